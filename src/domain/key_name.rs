use std::fmt;

use super::InvalidInput;

/// A key's friendly label: 1–100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

const KEY_NAME_MAX_CHARS: usize = 100;

impl KeyName {
    pub fn parse(input: &str) -> Result<Self, InvalidInput> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(InvalidInput::NameEmpty);
        }
        // Count characters, not bytes: "Intégration Zapier" is as long as it looks.
        if trimmed.chars().count() > KEY_NAME_MAX_CHARS {
            return Err(InvalidInput::NameTooLong);
        }
        if trimmed.chars().any(char::is_control) {
            return Err(InvalidInput::NameInvalidCharacters);
        }
        // Names are shown in tables and logs; a pasted secret must not end up there.
        if super::contains_key(trimmed) {
            return Err(InvalidInput::NameContainsKey);
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_trimmed() {
        assert_eq!(
            KeyName::parse("  Zapier integration \t").unwrap().as_str(),
            "Zapier integration"
        );
    }

    #[test]
    fn a_name_of_100_characters_is_accepted_even_if_multibyte() {
        let name = "é".repeat(100);
        assert_eq!(KeyName::parse(&name).unwrap().as_str(), name);
    }

    #[test]
    fn a_name_longer_than_100_characters_is_rejected() {
        assert_eq!(
            KeyName::parse(&"a".repeat(101)),
            Err(InvalidInput::NameTooLong)
        );
    }

    #[test]
    fn an_empty_or_blank_name_is_rejected() {
        assert_eq!(KeyName::parse(""), Err(InvalidInput::NameEmpty));
        assert_eq!(KeyName::parse(" \n\t "), Err(InvalidInput::NameEmpty));
    }

    #[test]
    fn a_name_holding_an_api_key_is_rejected() {
        let key = super::super::Secret::generate();
        let name = format!("prod {}", key.expose());
        assert_eq!(KeyName::parse(&name), Err(InvalidInput::NameContainsKey));
    }

    #[test]
    fn a_name_with_control_characters_is_rejected() {
        for name in ["line\nbreak", "bell\u{7}", "nul\0", "esc\u{1b}[31m"] {
            assert_eq!(
                KeyName::parse(name),
                Err(InvalidInput::NameInvalidCharacters),
                "{name:?}"
            );
        }
    }
}
