//! Whether text that people will read shows what it holds: key names, actor ids, anything
//! else that ends up in a table or the audit trail.

const ZWJ: char = '\u{200D}';
const VS16: char = '\u{FE0F}';

/// How a text would look to the person reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Legibility {
    /// Every character shows as itself.
    Legible,
    /// Nothing shows: empty, spaces, or only characters that are invisible.
    Blank,
    /// Something visible, and also a character that is invisible or changes how the rest
    /// shows (`"prod\u{202E}gnp.exe"` renders as "prodexe.png").
    Hidden,
}

/// Classifies `text`. Refused: control characters; bidi controls and marks (U+061C,
/// U+200E–200F, U+202A–202E, U+2066–2069); zero-width and other invisible format characters
/// (U+00AD, U+034F, U+180E, U+200B–200F, U+2060–206F, U+FEFF, Hangul fillers, …); line and
/// paragraph separators; tag characters (U+E0000–E007F, which can spell hidden text, so the
/// England, Scotland and Wales flags are refused too); noncharacters. Any script, combining
/// marks and emoji are legible. U+200D ZWJ is legible only between two pictographs (👩‍💻),
/// where emoji need it; elsewhere it is invisible, so Persian or Indic text must do without
/// explicit joiners. Variation selectors are legible after a visible character (❤️, 葛󠄀).
pub(crate) fn legibility(text: &str) -> Legibility {
    let mut hidden = false;
    let mut visible = false;
    let mut previous: Option<char> = None;
    // A pictograph came last, perhaps followed by U+FE0F (🏳️‍🌈 joins after the selector).
    let mut after_pictograph = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let legible = match c {
            ZWJ => after_pictograph && chars.peek().copied().is_some_and(is_pictograph),
            c if is_variation_selector(c) => previous.is_some_and(shows_as_itself),
            c => !c.is_control() && !is_invisible(c),
        };
        hidden |= !legible;
        visible |= shows_as_itself(c);
        after_pictograph = is_pictograph(c) || (c == VS16 && after_pictograph);
        previous = Some(c);
    }
    match (visible, hidden) {
        (false, _) => Legibility::Blank,
        (true, true) => Legibility::Hidden,
        (true, false) => Legibility::Legible,
    }
}

/// Draws something of its own: not space, not a selector, nothing invisible.
fn shows_as_itself(c: char) -> bool {
    !c.is_whitespace()
        && !c.is_control()
        && !is_invisible(c)
        && !is_variation_selector(c)
        // Braille blank renders as an empty cell: a favourite of blank-looking names.
        && c != '\u{2800}'
}

/// Invisible, reordering or not text at all: Unicode's default-ignorable format characters
/// (ZWJ included; variation selectors aside), line and paragraph separators, tags,
/// noncharacters.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E00FF}'
            | '\u{E01F0}'..='\u{E0FFF}'
            | '\u{FDD0}'..='\u{FDEF}'
    ) || (c as u32) & 0xFFFE == 0xFFFE
}

/// Picks a glyph variant of the character before it (emoji presentation, CJK variants).
fn is_variation_selector(c: char) -> bool {
    matches!(c, '\u{180B}'..='\u{180D}' | '\u{180F}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}')
}

/// Emoji and pictographs: a superset of Unicode's Extended_Pictographic (and the skin-tone
/// modifiers), enough for every ZWJ sequence Unicode recommends.
fn is_pictograph(c: char) -> bool {
    matches!(
        c,
        '\u{00A9}'
            | '\u{00AE}'
            | '\u{203C}'
            | '\u{2049}'
            | '\u{2122}'
            | '\u{2139}'
            | '\u{2190}'..='\u{21FF}'
            | '\u{2300}'..='\u{23FF}'
            | '\u{24C2}'
            | '\u{25A0}'..='\u{27BF}'
            | '\u{2934}'..='\u{2935}'
            | '\u{2B00}'..='\u{2BFF}'
            | '\u{3030}'
            | '\u{303D}'
            | '\u{3297}'
            | '\u{3299}'
            | '\u{1F000}'..='\u{1FAFF}'
            | '\u{1FC00}'..='\u{1FFFD}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_in_any_script_and_emoji_is_legible() {
        for text in [
            "Zapier integration",
            "Intégration façade",
            "مفتاح الإنتاج",
            "生产环境密钥",
            "उत्पादन कुंजी",
            "Ελληνικά",
            "key 🔑",
            "👩‍💻 dev",
            "👩🏽‍💻",
            "🏳️‍🌈 pride",
            "❤️‍🔥",
            "🧑‍🤝‍🧑 team",
            "👨‍👩‍👧",
            "🇫🇷 🇯🇵",
            "1️⃣",
            "葛\u{E0100}飾",
            "a\u{0301}",
        ] {
            assert_eq!(legibility(text), Legibility::Legible, "{text:?}");
        }
    }

    #[test]
    fn invisible_and_reordering_characters_are_hidden() {
        for text in [
            "prod\u{202E}gnp.exe",
            "a\u{202A}b",
            "a\u{2066}b\u{2069}",
            "a\u{061C}b",
            "a\u{200E}b",
            "a\u{200F}b",
            "a\u{200B}b",
            "a\u{200C}b",
            "a\u{2060}b",
            "a\u{2064}b",
            "\u{FEFF}name",
            "line\u{2028}break",
            "para\u{2029}break",
            "tag\u{E0041}\u{E0042}",
            "nonchar\u{FFFF}",
            "nonchar\u{FFFE}",
            "nonchar\u{FDD0}",
            "nonchar\u{10FFFF}",
            "soft\u{AD}hyphen",
            "bell\u{7}",
        ] {
            assert_eq!(legibility(text), Legibility::Hidden, "{text:?}");
        }
    }

    #[test]
    fn a_zero_width_joiner_is_legible_only_between_pictographs() {
        for text in [
            "a\u{200D}b",
            "\u{200D}👩",
            "👩\u{200D}",
            "👩\u{200D}a",
            "a\u{200D}💻",
            "a\u{FE0F}\u{200D}💻",
            "👩\u{200D}\u{200D}💻",
        ] {
            assert_eq!(legibility(text), Legibility::Hidden, "{text:?}");
        }
        assert_eq!(legibility("👩\u{200D}💻"), Legibility::Legible);
    }

    #[test]
    fn a_variation_selector_is_legible_only_after_a_visible_character() {
        assert_eq!(legibility("x \u{FE0F}"), Legibility::Hidden);
        assert_eq!(legibility("x\u{FE0F}\u{FE0F}"), Legibility::Hidden);
        assert_eq!(legibility("❤\u{FE0F}"), Legibility::Legible);
    }

    #[test]
    fn text_showing_nothing_is_blank() {
        for text in [
            "",
            "   ",
            "\u{200B}",
            "\u{2028}",
            "\u{FEFF}",
            "\u{E0041}",
            "\u{FFFF}",
            "\u{200D}",
            "\u{FE0F}",
            "\u{3164}",
            "\u{2800}\u{2800}",
            "\u{200B} \u{2060}",
        ] {
            assert_eq!(legibility(text), Legibility::Blank, "{text:?}");
        }
    }
}
