//! Base62 with the alphabet `0-9A-Za-z`, as used by keys, checksums and key ids.

use rand::{RngCore, TryRngCore, rngs::OsRng};

pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` characters drawn uniformly from the alphabet with the operating system's CSPRNG.
pub(crate) fn random(len: usize) -> String {
    // OsRng failing means the OS has no entropy to give; there is no safe way to go on.
    let mut rng = OsRng.unwrap_err();
    let mut out = String::with_capacity(len);
    // One read of the OS generator for the lot (not one per character); bytes of 248 and
    // above are dropped so that `byte % 62` stays uniform.
    let mut bytes = [0u8; 64];
    while out.len() < len {
        rng.fill_bytes(&mut bytes);
        for &byte in bytes.iter().filter(|&&b| b < 248) {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(byte % 62)]));
        }
    }
    out
}

pub(crate) fn is_base62(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
}

/// `value` in base62, most significant digit first, left-padded with `0` to `N` digits.
/// `value` must fit in `N` digits.
pub(crate) fn encode_fixed<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    debug_assert_eq!(value, 0, "value does not fit in {N} base62 digits");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_most_significant_digit_first_and_zero_padded() {
        assert_eq!(&encode_fixed::<6>(0), b"000000");
        assert_eq!(&encode_fixed::<6>(61), b"00000z");
        assert_eq!(&encode_fixed::<6>(62), b"000010");
        assert_eq!(&encode_fixed::<6>(u32::MAX as u64), b"4gfFC3");
    }

    #[test]
    fn random_characters_cover_the_alphabet_evenly() {
        let sample = random(62 * 1000);
        for &c in ALPHABET {
            let n = sample.bytes().filter(|&b| b == c).count();
            // Expected 1000 each; 6 standard deviations either way.
            assert!((810..=1190).contains(&n), "{} drawn {n} times", c as char);
        }
    }

    #[test]
    fn random_strings_use_only_the_alphabet_and_differ() {
        let a = random(32);
        let b = random(32);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(is_base62));
        assert_ne!(a, b);
    }
}
