//! The in-memory validation index: every key, tombstones included, by the blake3 hash of the
//! key. ValidateKey is a lock-free read here; the database is never on that path.

mod sync;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    hash::{BuildHasher, Hasher},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

use papaya::{HashMap, Operation};

pub use sync::{SyncSettings, Syncer};

use crate::{
    domain::{KeyHash, column_scopes},
    store::IndexRow,
};

/// A key's scopes, sorted; keys with the same scopes share one.
pub type ScopeSet = Arc<[Box<str>]>;

/// What the index knows of one key: about 200 bytes with the map's own overhead and its
/// name (see BENCHMARKS.md).
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
    /// Last valid use seen by this replica, `i64::MIN` for none; flushed in batches.
    last_used_us: AtomicI64,
    /// Whether this key waits in the flush queue already.
    use_pending: AtomicBool,
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
    pub state: KeyState,
    /// Whether the key has every scope the request required.
    pub has_required_scopes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Disabled,
    Expired,
    Deleted,
}

impl KeyState {
    /// The one rule for a key's state at `now_us`: the most lasting reason wins, deleted
    /// before expired before disabled (enabling cannot revive an expired key); a key expires
    /// at its `expire_time` exactly. `i64::MAX` means never.
    pub fn at(deleted: bool, disabled: bool, expire_time_us: i64, now_us: i64) -> Self {
        if deleted {
            Self::Deleted
        } else if expire_time_us <= now_us {
            Self::Expired
        } else if disabled {
            Self::Disabled
        } else {
            Self::Active
        }
    }
}

/// The keys are blake3 outputs: their first 8 bytes are already a uniform hash, and callers
/// cannot pick them (a presented key is hashed before lookup).
#[derive(Debug, Clone, Copy, Default)]
pub struct PrehashedKeys;

#[derive(Debug, Default)]
pub struct PrehashedHasher(u64);

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

#[derive(Debug, Default)]
pub struct KeyIndex {
    keys: HashMap<[u8; 32], Record, PrehashedKeys>,
    workspaces: Mutex<HashSet<Arc<str>>>,
    /// Every distinct scope set, by its stored column.
    scope_sets: Mutex<StdHashMap<Box<str>, ScopeSet>>,
    /// Keys whose last use changed since the last flush.
    pending_uses: Mutex<Vec<KeyHash>>,
}

impl KeyIndex {
    pub fn new() -> Self {
        Self {
            // Blocking resizes finish at once; an incremental one would leave lookups checking
            // two tables until enough later writes (rare here) finish the copy.
            keys: HashMap::builder()
                .hasher(PrehashedKeys)
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            workspaces: Mutex::default(),
            scope_sets: Mutex::default(),
            pending_uses: Mutex::default(),
        }
    }

    /// Makes room for `additional` more keys at once, instead of growing step by step.
    pub fn reserve(&self, additional: usize) {
        self.keys.pin().reserve(additional);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
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
        let record = |last_used: i64| Record {
            id,
            workspace: workspace.clone(),
            expire_time_us: row.expire_time_us.unwrap_or(i64::MAX),
            deleted: row.delete_time_us.is_some(),
            disabled: row.disable_time_us.is_some(),
            name: row.name.as_str().into(),
            scopes: scopes.clone(),
            revision: row.revision,
            last_used_us: AtomicI64::new(last_used.max(stored_use)),
            use_pending: AtomicBool::new(false),
        };
        let keys = self.keys.pin();
        keys.compute(*hash.as_bytes(), |existing| match existing {
            Some((_, old)) if old.revision >= row.revision => Operation::Abort(()),
            Some((_, old)) => Operation::Insert(record(old.last_used_us.load(Ordering::Relaxed))),
            None => Operation::Insert(record(i64::MIN)),
        });
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

    /// The key with this hash, as of `now_us`, and whether it has every one of `required`
    /// (sorted or not). An answer of VALID (active, with the scopes required) records the use
    /// (in memory).
    pub fn lookup<S: AsRef<str>>(
        &self,
        hash: &KeyHash,
        required: &[S],
        now_us: i64,
        use_resolution_us: i64,
    ) -> Option<Found> {
        let keys = self.keys.pin();
        let record = keys.get(hash.as_bytes())?;
        let state = KeyState::at(
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
        if state == KeyState::Active
            && has_required_scopes
            && record.last_used_us.load(Ordering::Relaxed) + use_resolution_us <= now_us
        {
            record.last_used_us.fetch_max(now_us, Ordering::Relaxed);
            if !record.use_pending.swap(true, Ordering::AcqRel) {
                self.pending_uses
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(*hash);
            }
        }
        let mut id = String::with_capacity(ID_PREFIX.len() + ID_LEN);
        id.push_str(ID_PREFIX);
        // The id bytes came from a parsed, base62 id.
        id.extend(record.id.iter().map(|&b| char::from(b)));
        Some(Found {
            id,
            workspace: record.workspace.to_string(),
            name: record.name.to_string(),
            scopes: record
                .scopes
                .iter()
                .map(|scope| scope.to_string())
                .collect(),
            expire_time_us: (record.expire_time_us != i64::MAX).then_some(record.expire_time_us),
            state,
            has_required_scopes,
        })
    }

    /// The last valid use this replica has seen of the key, if any.
    pub fn last_used_us(&self, hash: &KeyHash) -> Option<i64> {
        let keys = self.keys.pin();
        let used = keys
            .get(hash.as_bytes())?
            .last_used_us
            .load(Ordering::Relaxed);
        (used != i64::MIN).then_some(used)
    }

    /// Takes the uses recorded since the last call: `(key id, last used µs)`.
    pub fn take_uses(&self) -> Vec<(String, i64)> {
        let pending = std::mem::take(
            &mut *self
                .pending_uses
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let keys = self.keys.pin();
        pending
            .into_iter()
            .filter_map(|hash| {
                let record = keys.get(hash.as_bytes())?;
                record.use_pending.store(false, Ordering::Release);
                let id = format!("{ID_PREFIX}{}", std::str::from_utf8(&record.id).ok()?);
                Some((id, record.last_used_us.load(Ordering::Relaxed)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Secret;

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
        }
    }

    const NONE: &[&str] = &[];

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
        let found = index.lookup(&secret.hash(), NONE, 999, 1).unwrap();
        assert_eq!(found.id, "key_00000000000000000007");
        assert_eq!(&*found.workspace, "ws-1");
        assert_eq!(found.state, KeyState::Active);
        assert_eq!(found.expire_time_us, Some(1_000));
        assert_eq!(
            index.lookup(&secret.hash(), NONE, 1_000, 1).unwrap().state,
            KeyState::Expired
        );
        assert!(
            index
                .lookup(&Secret::generate().hash(), NONE, 0, 1)
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
            .lookup(&secret.hash(), &["orders:write"], 0, 1)
            .unwrap();
        assert!(found.has_required_scopes);
        assert_eq!(found.scopes, ["orders:read", "orders:write"]);
        assert_eq!(found.name, "key 1");
        assert_eq!(index.take_uses().len(), 1);
        let found = index
            .lookup(&secret.hash(), &["orders:read", "admin"], 10, 1)
            .unwrap();
        assert!(!found.has_required_scopes);
        key.revision = 2;
        key.disable_time_us = Some(1);
        index.apply(&key);
        assert_eq!(
            index.lookup(&secret.hash(), NONE, 20, 1).unwrap().state,
            KeyState::Disabled
        );
        // Expired wins over disabled, deleted over both.
        assert_eq!(
            index.lookup(&secret.hash(), NONE, 1_000, 1).unwrap().state,
            KeyState::Expired
        );
        // A refused key's use is not its last use.
        assert!(index.take_uses().is_empty());
        assert_eq!(index.last_used_us(&secret.hash()), Some(0));
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        index.apply(&row(1, &secret, 5, true));
        // A slow catch-up delivers the key as it was before its delete.
        index.apply(&row(1, &secret, 4, false));
        assert_eq!(
            index.lookup(&secret.hash(), NONE, 0, 1).unwrap().state,
            KeyState::Deleted
        );
    }

    #[test]
    fn uses_are_queued_once_per_flush_and_keep_the_latest_time() {
        let index = KeyIndex::new();
        let secret = Secret::generate();
        index.apply(&row(1, &secret, 1, false));
        index.lookup(&secret.hash(), NONE, 100, 10);
        index.lookup(&secret.hash(), NONE, 105, 10); // within the resolution: not noted
        index.lookup(&secret.hash(), NONE, 120, 10);
        assert_eq!(
            index.take_uses(),
            vec![("key_00000000000000000001".to_owned(), 120)]
        );
        assert!(index.take_uses().is_empty());
        assert_eq!(index.last_used_us(&secret.hash()), Some(120));
    }
}
