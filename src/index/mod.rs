//! The in-memory validation index: every key, tombstones included, by the blake3 hash of the
//! key. ValidateKey is a lock-free read here; the database is never on that path.

mod sync;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

use papaya::{HashMap, Operation};

pub use sync::{SyncSettings, Syncer};

use crate::{
    domain::{
        Cidr, CreditLease, KeyHash, KeyStatus, LimitJudgement, RateLimit, RateLimitAsk, Validation,
        Window, WindowLease, column_annotations, column_cidrs, column_credits, column_rate_limits,
        column_scopes, holds_any, judge_limits, keep_windows_of, mark_leasing, take_window_returns,
        window_held, window_lease_not_taken, window_leased, window_ready,
    },
    store::{CreditReturn, IndexRow},
    usage::{HourUsage, hour_start},
};

/// A key's scopes, sorted; keys with the same scopes share one.
pub(crate) type ScopeSet = Arc<[Box<str>]>;

/// What the index knows of one key: about 200 bytes with the map's own overhead and its
/// name (see BENCHMARKS.md), `terms` (8 bytes, null for most keys) included.
#[derive(Debug)]
struct Record {
    /// The id without its `key_` prefix.
    id: [u8; ID_LEN],
    /// Shared by every key of the workspace.
    workspace: Arc<str>,
    /// `i64::MAX` for never.
    expire_time_us: i64,
    deleted: bool,
    disabled: bool,
    name: Box<str>,
    scopes: ScopeSet,
    /// The revision this record reflects; an older one never replaces it.
    revision: i64,
    /// Owner, annotations and allowed networks, for the keys that have any.
    terms: Option<Box<Terms>>,
    /// The last valid use as stored, `i64::MIN` for none.
    stored_last_used_us: i64,
    /// What this replica saw of the key: made on its first use, and handed on to the record
    /// that replaces this one, so nothing counted is lost to a change.
    activity: OnceLock<Arc<Activity>>,
}

/// What only some keys carry, kept out of line: a key without any costs one pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Terms {
    owner_id: Box<str>,
    annotations: Box<[(Box<str>, Box<str>)]>,
    /// Empty: any address.
    allowed_cidrs: Box<[Cidr]>,
    /// Sorted by name; empty: no limit.
    rate_limits: Box<[RateLimit]>,
    /// The credit account spent from, and the generation of its setting; `None`: unlimited.
    credits: Option<(Box<str>, i64)>,
}

impl Terms {
    /// `None` when the row has none of them.
    fn of(row: &IndexRow) -> Option<Box<Self>> {
        let terms = Self {
            owner_id: row.owner_id.as_str().into(),
            annotations: column_annotations(&row.annotations)
                .into_iter()
                .map(|(key, value)| (key.into_boxed_str(), value.into_boxed_str()))
                .collect(),
            allowed_cidrs: column_cidrs(&row.allowed_cidrs).collect(),
            rate_limits: column_rate_limits(&row.rate_limits).into(),
            credits: column_credits(&row.credits).map(|plan| (plan.account, plan.generation)),
        };
        (terms != Self::default()).then(|| Box::new(terms))
    }

    /// Whether a request from `client_ip` may use the key: any address when it allows all,
    /// else only an address in one of its networks (an unknown address is in none).
    fn admits(&self, client_ip: Option<IpAddr>) -> bool {
        self.allowed_cidrs.is_empty()
            || client_ip.is_some_and(|ip| self.allowed_cidrs.iter().any(|net| net.contains(ip)))
    }
}

impl Record {
    fn last_used_us(&self) -> i64 {
        let seen = self.activity.get().map_or(i64::MIN, |activity| {
            activity.last_used_us.load(Ordering::Relaxed)
        });
        seen.max(self.stored_last_used_us)
    }

    /// The key's rate limits, sorted by name.
    fn rate_limits(&self) -> &[RateLimit] {
        self.terms
            .as_ref()
            .map_or(&[][..], |terms| &terms.rate_limits)
    }
}

/// What this replica saw of a key: 64 bytes (80 with the `Arc`'s counts) for as long as the
/// key is indexed, and what is not flushed yet boxed beside it, so a key used once costs
/// little ever after.
#[derive(Debug)]
struct Activity {
    /// The last valid use seen by this replica, `i64::MIN` for none.
    last_used_us: AtomicI64,
    /// Whether the key waits in the flush queue.
    queued: AtomicBool,
    state: Mutex<ActivityState>,
}

#[derive(Debug, Default)]
struct ActivityState {
    /// The client IP of the last valid use.
    last_used_ip: Option<IpAddr>,
    unflushed: Option<Box<Unflushed>>,
    /// The current window of each rate limit spent from (kept across changes to the key, so
    /// an update does not refill a limit); boxed, so a key without limits pays one pointer.
    windows: Option<Box<Windows>>,
}

/// What one replica holds of a key's credits: a slice leased from the account, spent here
/// with no round trip, and what the account had left when the slice was taken.
#[derive(Debug, Default)]
struct Hold {
    /// The setting and period the slice belongs to.
    generation: i64,
    period_start_us: i64,
    period_end_us: i64,
    /// Credits leased and not spent yet.
    held: i64,
    /// What the account had left, unleased, at the last lease.
    unleased: i64,
    /// Whether a lease of this setting and period arrived; until then nothing is known.
    known: bool,
    /// A lease is on its way.
    leasing: bool,
    /// The size of the last slice: the next is fetched when less than half of it is left.
    last_grant: i64,
    /// When the last lease arrived, by the request clock.
    last_lease_us: i64,
    /// Sweeps (flushes) since the last spend: a hold idle for long is given back.
    idle_sweeps: u32,
}

/// How a key's credits judge a request's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CreditVerdict {
    /// Paid from the slice held.
    Paid,
    /// Even the account's whole balance cannot pay it.
    Exceeded,
    /// The slice held cannot pay it but the account might: lease first.
    Short,
}

impl Hold {
    /// Voids a slice of an older setting, or of a period that ended.
    fn renew(&mut self, generation: i64, now_us: i64) {
        if self.generation < generation || now_us >= self.period_end_us {
            *self = Self {
                generation: self.generation.max(generation),
                leasing: self.leasing,
                ..Self::default()
            };
        }
    }

    fn judge(&mut self, cost: i64) -> CreditVerdict {
        let balance = self.held + self.unleased;
        // Nothing left refuses even a check (cost 0).
        if balance < cost.max(1) {
            CreditVerdict::Exceeded
        } else if self.held < cost {
            CreditVerdict::Short
        } else {
            self.held -= cost;
            // Only a spend keeps a slice busy: checks (cost 0) leave it idle.
            if cost > 0 {
                self.idle_sweeps = 0;
            }
            CreditVerdict::Paid
        }
    }

    /// What this replica believes is left: its slice and the account's unleased balance.
    fn remaining(&self) -> i64 {
        self.held + self.unleased
    }
}

/// How often a key whose credits ran out asks its account again (others may have given
/// back, an admin may have added).
const RELEASE_CHECK_US: i64 = 1_000_000;
/// Flushes without a spend after which a replica gives a key's slice back.
const IDLE_SWEEPS: u32 = 5;

fn lease_call(account: &str, need: i64, prefetch: bool) -> LeaseCall {
    LeaseCall {
        account: String::from(account),
        need,
        prefetch,
        window: None,
    }
}

/// A key's limits and what a request asks of them.
type LimitsAsked<'a> = (&'a [RateLimit], &'a [RateLimitAsk<'a>]);
/// A key's credit account, its setting's generation, and what a request costs.
type CreditsAsked<'a> = (&'a str, i64, i64);

/// A lookup's judgement, besides the key.
#[derive(Debug)]
struct Judged {
    result: Validation,
    limits: LimitJudgement,
    credits_remaining: Option<i64>,
    call: CreditCall,
}

impl Judged {
    fn of(result: Validation) -> Self {
        Self {
            result,
            limits: LimitJudgement::default(),
            credits_remaining: None,
            call: CreditCall::None,
        }
    }
}

/// A lease the index asks for: the service takes it from the account and hands it to
/// [`KeyIndex::credit_leased`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCall {
    /// The credit account, or the rate-limit window's id (see [`WindowCall`]): one lease of
    /// it at a time on this replica.
    pub account: String,
    /// What the slice held must reach for the request (0: whatever a lease takes).
    pub need: i64,
    /// The next slice fetched ahead (the answer did not wait for it).
    pub prefetch: bool,
    /// A slice of a rate limit's window, not of credits.
    pub window: Option<Box<WindowCall>>,
}

/// A lease of one rate-limit window of one key. Its id in the database (and the lease's
/// `account`) is `<key id>/<window ms>/<start µs>/<limit name>`.
#[derive(Clone, PartialEq, Eq)]
pub struct WindowCall {
    pub hash: KeyHash,
    pub lease: WindowLease,
}

impl std::fmt::Debug for WindowCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key's hash stays out of logs, as everywhere.
        f.debug_struct("WindowCall")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl WindowCall {
    fn call(hash: &KeyHash, record: &Record, lease: WindowLease, prefetch: bool) -> LeaseCall {
        let id = std::str::from_utf8(&record.id).unwrap_or_default();
        LeaseCall {
            account: format!(
                "{ID_PREFIX}{id}/{}/{}/{}",
                lease.window_ms, lease.start_us, lease.name
            ),
            need: lease.need,
            prefetch,
            window: Some(Box::new(Self { hash: *hash, lease })),
        }
    }
}

/// What a lookup asks of the service about credits, besides its answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CreditCall {
    #[default]
    None,
    /// Nothing was judged or counted: lease, then look up again.
    Wait(LeaseCall),
    /// Answered; fetch the next slice meanwhile.
    Prefetch(LeaseCall),
}

/// A key's rate-limit windows, and where its credits are held.
#[derive(Debug, Default)]
struct Windows {
    /// What this replica holds of the credits of the key's account, shared with the other
    /// keys of that account (a rotated key and its successor), found once by account.
    credits: Option<(Box<str>, Arc<Mutex<Hold>>)>,
    spent: Vec<Window>,
    /// The latest instant a request was judged at. A request whose clock reading is older
    /// (it waited for the lock, or the clock stepped back) is judged at this one instead, so
    /// the windows only ever move forward and a straggler from an ended window cannot
    /// reopen it.
    latest_us: i64,
    /// The key's revision whose limits the windows follow, as `apply` last set it.
    revision: i64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            last_used_us: AtomicI64::new(i64::MIN),
            queued: AtomicBool::new(false),
            state: Mutex::default(),
        })
    }
}

/// What the next flush takes of a key.
#[derive(Debug, Default)]
struct Unflushed {
    /// Whether `last_used_us` moved.
    last_used: bool,
    /// This hour's answers (when usage is recorded).
    usage: Option<HourUsage>,
}

/// What a flush takes of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyActivity {
    pub key_id: String,
    pub workspace_id: String,
    /// The last valid use and its client IP, when it moved since the last flush.
    pub last_used: Option<(i64, Option<IpAddr>)>,
    pub usage: Option<HourUsage>,
}

const ID_PREFIX: &str = "key_";
const ID_LEN: usize = 20;

/// A known key as ValidateKey reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Owned copies, made while the map is pinned: the response needs its own strings anyway, and
/// cloning a workspace's or scope set's shared `Arc` instead would make every core write the
/// same reference count on every call.
pub struct Found {
    pub id: String,
    pub workspace: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub expire_time_us: Option<i64>,
    /// Empty for none.
    pub owner_id: String,
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The answer, from the key's status, the client's address, the scopes required and the
    /// rate limits.
    pub result: Validation,
    /// The rate limits judged, when the key was otherwise valid.
    pub limits: LimitJudgement,
    /// What the key's credits have left after this request, when it has credits and was
    /// judged against them (it was otherwise VALID).
    pub credits_remaining: Option<i64>,
    /// A lease the answer needs (`Wait`: the answer is not final) or would like.
    pub credit_call: CreditCall,
}

/// The keys are blake3 outputs: their first 8 bytes are already a uniform hash, and callers
/// cannot pick them (a presented key is hashed before lookup).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PrehashedKeys;

#[derive(Debug, Default)]
pub(crate) struct PrehashedHasher(u64);

impl BuildHasher for PrehashedKeys {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // The 32 hash bytes arrive in one write; take their first 8.
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 = u64::from_le_bytes(*first);
        }
    }

    // `[u8; 32]` first writes its length: constant, so it must not become the hash.
    fn write_usize(&mut self, _length: usize) {}
}

#[derive(Debug)]
pub struct KeyIndex {
    keys: HashMap<[u8; 32], Record, PrehashedKeys>,
    workspaces: Mutex<HashSet<Arc<str>>>,
    /// Every distinct scope set, by its stored column.
    scope_sets: Mutex<StdHashMap<Box<str>, ScopeSet>>,
    /// Keys with activity since the last flush, each once.
    pending: Mutex<Vec<KeyHash>>,
    /// What this replica holds of each credit account it spent from.
    holds: Mutex<StdHashMap<Box<str>, Arc<Mutex<Hold>>>>,
    /// Accounts with credits held, for the sweep that gives idle ones back.
    holders: Mutex<HashSet<Box<str>>>,
    /// Keys that may hold slices of rate-limit windows, given back at a graceful stop, with
    /// the latest end of the windows they hold.
    window_holders: Mutex<StdHashMap<KeyHash, i64>>,
    /// The latest request instant a window lease arrived at: windows that ended before it
    /// hold nothing worth giving back.
    window_clock_us: AtomicI64,
    /// See [`KeyIndex::lease_gate`].
    lease_gates: Mutex<StdHashMap<Box<str>, Arc<tokio::sync::Mutex<()>>>>,
    /// Set at shutdown, before the last give-back.
    credits_closing: AtomicBool,
    /// Hours that ended before a flush took them.
    rolled: Mutex<Vec<(KeyHash, HourUsage)>>,
    /// Whether every answer for a known key is counted (GetKeyUsage), or only valid uses
    /// noted (last used).
    record_usage: bool,
}

impl Default for KeyIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyIndex {
    /// An index that records usage.
    pub fn new() -> Self {
        Self::recording_usage(true)
    }

    pub fn recording_usage(record_usage: bool) -> Self {
        Self {
            // Blocking resizes finish at once; an incremental one would leave lookups checking
            // two tables until enough later writes (rare here) finish the copy.
            keys: HashMap::builder()
                .hasher(PrehashedKeys)
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            workspaces: Mutex::default(),
            scope_sets: Mutex::default(),
            pending: Mutex::default(),
            holds: Mutex::default(),
            holders: Mutex::default(),
            window_holders: Mutex::default(),
            window_clock_us: AtomicI64::new(i64::MIN),
            lease_gates: Mutex::default(),
            credits_closing: AtomicBool::new(false),
            rolled: Mutex::default(),
            record_usage,
        }
    }

    /// Makes room for `additional` more keys at once, instead of growing step by step.
    pub(crate) fn reserve(&self, additional: usize) {
        self.keys.pin().reserve(additional);
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Applies a row as stored. A row older than what the index holds is ignored, so a slow
    /// catch-up can never bring back a key that a newer delete removed.
    pub fn apply(&self, row: &IndexRow) {
        let Some(hash) = KeyHash::from_slice(&row.key_hash) else {
            tracing::error!(key_id = %row.id, "stored key hash is not 32 bytes; key not indexed");
            return;
        };
        let Some(id) = row
            .id
            .strip_prefix(ID_PREFIX)
            .and_then(|rest| <[u8; ID_LEN]>::try_from(rest.as_bytes()).ok())
        else {
            tracing::error!(key_id = %row.id, "stored key id is ill-formed; key not indexed");
            return;
        };
        let workspace = self.intern(&row.workspace_id);
        let scopes = self.intern_scopes(&row.scopes);
        let stored_use = row.last_used_time_us.unwrap_or(i64::MIN);
        let terms = Terms::of(row);
        let has_limits = terms
            .as_ref()
            .is_some_and(|terms| !terms.rate_limits.is_empty());
        let has_credits = terms.as_ref().is_some_and(|terms| terms.credits.is_some());
        // A new setting of the balance voids what this replica holds of the old one, for
        // every key of the account (a rotated key still in its grace period too).
        if let Some((account, generation)) = terms.as_ref().and_then(|terms| terms.credits.as_ref())
            && let Some(hold) = lock(&self.holds).get(account).cloned()
        {
            let mut held = lock(&hold);
            if held.generation < *generation {
                *held = Hold {
                    generation: *generation,
                    leasing: held.leasing,
                    ..Hold::default()
                };
            }
        }
        let record = |old: Option<&Record>| Record {
            id,
            workspace: workspace.clone(),
            expire_time_us: row.expire_time_us.unwrap_or(i64::MAX),
            deleted: row.delete_time_us.is_some(),
            disabled: row.disable_time_us.is_some(),
            name: row.name.as_str().into(),
            scopes: scopes.clone(),
            revision: row.revision,
            terms: terms.clone(),
            stored_last_used_us: old
                .map_or(stored_use, |old| old.stored_last_used_us.max(stored_use)),
            // Shared, not moved: papaya may run this more than once. A key with limits gets
            // its activity now, so a lookup that still holds the old record spends from the
            // same windows (and the same slice of credits) as those that find the new one.
            activity: match old {
                Some(old) if has_limits || has_credits => {
                    OnceLock::from(old.activity.get_or_init(Activity::new).clone())
                }
                Some(old) => old
                    .activity
                    .get()
                    .cloned()
                    .map(OnceLock::from)
                    .unwrap_or_default(),
                None => OnceLock::new(),
            },
        };
        let keys = self.keys.pin();
        keys.compute(*hash.as_bytes(), |existing| match existing {
            Some((_, old)) if old.revision >= row.revision => Operation::Abort(()),
            Some((_, old)) => Operation::Insert(record(Some(old))),
            None => Operation::Insert(record(None)),
        });
        // Windows of limits removed, or whose window changed, go once they hold nothing; and
        // the windows follow this revision's limits from now on.
        let Some(record) = keys
            .get(hash.as_bytes())
            .filter(|record| record.revision == row.revision)
        else {
            return;
        };
        if let Some(activity) = record.activity.get() {
            let mut state = lock(&activity.state);
            if state.windows.is_some() || has_limits {
                let windows = state.windows.get_or_insert_with(Box::default);
                keep_windows_of(record.rate_limits(), &mut windows.spent);
                windows.revision = windows.revision.max(row.revision);
            }
        }
    }

    fn intern(&self, workspace: &str) -> Arc<str> {
        let mut workspaces = self
            .workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = workspaces.get(workspace) {
            return existing.clone();
        }
        let interned: Arc<str> = Arc::from(workspace);
        workspaces.insert(interned.clone());
        interned
    }

    fn intern_scopes(&self, column: &str) -> ScopeSet {
        let mut sets = self
            .scope_sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = sets.get(column) {
            return existing.clone();
        }
        let set: ScopeSet = column_scopes(column).map(Box::from).collect();
        sets.insert(column.into(), set.clone());
        set
    }

    /// The key with this hash, as of `now_us`, judged for a request from `client_ip` that
    /// needs every one of `required` (sorted or not) and spends `asks` from the key's rate
    /// limits (and 1 from each auto-applied one). An answer of VALID (active, from an allowed
    /// address, with the scopes required, within every limit judged) spends from the limits
    /// and notes the use (at most once per `use_resolution_us`); with usage recorded, every
    /// answer is counted in the key's hour. All in memory, for the flush to write. A key with
    /// credits is then charged `cost` from the slice this replica holds; when the slice
    /// cannot pay and the account might, nothing is judged or counted and the answer says
    /// to lease first ([`CreditCall::Wait`]).
    #[allow(clippy::too_many_arguments)]
    pub fn lookup<S: AsRef<str>>(
        &self,
        hash: &KeyHash,
        required: &[S],
        now_us: i64,
        use_resolution_us: i64,
        client_ip: Option<IpAddr>,
        asks: &[RateLimitAsk<'_>],
        cost: i64,
    ) -> Option<Found> {
        let keys = self.keys.pin();
        let record = keys.get(hash.as_bytes())?;
        let status = KeyStatus::at(
            record.deleted,
            record.disabled,
            record.expire_time_us,
            now_us,
        );
        let has_required_scopes = required.iter().all(|scope| {
            record
                .scopes
                .binary_search_by(|held| (**held).cmp(scope.as_ref()))
                .is_ok()
        });
        let ip_allowed = record
            .terms
            .as_ref()
            .is_none_or(|terms| terms.admits(client_ip));
        let mut result = Validation::of_known(status, ip_allowed, has_required_scopes);
        let limits = match &record.terms {
            Some(terms) if result == Validation::Valid && !terms.rate_limits.is_empty() => {
                Some((&*terms.rate_limits, asks))
            }
            _ => None,
        };
        let credits = match &record.terms {
            Some(terms) if result == Validation::Valid => terms
                .credits
                .as_ref()
                .map(|(account, generation)| (&**account, *generation, cost)),
            _ => None,
        };
        let use_stale = record.last_used_us().saturating_add(use_resolution_us) <= now_us;
        let mut judged = Judged::of(result);
        if limits.is_some()
            || credits.is_some()
            || (use_stale && result == Validation::Valid)
            || self.record_usage
        {
            judged = self.note(
                hash,
                record,
                result,
                (limits, credits),
                use_stale,
                now_us,
                client_ip,
            );
            result = judged.result;
        }
        let mut id = String::with_capacity(ID_PREFIX.len() + ID_LEN);
        id.push_str(ID_PREFIX);
        // The id bytes came from a parsed, base62 id: ASCII.
        id.push_str(std::str::from_utf8(&record.id).unwrap_or_default());
        Some(Found {
            id,
            // `String::from`, not `to_string`: the fmt machinery, for a copy.
            workspace: String::from(&*record.workspace),
            name: String::from(&*record.name),
            scopes: record
                .scopes
                .iter()
                .map(|scope| String::from(&**scope))
                .collect(),
            expire_time_us: (record.expire_time_us != i64::MAX).then_some(record.expire_time_us),
            owner_id: record
                .terms
                .as_ref()
                .map(|terms| String::from(&*terms.owner_id))
                .unwrap_or_default(),
            annotations: record
                .terms
                .iter()
                .flat_map(|terms| terms.annotations.iter())
                .map(|(key, value)| (String::from(&**key), String::from(&**value)))
                .collect(),
            result,
            limits: judged.limits,
            credits_remaining: judged.credits_remaining,
            credit_call: judged.call,
        })
    }

    /// Judges the request against `limits` (the key's, and what the request asks) and its
    /// credits when given, then notes a use (when the answer is still VALID and `use_stale`:
    /// the last one noted is older than the resolution) and counts the answer in the key's
    /// activity, and queues the key for the next flush. All under the key's lock, so
    /// concurrent requests spend from its limits and credits one at a time, and a request
    /// spends from all of them or none. RATE_LIMITED if a limit refused, else
    /// USAGE_EXCEEDED if the credits could not pay; a request the slice held cannot pay is
    /// neither judged nor counted ([`CreditCall::Wait`]).
    #[allow(clippy::too_many_arguments)]
    fn note(
        &self,
        hash: &KeyHash,
        record: &Record,
        result: Validation,
        (limits, credits): (Option<LimitsAsked<'_>>, Option<CreditsAsked<'_>>),
        use_stale: bool,
        now_us: i64,
        client_ip: Option<IpAddr>,
    ) -> Judged {
        let mut judged = Judged::of(result);
        let activity = record.activity.get_or_init(Activity::new);
        {
            let mut state = lock(&activity.state);
            let governed = match (limits, credits) {
                (None, None) => None,
                _ => Some(&mut **state.windows.get_or_insert_with(Box::default)),
            };
            let (windows, slot) = match governed {
                Some(Windows {
                    spent,
                    latest_us,
                    revision,
                    credits: slot,
                }) => (Some((spent, latest_us, *revision)), Some(slot)),
                None => (None, None),
            };
            let mut hold = None;
            if let (Some((account, generation, cost)), Some(slot)) = (credits, slot) {
                let mut held = lock(self.hold_of(slot, account));
                held.renew(generation, now_us);
                hold = Some((held, account, cost));
            }
            // Judged once the limits admit the request: a slice not known yet (nothing leased
            // for this setting and period) stops it unspent, to lease first.
            let mut verdict = None;
            let mut pay = || match &mut hold {
                Some((held, _, cost)) => {
                    let judged = if held.known {
                        held.judge(*cost)
                    } else {
                        CreditVerdict::Short
                    };
                    verdict = Some(judged);
                    judged == CreditVerdict::Paid
                }
                None => true,
            };
            let mut limit_windows = None;
            if let (Some((limits, asks)), Some((spent, latest_us, revision))) = (limits, windows) {
                let at = now_us.max(*latest_us);
                *latest_us = at;
                judged.limits = if record.revision >= revision {
                    judge_limits(limits, asks, spent, at, pay)
                } else {
                    // The key changed since this lookup read it: judge by its limits now.
                    let keys = self.keys.pin();
                    let current = keys
                        .get(hash.as_bytes())
                        .map_or(&[][..], Record::rate_limits);
                    judge_limits(current, asks, spent, at, pay)
                };
                if let Some(wait) = judged.limits.wait.take() {
                    // Nothing judged nor counted: lease the window's slice, then again.
                    return Judged {
                        call: CreditCall::Wait(WindowCall::call(hash, record, wait, false)),
                        ..Judged::of(result)
                    };
                }
                if !judged.limits.admitted() {
                    judged.result = Validation::RateLimited;
                }
                limit_windows = Some(spent);
            } else {
                pay();
            }
            if let Some((mut held, account, cost)) = hold.take() {
                match verdict {
                    Some(CreditVerdict::Short) => {
                        return lease_first(&mut held, account, cost, result);
                    }
                    Some(CreditVerdict::Exceeded) => {
                        judged.result = Validation::UsageExceeded;
                        // Replicas give back what they do not use, and an admin may add:
                        // look again, now and then.
                        if !held.leasing && now_us - held.last_lease_us >= RELEASE_CHECK_US {
                            held.leasing = true;
                            judged.call = CreditCall::Prefetch(lease_call(account, cost, true));
                        }
                    }
                    Some(CreditVerdict::Paid)
                        if !held.leasing
                            && held.unleased > 0
                            && held.held * 2 < held.last_grant =>
                    {
                        held.leasing = true;
                        judged.call = CreditCall::Prefetch(lease_call(account, 0, true));
                    }
                    _ => {}
                }
                // Refused by a limit first: the credits were not judged.
                if verdict.is_some() {
                    judged.credits_remaining = Some(held.remaining());
                }
            }
            // Whatever the path, the account's lock goes before the rest is noted.
            drop(hold);
            if judged.call == CreditCall::None
                && let Some(ahead) = judged.limits.prefetch.take()
                && let Some(spent) = limit_windows
            {
                mark_leasing(spent, &ahead);
                judged.call = CreditCall::Prefetch(WindowCall::call(hash, record, ahead, true));
            }
            let result = judged.result;
            let use_due = use_stale && result == Validation::Valid;
            if !use_due && !self.record_usage {
                // Only the limits were judged: nothing for a flush.
                return judged;
            }
            if use_due {
                activity.last_used_us.fetch_max(now_us, Ordering::Relaxed);
                state.last_used_ip = client_ip;
            }
            let unflushed = state.unflushed.get_or_insert_with(Box::default);
            unflushed.last_used |= use_due;
            if self.record_usage {
                let hour = hour_start(now_us);
                if let Some(ended) = unflushed.usage.take_if(|usage| usage.start_time_us != hour) {
                    lock(&self.rolled).push((*hash, ended));
                }
                unflushed
                    .usage
                    .get_or_insert_with(|| HourUsage::new(hour))
                    .count(result, client_ip);
            }
        }
        // A flush clears `queued` before it takes what is unflushed, so a use it missed is
        // queued again here.
        if !activity.queued.load(Ordering::Acquire) && !activity.queued.swap(true, Ordering::AcqRel)
        {
            lock(&self.pending).push(*hash);
        }
        judged
    }

    /// The hold of `account`, as the key's activity caches it.
    fn hold_of<'s>(
        &self,
        slot: &'s mut Option<(Box<str>, Arc<Mutex<Hold>>)>,
        account: &str,
    ) -> &'s Mutex<Hold> {
        if slot.as_ref().is_none_or(|(cached, _)| **cached != *account) {
            *slot = Some((account.into(), self.hold(account)));
        }
        match slot {
            Some((_, hold)) => hold,
            None => unreachable!("filled above"),
        }
    }

    fn hold(&self, account: &str) -> Arc<Mutex<Hold>> {
        let mut holds = lock(&self.holds);
        if let Some(hold) = holds.get(account) {
            return hold.clone();
        }
        let hold = Arc::<Mutex<Hold>>::default();
        holds.insert(account.into(), hold.clone());
        hold
    }

    /// Takes a lease into the account's hold. A lease of an older setting, or of a period
    /// that ended, is void (its credits were replaced or refilled).
    pub fn credit_leased(&self, account: &str, lease: Option<CreditLease>, now_us: i64) {
        let hold = self.hold(account);
        let mut held = lock(&hold);
        held.leasing = false;
        held.last_lease_us = now_us;
        let Some(lease) = lease else {
            // No such account (the key's credits were just cleared): nothing to hold.
            held.known = true;
            held.period_end_us = i64::MAX;
            return;
        };
        let newer = lease.generation > held.generation
            || (lease.generation == held.generation
                && lease.period_start_us > held.period_start_us);
        let same =
            lease.generation == held.generation && lease.period_start_us == held.period_start_us;
        if newer || (same && !held.known) {
            *held = Hold {
                generation: lease.generation,
                period_start_us: lease.period_start_us,
                period_end_us: lease.period_end_us,
                last_lease_us: now_us,
                held: if same { held.held } else { 0 },
                ..Hold::default()
            };
        } else if !same {
            return;
        }
        held.held += lease.granted;
        held.unleased = lease.unleased;
        held.known = true;
        if lease.granted > 0 {
            held.idle_sweeps = 0;
            held.last_grant = lease.granted;
            drop(held);
            lock(&self.holders).insert(account.into());
        }
    }

    /// Whether a lease asked for is no longer needed: for a request, the slice of the
    /// current period is known and pays `need`; for a prefetch, half of the last slice is
    /// still there (another lease came first).
    pub(crate) fn credits_ready(
        &self,
        account: &str,
        need: i64,
        prefetch: bool,
        now_us: i64,
    ) -> bool {
        let hold = self.hold(account);
        let held = lock(&hold);
        let current = held.known && now_us < held.period_end_us;
        if prefetch {
            current && held.held * 2 >= held.last_grant
        } else {
            current && held.held >= need
        }
    }

    /// A lease asked for and not taken (no longer needed, or failed): the next request that
    /// needs one asks again.
    pub(crate) fn credit_lease_not_taken(&self, account: &str) {
        lock(&self.hold(account)).leasing = false;
    }

    /// Whether the replica is stopping: no lease is taken any more, so what it holds can all
    /// be given back.
    pub(crate) fn credits_closing(&self) -> bool {
        self.credits_closing.load(Ordering::Acquire)
    }

    /// What this replica holds unspent of the account, of a setting at least `generation`,
    /// for the period of `now_us`.
    pub(crate) fn credits_held(&self, account: &str, generation: i64, now_us: i64) -> i64 {
        let Some(hold) = lock(&self.holds).get(account).cloned() else {
            return 0;
        };
        let held = lock(&hold);
        if now_us < held.period_end_us && held.generation >= generation {
            held.held
        } else {
            0
        }
    }

    /// Stops every lease from now on, and hands back the gates of those under way.
    pub(crate) fn close_credits(&self) -> Vec<Arc<tokio::sync::Mutex<()>>> {
        self.credits_closing.store(true, Ordering::Release);
        lock(&self.lease_gates).values().cloned().collect()
    }

    /// The accounts whose slices are due back: every one held (`all`, at shutdown), or
    /// those not spent from for [`IDLE_SWEEPS`] sweeps that hold a fifth or more of what is
    /// left (near the end of a balance, where another replica may need them). A slice of a
    /// large balance stays, so a key used now and then does not lease on every use. Each
    /// call is a sweep.
    pub(crate) fn credit_returns_due(&self, all: bool) -> Vec<Box<str>> {
        let holders: Vec<Box<str>> = if all {
            // Every hold, whether or not it is among the holders.
            lock(&self.holds).keys().cloned().collect()
        } else {
            lock(&self.holders).iter().cloned().collect()
        };
        let mut due = Vec::new();
        for account in holders {
            let hold = self.hold(&account);
            let mut held = lock(&hold);
            held.idle_sweeps += 1;
            let wanted_elsewhere = held.unleased < held.held * 4;
            if held.held > 0 && !all && (held.idle_sweeps <= IDLE_SWEEPS || !wanted_elsewhere) {
                continue;
            }
            drop(held);
            lock(&self.holders).remove(&account);
            due.push(account);
        }
        due
    }

    /// Takes back the account's slice to give back to it (under its lease gate, so no lease
    /// and no reader of its balance sees it in neither place); its next use leases again.
    /// `None` when it holds nothing.
    pub(crate) fn take_credit_return(&self, account: &str) -> Option<CreditReturn> {
        let hold = self.hold(account);
        let mut held = lock(&hold);
        if held.held <= 0 {
            return None;
        }
        held.known = false;
        Some(CreditReturn {
            account: String::from(account),
            generation: held.generation,
            period_start_us: held.period_start_us,
            amount: std::mem::take(&mut held.held),
        })
    }

    /// The lock a lease of the account's credits (and a return of them) holds: one at a
    /// time per account on this replica, so concurrent first uses share one lease.
    pub(crate) fn lease_gate(&self, account: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.lease_gates);
        // Gates nobody holds go, so the map holds only accounts being leased for.
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        if let Some(gate) = gates.get(account) {
            return gate.clone();
        }
        let gate = Arc::<tokio::sync::Mutex<()>>::default();
        gates.insert(account.into(), gate.clone());
        gate
    }

    /// Runs `f` on the key's rate-limit windows, with the latest instant they were judged at;
    /// `None` when the key is gone or has none.
    fn with_windows<R>(
        &self,
        hash: &KeyHash,
        f: impl FnOnce(&mut Vec<Window>, i64) -> R,
    ) -> Option<R> {
        let keys = self.keys.pin();
        let activity = keys.get(hash.as_bytes())?.activity.get()?;
        let mut state = lock(&activity.state);
        let windows = state.windows.as_mut()?;
        Some(f(&mut windows.spent, windows.latest_us))
    }

    /// Takes a lease of a rate-limit window into the key's windows: `granted` units, with
    /// `unleased` left of the window's budget.
    pub(crate) fn window_leased(&self, call: &WindowCall, granted: i64, unleased: i64) {
        let Some((holds, latest_us)) = self.with_windows(&call.hash, |windows, latest_us| {
            let holds = window_leased(windows, &call.lease, granted, unleased, latest_us);
            (holds, latest_us)
        }) else {
            return;
        };
        self.window_clock_us.fetch_max(latest_us, Ordering::Relaxed);
        if holds {
            let mut holders = lock(&self.window_holders);
            let ends = holders.entry(call.hash).or_insert(i64::MIN);
            *ends = (*ends).max(call.lease.ends_us());
        }
    }

    /// Whether a window lease asked for is no longer needed (see [`window_ready`]).
    pub(crate) fn window_ready(&self, call: &WindowCall, prefetch: bool) -> bool {
        self.with_windows(&call.hash, |windows, _| {
            window_ready(windows, &call.lease, prefetch)
        })
        .unwrap_or(false)
    }

    /// What this replica holds unspent of the window.
    pub(crate) fn window_held(&self, call: &WindowCall) -> i64 {
        self.with_windows(&call.hash, |windows, _| window_held(windows, &call.lease))
            .unwrap_or(0)
    }

    /// A window lease asked for and not taken: the next request that needs one asks again.
    pub(crate) fn window_lease_not_taken(&self, call: &WindowCall) {
        self.with_windows(&call.hash, |windows, _| {
            window_lease_not_taken(windows, &call.lease);
        });
    }

    /// Forgets the keys that hold no slice of a rate-limit window any more: their windows
    /// were spent, or ended (by the latest lease's clock), so the set given back at
    /// shutdown stays the keys in use. Under the set's lock, so a lease that lands meanwhile
    /// is not forgotten.
    pub(crate) fn forget_idle_window_holders(&self) {
        let now_us = self.window_clock_us.load(Ordering::Relaxed);
        lock(&self.window_holders).retain(|hash, ends_us| {
            *ends_us > now_us
                && self
                    .with_windows(hash, |windows, latest_us| {
                        holds_any(windows, latest_us.max(now_us))
                    })
                    .unwrap_or(false)
        });
    }

    /// Takes back every slice of a rate-limit window this replica holds (at a graceful
    /// stop, once no lease starts any more): each window's lease and the units to give back.
    pub(crate) fn take_window_returns(&self) -> Vec<(LeaseCall, i64)> {
        let holders = std::mem::take(&mut *lock(&self.window_holders));
        let keys = self.keys.pin();
        let mut returns = Vec::new();
        for hash in holders.into_keys() {
            let Some(record) = keys.get(hash.as_bytes()) else {
                continue;
            };
            let Some(activity) = record.activity.get() else {
                continue;
            };
            let taken = {
                let mut state = lock(&activity.state);
                match state.windows.as_mut() {
                    Some(windows) => take_window_returns(&mut windows.spent, windows.latest_us),
                    None => Vec::new(),
                }
            };
            for (lease, amount) in taken {
                returns.push((WindowCall::call(&hash, record, lease, false), amount));
            }
        }
        returns
    }

    /// The last valid use this replica has seen of the key, if any.
    pub(crate) fn last_used_us(&self, hash: &KeyHash) -> Option<i64> {
        let keys = self.keys.pin();
        let used = keys.get(hash.as_bytes())?.last_used_us();
        (used != i64::MIN).then_some(used)
    }

    /// The last valid use this replica has seen of the key, with its client IP.
    pub(crate) fn last_seen_use(&self, hash: &KeyHash) -> Option<(i64, Option<IpAddr>)> {
        let keys = self.keys.pin();
        let activity = keys.get(hash.as_bytes())?.activity.get()?;
        let at = activity.last_used_us.load(Ordering::Relaxed);
        (at != i64::MIN).then(|| (at, lock(&activity.state).last_used_ip))
    }

    /// Takes what was noted since the last call: last uses that moved, and counted hours.
    pub(crate) fn take_activity(&self) -> Vec<KeyActivity> {
        let pending = std::mem::take(&mut *lock(&self.pending));
        let rolled = std::mem::take(&mut *lock(&self.rolled));
        let keys = self.keys.pin();
        let names = |record: &Record| {
            let id = format!("{ID_PREFIX}{}", std::str::from_utf8(&record.id).ok()?);
            Some((id, record.workspace.to_string()))
        };
        let mut taken = Vec::with_capacity(pending.len() + rolled.len());
        for hash in pending {
            let Some(record) = keys.get(hash.as_bytes()) else {
                continue;
            };
            let Some(activity) = record.activity.get() else {
                continue;
            };
            activity.queued.store(false, Ordering::Release);
            let (unflushed, last_used_ip) = {
                let mut state = lock(&activity.state);
                (state.unflushed.take(), state.last_used_ip)
            };
            let Some(unflushed) = unflushed else {
                continue;
            };
            let last_used = unflushed
                .last_used
                .then(|| (activity.last_used_us.load(Ordering::Relaxed), last_used_ip));
            let usage = unflushed.usage;
            if let Some((key_id, workspace_id)) = names(record)
                && (last_used.is_some() || usage.is_some())
            {
                taken.push(KeyActivity {
                    key_id,
                    workspace_id,
                    last_used,
                    usage,
                });
            }
        }
        for (hash, usage) in rolled {
            if let Some((key_id, workspace_id)) = keys.get(hash.as_bytes()).and_then(names) {
                taken.push(KeyActivity {
                    key_id,
                    workspace_id,
                    last_used: None,
                    usage: Some(usage),
                });
            }
        }
        taken
    }
}

/// An answer that waits for a lease of at least `need`: judged and counted once it came.
fn lease_first(held: &mut Hold, account: &str, need: i64, result: Validation) -> Judged {
    held.leasing = true;
    Judged {
        call: CreditCall::Wait(lease_call(account, need, false)),
        ..Judged::of(result)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::Secret, usage::UsageCounts};

    fn row(id: usize, secret: &Secret, revision: i64, deleted: bool) -> IndexRow {
        IndexRow {
            id: format!("key_{id:0>20}"),
            workspace_id: format!("ws-{}", id % 3),
            key_hash: secret.hash().as_bytes().to_vec(),
            expire_time_us: Some(1_000),
            last_used_time_us: None,
            delete_time_us: deleted.then_some(5),
            revision,
            name: format!("key {id}"),
            disable_time_us: None,
            scopes: String::new(),
            owner_id: String::new(),
            annotations: String::new(),
            allowed_cidrs: String::new(),
            rate_limits: String::new(),
            credits: String::new(),
        }
    }

    const NONE: &[&str] = &[];

    #[test]
    fn a_request_that_read_the_clock_before_a_window_ended_is_judged_in_the_next() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        let mut key = row(1, &secret, 1, false);
        key.expire_time_us = None;
        let limit = RateLimit::parse("a", 2, Some((1, 0)), true).unwrap();
        key.rate_limits = crate::domain::RateLimits::new(vec![limit])
            .unwrap()
            .to_column();
        index.apply(&key);
        // The database's side: units leased of each window.
        let granted = Mutex::new(StdHashMap::<String, i64>::new());
        let result = |at| {
            for _ in 0..4 {
                let found = index
                    .lookup(&secret.hash(), NONE, at, 1, None, &[], 1)
                    .unwrap();
                let CreditCall::Wait(call) = found.credit_call else {
                    return found.result;
                };
                let window = call.window.expect("a window's lease");
                let mut granted = lock(&granted);
                let taken = granted.entry(call.account).or_default();
                let left = window.lease.limit - *taken;
                let slice = crate::domain::lease_size(left, window.lease.need);
                *taken += slice;
                index.window_leased(&window, slice, left - slice);
            }
            panic!("a lookup kept waiting");
        };
        assert_eq!(result(900_000), Validation::Valid);
        assert_eq!(result(950_000), Validation::Valid);
        assert_eq!(result(960_000), Validation::RateLimited);
        assert_eq!(result(1_000_000), Validation::Valid);
        // Stamped before the second began but judged after: it spends from the second
        // window, which is then full; the first is not opened again.
        assert_eq!(result(990_000), Validation::Valid);
        assert_eq!(result(1_010_000), Validation::RateLimited);
        assert_eq!(result(2_000_000), Validation::Valid);
    }

    #[test]
    fn distinct_key_hashes_spread_over_the_table() {
        let build = PrehashedKeys;
        let a = build.hash_one(*Secret::generate().hash().as_bytes());
        let b = build.hash_one(*Secret::generate().hash().as_bytes());
        assert_ne!(a, b);
    }

    #[test]
    fn a_key_is_found_with_its_state_at_a_time() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        index.apply(&row(7, &secret, 1, false));
        let found = index
            .lookup(&secret.hash(), NONE, 999, 1, None, &[], 1)
            .unwrap();
        assert_eq!(found.id, "key_00000000000000000007");
        assert_eq!(&*found.workspace, "ws-1");
        assert_eq!(found.result, Validation::Valid);
        assert_eq!(found.expire_time_us, Some(1_000));
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 1_000, 1, None, &[], 1)
                .unwrap()
                .result,
            Validation::Expired
        );
        assert!(
            index
                .lookup(&Secret::generate().hash(), NONE, 0, 1, None, &[], 1)
                .is_none()
        );
    }

    #[test]
    fn scopes_are_checked_and_disabled_keys_are_not_active() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        let mut key = row(1, &secret, 1, false);
        key.scopes = "orders:read orders:write".into();
        index.apply(&key);
        let found = index
            .lookup(&secret.hash(), &["orders:write"], 0, 1, None, &[], 1)
            .unwrap();
        assert_eq!(found.result, Validation::Valid);
        assert_eq!(found.scopes, ["orders:read", "orders:write"]);
        assert_eq!(found.name, "key 1");
        assert_eq!(index.take_activity().len(), 1);
        let found = index
            .lookup(
                &secret.hash(),
                &["orders:read", "admin"],
                10,
                1,
                None,
                &[],
                1,
            )
            .unwrap();
        assert_eq!(found.result, Validation::InsufficientScope);
        key.revision = 2;
        key.disable_time_us = Some(1);
        index.apply(&key);
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 20, 1, None, &[], 1)
                .unwrap()
                .result,
            Validation::Disabled
        );
        // Expired wins over disabled, deleted over both.
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 1_000, 1, None, &[], 1)
                .unwrap()
                .result,
            Validation::Expired
        );
        // A refused key's use is not its last use, but it is counted.
        let taken = index.take_activity();
        assert_eq!(taken[0].last_used, None);
        let usage = taken[0].usage.as_ref().unwrap();
        // Insufficient scope, disabled, expired (all within hour 0).
        assert_eq!(
            usage.counts,
            UsageCounts {
                expired: 1,
                disabled: 1,
                insufficient_scope: 1,
                ..UsageCounts::default()
            }
        );
        assert_eq!(index.last_used_us(&secret.hash()), Some(0));
    }

    #[test]
    fn a_used_key_keeps_64_bytes_of_activity_between_flushes() {
        // What a flush takes is boxed, so it is not here between flushes.
        assert!(std::mem::size_of::<Activity>() <= 64);
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        index.apply(&row(1, &secret, 5, true));
        // A slow catch-up delivers the key as it was before its delete.
        index.apply(&row(1, &secret, 4, false));
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 0, 1, None, &[], 1)
                .unwrap()
                .result,
            Validation::Deleted
        );
    }

    #[test]
    fn uses_are_queued_once_per_flush_and_keep_the_latest_time() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        index.apply(&row(1, &secret, 1, false));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        index.lookup(&secret.hash(), NONE, 100, 10, None, &[], 1);
        index.lookup(&secret.hash(), NONE, 105, 10, None, &[], 1); // within the resolution: not noted
        index.lookup(&secret.hash(), NONE, 120, 10, Some(ip), &[], 1);
        let taken = index.take_activity();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].key_id, "key_00000000000000000001");
        assert_eq!(taken[0].workspace_id, "ws-1");
        assert_eq!(taken[0].last_used, Some((120, Some(ip))));
        let usage = taken[0].usage.as_ref().unwrap();
        assert_eq!(
            usage.counts,
            UsageCounts {
                valid: 3,
                ..UsageCounts::default()
            }
        );
        assert_eq!(usage.client_ips.estimate(), 1);
        assert!(index.take_activity().is_empty());
        assert_eq!(index.last_used_us(&secret.hash()), Some(120));
    }

    #[test]
    fn an_hour_that_ends_before_a_flush_is_kept_apart() {
        use crate::usage::HOUR_US;
        let index = KeyIndex::new();
        let secret = Secret::generate();
        let mut key = row(1, &secret, 1, false);
        key.expire_time_us = None;
        index.apply(&key);
        index.lookup(&secret.hash(), NONE, HOUR_US - 1, 1, None, &[], 1);
        index.lookup(&secret.hash(), NONE, HOUR_US, 1, None, &[], 1);
        index.lookup(&secret.hash(), NONE, HOUR_US + 1, 1, None, &[], 1);
        let mut hours: Vec<_> = index
            .take_activity()
            .into_iter()
            .filter_map(|taken| taken.usage)
            .map(|usage| (usage.start_time_us, usage.counts.valid))
            .collect();
        hours.sort();
        assert_eq!(hours, [(0, 1), (HOUR_US, 2)]);
    }

    #[test]
    fn counts_survive_a_change_to_the_key_and_are_off_when_usage_is_not_recorded() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        let mut key = row(1, &secret, 1, false);
        index.apply(&key);
        index.lookup(&secret.hash(), NONE, 10, 1, None, &[], 1);
        key.revision = 2;
        key.disable_time_us = Some(11);
        index.apply(&key);
        index.lookup(&secret.hash(), NONE, 12, 1, None, &[], 1);
        let taken = index.take_activity();
        assert_eq!(
            taken[0].usage.as_ref().unwrap().counts,
            UsageCounts {
                valid: 1,
                disabled: 1,
                ..UsageCounts::default()
            }
        );

        let off = KeyIndex::recording_usage(false);
        off.apply(&row(1, &secret, 1, false));
        off.lookup(&secret.hash(), NONE, 10, 1, None, &[], 1);
        off.lookup(&secret.hash(), NONE, 2_000, 1, None, &[], 1); // expired: not a use
        let taken = off.take_activity();
        assert_eq!(taken[0].last_used, Some((10, None)));
        assert_eq!(taken[0].usage, None);
    }
}
