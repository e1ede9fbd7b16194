//! What a key carries besides its identity: who it belongs to in the customer's own terms
//! (`owner_id`), labels returned on every validation (`annotations`) and the client
//! addresses it may be used from (`allowed_cidrs`). Each can only hold a valid value, and
//! each is stored as one text column.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use sea_orm::DeriveValueType;

use super::{InvalidInput, contains_key, is_scope};

/// The longest `owner_id`, in characters.
pub(super) const OWNER_ID_MAX_LEN: usize = 128;
/// A key has at most this many annotations.
pub(super) const MAX_ANNOTATIONS: usize = 16;
/// The longest annotation value, in bytes.
pub(super) const ANNOTATION_VALUE_MAX_BYTES: usize = 256;
/// A key has at most this many allowed CIDRs.
pub(super) const MAX_CIDRS: usize = 64;

/// The customer's own id for the user or service a key belongs to: 1–128 visible ASCII
/// characters (no space: it travels as an HTTP header value), or none.
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
pub struct OwnerId(String);

impl OwnerId {
    /// '' is no owner.
    pub fn parse(input: &str) -> Result<Self, InvalidInput> {
        let visible = input.bytes().all(|b| b.is_ascii_graphic());
        if input.len() > OWNER_ID_MAX_LEN || !visible || contains_key(input) {
            return Err(InvalidInput::OwnerIdInvalid);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<OwnerId> for String {
    fn from(owner: OwnerId) -> Self {
        owner.0
    }
}

/// A key's annotations: at most [`MAX_ANNOTATIONS`], each key named like a scope, each value
/// at most [`ANNOTATION_VALUE_MAX_BYTES`] bytes without control characters (values travel as
/// HTTP header values). Stored as a JSON object; '' for none.
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
#[sea_orm(
    value_type = "String",
    from_str = "Annotations::from_column",
    to_str = "Annotations::to_column"
)]
pub struct Annotations(BTreeMap<String, String>);

impl Annotations {
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, InvalidInput> {
        // Sorted first, so the reason given for several bad entries is always the same one.
        let entries: BTreeMap<&String, &String> = entries.into_iter().collect();
        if entries.len() > MAX_ANNOTATIONS {
            return Err(InvalidInput::TooManyAnnotations);
        }
        let mut map = BTreeMap::new();
        for (key, value) in entries {
            if !is_scope(key) || contains_key(key) {
                return Err(InvalidInput::AnnotationKeyInvalid);
            }
            let clean = !value.chars().any(char::is_control);
            if value.len() > ANNOTATION_VALUE_MAX_BYTES || !clean || contains_key(value) {
                return Err(InvalidInput::AnnotationValueInvalid);
            }
            map.insert(key.clone(), value.clone());
        }
        Ok(Self(map))
    }

    /// As stored: a JSON object of strings, '' for none.
    pub fn to_column(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        serde_json::to_string(&self.0).unwrap_or_default()
    }

    /// As read back: the column was written by [`Annotations::to_column`]; anything else
    /// reads as none.
    pub fn from_column(column: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(column_annotations(column)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// The annotations of a stored column, sorted by key.
pub fn column_annotations(column: &str) -> BTreeMap<String, String> {
    if column.is_empty() {
        return BTreeMap::new();
    }
    serde_json::from_str(column).unwrap_or_default()
}

/// An IPv4 or IPv6 network: an address with no bits set past its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32 or /128. An address with bits
    /// set past the prefix (`10.0.0.1/8`) is refused rather than silently widened.
    pub fn parse(input: &str) -> Option<Self> {
        let (address, prefix) = match input.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (input, None),
        };
        let mut network: IpAddr = address.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: no sign, no space.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().ok().filter(|p| *p <= max)?
            }
            Some(_) => return None,
        };
        // An IPv4-mapped network (`::ffff:192.0.2.0/120`) is the IPv4 one it maps, as a
        // client's mapped address is judged as its IPv4 address; one that also spans
        // addresses that map nothing is refused.
        let mut prefix: u8 = prefix;
        if let IpAddr::V6(v6) = network
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            prefix = prefix.checked_sub(96)?;
            network = IpAddr::V4(v4);
        }
        let cidr = Self { network, prefix };
        (cidr.masked(network) == network).then_some(cidr)
    }

    /// `ip` with the bits past this network's prefix cleared; `ip` is of the same family.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(ip) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask))
            }
        }
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, as
    /// a dual-stack listener reports IPv4 clients) is the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The networks a key may be used from: at most [`MAX_CIDRS`], sorted, without duplicates;
/// none means any address. Stored separated by single spaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
#[sea_orm(
    value_type = "String",
    from_str = "AllowedCidrs::from_column",
    to_str = "AllowedCidrs::to_column"
)]
pub struct AllowedCidrs(Vec<Cidr>);

impl AllowedCidrs {
    pub fn parse<S: AsRef<str>>(input: &[S]) -> Result<Self, InvalidInput> {
        // Duplicates are dropped, but no list of them needs to be this long: bound the work.
        if input.len() > 4 * MAX_CIDRS {
            return Err(InvalidInput::TooManyCidrs);
        }
        let mut cidrs = input
            .iter()
            .map(|cidr| Cidr::parse(cidr.as_ref().trim()))
            .collect::<Option<Vec<_>>>()
            .ok_or(InvalidInput::CidrInvalid)?;
        cidrs.sort_unstable();
        cidrs.dedup();
        if cidrs.len() > MAX_CIDRS {
            return Err(InvalidInput::TooManyCidrs);
        }
        Ok(Self(cidrs))
    }

    pub fn to_column(&self) -> String {
        self.to_strings().join(" ")
    }

    pub fn from_column(column: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(column_cidrs(column).collect()))
    }

    /// In canonical form: `10.0.0.0/8`, a bare address as `/32` or `/128`.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(Cidr::to_string).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The networks of a stored column (anything unparsable is skipped: the column is written
/// from parsed values only).
pub fn column_cidrs(column: &str) -> impl Iterator<Item = Cidr> + '_ {
    column.split(' ').filter_map(Cidr::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_bare_address_is_a_single_host_network() {
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            Cidr::parse("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
    }

    #[test]
    fn networks_contain_their_addresses_and_no_others() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(!net.contains(ip("::1")));
        // An IPv4 client seen through a dual-stack socket.
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::9")));
        assert!(!v6.contains(ip("2001:db9::")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("203.0.113.9"))
        );
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::")));
        // A network written IPv4-mapped is the IPv4 one, and holds mapped clients too.
        let mapped = Cidr::parse("::ffff:192.0.2.0/120").unwrap();
        assert_eq!(mapped.to_string(), "192.0.2.0/24");
        assert!(mapped.contains(ip("::ffff:192.0.2.1")));
        assert!(mapped.contains(ip("192.0.2.1")));
        assert_eq!(Cidr::parse("::ffff:192.0.2.0/64"), None);
    }

    #[test]
    fn malformed_or_widened_networks_are_refused() {
        for bad in [
            "",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "::/129",
            "example.com",
            "10.0.0.0/8/8",
            "10.0.0.256",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn allowed_cidrs_are_sorted_deduplicated_and_bounded() {
        let cidrs = AllowedCidrs::parse(&["10.0.0.0/8", "192.0.2.1", "10.0.0.0/8"]).unwrap();
        assert_eq!(cidrs.to_strings(), ["10.0.0.0/8", "192.0.2.1/32"]);
        assert_eq!(
            AllowedCidrs::from_column(&cidrs.to_column()).unwrap(),
            cidrs
        );
        let many: Vec<String> = (0..=MAX_CIDRS).map(|i| format!("10.0.{i}.0/24")).collect();
        assert_eq!(AllowedCidrs::parse(&many), Err(InvalidInput::TooManyCidrs));
        assert_eq!(
            AllowedCidrs::parse(&["10.0.0.1/8"]),
            Err(InvalidInput::CidrInvalid)
        );
    }

    #[test]
    fn annotations_are_bounded_and_round_trip() {
        let entries = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let parse = |pairs: &[(&str, &str)]| {
            let owned = entries(pairs);
            Annotations::parse(owned.iter().map(|(k, v)| (k, v)))
        };
        let ok = parse(&[("tier", "gold"), ("region", "eu-west €")]).unwrap();
        assert_eq!(Annotations::from_column(&ok.to_column()).unwrap(), ok);
        assert_eq!(ok.get("tier"), Some("gold"));
        assert_eq!(
            parse(&[("Tier", "gold")]),
            Err(InvalidInput::AnnotationKeyInvalid)
        );
        assert_eq!(
            parse(&[("tier", "a\r\nb")]),
            Err(InvalidInput::AnnotationValueInvalid)
        );
        let long = "x".repeat(ANNOTATION_VALUE_MAX_BYTES + 1);
        assert_eq!(
            parse(&[("tier", long.as_str())]),
            Err(InvalidInput::AnnotationValueInvalid)
        );
        let keys: Vec<String> = (0..=MAX_ANNOTATIONS).map(|i| format!("k{i}")).collect();
        let many: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        assert_eq!(parse(&many), Err(InvalidInput::TooManyAnnotations));
        assert!(Annotations::from_column("").unwrap().is_empty());
    }

    #[test]
    fn an_owner_id_is_visible_ascii_up_to_128_characters() {
        assert!(OwnerId::parse("").unwrap().is_empty());
        assert_eq!(OwnerId::parse("user_42").unwrap().as_str(), "user_42");
        assert!(OwnerId::parse(&"u".repeat(OWNER_ID_MAX_LEN)).is_ok());
        for bad in [
            "u".repeat(OWNER_ID_MAX_LEN + 1),
            "two words".into(),
            "tab\t".into(),
            "é".into(),
        ] {
            assert_eq!(OwnerId::parse(&bad), Err(InvalidInput::OwnerIdInvalid));
        }
    }
}
