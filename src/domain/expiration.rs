use chrono::{DateTime, Months, TimeDelta, Utc};

use super::InvalidInput;

/// How long a new key stays valid; the server turns it into an `expire_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiration {
    Never,
    Days30,
    Days90,
    OneYear,
}

impl Expiration {
    /// When a key created at `now` expires; `None` for never.
    pub(crate) fn expire_time(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Never => None,
            Self::Days30 => Some(now + TimeDelta::days(30)),
            Self::Days90 => Some(now + TimeDelta::days(90)),
            // A calendar year: same day and time next year; 29 February becomes 28 February.
            // Only fails past year 262143, far beyond any clock this service runs on.
            Self::OneYear => now.checked_add_months(Months::new(12)),
        }
    }
}

/// When a new key stops being valid: a preset, or a custom time (GitHub-style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    Preset(Expiration),
    At(DateTime<Utc>),
}

/// A custom expiry lies at most this many months ahead (five calendar years).
const CUSTOM_EXPIRY_MAX_MONTHS: u32 = 60;

impl Expiry {
    /// When a key created at `now` expires; `None` for never. A custom time must lie after
    /// `now` and at most five years ahead.
    pub(crate) fn expire_time(
        self,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, InvalidInput> {
        match self {
            Self::Preset(preset) => Ok(preset.expire_time(now)),
            Self::At(at) if at <= now => Err(InvalidInput::ExpireTimeInPast),
            Self::At(at)
                if now
                    .checked_add_months(Months::new(CUSTOM_EXPIRY_MAX_MONTHS))
                    .is_none_or(|limit| at > limit) =>
            {
                Err(InvalidInput::ExpireTimeTooFar)
            }
            Self::At(at) => Ok(Some(at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_expiry_lies_in_the_next_five_years() {
        let now = at("2026-11-26T10:00:00Z");
        let expiry = |s| Expiry::At(at(s)).expire_time(now);
        assert_eq!(
            expiry("2026-11-26T10:00:00.000001Z"),
            Ok(Some(at("2026-11-26T10:00:00.000001Z")))
        );
        assert_eq!(
            expiry("2031-11-26T10:00:00Z"),
            Ok(Some(at("2031-11-26T10:00:00Z")))
        );
        assert_eq!(
            expiry("2026-11-26T10:00:00Z"),
            Err(InvalidInput::ExpireTimeInPast)
        );
        assert_eq!(
            expiry("2020-01-01T00:00:00Z"),
            Err(InvalidInput::ExpireTimeInPast)
        );
        assert_eq!(
            expiry("2031-11-26T10:00:00.000001Z"),
            Err(InvalidInput::ExpireTimeTooFar)
        );
        assert_eq!(Expiry::Preset(Expiration::Never).expire_time(now), Ok(None));
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn presets_count_from_creation() {
        let now = at("2026-01-15T10:00:00Z");
        assert_eq!(Expiration::Never.expire_time(now), None);
        assert_eq!(
            Expiration::Days30.expire_time(now),
            Some(at("2026-02-14T10:00:00Z"))
        );
        assert_eq!(
            Expiration::Days90.expire_time(now),
            Some(at("2026-04-15T10:00:00Z"))
        );
        assert_eq!(
            Expiration::OneYear.expire_time(now),
            Some(at("2027-01-15T10:00:00Z"))
        );
    }

    #[test]
    fn one_year_is_a_calendar_year() {
        // 2028 is a leap year: a year from 2027-03-01 is 366 days, from 2028-02-29 it is 28 Feb.
        assert_eq!(
            Expiration::OneYear.expire_time(at("2027-03-01T00:00:00Z")),
            Some(at("2028-03-01T00:00:00Z"))
        );
        assert_eq!(
            Expiration::OneYear.expire_time(at("2028-02-29T12:00:00Z")),
            Some(at("2029-02-28T12:00:00Z"))
        );
    }
}
