//! The API key itself: `clo_` + 32 random base62 characters + a 6-character CRC-32 checksum.

use std::fmt;

use super::base62;

pub const KEY_PREFIX: &str = "clo_";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// Length of a well-formed key: prefix, random part, checksum.
pub const KEY_LEN: usize = KEY_PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// What a masked key shows in place of the secret part.
const MASK: &str = "clo_********";
/// How many trailing characters of the key the masked preview keeps.
const SUFFIX_LEN: usize = 4;

/// A full API key, as generated for CreateKey. Its `Debug` and `Display` print `clo_****`, so a
/// stray `{:?}` in a log line cannot leak it; the only way to the value is `expose`.
pub struct Secret(String);

impl Secret {
    /// A new key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let random = base62::random(RANDOM_LEN);
        let checksum = checksum(random.as_bytes());
        let mut key = String::with_capacity(KEY_LEN);
        key.push_str(KEY_PREFIX);
        key.push_str(&random);
        // The checksum bytes are base62 ASCII.
        key.extend(checksum.iter().map(|&b| char::from(b)));
        Self(key)
    }

    /// The full key. Call only to hand it to its owner, once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.0.as_bytes())
    }

    /// The last characters of the key, kept for the masked preview.
    pub(crate) fn suffix(&self) -> &str {
        &self.0[KEY_LEN - SUFFIX_LEN..]
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("clo_****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("clo_****")
    }
}

/// The preview shown in lists: `clo_********` + the key's last four characters.
pub fn masked_key(suffix: &str) -> String {
    format!("{MASK}{suffix}")
}

/// A presented key that is well-formed: right length, prefix, alphabet and checksum.
/// Parsing allocates nothing. Like [`Secret`], it never prints its value.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a>(&'a str);

/// Why a presented key is not well-formed. Carries nothing of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("a key is {KEY_LEN} characters long")]
    WrongLength,
    #[error("a key starts with {KEY_PREFIX}")]
    WrongPrefix,
    #[error("a key holds only base62 characters after its prefix")]
    WrongAlphabet,
    #[error("the key's checksum does not match")]
    BadChecksum,
}

impl<'a> PresentedKey<'a> {
    pub fn parse(input: &'a str) -> Result<Self, MalformedKey> {
        let bytes = input.as_bytes();
        if bytes.len() != KEY_LEN {
            return Err(MalformedKey::WrongLength);
        }
        if !bytes.starts_with(KEY_PREFIX.as_bytes()) {
            return Err(MalformedKey::WrongPrefix);
        }
        let body = &bytes[KEY_PREFIX.len()..];
        if !body.iter().all(|&b| base62::is_base62(b)) {
            return Err(MalformedKey::WrongAlphabet);
        }
        let (random, given) = body.split_at(RANDOM_LEN);
        if checksum(random) != given {
            return Err(MalformedKey::BadChecksum);
        }
        Ok(Self(input))
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.0.as_bytes())
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("clo_****")
    }
}

/// Whether `text` holds a well-formed key anywhere: such text must never be stored or logged as
/// a name or an id (someone pasted the secret in the wrong field).
pub fn contains_key(text: &str) -> bool {
    text.match_indices(KEY_PREFIX).any(|(at, _)| {
        text.get(at..at + KEY_LEN)
            .is_some_and(|candidate| PresentedKey::parse(candidate).is_ok())
    })
}

/// CRC-32 (IEEE) of the random part, in 6 base62 digits.
fn checksum(random: &[u8]) -> [u8; CHECKSUM_LEN] {
    base62::encode_fixed(u64::from(crc32fast::hash(random)))
}

/// blake3 of the full key: what the database stores and the index is keyed by. A fast hash is
/// right for a 190-bit random secret; a password KDF would only slow validation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    fn of(key: &[u8]) -> Self {
        Self(*blake3::hash(key).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell hashes apart in a debug dump.
        write!(
            f,
            "KeyHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_generated_key_has_the_documented_shape() {
        let key = Secret::generate();
        let s = key.expose();
        assert_eq!(s.len(), 42);
        assert!(s.starts_with("clo_"));
        assert!(s[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn the_checksum_is_crc32_of_the_random_part_in_base62() {
        // CRC-32 of 32 '0' characters is 0xA0F292D0 = 2700251856; in base62 that is 2wjyrI.
        let random = "0".repeat(32);
        assert_eq!(crc32fast::hash(random.as_bytes()), 0xA0F2_92D0);
        let key = format!("clo_{random}2wjyrI");
        assert!(PresentedKey::parse(&key).is_ok());
    }

    #[test]
    fn secrets_never_print_their_value() {
        let key = Secret::generate();
        assert_eq!(format!("{key:?}"), "clo_****");
        assert_eq!(format!("{key}"), "clo_****");
        let presented = PresentedKey::parse(key.expose()).unwrap();
        assert_eq!(format!("{presented:?}"), "clo_****");
    }

    #[test]
    fn the_masked_key_shows_only_the_last_four_characters() {
        let key = Secret::generate();
        let masked = masked_key(key.suffix());
        assert_eq!(masked, format!("clo_********{}", &key.expose()[38..]));
        assert_eq!(masked.len(), 16);
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(
            PresentedKey::parse("").err(),
            Some(MalformedKey::WrongLength)
        );
        assert_eq!(
            PresentedKey::parse(&"x".repeat(10_240)).err(),
            Some(MalformedKey::WrongLength)
        );
        let key = Secret::generate();
        let wrong_prefix = format!("sk_{}", &key.expose()[3..]);
        assert_eq!(
            PresentedKey::parse(&wrong_prefix).err(),
            Some(MalformedKey::WrongPrefix)
        );
        let with_dash = format!("{}-{}", &key.expose()[..10], &key.expose()[11..]);
        assert_eq!(
            PresentedKey::parse(&with_dash).err(),
            Some(MalformedKey::WrongAlphabet)
        );
        // A multi-byte character of the right byte length is not base62 either.
        let with_accent = format!("{}é{}", &key.expose()[..10], &key.expose()[12..]);
        assert_eq!(
            PresentedKey::parse(&with_accent).err(),
            Some(MalformedKey::WrongAlphabet)
        );
    }

    #[test]
    fn a_key_inside_other_text_is_found() {
        let key = Secret::generate();
        assert!(contains_key(key.expose()));
        assert!(contains_key(&format!("my key is {}!", key.expose())));
        assert!(!contains_key(&key.expose()[..41]));
        assert!(!contains_key("clo_ is our prefix"));
        assert!(!contains_key("Zapier integration"));
    }

    #[test]
    fn the_hash_of_a_presented_key_equals_the_hash_of_the_issued_key() {
        let key = Secret::generate();
        let presented = PresentedKey::parse(key.expose()).unwrap();
        assert_eq!(presented.hash(), key.hash());
        assert_eq!(KeyHash::from_slice(key.hash().as_bytes()), Some(key.hash()));
    }

    proptest! {
        #[test]
        fn every_generated_key_parses(_seed in any::<u64>()) {
            let key = Secret::generate();
            prop_assert!(PresentedKey::parse(key.expose()).is_ok());
        }

        #[test]
        fn any_one_character_change_is_rejected(position in 0..KEY_LEN, replacement in 0..62usize) {
            let key = Secret::generate();
            let mut bytes = key.expose().as_bytes().to_vec();
            let new = base62::ALPHABET[replacement];
            prop_assume!(bytes[position] != new);
            bytes[position] = new;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(PresentedKey::parse(&changed).is_err());
        }
    }
}
