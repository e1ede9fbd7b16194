use std::fmt;

use sea_orm::DeriveValueType;

use super::InvalidInput;

/// A workspace identifier: 1–64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, DeriveValueType)]
pub struct WorkspaceId(String);

const WORKSPACE_ID_MAX_LEN: usize = 64;

impl WorkspaceId {
    pub fn parse(input: &str) -> Result<Self, InvalidInput> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        // A secret pasted here would be stored and logged as an id.
        if input.is_empty()
            || input.len() > WORKSPACE_ID_MAX_LEN
            || !input.bytes().all(allowed)
            || super::contains_key(input)
        {
            return Err(InvalidInput::WorkspaceIdInvalid);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<WorkspaceId> for String {
    fn from(value: WorkspaceId) -> Self {
        value.0
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_workspace_ids_are_accepted() {
        for id in [
            "ws_1",
            "acme.prod",
            "tenant:42",
            "A-b_c.d:e",
            &"w".repeat(64),
        ] {
            assert_eq!(WorkspaceId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn empty_long_or_odd_workspace_ids_are_rejected() {
        for id in [
            "",
            &"w".repeat(65),
            "has space",
            "slash/y",
            "é",
            "new\nline",
        ] {
            assert_eq!(
                WorkspaceId::parse(id),
                Err(InvalidInput::WorkspaceIdInvalid),
                "{id:?}"
            );
        }
        let key = super::super::Secret::generate();
        assert_eq!(
            WorkspaceId::parse(key.expose()),
            Err(InvalidInput::WorkspaceIdInvalid)
        );
    }
}
