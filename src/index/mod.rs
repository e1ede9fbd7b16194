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
        Cidr, KeyHash, KeyStatus, LimitJudgement, RateLimit, RateLimitAsk, Validation, Window,
        column_annotations, column_cidrs, column_rate_limits, column_scopes, judge_limits,
        keep_windows_of,
    },
    store::IndexRow,
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

/// A key's rate-limit windows.
#[derive(Debug, Default)]
struct Windows {
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
            // same windows as those that find the new one.
            activity: match old {
                Some(old) if has_limits => {
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
        // Limits removed, or whose window changed, start afresh if they come back; and the
        // windows follow this revision's limits from now on.
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
    /// answer is counted in the key's hour. All in memory, for the flush to write.
    pub fn lookup<S: AsRef<str>>(
        &self,
        hash: &KeyHash,
        required: &[S],
        now_us: i64,
        use_resolution_us: i64,
        client_ip: Option<IpAddr>,
        asks: &[RateLimitAsk<'_>],
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
        let use_stale = record.last_used_us().saturating_add(use_resolution_us) <= now_us;
        let mut judged = LimitJudgement::default();
        if limits.is_some() || (use_stale && result == Validation::Valid) || self.record_usage {
            (result, judged) =
                self.note(hash, record, result, limits, use_stale, now_us, client_ip);
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
            limits: judged,
        })
    }

    /// Judges the request against `limits` (the key's, and what the request asks) when
    /// given, then notes a use (when the answer is still VALID and `use_stale`: the last one
    /// noted is older than the resolution) and counts the answer in the key's activity, and
    /// queues the key for the next flush. All under the key's lock, so concurrent requests
    /// spend from its limits one at a time. Returns the answer: RATE_LIMITED if a limit
    /// refused.
    #[allow(clippy::too_many_arguments)]
    fn note(
        &self,
        hash: &KeyHash,
        record: &Record,
        mut result: Validation,
        limits: Option<(&[RateLimit], &[RateLimitAsk<'_>])>,
        use_stale: bool,
        now_us: i64,
        client_ip: Option<IpAddr>,
    ) -> (Validation, LimitJudgement) {
        let mut judged = LimitJudgement::default();
        let activity = record.activity.get_or_init(Activity::new);
        {
            let mut state = lock(&activity.state);
            if let Some((limits, asks)) = limits {
                let windows = state.windows.get_or_insert_with(Box::default);
                let at = now_us.max(windows.latest_us);
                windows.latest_us = at;
                judged = if record.revision >= windows.revision {
                    judge_limits(limits, asks, &mut windows.spent, at)
                } else {
                    // The key changed since this lookup read it: judge by its limits now.
                    let keys = self.keys.pin();
                    let current = keys
                        .get(hash.as_bytes())
                        .map_or(&[][..], Record::rate_limits);
                    judge_limits(current, asks, &mut windows.spent, at)
                };
                if !judged.admitted() {
                    result = Validation::RateLimited;
                }
            }
            let use_due = use_stale && result == Validation::Valid;
            if !use_due && !self.record_usage {
                // Only the limits were judged: nothing for a flush.
                return (result, judged);
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
        (result, judged)
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
        let result = |at| {
            index
                .lookup(&secret.hash(), NONE, at, 1, None, &[])
                .unwrap()
                .result
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
            .lookup(&secret.hash(), NONE, 999, 1, None, &[])
            .unwrap();
        assert_eq!(found.id, "key_00000000000000000007");
        assert_eq!(&*found.workspace, "ws-1");
        assert_eq!(found.result, Validation::Valid);
        assert_eq!(found.expire_time_us, Some(1_000));
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 1_000, 1, None, &[])
                .unwrap()
                .result,
            Validation::Expired
        );
        assert!(
            index
                .lookup(&Secret::generate().hash(), NONE, 0, 1, None, &[])
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
            .lookup(&secret.hash(), &["orders:write"], 0, 1, None, &[])
            .unwrap();
        assert_eq!(found.result, Validation::Valid);
        assert_eq!(found.scopes, ["orders:read", "orders:write"]);
        assert_eq!(found.name, "key 1");
        assert_eq!(index.take_activity().len(), 1);
        let found = index
            .lookup(&secret.hash(), &["orders:read", "admin"], 10, 1, None, &[])
            .unwrap();
        assert_eq!(found.result, Validation::InsufficientScope);
        key.revision = 2;
        key.disable_time_us = Some(1);
        index.apply(&key);
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 20, 1, None, &[])
                .unwrap()
                .result,
            Validation::Disabled
        );
        // Expired wins over disabled, deleted over both.
        assert_eq!(
            index
                .lookup(&secret.hash(), NONE, 1_000, 1, None, &[])
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
                .lookup(&secret.hash(), NONE, 0, 1, None, &[])
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
        index.lookup(&secret.hash(), NONE, 100, 10, None, &[]);
        index.lookup(&secret.hash(), NONE, 105, 10, None, &[]); // within the resolution: not noted
        index.lookup(&secret.hash(), NONE, 120, 10, Some(ip), &[]);
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
        index.lookup(&secret.hash(), NONE, HOUR_US - 1, 1, None, &[]);
        index.lookup(&secret.hash(), NONE, HOUR_US, 1, None, &[]);
        index.lookup(&secret.hash(), NONE, HOUR_US + 1, 1, None, &[]);
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
        index.lookup(&secret.hash(), NONE, 10, 1, None, &[]);
        key.revision = 2;
        key.disable_time_us = Some(11);
        index.apply(&key);
        index.lookup(&secret.hash(), NONE, 12, 1, None, &[]);
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
        off.lookup(&secret.hash(), NONE, 10, 1, None, &[]);
        off.lookup(&secret.hash(), NONE, 2_000, 1, None, &[]); // expired: not a use
        let taken = off.take_activity();
        assert_eq!(taken[0].last_used, Some((10, None)));
        assert_eq!(taken[0].usage, None);
    }
}
