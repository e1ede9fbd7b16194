//! Per-key credits: a balance that validations spend from and that may refill once per day
//! or month. Pure: the store keeps the balance, the index what this replica holds of it.
//!
//! The balance lives in the database as an *account* (the key's own id, shared by the keys
//! a rotation issues from it, so rotating never mints credits). A replica leases a slice of
//! it at a time and spends the slice in memory; what it leased is gone from the account
//! before any of it is spent, so no number of replicas can spend more than the account had.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sea_orm::DeriveValueType;
use serde_json::{Value, json};

use super::InvalidInput;

/// The largest balance and refill amount.
pub(super) const MAX_CREDITS: i64 = 1_000_000_000_000;

/// How often a balance refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefillInterval {
    /// Every day at 00:00 UTC.
    Daily,
    /// Every month on its `day_of_month` at 00:00 UTC (the month's last day when it is
    /// shorter).
    Monthly,
}

/// A refill: the balance becomes `amount` (not `amount` more) at the start of each period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub amount: i64,
    pub interval: RefillInterval,
    /// 1–31 for a monthly refill; 0 for a daily one.
    pub day_of_month: u8,
}

const DAY_US: i64 = 86_400_000_000;

impl Refill {
    /// `interval`: `None` when unspecified. A daily refill takes no day (0); a monthly one a
    /// day of 1–31.
    pub fn parse(
        amount: i64,
        interval: Option<RefillInterval>,
        day_of_month: i32,
    ) -> Result<Self, InvalidInput> {
        if !(1..=MAX_CREDITS).contains(&amount) {
            return Err(InvalidInput::RefillInvalid);
        }
        let day_of_month = match interval {
            None => return Err(InvalidInput::RefillInvalid),
            Some(RefillInterval::Daily) if day_of_month == 0 => 0,
            Some(RefillInterval::Monthly) if (1..=31).contains(&day_of_month) => day_of_month as u8,
            Some(_) => return Err(InvalidInput::RefillInvalid),
        };
        Ok(Self {
            amount,
            interval: interval.unwrap_or(RefillInterval::Daily),
            day_of_month,
        })
    }

    /// The period holding `now_us`: its start and end, in microseconds since the epoch.
    pub fn period_us(&self, now_us: i64) -> (i64, i64) {
        match self.interval {
            RefillInterval::Daily => {
                let start = now_us - now_us.rem_euclid(DAY_US);
                (start, start + DAY_US)
            }
            RefillInterval::Monthly => {
                let now = DateTime::from_timestamp_micros(now_us).unwrap_or_default();
                let (year, month) = (now.year(), now.month());
                let this = refill_day(year, month, self.day_of_month);
                let (start, end) = if this <= now.date_naive() {
                    let (y, m) = next_month(year, month);
                    (this, refill_day(y, m, self.day_of_month))
                } else {
                    let (y, m) = previous_month(year, month);
                    (refill_day(y, m, self.day_of_month), this)
                };
                (midnight_us(start), midnight_us(end))
            }
        }
    }
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

/// The month's `day`, or its last day when it has fewer.
fn refill_day(year: i32, month: u32, day: u8) -> NaiveDate {
    (1..=u32::from(day))
        .rev()
        .find_map(|day| NaiveDate::from_ymd_opt(year, month, day))
        .unwrap_or_default()
}

fn midnight_us(date: NaiveDate) -> i64 {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
        .timestamp_micros()
}

/// The period of a balance at `now_us`: `(0, i64::MAX)` without refill.
pub fn credit_period_us(refill: Option<&Refill>, now_us: i64) -> (i64, i64) {
    refill.map_or((0, i64::MAX), |refill| refill.period_us(now_us))
}

/// Credits as an admin sets them: a balance and, optionally, its refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub remaining: i64,
    pub refill: Option<Refill>,
}

impl Credits {
    pub fn parse(remaining: i64, refill: Option<Refill>) -> Result<Self, InvalidInput> {
        if !(0..=MAX_CREDITS).contains(&remaining) {
            return Err(InvalidInput::CreditsInvalid);
        }
        Ok(Self { remaining, refill })
    }
}

/// What a key's row says of its credits: whose account it spends from, which setting of it
/// (a new setting voids what replicas leased of the old), and the refill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditPlan {
    /// The id of the key whose credits these are (a key issued by rotation keeps its
    /// predecessor's).
    pub account: Box<str>,
    /// Grows with every setting of the balance by an admin.
    pub generation: i64,
    pub refill: Option<Refill>,
}

/// A key's credits as stored in its row: `None` for unlimited. A JSON object
/// (`{"account":…,"generation":…,"refill":{"amount":…,"interval":"daily"|"monthly","day":…}}`),
/// '' for none.
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
#[sea_orm(
    value_type = "String",
    from_str = "KeyCredits::from_column",
    to_str = "KeyCredits::to_column"
)]
pub struct KeyCredits(pub Option<CreditPlan>);

impl KeyCredits {
    pub fn plan(&self) -> Option<&CreditPlan> {
        self.0.as_ref()
    }

    pub fn to_column(&self) -> String {
        let Some(plan) = &self.0 else {
            return String::new();
        };
        let refill = plan.refill.map_or(Value::Null, |refill| {
            json!({
                "amount": refill.amount,
                "interval": match refill.interval {
                    RefillInterval::Daily => "daily",
                    RefillInterval::Monthly => "monthly",
                },
                "day": refill.day_of_month,
            })
        });
        json!({"account": &*plan.account, "generation": plan.generation, "refill": refill})
            .to_string()
    }

    /// As read back: written by [`KeyCredits::to_column`]; anything else is no credits.
    pub fn from_column(column: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(column_credits(column)))
    }
}

/// The plan of a stored column.
pub fn column_credits(column: &str) -> Option<CreditPlan> {
    if column.is_empty() {
        return None;
    }
    let value: Value = serde_json::from_str(column).ok()?;
    let refill = match value.get("refill") {
        Some(Value::Object(refill)) => Some(Refill {
            amount: refill.get("amount")?.as_i64()?,
            interval: match refill.get("interval")?.as_str()? {
                "daily" => RefillInterval::Daily,
                "monthly" => RefillInterval::Monthly,
                _ => return None,
            },
            day_of_month: u8::try_from(refill.get("day")?.as_u64()?).ok()?,
        }),
        _ => None,
    };
    Some(CreditPlan {
        account: value.get("account")?.as_str()?.into(),
        generation: value.get("generation")?.as_i64()?,
        refill,
    })
}

/// What a validation spends from its key's credits: `None` is 1.
pub fn parse_credit_cost(cost: Option<i64>) -> Result<i64, InvalidInput> {
    match cost {
        None => Ok(1),
        Some(cost) if cost >= 0 => Ok(cost),
        Some(_) => Err(InvalidInput::CostInvalid),
    }
}

/// A slice of an account leased to one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLease {
    pub generation: i64,
    /// The period the slice belongs to; it is void once the period ends.
    pub period_start_us: i64,
    pub period_end_us: i64,
    pub granted: i64,
    /// What the account had left, unleased, once this slice was taken.
    pub unleased: i64,
}

/// The most one lease takes: a replica killed without a graceful stop loses at most what it
/// held, two leases' worth.
pub const MAX_LEASE: i64 = 1_000;

/// How much of `remaining` a lease that needs at least `need` takes: nothing when `need` is
/// more than there is (no slice is stranded on a replica that cannot use it), else a
/// sixteenth of what is left (so several replicas share the last of a balance), at least
/// `need` and at most [`MAX_LEASE`] beyond it.
pub fn lease_size(remaining: i64, need: i64) -> i64 {
    if need > remaining || remaining <= 0 {
        return 0;
    }
    let slice = (remaining / 16).clamp(1, MAX_LEASE);
    need.max(slice).min(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    #[test]
    fn a_daily_refill_runs_from_midnight_to_midnight_utc() {
        let refill = Refill::parse(10, Some(RefillInterval::Daily), 0).unwrap();
        assert_eq!(
            refill.period_us(at("2026-12-03T15:00:00Z")),
            (at("2026-12-03T00:00:00Z"), at("2026-12-04T00:00:00Z"))
        );
    }

    #[test]
    fn a_monthly_refill_on_the_31st_falls_on_the_last_day_of_short_months() {
        let refill = Refill::parse(10, Some(RefillInterval::Monthly), 31).unwrap();
        assert_eq!(
            refill.period_us(at("2027-02-15T00:00:00Z")),
            (at("2027-01-31T00:00:00Z"), at("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            refill.period_us(at("2027-02-28T00:00:00Z")),
            (at("2027-02-28T00:00:00Z"), at("2027-03-31T00:00:00Z"))
        );
        let fifth = Refill::parse(10, Some(RefillInterval::Monthly), 5).unwrap();
        assert_eq!(
            fifth.period_us(at("2026-12-31T23:00:00Z")),
            (at("2026-12-05T00:00:00Z"), at("2027-01-05T00:00:00Z"))
        );
        assert_eq!(
            fifth.period_us(at("2027-01-04T23:59:59Z")),
            (at("2026-12-05T00:00:00Z"), at("2027-01-05T00:00:00Z"))
        );
    }

    #[test]
    fn refills_and_balances_out_of_range_are_refused() {
        let daily = Some(RefillInterval::Daily);
        let monthly = Some(RefillInterval::Monthly);
        assert_eq!(Refill::parse(0, daily, 0), Err(InvalidInput::RefillInvalid));
        assert_eq!(Refill::parse(1, None, 0), Err(InvalidInput::RefillInvalid));
        assert_eq!(Refill::parse(1, daily, 3), Err(InvalidInput::RefillInvalid));
        assert_eq!(
            Refill::parse(1, monthly, 0),
            Err(InvalidInput::RefillInvalid)
        );
        assert_eq!(
            Refill::parse(1, monthly, 32),
            Err(InvalidInput::RefillInvalid)
        );
        assert!(Refill::parse(MAX_CREDITS, monthly, 31).is_ok());
        assert_eq!(Credits::parse(-1, None), Err(InvalidInput::CreditsInvalid));
        assert!(Credits::parse(0, None).is_ok());
        assert_eq!(parse_credit_cost(Some(-1)), Err(InvalidInput::CostInvalid));
        assert_eq!(parse_credit_cost(None), Ok(1));
    }

    #[test]
    fn a_plan_survives_its_column() {
        let plan = KeyCredits(Some(CreditPlan {
            account: "key_a".into(),
            generation: 3,
            refill: Some(Refill::parse(7, Some(RefillInterval::Monthly), 29).unwrap()),
        }));
        assert_eq!(KeyCredits::from_column(&plan.to_column()), Ok(plan));
        assert_eq!(KeyCredits::from_column(""), Ok(KeyCredits(None)));
    }

    #[test]
    fn leases_take_a_sixteenth_and_never_strand_what_cannot_be_used() {
        assert_eq!(lease_size(1_600, 1), 100);
        assert_eq!(lease_size(10, 1), 1);
        assert_eq!(lease_size(10, 4), 4);
        assert_eq!(lease_size(3, 4), 0);
        assert_eq!(lease_size(10_000_000, 1), MAX_LEASE);
        assert_eq!(lease_size(10_000_000, 5_000), 5_000);
        assert_eq!(lease_size(5, 0), 1);
        assert_eq!(lease_size(0, 0), 0);
    }
}
