use std::fmt;

use sea_orm::DeriveValueType;

use super::{InvalidInput, base62};

/// A key's public identifier: `key_` + 20 random base62 characters (≈119 bits). Random, so it
/// reveals nothing about the secret or about how many keys exist.
///
/// Stored as text (read back without re-checking: only this type writes the column).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, DeriveValueType)]
pub struct KeyId(String);

const PREFIX: &str = "key_";
const RANDOM_LEN: usize = 20;

impl KeyId {
    pub fn generate() -> Self {
        Self(format!("{PREFIX}{}", base62::random(RANDOM_LEN)))
    }

    pub fn parse(input: &str) -> Result<Self, InvalidInput> {
        let well_formed = input.len() == PREFIX.len() + RANDOM_LEN
            && input.starts_with(PREFIX)
            && input.bytes().skip(PREFIX.len()).all(base62::is_base62);
        if !well_formed {
            return Err(InvalidInput::KeyIdInvalid);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<KeyId> for String {
    fn from(value: KeyId) -> Self {
        value.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = KeyId::generate();
        assert_eq!(KeyId::parse(a.as_str()), Ok(a.clone()));
        assert_ne!(a, KeyId::generate());
    }

    #[test]
    fn ill_formed_ids_are_rejected() {
        for id in [
            "",
            "key_",
            "key_short",
            "kex_AAAAAAAAAAAAAAAAAAAA",
            "key_AAAAAAAAAAAAAAAAAAA!",
            "key_AAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(KeyId::parse(id), Err(InvalidInput::KeyIdInvalid), "{id:?}");
        }
    }
}
