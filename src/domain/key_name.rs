use std::fmt;

use sea_orm::DeriveValueType;

use super::{InvalidInput, Legibility, legibility};

/// A key's friendly label: 1–100 characters after trimming, every one shown as written (see
/// [`legibility`]).
#[derive(Debug, Clone, PartialEq, Eq, DeriveValueType)]
pub struct KeyName(String);

const KEY_NAME_MAX_CHARS: usize = 100;

impl KeyName {
    pub fn parse(input: &str) -> Result<Self, InvalidInput> {
        let trimmed = input.trim();
        // A name that shows nothing is empty to whoever reads the list, whatever it holds.
        let legibility = legibility(trimmed);
        if legibility == Legibility::Blank {
            return Err(InvalidInput::NameEmpty);
        }
        // Count characters, not bytes: "Intégration Zapier" is as long as it looks.
        if trimmed.chars().count() > KEY_NAME_MAX_CHARS {
            return Err(InvalidInput::NameTooLong);
        }
        // Names are shown to people deciding which key to delete: what they read must be
        // what the name is.
        if legibility == Legibility::Hidden {
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

impl From<KeyName> for String {
    fn from(value: KeyName) -> Self {
        value.0
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
    fn a_name_with_invisible_or_reordering_characters_is_rejected() {
        for name in [
            "prod\u{202E}gnp.exe",
            "line\u{2028}separator",
            "\u{FEFF}bom",
            "tags\u{E0041}\u{E0042}",
            "nonchar\u{FFFF}",
            "zero\u{200B}width",
            "a\u{200D}b",
        ] {
            assert_eq!(
                KeyName::parse(name),
                Err(InvalidInput::NameInvalidCharacters),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_name_that_shows_nothing_is_empty() {
        for name in [
            "\u{200B}",
            " \u{2028} ",
            "\u{FEFF}",
            "\u{E0041}",
            "\u{FFFF}",
        ] {
            assert_eq!(
                KeyName::parse(name),
                Err(InvalidInput::NameEmpty),
                "{name:?}"
            );
        }
    }

    #[test]
    fn names_in_any_script_and_with_emoji_are_accepted() {
        for name in [
            "مفتاح الإنتاج",
            "生产环境 CI",
            "उत्पादन कुंजी",
            "Intégration Zapier",
            "\u{1F469}\u{200D}\u{1F4BB} dev laptop",
            "🇫🇷 prod ❤️",
        ] {
            assert_eq!(KeyName::parse(name).unwrap().as_str(), name);
        }
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
