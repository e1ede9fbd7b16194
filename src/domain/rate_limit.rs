//! Per-key rate limits: what a key allows (at most `limit` units per fixed window), what a
//! request asks of them, and the one rule that judges a request against a key's windows.
//! Pure: the index keeps the windows, in memory, and calls [`judge`] under the key's lock.

use sea_orm::DeriveValueType;
use serde_json::{Value, json};

use super::{InvalidInput, is_scope};

/// A key has, and a request names, at most this many limits.
pub const MAX_RATE_LIMITS: usize = 8;
/// The largest `limit`.
pub(super) const MAX_LIMIT: i64 = 1_000_000_000;
/// The shortest and longest window, in milliseconds.
pub(super) const MIN_WINDOW_MS: i64 = 1_000;
pub(super) const MAX_WINDOW_MS: i64 = 24 * 3_600_000;

/// One limit: at most `limit` units in each window of `window_ms` (whole seconds), windows
/// aligned to the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub name: Box<str>,
    pub limit: i64,
    pub window_ms: i64,
    /// Judged on every request, not only on those that name it.
    pub auto_apply: bool,
}

impl RateLimit {
    /// `window` as seconds and nanoseconds (a protobuf Duration); `None` is no window.
    pub fn parse(
        name: &str,
        limit: i64,
        window: Option<(i64, i32)>,
        auto_apply: bool,
    ) -> Result<Self, InvalidInput> {
        if !is_scope(name) {
            return Err(InvalidInput::RateLimitNameInvalid);
        }
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(InvalidInput::RateLimitLimitInvalid);
        }
        // Whole seconds, as the RateLimit headers state windows.
        let window_ms = window
            .filter(|(_, nanos)| *nanos == 0)
            .and_then(|(seconds, _)| seconds.checked_mul(1_000))
            .filter(|ms| (MIN_WINDOW_MS..=MAX_WINDOW_MS).contains(ms))
            .ok_or(InvalidInput::RateLimitWindowInvalid)?;
        Ok(Self {
            name: name.into(),
            limit,
            window_ms,
            auto_apply,
        })
    }

    fn window_us(&self) -> i64 {
        self.window_ms * 1_000
    }
}

/// A key's limits: at most [`MAX_RATE_LIMITS`], names distinct, sorted by name. Stored as a
/// JSON array (`[{"name":…,"limit":…,"window_ms":…,"auto_apply":…}]`), '' for none.
#[derive(Debug, Clone, Default, PartialEq, Eq, DeriveValueType)]
#[sea_orm(
    value_type = "String",
    from_str = "RateLimits::from_column",
    to_str = "RateLimits::to_column"
)]
pub struct RateLimits(Vec<RateLimit>);

impl RateLimits {
    pub fn new(mut limits: Vec<RateLimit>) -> Result<Self, InvalidInput> {
        if limits.len() > MAX_RATE_LIMITS {
            return Err(InvalidInput::TooManyRateLimits);
        }
        limits.sort_by(|a, b| a.name.cmp(&b.name));
        if limits.windows(2).any(|pair| pair[0].name == pair[1].name) {
            return Err(InvalidInput::RateLimitNameInvalid);
        }
        Ok(Self(limits))
    }

    pub fn as_slice(&self) -> &[RateLimit] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_column(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let limits: Vec<Value> = self
            .0
            .iter()
            .map(|limit| {
                json!({
                    "name": &*limit.name,
                    "limit": limit.limit,
                    "window_ms": limit.window_ms,
                    "auto_apply": limit.auto_apply,
                })
            })
            .collect();
        Value::Array(limits).to_string()
    }

    /// As read back: the column was written by [`RateLimits::to_column`]; an entry that is not
    /// a limit is dropped.
    pub fn from_column(column: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(column_rate_limits(column)))
    }
}

/// The limits of a stored column, sorted by name.
pub fn column_rate_limits(column: &str) -> Vec<RateLimit> {
    if column.is_empty() {
        return Vec::new();
    }
    let Ok(Value::Array(entries)) = serde_json::from_str::<Value>(column) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            Some(RateLimit {
                name: entry.get("name")?.as_str()?.into(),
                limit: entry.get("limit")?.as_i64()?,
                window_ms: entry.get("window_ms")?.as_i64()?.max(1),
                auto_apply: entry.get("auto_apply")?.as_bool()?,
            })
        })
        .collect()
}

/// What a request spends from one of its key's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitAsk<'a> {
    pub name: &'a str,
    pub cost: i64,
}

impl<'a> RateLimitAsk<'a> {
    /// `cost`: `None` is 1.
    pub fn parse(name: &'a str, cost: Option<i64>) -> Result<Self, InvalidInput> {
        if !is_scope(name) {
            return Err(InvalidInput::RateLimitNameInvalid);
        }
        let cost = cost.unwrap_or(1);
        if cost < 0 {
            return Err(InvalidInput::CostInvalid);
        }
        Ok(Self { name, cost })
    }

    /// Checks a request's list: at most [`MAX_RATE_LIMITS`], names distinct.
    pub fn check_all(asks: &[Self]) -> Result<(), InvalidInput> {
        if asks.len() > MAX_RATE_LIMITS {
            return Err(InvalidInput::TooManyRateLimits);
        }
        for (at, ask) in asks.iter().enumerate() {
            if asks[..at].iter().any(|earlier| earlier.name == ask.name) {
                return Err(InvalidInput::RateLimitNameInvalid);
            }
        }
        Ok(())
    }
}

impl Window {
    /// Whether this window counts for `limit` (whichever of its windows).
    fn counts_for(&self, limit: &RateLimit) -> bool {
        self.name == limit.name && self.window_ms == limit.window_ms
    }
}

/// Drops the windows of limits that are not among `limits` (by name and window length), as
/// when a key's limits change: a limit removed and added again starts afresh, a limit whose
/// count alone changed keeps what was spent.
pub fn keep_windows_of(limits: &[RateLimit], windows: &mut Vec<Window>) {
    windows.retain(|window| limits.iter().any(|limit| window.counts_for(limit)));
}

/// `value / unit`, rounded up; both at least 0 and 1.
pub fn ceil_div(value: i64, unit: i64) -> i64 {
    value / unit + i64::from(value % unit != 0)
}

/// One limit's current window, as a replica counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    name: Box<str>,
    /// The limit's window length: a limit whose window changes starts counting afresh.
    window_ms: i64,
    /// The window's start, in microseconds since the epoch.
    start_us: i64,
    /// Units spent in it.
    used: i64,
}

/// Where one limit stands after a judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub name: String,
    pub limit: i64,
    pub remaining: i64,
    /// The current window's end, in microseconds since the epoch.
    pub reset_us: i64,
    pub window_ms: i64,
}

/// A judgement of a request against its key's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitJudgement {
    /// Every limit judged, by name.
    pub states: Vec<LimitState>,
    /// Whether a limit refused the request.
    pub refused: bool,
    /// When refused: how long until every limit that refused starts a new window; `None`
    /// when no wait helps (the request costs more than a limit allows in a whole window).
    pub retry_after_us: Option<i64>,
    /// When it was judged.
    pub now_us: i64,
}

impl LimitJudgement {
    pub fn admitted(&self) -> bool {
        !self.refused
    }
}

/// Whether the key's `limits` have room at `now_us` for what `asks` (and every auto-applied
/// limit, at cost 1 unless asked otherwise) would spend. Admitted: `pay` is asked (the
/// request's other costs, judged only once the limits admit it), and if it pays, spent from
/// every limit judged, in `windows`. Refused, or not paid: nothing spent. A limit asked for
/// that the key does not have is not judged.
pub fn judge(
    limits: &[RateLimit],
    asks: &[RateLimitAsk<'_>],
    windows: &mut Vec<Window>,
    now_us: i64,
    pay: impl FnOnce() -> bool,
) -> LimitJudgement {
    let mut judged: Vec<(&RateLimit, i64, i64)> = Vec::with_capacity(limits.len());
    for limit in limits {
        let asked = asks.iter().find(|ask| *ask.name == *limit.name);
        let cost = match asked {
            Some(ask) => ask.cost,
            None if limit.auto_apply => 1,
            None => continue,
        };
        let window_us = limit.window_us();
        let start_us = now_us - now_us.rem_euclid(window_us);
        judged.push((limit, cost, start_us));
    }
    if judged.is_empty() {
        pay();
        return LimitJudgement::default();
    }
    // What each limit has spent in its current window; an ended window is spent nothing.
    let used = |windows: &[Window], limit: &RateLimit, start_us: i64| {
        windows
            .iter()
            .find(|window| window.counts_for(limit) && window.start_us == start_us)
            .map_or(0, |window| window.used)
    };
    let (mut refused, mut hopeless, mut wait_us) = (false, false, 0);
    for &(limit, cost, start_us) in &judged {
        let spent = used(windows, limit, start_us);
        // Nothing left refuses even a check (cost 0).
        if spent.saturating_add(cost.max(1)) > limit.limit {
            refused = true;
            hopeless |= cost > limit.limit;
            wait_us = wait_us.max(start_us + limit.window_us() - now_us);
        }
    }
    if !refused && pay() {
        // Windows that ended, and those of limits the key no longer has, go. (The caller
        // keeps `now_us` from going back, so no window starts after it.)
        windows.retain(|window| {
            window.start_us + window.window_ms * 1_000 > now_us
                && limits.iter().any(|limit| window.counts_for(limit))
        });
        for &(limit, cost, start_us) in &judged {
            if cost == 0 {
                continue;
            }
            match windows
                .iter_mut()
                .find(|window| window.counts_for(limit) && window.start_us == start_us)
            {
                Some(window) => window.used += cost,
                None => windows.push(Window {
                    name: limit.name.clone(),
                    window_ms: limit.window_ms,
                    start_us,
                    used: cost,
                }),
            }
        }
    }
    let states = judged
        .iter()
        .map(|&(limit, _, start_us)| LimitState {
            name: String::from(&*limit.name),
            limit: limit.limit,
            remaining: (limit.limit - used(windows, limit, start_us)).max(0),
            reset_us: start_us + limit.window_us(),
            window_ms: limit.window_ms,
        })
        .collect();
    LimitJudgement {
        states,
        refused,
        retry_after_us: (refused && !hopeless).then_some(wait_us),
        now_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with nothing else to pay.
    fn judge(
        limits: &[RateLimit],
        asks: &[RateLimitAsk<'_>],
        windows: &mut Vec<Window>,
        now_us: i64,
    ) -> LimitJudgement {
        super::judge(limits, asks, windows, now_us, || true)
    }

    #[test]
    fn a_request_that_cannot_pay_its_other_costs_spends_nothing() {
        let limits = [limit("a", 2, 1_000, true)];
        let mut windows = Vec::new();
        let unpaid = super::judge(&limits, &[], &mut windows, 0, || false);
        assert!(unpaid.admitted());
        assert_eq!(unpaid.states[0].remaining, 2);
        let mut asked = false;
        let refused = {
            judge(&limits, &[], &mut windows, 0);
            judge(&limits, &[], &mut windows, 0);
            super::judge(&limits, &[], &mut windows, 0, || {
                asked = true;
                true
            })
        };
        assert!(!refused.admitted());
        assert!(!asked, "a request a limit refused is not asked to pay");
    }

    fn limit(name: &str, limit: i64, window_ms: i64, auto_apply: bool) -> RateLimit {
        RateLimit {
            name: name.into(),
            limit,
            window_ms,
            auto_apply,
        }
    }

    fn ask(name: &str, cost: i64) -> RateLimitAsk<'_> {
        RateLimitAsk { name, cost }
    }

    #[test]
    fn a_limit_of_n_admits_n_per_window_then_starts_again() {
        let limits = [limit("requests", 3, 1_000, true)];
        let mut windows = Vec::new();
        let at = |ms: i64| ms * 1_000;
        for n in 0..3 {
            let judged = judge(&limits, &[], &mut windows, at(100 + n));
            assert!(judged.admitted());
            assert_eq!(judged.states[0].remaining, 2 - n);
            assert_eq!(judged.states[0].reset_us, at(1_000));
        }
        let refused = judge(&limits, &[], &mut windows, at(400));
        assert_eq!(refused.retry_after_us, Some(at(600)));
        assert_eq!(refused.states[0].remaining, 0);
        // The next window, aligned to the epoch.
        let next = judge(&limits, &[], &mut windows, at(1_000));
        assert!(next.admitted());
        assert_eq!(next.states[0].remaining, 2);
        assert_eq!(next.states[0].reset_us, at(2_000));
        assert_eq!(windows.len(), 1);
    }

    #[test]
    fn a_refused_request_spends_from_no_limit() {
        let limits = [
            limit("burst", 10, 1_000, true),
            limit("writes", 2, 60_000, false),
        ];
        let mut windows = Vec::new();
        assert!(judge(&limits, &[ask("writes", 2)], &mut windows, 0).admitted());
        // writes is spent: the burst limit must not lose a unit for the refusal.
        let refused = judge(&limits, &[ask("writes", 1)], &mut windows, 1);
        assert_eq!(refused.retry_after_us, Some(60_000_000 - 1));
        assert_eq!(refused.states[0].name, "burst");
        assert_eq!(refused.states[0].remaining, 9);
        // Without naming writes, only burst is judged.
        let plain = judge(&limits, &[], &mut windows, 2);
        assert!(plain.admitted());
        assert_eq!(plain.states.len(), 1);
        assert_eq!(plain.states[0].remaining, 8);
    }

    #[test]
    fn costs_zero_and_above_the_limit_and_unknown_names() {
        let limits = [limit("units", 5, 1_000, false)];
        let mut windows = Vec::new();
        // Not named, not auto-applied, and an unknown name: nothing judged.
        assert_eq!(
            judge(&limits, &[ask("other", 9)], &mut windows, 0),
            LimitJudgement::default()
        );
        // More than a whole window allows: refused, and no wait would help.
        let hopeless = judge(&limits, &[ask("units", 6)], &mut windows, 0);
        assert!(!hopeless.admitted());
        assert_eq!(hopeless.retry_after_us, None);
        assert!(judge(&limits, &[ask("units", 5)], &mut windows, 0).admitted());
        // Nothing left: even a check is refused.
        assert!(!judge(&limits, &[ask("units", 0)], &mut windows, 0).admitted());
        assert!(judge(&limits, &[ask("units", 0)], &mut windows, 1_000_000).admitted());
        assert_eq!(windows.len(), 0);
    }

    #[test]
    fn the_longest_wait_among_refusing_limits_is_the_retry() {
        let limits = [limit("a", 1, 1_000, true), limit("b", 1, 10_000, true)];
        let mut windows = Vec::new();
        assert!(judge(&limits, &[], &mut windows, 0).admitted());
        let refused = judge(&limits, &[], &mut windows, 500_000);
        assert_eq!(refused.retry_after_us, Some(9_500_000));
    }

    #[test]
    fn a_changed_window_or_a_removed_limit_starts_afresh_a_changed_count_does_not() {
        let mut windows = Vec::new();
        let minute = [limit("calls", 2, 60_000, true)];
        assert!(judge(&minute, &[], &mut windows, 0).admitted());
        // The count alone changes: what was spent stays spent.
        let raised = [limit("calls", 3, 60_000, true)];
        keep_windows_of(&raised, &mut windows);
        assert_eq!(judge(&raised, &[], &mut windows, 1).states[0].remaining, 1);
        // The window changes: a new count, even where both windows start together.
        let hour = [limit("calls", 3, 3_600_000, true)];
        keep_windows_of(&hour, &mut windows);
        assert!(windows.is_empty());
        assert_eq!(judge(&hour, &[], &mut windows, 2).states[0].remaining, 2);
        // Removed, then added again: afresh.
        keep_windows_of(&[], &mut windows);
        assert!(windows.is_empty());
        assert_eq!(judge(&hour, &[], &mut windows, 3).states[0].remaining, 2);
    }

    #[test]
    fn limits_are_checked_sorted_and_stored() {
        let parse = |name, limit, window| RateLimit::parse(name, limit, window, false);
        assert_eq!(
            parse("Bad", 1, Some((1, 0))),
            Err(InvalidInput::RateLimitNameInvalid)
        );
        assert_eq!(
            parse("a", 0, Some((1, 0))),
            Err(InvalidInput::RateLimitLimitInvalid)
        );
        assert_eq!(
            parse("a", MAX_LIMIT + 1, Some((1, 0))),
            Err(InvalidInput::RateLimitLimitInvalid)
        );
        for window in [
            None,
            Some((0, 0)),
            Some((86_401, 0)),
            Some((1, 500_000_000)),
            Some((-1, 0)),
        ] {
            assert_eq!(
                parse("a", 1, window),
                Err(InvalidInput::RateLimitWindowInvalid),
                "{window:?}"
            );
        }
        assert_eq!(
            parse("a", 1, Some((86_400, 0))).unwrap().window_ms,
            86_400_000
        );
        let limits = RateLimits::new(vec![
            parse("zeta", 5, Some((60, 0))).unwrap(),
            RateLimit::parse("alpha", 1, Some((86_400, 0)), true).unwrap(),
        ])
        .unwrap();
        assert_eq!(&*limits.as_slice()[0].name, "alpha");
        assert_eq!(
            RateLimits::from_column(&limits.to_column()).unwrap(),
            limits
        );
        assert_eq!(RateLimits::default().to_column(), "");
        let twice = vec![parse("a", 1, Some((1, 0))).unwrap(); 2];
        assert_eq!(
            RateLimits::new(twice),
            Err(InvalidInput::RateLimitNameInvalid)
        );
        let many = (0..9)
            .map(|n| RateLimit::parse(&format!("l{n}"), 1, Some((1, 0)), false).unwrap())
            .collect();
        assert_eq!(RateLimits::new(many), Err(InvalidInput::TooManyRateLimits));
        assert_eq!(
            RateLimitAsk::parse("a", Some(-1)),
            Err(InvalidInput::CostInvalid)
        );
        assert_eq!(RateLimitAsk::parse("a", None).unwrap().cost, 1);
        assert_eq!(
            RateLimitAsk::check_all(&[ask("a", 1), ask("a", 2)]),
            Err(InvalidInput::RateLimitNameInvalid)
        );
    }
}
