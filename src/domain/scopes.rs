//! What a key may be used for: short names such as `orders:read`, checked by gateways through
//! ValidateKey's `required_scopes`.

use sea_orm::DeriveValueType;

use super::InvalidInput;

/// A key holds at most this many scopes; a request may require at most this many.
pub const MAX_SCOPES: usize = 32;
const SCOPE_MAX_LEN: usize = 64;

/// Whether `scope` is 1–64 characters of `[a-z0-9_.:-]`. No space, so a space-separated
/// column holds a set unambiguously; lower case only, so `Orders:Read` cannot pass for a
/// different scope than `orders:read`.
pub fn is_scope(scope: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.:-".contains(&b);
    !scope.is_empty() && scope.len() <= SCOPE_MAX_LEN && scope.bytes().all(allowed)
}

/// A key's scopes: sorted, without duplicates, each well-formed, at most [`MAX_SCOPES`].
/// Stored as one text column (see [`Scopes::to_column`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
#[sea_orm(
    value_type = "String",
    from_str = "Scopes::from_column",
    to_str = "Scopes::to_column"
)]
pub struct Scopes(Vec<String>);

impl Scopes {
    pub fn parse<S: AsRef<str>>(input: &[S]) -> Result<Self, InvalidInput> {
        // Scopes are stored and shown; a well-formed key (all lower case, however unlikely)
        // must not end up there.
        let acceptable = |scope: &str| is_scope(scope) && !super::contains_key(scope);
        if !input.iter().all(|scope| acceptable(scope.as_ref())) {
            return Err(InvalidInput::ScopeInvalid);
        }
        let mut scopes: Vec<String> = input.iter().map(|s| s.as_ref().to_owned()).collect();
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.len() > MAX_SCOPES {
            return Err(InvalidInput::TooManyScopes);
        }
        Ok(Self(scopes))
    }

    /// As stored: sorted, separated by single spaces; '' for none.
    pub fn to_column(&self) -> String {
        self.0.join(" ")
    }

    /// As read back: the column was written by [`Scopes::to_column`].
    pub fn from_column(column: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(column_scopes(column).map(str::to_owned).collect()))
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// The scopes of a stored column, in order (an empty column has none).
pub fn column_scopes(column: &str) -> impl Iterator<Item = &str> {
    column.split(' ').filter(|scope| !scope.is_empty())
}

/// Checks a ValidateKey request's `required_scopes` without allocating: at most
/// [`MAX_SCOPES`], each well-formed.
pub fn check_required<S: AsRef<str>>(required: &[S]) -> Result<(), InvalidInput> {
    if required.len() > MAX_SCOPES || !required.iter().all(|s| is_scope(s.as_ref())) {
        return Err(InvalidInput::RequiredScopesInvalid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_sorted_and_deduplicated() {
        let scopes = Scopes::parse(&["orders:write", "orders:read", "orders:write"]).unwrap();
        assert_eq!(scopes.as_slice(), ["orders:read", "orders:write"]);
        assert_eq!(scopes.to_column(), "orders:read orders:write");
        assert_eq!(
            column_scopes(&scopes.to_column()).collect::<Vec<_>>(),
            ["orders:read", "orders:write"]
        );
        assert_eq!(Scopes::parse::<&str>(&[]).unwrap().to_column(), "");
        assert_eq!(column_scopes("").count(), 0);
    }

    #[test]
    fn ill_formed_scopes_are_rejected() {
        let too_long = "a".repeat(65);
        for scope in ["", "Orders", "a b", "a/b", "é", too_long.as_str()] {
            assert_eq!(
                Scopes::parse(&[scope]),
                Err(InvalidInput::ScopeInvalid),
                "{scope:?}"
            );
            assert_eq!(
                check_required(&[scope]),
                Err(InvalidInput::RequiredScopesInvalid)
            );
        }
        assert!(is_scope(&"a".repeat(64)));
        assert!(is_scope("billing.invoices:read_all-2"));
    }

    #[test]
    fn a_scope_holding_a_well_formed_key_is_rejected() {
        // A key whose random part and checksum happen to be all lower case and digits is
        // also a well-formed scope; the first of the keys `clo_000…0n` that is.
        let key = (0u64..)
            .map(|n| {
                let random = format!("{n:032}");
                let checksum = super::super::base62::encode_fixed::<6>(u64::from(crc32fast::hash(
                    random.as_bytes(),
                )));
                format!("clo_{random}{}", String::from_utf8_lossy(&checksum))
            })
            .find(|candidate| is_scope(candidate))
            .unwrap();
        assert!(
            super::super::contains_key(&key),
            "{key} is a well-formed key"
        );

        assert_eq!(
            Scopes::parse(&["orders:read", key.as_str()]),
            Err(InvalidInput::ScopeInvalid)
        );
    }

    #[test]
    fn at_most_32_distinct_scopes() {
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        assert_eq!(Scopes::parse(&many), Err(InvalidInput::TooManyScopes));
        assert_eq!(Scopes::parse(&many[..32]).unwrap().as_slice().len(), 32);
        // Duplicates do not count against the limit.
        let repeated = vec!["a"; 100];
        assert_eq!(Scopes::parse(&repeated).unwrap().as_slice(), ["a"]);
        assert_eq!(
            check_required(&many),
            Err(InvalidInput::RequiredScopesInvalid)
        );
        assert_eq!(check_required(&many[..32]), Ok(()));
    }
}
