//! Model-based test: random sequences of CreateKey, ListKeys, GetKey, UpdateKey, DisableKey,
//! EnableKey, RotateKey, DeleteKey and ValidateKey, by two actors, with the clock moving on
//! between them, each answer checked field by field against an in-memory model of what the
//! API promises (proto/…/api_keys.proto): keys as shown, errors with their reasons, validation
//! results with the key's identity, last use, and at the end the audit trail event by event.
//! Keys carry owners, annotations and allowed networks; validations come from addresses in
//! and out of them; changes send no etag, the current one or a stale one (and etags must
//! change exactly when the key does). Keys carry rate limits, judged by the model's clock
//! (fixed windows aligned to the epoch), validations ask for them at costs of 0, 1 and 2, and
//! every answer's limit states and retry wait are the model's. Keys carry credits (with and
//! without daily and monthly refills, the periods worked out from the calendar), shared by a
//! rotated key and its successor; validations cost 0, 1 or 2, every answer's balance is the
//! model's, and a request the credits refuse spends nothing from its limits.
//! Each case runs in a workspace of its own on one server; proptest shrinks a failing case
//! to the shortest sequence that still fails.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use apikeys::{
    clock::{Clock, ManualClock},
    domain::{KeyId, Secret},
    grpc::proto::{
        ApiKey, CreateKeyRequest, Credits, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest,
        Expiration, GetKeyRequest, KeyEvent, KeyEventType, KeyStatus, ListKeyEventsRequest,
        ListKeysRequest, RateLimit, RateLimitRequest, RateLimitState, Refill, RefillInterval,
        RotateKeyRequest, UpdateKeyRequest, ValidateKeyRequest, ValidateKeyResponse,
        ValidationResult,
    },
};
use chrono::{DateTime, Datelike, Months, TimeDelta, Utc};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config, TestCaseError, TestRunner},
};
use prost_types::{FieldMask, Timestamp};
use tonic::{Code, Response, Status};
use tonic_types::StatusExt;

use super::{Client, report, scale};
use crate::support::{TestDb, as_actor, spawn_app_with};

const NAMES: [&str; 4] = ["ci", "  Zapier – prod  ", "k", "billing sync"];
const SCOPES: [&str; 4] = ["admin.all", "billing", "orders:read", "orders:write"];
/// Owners ("" is none).
const OWNERS: [&str; 3] = ["", "user_1", "svc:billing"];
/// Annotations; a later pick of the same key wins.
const ANNOTATIONS: [(&str, &str); 3] = [("tier", "gold"), ("tier", "free"), ("region", "eu west")];
/// Allowed networks as sent, and as shown (sorted as listed here).
const CIDRS: [(&str, &str); 3] = [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("192.0.2.7", "192.0.2.7/32"),
    ("2001:db8::/32", "2001:db8::/32"),
];
/// Rate limits a key may have: (name, limit, window in seconds, auto_apply). Two share a
/// name, so a key has one or the other (the first picked), and an update from one to the
/// other changes the window: counted afresh.
const LIMITS: [(&str, i64, i64, bool); 4] = [
    ("calls", 1, 3_600, true),
    ("calls", 2, 86_400, true),
    ("writes", 1, 86_400, false),
    ("burst", 2, 1, true),
];
/// Names a validation may ask for ("reads" is no key's).
const ASKS: [&str; 4] = ["calls", "writes", "burst", "reads"];
/// Credits a key may be given: (remaining, refill as (amount, monthly day, 0 for daily)).
/// The model works out periods on its own, from the calendar.
const CREDITS: [(i64, Option<(i64, u32)>); 3] = [(3, None), (2, Some((4, 0))), (1, Some((3, 31)))];
/// USAGE_EXCEEDED answers the model expected (and got), over the run.
static USAGE_EXCEEDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// RATE_LIMITED answers the model expected (and got), over the run.
static RATE_LIMITED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Client addresses a validation may come from ("" is none sent).
const IPS: [&str; 6] = [
    "",
    "10.1.2.3",
    "192.0.2.7",
    "203.0.113.9",
    "2001:db8::5",
    "::ffff:10.9.9.9",
];
/// Which of IPS each of CIDRS holds, worked out by hand.
const HOLDS: [[bool; 6]; 3] = [
    [false, true, false, false, false, true],
    [false, false, true, false, false, false],
    [false, false, false, false, true, false],
];
/// (id, role) of the two people managing keys.
const ACTORS: [(&str, &str); 2] = [("user_owner", "owner"), ("user_admin", "admin")];
const SECOND_US: i64 = 1_000_000;
const DAY_US: i64 = 86_400 * SECOND_US;
/// ValidateKey notes a key's last use at most once a second.
const LAST_USED_RESOLUTION_US: i64 = SECOND_US;

#[derive(Debug, Clone, Copy)]
enum Mask {
    /// No mask: the fields that are set.
    Absent,
    Name,
    Scopes,
    Owner,
    Annotations,
    Cidrs,
    RateLimits,
    Credits,
    All,
}

/// The etag a change sends.
#[derive(Debug, Clone, Copy)]
enum Etag {
    None,
    Current,
    /// One the key had before (or, for a key never changed, one that is no etag at all).
    Stale,
}

/// What a key carries besides its name and scopes: indexes into OWNERS, ANNOTATIONS, CIDRS.
#[derive(Debug, Clone, Default)]
struct Terms {
    owner: usize,
    annotations: Vec<usize>,
    cidrs: Vec<usize>,
    /// Indexes into LIMITS.
    limits: Vec<usize>,
    /// Index into CREDITS; `None`: unlimited.
    credits: Option<usize>,
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: usize,
        expiration: Expiration,
        scopes: Vec<usize>,
        terms: Terms,
    },
    List {
        page_size: i32,
        /// Index into OWNERS ("" lists every key).
        owner: usize,
    },
    Get(Index),
    Update {
        key: Index,
        name: Option<usize>,
        scopes: Option<Vec<usize>>,
        terms: Terms,
        mask: Mask,
        etag: Etag,
    },
    Disable(Index, Etag),
    Enable(Index, Etag),
    Rotate {
        key: Index,
        grace_seconds: Option<i64>,
        etag: Etag,
    },
    Delete(Index, Etag),
    Validate {
        key: Index,
        required: Vec<usize>,
        /// Index into IPS.
        ip: usize,
        /// Indexes into ASKS (distinct), with a cost (None: the default, 1).
        asks: Vec<(usize, Option<i64>)>,
        /// What the request spends of the key's credits (None: the default, 1).
        cost: Option<i64>,
    },
    /// The clock moves on by this many hours.
    Advance(i64),
}

fn scope_picks() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..SCOPES.len(), 0..4)
}

fn terms() -> impl Strategy<Value = Terms> {
    (
        // Most keys have no owner, annotations or networks, as in life.
        prop_oneof![3 => Just(0), 1 => 1..OWNERS.len()],
        prop_oneof![2 => Just(Vec::new()), 1 => proptest::collection::vec(0..ANNOTATIONS.len(), 1..3)],
        prop_oneof![2 => Just(Vec::new()), 1 => proptest::collection::vec(0..CIDRS.len(), 1..3)],
        prop_oneof![1 => Just(Vec::new()), 2 => proptest::collection::vec(0..LIMITS.len(), 1..4)],
        prop_oneof![1 => Just(None), 1 => (0..CREDITS.len()).prop_map(Some)],
    )
        .prop_map(|(owner, annotations, cidrs, limits, credits)| Terms {
            owner,
            annotations,
            cidrs,
            limits,
            credits,
        })
}

fn etag() -> impl Strategy<Value = Etag> {
    prop_oneof![3 => Just(Etag::None), 2 => Just(Etag::Current), 1 => Just(Etag::Stale)]
}

fn op() -> impl Strategy<Value = Op> {
    let expiration = prop_oneof![
        Just(Expiration::Never),
        Just(Expiration::Expiration30Days),
        Just(Expiration::Expiration90Days),
        Just(Expiration::Expiration1Year),
    ];
    let mask = prop_oneof![
        Just(Mask::Absent),
        Just(Mask::Name),
        Just(Mask::Scopes),
        Just(Mask::Owner),
        Just(Mask::Annotations),
        Just(Mask::Cidrs),
        Just(Mask::RateLimits),
        Just(Mask::Credits),
        Just(Mask::All)
    ];
    // Absent is "stops at once", as is 0; eight days is more than the seven allowed.
    let grace = prop_oneof![
        Just(None),
        Just(Some(0)),
        Just(Some(3_600)),
        Just(Some(8 * 86_400))
    ];
    prop_oneof![
        4 => (0..NAMES.len(), expiration, scope_picks(), terms()).prop_map(
            |(name, expiration, scopes, terms)| Op::Create { name, expiration, scopes, terms }
        ),
        1 => (1..4i32, 0..OWNERS.len()).prop_map(|(page_size, owner)| Op::List { page_size, owner }),
        1 => any::<Index>().prop_map(Op::Get),
        3 => (
            any::<Index>(),
            proptest::option::of(0..NAMES.len()),
            proptest::option::of(scope_picks()),
            terms(),
            mask,
            etag(),
        )
            .prop_map(|(key, name, scopes, terms, mask, etag)| Op::Update {
                key,
                name,
                scopes,
                terms,
                mask,
                etag,
            }),
        2 => (any::<Index>(), etag()).prop_map(|(key, etag)| Op::Disable(key, etag)),
        2 => (any::<Index>(), etag()).prop_map(|(key, etag)| Op::Enable(key, etag)),
        2 => (any::<Index>(), grace, etag())
            .prop_map(|(key, grace_seconds, etag)| Op::Rotate { key, grace_seconds, etag }),
        2 => (any::<Index>(), etag()).prop_map(|(key, etag)| Op::Delete(key, etag)),
        8 => (
            any::<Index>(),
            proptest::collection::vec(0..SCOPES.len(), 0..3),
            prop_oneof![2 => Just(0), 3 => 0..IPS.len()],
            proptest::collection::btree_map(
                0..ASKS.len(),
                prop_oneof![2 => Just(None), 1 => Just(Some(0)), 1 => Just(Some(2))],
                0..3,
            ),
            prop_oneof![2 => Just(None), 1 => Just(Some(0)), 1 => Just(Some(2))],
        )
            .prop_map(|(key, required, ip, asks, cost)| Op::Validate {
                key,
                required,
                ip,
                asks: asks.into_iter().collect(),
                cost,
            }),
        1 => prop_oneof![Just(1i64), Just(24 * 31), Just(24 * 400)].prop_map(Op::Advance),
    ]
}

/// A key as the model knows it.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    secret: String,
    name: String,
    scopes: BTreeSet<String>,
    create_us: i64,
    expire_us: Option<i64>,
    disabled: bool,
    deleted: bool,
    rotated: bool,
    created_by: String,
    last_used_us: Option<i64>,
    owner: String,
    annotations: BTreeMap<String, String>,
    /// Indexes into CIDRS, sorted.
    cidrs: BTreeSet<usize>,
    /// Indexes into LIMITS, sorted by name, names distinct.
    limits: Vec<usize>,
    /// The windows spent from: (name, window in seconds, start, units spent).
    windows: Vec<(&'static str, i64, i64, i64)>,
    /// The balance spent from, shared with the keys a rotation issued from this one.
    credits: Option<Arc<Mutex<Account>>>,
    /// As the server last showed it, and the one before (empty before the first change).
    etag: String,
    stale_etag: String,
}

/// A balance as the model keeps it.
#[derive(Debug)]
struct Account {
    remaining: i64,
    /// (amount, day of month; 0 for daily).
    refill: Option<(i64, u32)>,
    /// The start of the period `remaining` belongs to.
    period_start: i64,
}

/// The start of the refill period holding `now`, worked out from the calendar.
fn period_start(refill: Option<(i64, u32)>, now: i64) -> i64 {
    let Some((_, day)) = refill else {
        return 0;
    };
    if day == 0 {
        return now - now.rem_euclid(DAY_US);
    }
    let date = DateTime::<Utc>::from_timestamp_micros(now)
        .unwrap()
        .date_naive();
    // The refill day of the month `back` months before now's (its last day if shorter).
    let refill_day = |back: u32| {
        let first = chrono::NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap()
            - Months::new(back);
        let last = (first + Months::new(1)).pred_opt().unwrap().day();
        first.with_day(day.min(last)).unwrap()
    };
    let start = if refill_day(0) <= date {
        refill_day(0)
    } else {
        refill_day(1)
    };
    start
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

impl Account {
    fn new(credits: usize, now: i64) -> Arc<Mutex<Self>> {
        let (remaining, refill) = CREDITS[credits];
        Arc::new(Mutex::new(Self {
            remaining,
            refill,
            period_start: period_start(refill, now),
        }))
    }

    /// The balance at `now`: refilled to its amount once a period has begun since.
    fn at(&mut self, now: i64) -> i64 {
        let start = period_start(self.refill, now);
        if let Some((amount, _)) = self.refill
            && start > self.period_start
        {
            self.remaining = amount;
            self.period_start = start;
        }
        self.remaining
    }

    fn shown(&mut self, now: i64) -> Credits {
        Credits {
            remaining: self.at(now),
            refill: self.refill.map(|(amount, day)| Refill {
                amount,
                interval: if day == 0 {
                    RefillInterval::Daily
                } else {
                    RefillInterval::Monthly
                }
                .into(),
                day_of_month: day as i32,
            }),
        }
    }
}

fn account(key: &Key) -> Option<std::sync::MutexGuard<'_, Account>> {
    key.credits.as_ref().map(|account| {
        account
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
}

/// `credits` as a request sends them.
fn sent_credits(credits: Option<usize>) -> Option<Credits> {
    credits.map(|c| Account::new(c, 0).lock().unwrap().shown(0))
}

/// The owner, annotations and networks `terms` picks.
fn picked(terms: &Terms) -> (String, BTreeMap<String, String>, BTreeSet<usize>) {
    let annotations = terms
        .annotations
        .iter()
        .map(|&i| (ANNOTATIONS[i].0.to_owned(), ANNOTATIONS[i].1.to_owned()))
        .collect();
    (
        OWNERS[terms.owner].to_owned(),
        annotations,
        terms.cidrs.iter().copied().collect(),
    )
}

/// The limits `terms` picks, in the order picked: the first of each name.
fn first_of_each_name(terms: &Terms) -> Vec<usize> {
    let mut limits: Vec<usize> = Vec::new();
    for &l in &terms.limits {
        if !limits.iter().any(|&m| LIMITS[m].0 == LIMITS[l].0) {
            limits.push(l);
        }
    }
    limits
}

/// The limits `terms` picks, as the key has them: sorted by name.
fn picked_limits(terms: &Terms) -> Vec<usize> {
    let mut limits = first_of_each_name(terms);
    limits.sort_by_key(|&l| LIMITS[l].0);
    limits
}

fn rate_limit(l: usize) -> RateLimit {
    let (name, limit, seconds, auto_apply) = LIMITS[l];
    RateLimit {
        name: name.into(),
        limit,
        window: Some(prost_types::Duration { seconds, nanos: 0 }),
        auto_apply,
    }
}

/// The limits `terms` picks, as a request sends them (unsorted).
fn sent_limits(terms: &Terms) -> Vec<RateLimit> {
    first_of_each_name(terms)
        .into_iter()
        .map(rate_limit)
        .collect()
}

/// `terms` as a request sends them.
fn sent(terms: &Terms) -> (String, BTreeMap<String, String>, Vec<String>) {
    let (owner, annotations, _) = picked(terms);
    let cidrs = terms.cidrs.iter().map(|&i| CIDRS[i].0.to_owned()).collect();
    (owner, annotations.into_iter().collect(), cidrs)
}

impl Key {
    /// Whether a request from IPS[ip] may use the key.
    fn admits(&self, ip: usize) -> bool {
        self.cidrs.is_empty() || self.cidrs.iter().any(|&c| HOLDS[c][ip])
    }

    /// The etag a change sends, by `etag`.
    fn etag(&self, etag: Etag) -> String {
        match etag {
            Etag::None => String::new(),
            Etag::Current => self.etag.clone(),
            Etag::Stale if self.stale_etag.is_empty() => "0123456789abcdef".into(),
            Etag::Stale => self.stale_etag.clone(),
        }
    }

    /// Takes the etag the server showed after a change the model made: it must be new.
    fn adopt_etag(&mut self, shown: &ApiKey) -> Result<(), String> {
        if shown.etag.is_empty() || shown.etag == self.etag {
            return Err(format!(
                "key {}: the etag must change with the key, was {:?}, now {:?}",
                self.id, self.etag, shown.etag
            ));
        }
        self.stale_etag = std::mem::replace(&mut self.etag, shown.etag.clone());
        Ok(())
    }

    /// Takes new limits. Each window's count stays (the server keeps every window's budget
    /// in the database): a limit removed and added again within its window, or whose
    /// window changed and changed back, goes on from what was spent; a changed window is
    /// another count.
    fn set_limits(&mut self, limits: Vec<usize>) {
        self.limits = limits;
    }

    /// Judges a request asking `asks` at `now`: the states of the limits judged, whether
    /// refused and, when a wait helps, the wait. Admitted: spent from every limit judged.
    fn judge(
        &mut self,
        asks: &[(usize, Option<i64>)],
        now: i64,
    ) -> (Vec<RateLimitState>, bool, Option<prost_types::Duration>) {
        let mut judged = Vec::new();
        for &l in &self.limits {
            let (name, limit, seconds, auto_apply) = LIMITS[l];
            let cost = match asks.iter().find(|(a, _)| ASKS[*a] == name) {
                Some((_, cost)) => cost.unwrap_or(1),
                None if auto_apply => 1,
                None => continue,
            };
            let window = seconds * SECOND_US;
            judged.push((name, limit, seconds, cost, now - now.rem_euclid(window)));
        }
        let spent = |windows: &[(&str, i64, i64, i64)], name: &str, seconds, start| {
            windows
                .iter()
                .find(|w| (w.0, w.1, w.2) == (name, seconds, start))
                .map_or(0, |w| w.3)
        };
        let refusing: Vec<_> = judged
            .iter()
            .filter(|&&(name, limit, seconds, cost, start)| {
                spent(&self.windows, name, seconds, start) + cost.max(1) > limit
            })
            .collect();
        let refused = !refusing.is_empty();
        // A cost above a whole window's limit never fits: no wait to give.
        let hopeless = refusing.iter().any(|&&(_, limit, _, cost, _)| cost > limit);
        let wait = refusing
            .iter()
            .map(|&&(_, _, seconds, _, start)| start + seconds * SECOND_US - now)
            .max()
            .filter(|_| !hopeless);
        if !refused {
            for &(name, _, seconds, cost, start) in &judged {
                match self
                    .windows
                    .iter_mut()
                    .find(|w| (w.0, w.1, w.2) == (name, seconds, start))
                {
                    Some(window) => window.3 += cost,
                    None => self.windows.push((name, seconds, start, cost)),
                }
            }
        }
        let states = judged
            .iter()
            .map(|&(name, limit, seconds, _, start)| RateLimitState {
                name: name.into(),
                limit,
                remaining: (limit - spent(&self.windows, name, seconds, start)).max(0),
                reset_time: Some(timestamp(start + seconds * SECOND_US)),
            })
            .collect();
        // Rounded up to the millisecond.
        let wait = wait.map(|us| {
            let ms = us / 1_000 + i64::from(us % 1_000 != 0);
            prost_types::Duration {
                seconds: ms / 1_000,
                nanos: (ms % 1_000 * 1_000_000) as i32,
            }
        });
        (states, refused, wait)
    }

    fn expired(&self, now: i64) -> bool {
        self.expire_us.is_some_and(|at| at <= now)
    }

    /// The key as ApiKey shows it at `now`.
    fn shown(&self, workspace: &str, now: i64) -> ApiKey {
        let status = if self.expired(now) {
            KeyStatus::Expired
        } else if self.disabled {
            KeyStatus::Disabled
        } else {
            KeyStatus::Active
        };
        ApiKey {
            id: self.id.clone(),
            workspace_id: workspace.into(),
            name: self.name.clone(),
            masked_key: format!("clo_********{}", &self.secret[self.secret.len() - 4..]),
            create_time: Some(timestamp(self.create_us)),
            expire_time: self.expire_us.map(timestamp),
            status: status.into(),
            last_used_time: self.last_used_us.map(timestamp),
            created_by: self.created_by.clone(),
            scopes: self.scopes.iter().cloned().collect(),
            allowed_cidrs: self.cidrs.iter().map(|&c| CIDRS[c].1.to_owned()).collect(),
            annotations: self.annotations.clone().into_iter().collect(),
            owner_id: self.owner.clone(),
            etag: self.etag.clone(),
            rate_limits: self.limits.iter().map(|&l| rate_limit(l)).collect(),
            credits: account(self).map(|mut account| account.shown(now)),
        }
    }
}

#[derive(Debug)]
struct Event {
    key_id: String,
    kind: KeyEventType,
    actor: usize,
    at_us: i64,
    new_key_id: String,
    changed_fields: Vec<String>,
}

/// What one case's workspace should hold.
#[derive(Debug)]
struct Model {
    workspace: String,
    keys: Vec<Key>,
    /// Oldest first.
    events: Vec<Event>,
}

fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(SECOND_US),
        nanos: (us.rem_euclid(SECOND_US) * 1_000) as i32,
    }
}

fn expiry(expiration: Expiration, now: i64) -> Option<i64> {
    match expiration {
        Expiration::Expiration30Days => Some(now + 30 * DAY_US),
        Expiration::Expiration90Days => Some(now + 90 * DAY_US),
        Expiration::Expiration1Year => DateTime::<Utc>::from_timestamp_micros(now)
            .and_then(|at| at.checked_add_months(Months::new(12)))
            .map(|at| at.timestamp_micros()),
        _ => None,
    }
}

fn scopes(picks: &[usize]) -> Vec<String> {
    picks.iter().map(|&i| SCOPES[i].to_owned()).collect()
}

/// An answer as the model predicts it: the message, or the code and reason of the error.
type Outcome<T> = Result<T, (Code, String)>;

fn outcome<T>(answer: Result<Response<T>, Status>) -> Outcome<T> {
    answer.map(Response::into_inner).map_err(|status| {
        let reason = status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default();
        (status.code(), reason)
    })
}

fn refused<T>(code: Code, reason: &str) -> Outcome<T> {
    Err((code, reason.to_owned()))
}

/// A request from one of the two actors.
fn by<T>(actor: usize, message: T) -> tonic::Request<T> {
    as_actor(message, ACTORS[actor].0, ACTORS[actor].1)
}

fn same<T: PartialEq + Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}:\n   got {got:?}\n  want {want:?}"))
    }
}

impl Model {
    /// The key an index picks: one of the case's keys, or (one pick in n + 1) a key that was
    /// never issued.
    fn pick(&self, index: &Index) -> Option<usize> {
        let which = index.index(self.keys.len() + 1);
        (which < self.keys.len()).then_some(which)
    }

    fn id(&self, key: Option<usize>) -> String {
        key.map_or_else(
            || KeyId::generate().as_str().to_owned(),
            |k| self.keys[k].id.clone(),
        )
    }

    fn event(&mut self, key_id: &str, kind: KeyEventType, actor: usize, at_us: i64) {
        self.events.push(Event {
            key_id: key_id.to_owned(),
            kind,
            actor,
            at_us,
            new_key_id: String::new(),
            changed_fields: Vec::new(),
        });
    }

    /// Runs `op` against the server and checks its answer.
    async fn step(
        &mut self,
        client: &mut Client,
        clock: &ManualClock,
        op: &Op,
        actor: usize,
    ) -> Result<(), String> {
        let now = clock.now().timestamp_micros();
        let ws = self.workspace.clone();
        let actor_id = ACTORS[actor].0;
        match op {
            Op::Create {
                name,
                expiration,
                scopes: picks,
                terms,
            } => {
                let (owner_id, annotations, allowed_cidrs) = sent(terms);
                let request = CreateKeyRequest {
                    workspace_id: ws.clone(),
                    name: NAMES[*name].into(),
                    expiration: (*expiration).into(),
                    scopes: scopes(picks),
                    expire_time: None,
                    allowed_cidrs,
                    annotations,
                    owner_id,
                    rate_limits: sent_limits(terms),
                    credits: sent_credits(terms.credits),
                };
                let created = outcome(client.create_key(by(actor, request)).await)
                    .map_err(|e| format!("CreateKey refused: {e:?}"))?;
                let got = created.key.ok_or("CreateKey returned no key")?;
                let (owner, annotations, cidrs) = picked(terms);
                let mut key = Key {
                    id: got.id.clone(),
                    secret: created.secret,
                    name: NAMES[*name].trim().to_owned(),
                    scopes: scopes(picks).into_iter().collect(),
                    create_us: now,
                    expire_us: expiry(*expiration, now),
                    disabled: false,
                    deleted: false,
                    rotated: false,
                    created_by: actor_id.to_owned(),
                    last_used_us: None,
                    owner,
                    annotations,
                    cidrs,
                    limits: picked_limits(terms),
                    windows: Vec::new(),
                    credits: terms.credits.map(|c| Account::new(c, now)),
                    etag: String::new(),
                    stale_etag: String::new(),
                };
                key.adopt_etag(&got)?;
                same("CreateKey", got, key.shown(&ws, now))?;
                self.event(&key.id, KeyEventType::Created, actor, now);
                self.keys.push(key);
            }
            Op::List { page_size, owner } => {
                let owner = OWNERS[*owner];
                let mut got = Vec::new();
                let mut page_token = String::new();
                loop {
                    let request = ListKeysRequest {
                        workspace_id: ws.clone(),
                        page_size: *page_size,
                        page_token,
                        owner_id: owner.into(),
                    };
                    let page = outcome(client.list_keys(by(actor, request)).await)
                        .map_err(|e| format!("ListKeys refused: {e:?}"))?;
                    same(
                        "ListKeys page size",
                        page.keys.len() <= *page_size as usize,
                        true,
                    )?;
                    got.extend(page.keys);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                let mut live: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| !k.deleted && (owner.is_empty() || k.owner == owner))
                    .collect();
                // Newest first, by create_time then id.
                live.sort_by(|a, b| (b.create_us, &b.id).cmp(&(a.create_us, &a.id)));
                let want: Vec<ApiKey> = live.iter().map(|k| k.shown(&ws, now)).collect();
                same("ListKeys", got, want)?;
            }
            Op::Get(index) => {
                let key = self.pick(index);
                let request = GetKeyRequest {
                    workspace_id: ws.clone(),
                    key_id: self.id(key),
                };
                let want = match key.map(|k| &self.keys[k]) {
                    Some(k) if !k.deleted => Ok(k.shown(&ws, now)),
                    _ => refused(Code::NotFound, "KEY_NOT_FOUND"),
                };
                same(
                    "GetKey",
                    outcome(client.get_key(by(actor, request)).await),
                    want,
                )?;
            }
            Op::Update {
                key,
                name,
                scopes: picks,
                terms,
                mask,
                etag,
            } => {
                let key = self.pick(key);
                let new_name = name.map(|n| NAMES[n]).unwrap_or_default();
                let new_scopes = picks.as_deref().map(scopes).unwrap_or_default();
                let (owner_id, annotations, allowed_cidrs) = sent(terms);
                // Which fields the update sets: by the mask, or with none those given.
                let paths: Option<&[&str]> = match mask {
                    Mask::Absent => None,
                    Mask::Name => Some(&["name"]),
                    Mask::Scopes => Some(&["scopes"]),
                    Mask::Owner => Some(&["owner_id"]),
                    Mask::Annotations => Some(&["annotations"]),
                    Mask::Cidrs => Some(&["allowed_cidrs"]),
                    Mask::RateLimits => Some(&["rate_limits"]),
                    Mask::Credits => Some(&["credits"]),
                    Mask::All => Some(&["*"]),
                };
                let set = |field: &str, given: bool| match paths {
                    None => given,
                    Some(paths) => paths.contains(&field) || paths.contains(&"*"),
                };
                let set_name = set("name", !new_name.is_empty());
                let set_scopes = set("scopes", !new_scopes.is_empty());
                let set_owner = set("owner_id", !owner_id.is_empty());
                let set_annotations = set("annotations", !annotations.is_empty());
                let set_cidrs = set("allowed_cidrs", !allowed_cidrs.is_empty());
                let rate_limits = sent_limits(terms);
                let set_limits = set("rate_limits", !rate_limits.is_empty());
                let set_credits = set("credits", terms.credits.is_some());
                let sent_etag = key.map(|k| self.keys[k].etag(*etag)).unwrap_or_default();
                let request = UpdateKeyRequest {
                    key: Some(ApiKey {
                        workspace_id: ws.clone(),
                        id: self.id(key),
                        name: new_name.to_owned(),
                        scopes: new_scopes.clone(),
                        owner_id,
                        annotations,
                        allowed_cidrs,
                        rate_limits,
                        credits: sent_credits(terms.credits),
                        etag: sent_etag.clone(),
                        ..Default::default()
                    }),
                    update_mask: paths.map(|paths| FieldMask {
                        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
                    }),
                };
                let got = outcome(client.update_key(by(actor, request)).await);
                let want = if set_name && new_name.is_empty() {
                    refused(Code::InvalidArgument, "NAME_EMPTY")
                } else if let Some(k) = key {
                    let k = &mut self.keys[k];
                    if k.deleted {
                        refused(Code::FailedPrecondition, "KEY_DELETED")
                    } else if !sent_etag.is_empty() && sent_etag != k.etag {
                        refused(Code::Aborted, "ETAG_MISMATCH")
                    } else if set_credits && terms.credits.is_some() && k.rotated {
                        // The successor spends from the same balance, and sets it.
                        refused(Code::FailedPrecondition, "KEY_ROTATED")
                    } else {
                        let (owner, annotations, cidrs) = picked(terms);
                        let mut changed = Vec::new();
                        if set_name && k.name != new_name.trim() {
                            k.name = new_name.trim().to_owned();
                            changed.push("name".to_owned());
                        }
                        let new_scopes: BTreeSet<String> = new_scopes.into_iter().collect();
                        if set_scopes && k.scopes != new_scopes {
                            k.scopes = new_scopes;
                            changed.push("scopes".to_owned());
                        }
                        if set_owner && k.owner != owner {
                            k.owner = owner;
                            changed.push("owner_id".to_owned());
                        }
                        if set_annotations && k.annotations != annotations {
                            k.annotations = annotations;
                            changed.push("annotations".to_owned());
                        }
                        if set_cidrs && k.cidrs != cidrs {
                            k.cidrs = cidrs;
                            changed.push("allowed_cidrs".to_owned());
                        }
                        let limits = picked_limits(terms);
                        if set_limits && k.limits != limits {
                            k.set_limits(limits);
                            changed.push("rate_limits".to_owned());
                        }
                        // Setting a balance is always a change; clearing, only of one set.
                        match (set_credits, terms.credits, &k.credits) {
                            (true, Some(c), Some(account)) => {
                                let fresh = Account::new(c, now);
                                let fresh = Arc::try_unwrap(fresh).unwrap().into_inner().unwrap();
                                *account.lock().unwrap() = fresh;
                                changed.push("credits".to_owned());
                            }
                            (true, Some(c), None) => {
                                k.credits = Some(Account::new(c, now));
                                changed.push("credits".to_owned());
                            }
                            (true, None, Some(_)) => {
                                k.credits = None;
                                changed.push("credits".to_owned());
                            }
                            _ => {}
                        }
                        if !changed.is_empty()
                            && let Ok(shown) = &got
                        {
                            k.adopt_etag(shown)?;
                        }
                        let (shown, id) = (k.shown(&ws, now), k.id.clone());
                        if !changed.is_empty() {
                            self.event(&id, KeyEventType::Updated, actor, now);
                            self.events.last_mut().unwrap().changed_fields = changed;
                        }
                        Ok(shown)
                    }
                } else {
                    refused(Code::NotFound, "KEY_NOT_FOUND")
                };
                same("UpdateKey", got, want)?;
            }
            Op::Disable(index, etag) | Op::Enable(index, etag) => {
                let disable = matches!(op, Op::Disable(..));
                let key = self.pick(index);
                let (workspace_id, key_id) = (ws.clone(), self.id(key));
                let sent_etag = key.map(|k| self.keys[k].etag(*etag)).unwrap_or_default();
                let got = if disable {
                    let request = DisableKeyRequest {
                        workspace_id,
                        key_id,
                        etag: sent_etag.clone(),
                    };
                    outcome(client.disable_key(by(actor, request)).await)
                } else {
                    let request = EnableKeyRequest {
                        workspace_id,
                        key_id,
                        etag: sent_etag.clone(),
                    };
                    outcome(client.enable_key(by(actor, request)).await)
                };
                let want = match key {
                    None => refused(Code::NotFound, "KEY_NOT_FOUND"),
                    Some(k) if self.keys[k].deleted => {
                        refused(Code::FailedPrecondition, "KEY_DELETED")
                    }
                    Some(k) if !sent_etag.is_empty() && sent_etag != self.keys[k].etag => {
                        refused(Code::Aborted, "ETAG_MISMATCH")
                    }
                    Some(k) if !disable && self.keys[k].expired(now) => {
                        refused(Code::FailedPrecondition, "KEY_EXPIRED")
                    }
                    Some(k) => {
                        if self.keys[k].disabled != disable {
                            if let Ok(shown) = &got {
                                self.keys[k].adopt_etag(shown)?;
                            }
                            self.keys[k].disabled = disable;
                            let kind = if disable {
                                KeyEventType::Disabled
                            } else {
                                KeyEventType::Enabled
                            };
                            let id = self.keys[k].id.clone();
                            self.event(&id, kind, actor, now);
                        }
                        Ok(self.keys[k].shown(&ws, now))
                    }
                };
                same(if disable { "DisableKey" } else { "EnableKey" }, got, want)?;
            }
            Op::Rotate {
                key,
                grace_seconds,
                etag,
            } => {
                let key = self.pick(key);
                let sent_etag = key.map(|k| self.keys[k].etag(*etag)).unwrap_or_default();
                let request = RotateKeyRequest {
                    workspace_id: ws.clone(),
                    key_id: self.id(key),
                    grace_period: grace_seconds
                        .map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                    etag: sent_etag.clone(),
                };
                let got = outcome(client.rotate_key(by(actor, request)).await);
                let grace_us = grace_seconds.unwrap_or(0) * SECOND_US;
                let state = key.map(|k| &self.keys[k]);
                let refusal = if grace_us > 7 * DAY_US {
                    Some((Code::InvalidArgument, "GRACE_PERIOD_INVALID"))
                } else {
                    match state {
                        None => Some((Code::NotFound, "KEY_NOT_FOUND")),
                        Some(k) if k.deleted => Some((Code::FailedPrecondition, "KEY_DELETED")),
                        Some(k) if !sent_etag.is_empty() && sent_etag != k.etag => {
                            Some((Code::Aborted, "ETAG_MISMATCH"))
                        }
                        Some(k) if k.expired(now) => {
                            Some((Code::FailedPrecondition, "KEY_EXPIRED"))
                        }
                        Some(k) if k.disabled => Some((Code::FailedPrecondition, "KEY_DISABLED")),
                        Some(k) if k.rotated => Some((Code::FailedPrecondition, "KEY_ROTATED")),
                        Some(_) => None,
                    }
                };
                match (refusal, key) {
                    (Some((code, reason)), _) => {
                        same("RotateKey", got.map(|_| ()), refused(code, reason))?
                    }
                    (None, Some(k)) => {
                        let rotated = got.map_err(|e| format!("RotateKey refused: {e:?}"))?;
                        let got_new = rotated.key.ok_or("RotateKey returned no key")?;
                        let old = &mut self.keys[k];
                        if let Some(old_shown) = &rotated.old_key {
                            old.adopt_etag(old_shown)?;
                        }
                        let grace_end = now + grace_us;
                        let lifetime = old.expire_us.map(|at| at - old.create_us);
                        old.expire_us =
                            Some(old.expire_us.map_or(grace_end, |at| at.min(grace_end)));
                        old.rotated = true;
                        let mut new = Key {
                            id: got_new.id.clone(),
                            secret: rotated.secret,
                            name: old.name.clone(),
                            scopes: old.scopes.clone(),
                            create_us: now,
                            expire_us: lifetime.map(|lifetime| now + lifetime),
                            disabled: false,
                            deleted: false,
                            rotated: false,
                            created_by: actor_id.to_owned(),
                            last_used_us: None,
                            owner: old.owner.clone(),
                            annotations: old.annotations.clone(),
                            cidrs: old.cidrs.clone(),
                            limits: old.limits.clone(),
                            windows: Vec::new(),
                            credits: old.credits.clone(),
                            etag: String::new(),
                            stale_etag: String::new(),
                        };
                        new.adopt_etag(&got_new)?;
                        same(
                            "RotateKey old key",
                            rotated.old_key,
                            Some(old.shown(&ws, now)),
                        )?;
                        same("RotateKey new key", got_new, new.shown(&ws, now))?;
                        let old_id = old.id.clone();
                        self.event(&old_id, KeyEventType::Rotated, actor, now);
                        self.events.last_mut().unwrap().new_key_id = new.id.clone();
                        self.keys.push(new);
                    }
                    (None, None) => unreachable!("an unknown key is refused"),
                }
            }
            Op::Delete(index, etag) => {
                let key = self.pick(index);
                let sent_etag = key.map(|k| self.keys[k].etag(*etag)).unwrap_or_default();
                let request = DeleteKeyRequest {
                    workspace_id: ws.clone(),
                    key_id: self.id(key),
                    etag: sent_etag.clone(),
                };
                let got = outcome(client.delete_key(by(actor, request)).await).map(|_| ());
                let want = match key {
                    Some(k)
                        if !self.keys[k].deleted
                            && !sent_etag.is_empty()
                            && sent_etag != self.keys[k].etag =>
                    {
                        refused(Code::Aborted, "ETAG_MISMATCH")
                    }
                    Some(k) if !self.keys[k].deleted => {
                        self.keys[k].deleted = true;
                        let id = self.keys[k].id.clone();
                        self.event(&id, KeyEventType::Deleted, actor, now);
                        Ok(())
                    }
                    _ => refused(Code::NotFound, "KEY_NOT_FOUND"),
                };
                same("DeleteKey", got, want)?;
            }
            Op::Validate {
                key,
                required,
                ip,
                asks,
                cost,
            } => {
                let key = self.pick(key);
                let secret = key.map_or_else(
                    || Secret::generate().expose().to_owned(),
                    |k| self.keys[k].secret.clone(),
                );
                let request = ValidateKeyRequest {
                    key: secret,
                    required_scopes: scopes(required),
                    client_ip: IPS[*ip].into(),
                    rate_limits: asks
                        .iter()
                        .map(|&(a, cost)| RateLimitRequest {
                            name: ASKS[a].into(),
                            cost,
                        })
                        .collect(),
                    cost: *cost,
                };
                let got = outcome(client.validate_key(request).await)
                    .map_err(|e| format!("ValidateKey refused: {e:?}"))?;
                let want = match key {
                    None => ValidateKeyResponse {
                        result: ValidationResult::NotFound.into(),
                        ..Default::default()
                    },
                    Some(k) => {
                        let k = &mut self.keys[k];
                        let mut result = if k.deleted {
                            ValidationResult::Deleted
                        } else if k.expired(now) {
                            ValidationResult::Expired
                        } else if k.disabled {
                            ValidationResult::Disabled
                        } else if !k.admits(*ip) {
                            ValidationResult::IpNotAllowed
                        } else if !required.iter().all(|&s| k.scopes.contains(SCOPES[s])) {
                            ValidationResult::InsufficientScope
                        } else {
                            ValidationResult::Valid
                        };
                        let (mut rate_limits, mut retry_after) = (Vec::new(), None);
                        let mut credits_remaining = None;
                        if result == ValidationResult::Valid {
                            let refused;
                            let windows = k.windows.clone();
                            (rate_limits, refused, retry_after) = k.judge(asks, now);
                            if refused {
                                RATE_LIMITED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                result = ValidationResult::RateLimited;
                            } else if let Some(mut account) = account(k) {
                                let (cost, left) = (cost.unwrap_or(1), account.at(now));
                                if left < cost.max(1) {
                                    USAGE_EXCEEDED
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    result = ValidationResult::UsageExceeded;
                                    credits_remaining = Some(left);
                                } else {
                                    account.remaining -= cost;
                                    credits_remaining = Some(account.remaining);
                                }
                            }
                            if result == ValidationResult::UsageExceeded {
                                // Refused by the credits: the limits spent nothing either.
                                k.windows = windows;
                                for state in &mut rate_limits {
                                    state.remaining += asks
                                        .iter()
                                        .find(|(a, _)| ASKS[*a] == state.name)
                                        .map_or(1, |(_, cost)| cost.unwrap_or(1));
                                }
                            }
                        }
                        if result == ValidationResult::Valid
                            && k.last_used_us
                                .is_none_or(|at| at + LAST_USED_RESOLUTION_US <= now)
                        {
                            k.last_used_us = Some(now);
                        }
                        ValidateKeyResponse {
                            valid: result == ValidationResult::Valid,
                            result: result.into(),
                            key_id: k.id.clone(),
                            workspace_id: ws.clone(),
                            expire_time: k.expire_us.map(timestamp),
                            scopes: k.scopes.iter().cloned().collect(),
                            name: k.name.clone(),
                            annotations: k.annotations.clone().into_iter().collect(),
                            owner_id: k.owner.clone(),
                            rate_limits,
                            retry_after,
                            credits_remaining,
                        }
                    }
                };
                same("ValidateKey", got, want)?;
            }
            Op::Advance(hours) => clock.advance(TimeDelta::hours(*hours)),
        }
        Ok(())
    }

    /// The workspace's audit trail is the model's, event for event, newest first.
    async fn check_events(&self, client: &mut Client) -> Result<(), String> {
        let mut got = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListKeyEventsRequest {
                workspace_id: self.workspace.clone(),
                page_size: 7,
                page_token,
                ..Default::default()
            };
            let page = outcome(client.list_key_events(by(0, request)).await)
                .map_err(|e| format!("ListKeyEvents refused: {e:?}"))?;
            got.extend(page.events);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        // Event ids are the server's; the rest is the model's.
        let want: Vec<KeyEvent> = self
            .events
            .iter()
            .rev()
            .zip(&got)
            .map(|(event, got)| KeyEvent {
                id: got.id.clone(),
                workspace_id: self.workspace.clone(),
                key_id: event.key_id.clone(),
                r#type: event.kind.into(),
                actor_id: ACTORS[event.actor].0.into(),
                actor_role: ACTORS[event.actor].1.into(),
                create_time: Some(timestamp(event.at_us)),
                new_key_id: event.new_key_id.clone(),
                changed_fields: event.changed_fields.clone(),
            })
            .collect();
        same("ListKeyEvents length", got.len(), self.events.len())?;
        same("ListKeyEvents", got, want)
    }
}

#[test]
fn every_key_rpc_answers_as_the_model_says() {
    let cases = scale(1_000, 10_000);
    // Quiet: see `quietly`.
    let _quiet = super::silence();
    let runtime = super::quiet_runtime();
    let clock = ManualClock::new(Utc::now());
    let app = runtime.block_on(async {
        spawn_app_with(TestDb::new().await, clock.clone(), |settings| {
            // The clock jumps years ahead: keep every event for the final comparison.
            settings.prune_interval = Duration::from_secs(3_650 * 86_400);
        })
        .await
    });
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let (case, ops_run) = (Cell::new(0u32), Cell::new(0usize));
    let started = std::time::Instant::now();
    let sequences = proptest::collection::vec((op(), 0..ACTORS.len()), 1..40);
    let start = clock.now();
    let result = runner.run(&sequences, |ops| {
        // Every case starts at the same instant (the clock would otherwise run past year
        // 9999, the end of protobuf's timestamps, within a long run).
        clock.advance(start - clock.now());
        case.set(case.get() + 1);
        ops_run.set(ops_run.get() + ops.len());
        let mut model = Model {
            workspace: format!("model-{}", case.get()),
            keys: Vec::new(),
            events: Vec::new(),
        };
        let mut client = app.client.clone();
        runtime.block_on(async {
            for (n, (op, actor)) in ops.iter().enumerate() {
                model
                    .step(&mut client, &clock, op, *actor)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("step {n}, {op:?}: {e}")))?;
            }
            model
                .check_events(&mut client)
                .await
                .map_err(TestCaseError::fail)
        })
    });
    let elapsed = started.elapsed();
    runtime.block_on(app.stop());
    if let Err(failure) = result {
        panic!("{failure}");
    }
    report(
        "model-based",
        format_args!(
            "{cases} cases passed, {} sequences run with shrinking, {} operations ({} answered \
             RATE_LIMITED, {} USAGE_EXCEEDED), in {elapsed:.0?}",
            case.get(),
            ops_run.get(),
            RATE_LIMITED.load(std::sync::atomic::Ordering::Relaxed),
            USAGE_EXCEEDED.load(std::sync::atomic::Ordering::Relaxed)
        ),
    );
}
