//! A stored key as the service sees it: what the store returns and the gRPC layer shows.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::{
    AllowedCidrs, Annotations, KeyCredits, KeyHash, KeyId, KeyName, KeyStatus, OwnerId, RateLimits,
    Scopes, WorkspaceId, masked_key,
};

/// A key as stored, tombstone or not. Never the key itself: only its hash and last four
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub id: KeyId,
    pub workspace: WorkspaceId,
    pub name: KeyName,
    pub hash: KeyHash,
    /// The key's last four characters, for the masked preview.
    pub suffix: String,
    /// The actor who created it.
    pub created_by: String,
    pub create_time: DateTime<Utc>,
    /// `None` for never.
    pub expire_time: Option<DateTime<Utc>>,
    /// The last valid use, as stored or as this replica has seen it.
    pub last_used_time: Option<DateTime<Utc>>,
    /// The client IP of that use, when the gateway sent one.
    pub last_used_ip: Option<IpAddr>,
    /// Set while the key is disabled.
    pub disable_time: Option<DateTime<Utc>>,
    /// Set once the key is deleted; the key stays as a tombstone.
    pub delete_time: Option<DateTime<Utc>>,
    pub scopes: Scopes,
    /// The key RotateKey issued to replace this one.
    pub rotated_to: Option<KeyId>,
    /// The revision of its last change: a newer one replaces an older one everywhere.
    pub revision: i64,
    pub owner_id: OwnerId,
    pub annotations: Annotations,
    /// Empty: any address.
    pub allowed_cidrs: AllowedCidrs,
    /// Empty: no limit.
    pub rate_limits: RateLimits,
    /// `None`: unlimited.
    pub credits: KeyCredits,
    /// The account's balance as stored (what no replica has leased), with the refill due by
    /// the time it was read; `None` when not read or unlimited.
    pub credits_remaining: Option<i64>,
}

impl Key {
    /// The key's status at `now`, by [`KeyStatus::at`].
    pub(crate) fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        KeyStatus::at(
            self.is_deleted(),
            self.is_disabled(),
            self.expire_time
                .map_or(i64::MAX, |at| at.timestamp_micros()),
            now.timestamp_micros(),
        )
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.delete_time.is_some()
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.disable_time.is_some()
    }

    /// Whether the key has expired by `now` (exactly at its expiry time, it has).
    pub(crate) fn has_expired(&self, now: DateTime<Utc>) -> bool {
        self.expire_time.is_some_and(|at| at <= now)
    }

    /// The key's etag (AIP-154): it changes with every change made to the key through the
    /// API, as the revision does (not with its last use, nor when it expires).
    pub(crate) fn etag(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.id.as_str().as_bytes());
        hasher.update(&self.revision.to_be_bytes());
        let hash = hasher.finalize();
        hash.to_hex()[..16].to_owned()
    }

    /// Whether `etag` is absent (empty) or the key's current one.
    pub(crate) fn etag_matches(&self, etag: &str) -> bool {
        etag.is_empty() || etag == self.etag()
    }

    /// The masked preview of the key, for lists: its prefix and last four characters.
    pub(crate) fn masked(&self) -> String {
        masked_key(&self.suffix)
    }

    /// Notes a use this replica saw that may not be stored yet.
    pub(crate) fn note_use(&mut self, at: DateTime<Utc>, ip: Option<IpAddr>) {
        if Some(at) > self.last_used_time {
            self.last_used_time = Some(at);
            self.last_used_ip = ip;
        }
    }
}
