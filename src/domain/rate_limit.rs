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

    fn is(&self, lease: &WindowLease) -> bool {
        *self.name == *lease.name
            && self.window_ms == lease.window_ms
            && self.start_us == lease.start_us
    }

    fn ends_us(&self) -> i64 {
        self.start_us + self.window_ms * 1_000
    }

    /// What this replica may spend of its slice, and what the window's budget has left
    /// unleased, under `limit` (the key's limit now, which may differ from the one the last
    /// lease was taken under). A limit lowered below what was leased counts every leased
    /// unit elsewhere as spent, so one replica never admits more than the new limit.
    fn standing(&self, limit: i64) -> (i64, i64) {
        let granted = self.limit - self.unleased;
        if granted > limit {
            ((self.held - (granted - limit)).max(0), 0)
        } else {
            (self.held, limit - granted)
        }
    }

    fn new(lease: &WindowLease) -> Self {
        Self {
            name: lease.name.clone(),
            window_ms: lease.window_ms,
            start_us: lease.start_us,
            limit: lease.limit,
            held: 0,
            unleased: 0,
            known: false,
            leasing: false,
            last_grant: 0,
            last_lease_us: i64::MIN,
        }
    }
}

/// Drops the windows of limits that are not among `limits` (by name and window length) and
/// hold nothing, as when a key's limits change. A window's budget is in the database, so a
/// limit whose count alone changed keeps what was spent, and so does one removed and added
/// again within its window (this replica keeps what it holds of it until the window ends);
/// a limit whose window changed is another budget, counted afresh.
pub fn keep_windows_of(limits: &[RateLimit], windows: &mut Vec<Window>) {
    windows.retain(|window| window.held > 0 || limits.iter().any(|l| window.counts_for(l)));
}

/// `value / unit`, rounded up; both at least 0 and 1.
pub fn ceil_div(value: i64, unit: i64) -> i64 {
    value / unit + i64::from(value % unit != 0)
}

/// One limit's window as a replica holds it. A window's budget (its limit) is shared by
/// every replica through the database: a replica leases a slice of it at a time, spends the
/// slice in memory, and learns at each lease what is left unleased. What one replica leased
/// no other can spend, so all of them together never admit more than the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    name: Box<str>,
    /// The limit's window length: a limit whose window changes starts counting afresh.
    window_ms: i64,
    /// The window's start, in microseconds since the epoch.
    start_us: i64,
    /// The limit the last lease was taken under.
    limit: i64,
    /// Units leased and not spent yet.
    held: i64,
    /// What the budget had left, unleased, at the last lease (below zero when the limit was
    /// lowered under what replicas had leased).
    unleased: i64,
    /// Whether a lease arrived; until then nothing is known of the window.
    known: bool,
    /// A lease is on its way.
    leasing: bool,
    /// The size of the last slice: the next is fetched when less than half of it is left.
    last_grant: i64,
    /// When the last lease arrived, by the request clock.
    last_lease_us: i64,
}

/// How long before a window's end a request leases the next window's first slice (half of
/// the window, for windows shorter than twice this). A key used less often leases at its
/// first use in a window instead: one round trip per window, not a slice held ahead of
/// every window it may never use.
const AHEAD_US: i64 = 1_000_000;

/// How often a replica whose window ran out asks its budget again: another replica may
/// have given back what it held (at a graceful stop), or the limit may have been raised.
const RECHECK_US: i64 = 1_000_000;

/// A slice of one window's budget to lease: at least `need` (0: whatever a lease takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLease {
    pub name: Box<str>,
    pub window_ms: i64,
    pub start_us: i64,
    /// The key's limit: the window's whole budget.
    pub limit: i64,
    pub need: i64,
    /// Only a second look at a window that ran out here: read what is left, take nothing
    /// (the next request that can be paid leases).
    pub recheck: bool,
}

impl WindowLease {
    fn of(limit: &RateLimit, start_us: i64, need: i64) -> Self {
        Self {
            name: limit.name.clone(),
            window_ms: limit.window_ms,
            start_us,
            limit: limit.limit,
            need,
            recheck: false,
        }
    }

    pub fn ends_us(&self) -> i64 {
        self.start_us + self.window_ms * 1_000
    }
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
    /// Nothing was judged or spent: this window's slice on this replica cannot pay (or is
    /// not known yet) and its budget might. Lease, then judge again.
    pub wait: Option<WindowLease>,
    /// A slice worth leasing ahead: the next of a window half spent, or else the first of
    /// the next window. Not marked as on its way: see [`mark_leasing`].
    pub prefetch: Option<WindowLease>,
}

impl LimitJudgement {
    pub fn admitted(&self) -> bool {
        !self.refused
    }
}

/// Whether the key's `limits` have room at `now_us` for what `asks` (and every auto-applied
/// limit, at cost 1 unless asked otherwise) would spend, from the slices this replica holds
/// in `windows`. Admitted: `pay` is asked (the request's other costs, judged only once the
/// limits admit it), and if it pays, spent from every limit judged. Refused, or not paid:
/// nothing spent. A slice that cannot pay while the window's budget might: nothing judged,
/// [`LimitJudgement::wait`] says what to lease. A limit asked for that the key does not have
/// is not judged. The caller keeps `now_us` from going back, so no window is reopened.
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
    // Windows that ended go, and so do those of limits the key no longer has, once they
    // hold nothing.
    windows.retain(|window| {
        window.ends_us() > now_us
            && (window.held > 0 || limits.iter().any(|limit| window.counts_for(limit)))
    });
    let find = |windows: &[Window], limit: &RateLimit, start_us: i64| {
        windows
            .iter()
            .position(|window| window.counts_for(limit) && window.start_us == start_us)
    };
    let (mut refused, mut hopeless, mut wait_us) = (false, false, 0);
    let mut wait = None;
    for &(limit, cost, start_us) in &judged {
        let known = find(windows, limit, start_us)
            .map(|at| &windows[at])
            .filter(|window| window.known);
        // Nothing left refuses even a check (cost 0).
        let (short, out) = match known {
            Some(window) => {
                let (spendable, unleased) = window.standing(limit.limit);
                (spendable < cost, spendable + unleased < cost.max(1))
            }
            None => (true, cost > limit.limit),
        };
        if out {
            refused = true;
            hopeless |= cost > limit.limit;
            wait_us = wait_us.max(start_us + limit.window_us() - now_us);
        } else if short && wait.is_none() {
            wait = Some(WindowLease::of(limit, start_us, cost));
        }
    }
    if !refused && wait.is_some() {
        return LimitJudgement {
            now_us,
            wait,
            ..LimitJudgement::default()
        };
    }
    if !refused && pay() {
        for &(limit, cost, start_us) in &judged {
            if let Some(at) = find(windows, limit, start_us) {
                windows[at].held -= cost;
            }
        }
    }
    let mut prefetch = None;
    for &(limit, cost, start_us) in &judged {
        if prefetch.is_some() {
            break;
        }
        let window_us = limit.window_us();
        if let Some(at) = find(windows, limit, start_us) {
            let window = &windows[at];
            let (spendable, unleased) = window.standing(limit.limit);
            if !window.leasing && unleased > 0 && window.held * 2 < window.last_grant {
                prefetch = Some(WindowLease::of(limit, start_us, 0));
                continue;
            }
            // Ran out here: ask the budget again now and then, for what others gave back.
            let ran_out = window.known && spendable + unleased < cost.max(1);
            if ran_out
                && cost <= limit.limit
                && !window.leasing
                && now_us.saturating_sub(window.last_lease_us) >= RECHECK_US
            {
                prefetch = Some(WindowLease {
                    recheck: true,
                    ..WindowLease::of(limit, start_us, cost)
                });
                continue;
            }
        }
        // A window judged in near its end leases the next one's first slice, so a key used
        // right up to a window's end does not wait for one at the next one's start.
        let next_us = start_us + window_us;
        if next_us - now_us <= (window_us / 2).min(AHEAD_US)
            && find(windows, limit, next_us).is_none()
        {
            prefetch = Some(WindowLease::of(limit, next_us, 0));
        }
    }
    let states = judged
        .iter()
        .map(|&(limit, _, start_us)| {
            let remaining = find(windows, limit, start_us)
                .map(|at| &windows[at])
                .filter(|window| window.known)
                .map_or(limit.limit, |window| {
                    let (spendable, unleased) = window.standing(limit.limit);
                    spendable + unleased
                });
            LimitState {
                name: String::from(&*limit.name),
                limit: limit.limit,
                remaining,
                reset_us: start_us + limit.window_us(),
                window_ms: limit.window_ms,
            }
        })
        .collect();
    LimitJudgement {
        states,
        refused,
        retry_after_us: (refused && !hopeless).then_some(wait_us),
        now_us,
        wait: None,
        prefetch,
    }
}

/// Notes that `lease` is on its way (its window is made, unknown, if this replica had none).
pub fn mark_leasing(windows: &mut Vec<Window>, lease: &WindowLease) {
    match windows.iter_mut().find(|window| window.is(lease)) {
        Some(window) => window.leasing = true,
        None => windows.push(Window {
            leasing: true,
            ..Window::new(lease)
        }),
    }
}

/// Takes a lease into its window: `granted` units, with `unleased` left in the budget.
/// A lease of a window that ended (`latest_us` is past it) is void: its units expired.
/// Returns whether any unit is now held.
pub fn window_leased(
    windows: &mut Vec<Window>,
    lease: &WindowLease,
    granted: i64,
    unleased: i64,
    latest_us: i64,
) -> bool {
    if lease.ends_us() <= latest_us {
        return false;
    }
    let at = match windows.iter().position(|window| window.is(lease)) {
        Some(at) => at,
        None => {
            windows.push(Window::new(lease));
            windows.len() - 1
        }
    };
    let window = &mut windows[at];
    window.leasing = false;
    window.known = true;
    window.last_lease_us = latest_us;
    window.held += granted;
    window.limit = lease.limit;
    window.unleased = unleased;
    if granted > 0 {
        window.last_grant = granted;
    }
    window.held > 0
}

/// Whether a lease asked for is no longer needed: for a request (or a second look at a
/// window that ran out), the window is known and its slice pays `need`; for a prefetch, the
/// window is known and half of its last slice is still there (another lease came first).
pub fn window_ready(windows: &[Window], lease: &WindowLease, prefetch: bool) -> bool {
    windows
        .iter()
        .find(|window| window.is(lease) && window.known)
        .is_some_and(|window| {
            if prefetch && lease.need == 0 {
                window.held * 2 >= window.last_grant
            } else {
                window.standing(lease.limit).0 >= lease.need
            }
        })
}

/// Whether any window not ended by `latest_us` holds a slice.
pub fn holds_any(windows: &[Window], latest_us: i64) -> bool {
    windows
        .iter()
        .any(|window| window.held > 0 && window.ends_us() > latest_us)
}

/// What this replica holds unspent of the window.
pub fn window_held(windows: &[Window], lease: &WindowLease) -> i64 {
    windows
        .iter()
        .find(|window| window.is(lease))
        .map_or(0, |window| window.held)
}

/// A lease asked for and not taken: the next request that needs one asks again.
pub fn window_lease_not_taken(windows: &mut [Window], lease: &WindowLease) {
    if let Some(window) = windows.iter_mut().find(|window| window.is(lease)) {
        window.leasing = false;
    }
}

/// Takes back every slice held of a window that has not ended by `latest_us` (the latest
/// instant the key was judged at), to give back to its window's budget (at a graceful
/// stop): each window's lease and the units.
pub fn take_window_returns(windows: &mut [Window], latest_us: i64) -> Vec<(WindowLease, i64)> {
    windows
        .iter_mut()
        .filter(|window| window.held > 0 && window.ends_us() > latest_us)
        .map(|window| {
            window.known = false;
            let lease = WindowLease {
                name: window.name.clone(),
                window_ms: window.window_ms,
                start_us: window.start_us,
                limit: window.limit,
                need: 0,
                recheck: false,
            };
            (lease, std::mem::take(&mut window.held))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::{cell::RefCell, collections::HashMap};

    /// Units leased of each window, by name, window length and start.
    type Granted = HashMap<(Box<str>, i64, i64), i64>;

    thread_local! {
        /// The database's side, for this test's replicas.
        static GRANTED: RefCell<Granted> = RefCell::default();
    }

    /// Leases as the store does: a slice of what the window has left.
    fn lease(windows: &mut Vec<Window>, lease: &WindowLease, latest_us: i64) {
        let held = window_held(windows, lease);
        let need = (lease.need - held).max(0);
        let (granted, unleased) = GRANTED.with_borrow_mut(|granted| {
            let taken = granted
                .entry((lease.name.clone(), lease.window_ms, lease.start_us))
                .or_default();
            // Below zero when a lowered limit is under what was leased, as the store says.
            let left = lease.limit - *taken;
            let slice = crate::domain::lease_size(left, need);
            *taken += slice;
            (slice, left - slice)
        });
        window_leased(windows, lease, granted, unleased, latest_us);
    }

    /// One replica's judgement, leasing whatever it waits for, as the service does.
    fn judge_paying(
        limits: &[RateLimit],
        asks: &[RateLimitAsk<'_>],
        windows: &mut Vec<Window>,
        now_us: i64,
        pay: impl FnOnce() -> bool,
    ) -> LimitJudgement {
        let mut pay = Some(pay);
        for _ in 0..MAX_RATE_LIMITS + 1 {
            let judged = super::judge(limits, asks, windows, now_us, || {
                pay.take().is_some_and(|pay| pay())
            });
            match &judged.wait {
                Some(wanted) => lease(windows, &wanted.clone(), now_us),
                None => return judged,
            }
        }
        panic!("a judgement kept waiting");
    }

    /// A request with nothing else to pay.
    fn judge(
        limits: &[RateLimit],
        asks: &[RateLimitAsk<'_>],
        windows: &mut Vec<Window>,
        now_us: i64,
    ) -> LimitJudgement {
        judge_paying(limits, asks, windows, now_us, || true)
    }

    #[test]
    fn replicas_sharing_a_budget_admit_at_most_the_limit_and_lease_ahead() {
        let limits = [limit("requests", 100, 1_000, true)];
        let mut replicas = [Vec::new(), Vec::new(), Vec::new()];
        let mut admitted = 0;
        for n in 0..500_i64 {
            let windows = &mut replicas[(n % 3) as usize];
            // 500 requests over the window's first half.
            let judged = judge(&limits, &[], windows, n * 1_000);
            if judged.admitted() {
                admitted += 1;
            }
            if let Some(ahead) = judged.prefetch {
                mark_leasing(windows, &ahead);
                lease(windows, &ahead, n * 1_000);
            }
        }
        assert!(admitted <= 100, "{admitted}");
        // Slices of a sixteenth of what is left: what the others hold at the end is little.
        assert!(admitted >= 90, "{admitted}");
        // A window judged in during its last half (its last second, for longer windows)
        // leases the next one's first slice, and that window then admits from it with no
        // wait.
        let windows = &mut replicas[0];
        windows.retain(|window| window.start_us == 0);
        let early = judge(&limits, &[], windows, 400_000);
        assert!(early.prefetch.is_none(), "{early:?}");
        let late = judge(&limits, &[], windows, 800_000);
        let ahead = late.prefetch.expect("the next window is leased ahead");
        assert_eq!(ahead.start_us, 1_000_000);
        mark_leasing(windows, &ahead);
        lease(windows, &ahead, 800_000);
        let next = super::judge(&limits, &[], windows, 1_000_000, || true);
        assert!(next.admitted() && next.wait.is_none(), "{next:?}");
        // A lease of a window that ended is void.
        let ended = WindowLease {
            start_us: 0,
            ..ahead.clone()
        };
        assert!(!window_leased(windows, &ended, 5, 0, 1_000_000));
        assert!(windows.iter().all(|window| window.start_us != 0));
    }

    #[test]
    fn a_limit_lowered_below_what_was_leased_admits_no_more_than_the_new_one() {
        let mut windows = Vec::new();
        let high = [limit("calls", 1_600, 60_000, true)];
        // 1,600 / 16: the first slice is 100; 10 spent.
        for _ in 0..10 {
            assert!(judge(&high, &[], &mut windows, 0).admitted());
        }
        let low = [limit("calls", 20, 60_000, true)];
        let mut admitted = 0;
        while judge(&low, &[], &mut windows, 1).admitted() {
            admitted += 1;
        }
        assert_eq!(admitted, 10, "20 in all, 10 of them already spent");
    }

    #[test]
    fn a_limit_lowered_under_what_others_leased_counts_their_slices_as_spent() {
        let high = [limit("calls", 1_600, 60_000, true)];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // A leases 100 and spends 51; B leases 93 after it: 193 leased in all.
        for _ in 0..51 {
            assert!(judge(&high, &[], &mut a, 0).admitted());
        }
        assert!(judge(&high, &[], &mut b, 0).admitted());
        assert_eq!(window_held(&a, &WindowLease::of(&high[0], 0, 0)), 49);
        // Lowered to 150: A learns at its next lease that 193 are leased, 43 over, and
        // counts them against what it holds: 6 left to spend of its 49.
        let low = [limit("calls", 150, 60_000, true)];
        lease(&mut a, &WindowLease::of(&low[0], 0, 0), 0);
        let mut admitted = 0;
        while judge(&low, &[], &mut a, 1).admitted() {
            admitted += 1;
        }
        assert_eq!(admitted, 6);
    }

    #[test]
    fn a_graceful_stop_gives_back_the_slices_of_windows_not_ended() {
        let limits = [limit("calls", 1_600, 60_000, true)];
        let mut windows = Vec::new();
        assert!(judge(&limits, &[], &mut windows, 0).admitted());
        let returns = take_window_returns(&mut windows, 1);
        assert_eq!(returns.len(), 1);
        assert_eq!(returns[0].1, 99);
        assert!(take_window_returns(&mut windows, 1).is_empty());
        // The next request leases again.
        let again = super::judge(&limits, &[], &mut windows, 2, || true);
        assert!(again.wait.is_some());
    }

    #[test]
    fn a_request_that_cannot_pay_its_other_costs_spends_nothing() {
        let limits = [limit("a", 2, 1_000, true)];
        let mut windows = Vec::new();
        let unpaid = judge_paying(&limits, &[], &mut windows, 0, || false);
        assert!(unpaid.admitted());
        assert_eq!(unpaid.states[0].remaining, 2);
        let mut asked = false;
        let refused = {
            judge(&limits, &[], &mut windows, 0);
            judge(&limits, &[], &mut windows, 0);
            judge_paying(&limits, &[], &mut windows, 0, || {
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
        // Only the new window is held.
        assert_eq!(windows.len(), 1);
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
    fn a_changed_window_starts_afresh_a_changed_count_or_a_limit_added_again_does_not() {
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
        // Removed, then added again: the window's budget is what it was, so an edit never
        // refills.
        keep_windows_of(&[], &mut windows);
        assert!(windows.is_empty(), "a window holding nothing goes");
        assert_eq!(judge(&hour, &[], &mut windows, 3).states[0].remaining, 1);
        // One that holds a slice stays, and is spent from when the limit comes back.
        let big = [limit("calls", 1_600, 3_600_000, true)];
        assert_eq!(judge(&big, &[], &mut windows, 4).states[0].remaining, 1_597);
        keep_windows_of(&[], &mut windows);
        assert_eq!(windows.len(), 1);
        assert_eq!(judge(&big, &[], &mut windows, 5).states[0].remaining, 1_596);
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
