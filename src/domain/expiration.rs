use chrono::{DateTime, Months, TimeDelta, Utc};

/// How long a new key stays valid; the server turns it into an `expire_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiration {
    Never,
    Days30,
    Days90,
    OneYear,
}

impl Expiration {
    /// When a key created at `now` expires; `None` for never.
    pub fn expire_time(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
