//! What the API does, in domain terms; the gRPC layer only converts at the edges.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    clock::Clock,
    domain::{Actor, Expiration, KeyId, KeyName, PageCursor, PresentedKey, Secret, WorkspaceId},
    error::ApiError,
    store::{KeyRow, NewKey, Store},
};

/// ListKeys page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// ListKeys never returns more than this many keys at once.
pub const MAX_PAGE_SIZE: u64 = 1000;
/// `last_used_time` is written at most this often per key, so a busy key does not turn every
/// validation into a database write.
const LAST_USED_RESOLUTION: TimeDelta = TimeDelta::seconds(5);

#[derive(Debug, Clone)]
pub struct KeyService {
    store: Store,
    clock: Arc<dyn Clock>,
}

/// A stored key as of a moment: whether it is deleted or expired is decided against `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    Valid,
    Malformed,
    NotFound,
    Expired,
    Deleted,
}

#[derive(Debug)]
pub struct ValidateOutcome {
    pub result: Validation,
    /// The key, when it is known (every result but Malformed and NotFound).
    pub key: Option<KeyRow>,
}

#[derive(Debug)]
pub struct Page {
    pub keys: Vec<KeyRow>,
    pub next: Option<PageCursor>,
}

impl KeyService {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }

    /// The current time, at the microsecond precision the database keeps.
    pub fn now(&self) -> DateTime<Utc> {
        let now = self.clock.now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
    }

    pub async fn create(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        name: &KeyName,
        expiration: Expiration,
    ) -> Result<(KeyRow, Secret), ApiError> {
        let now = self.now();
        let secret = Secret::generate();
        let id = KeyId::generate();
        let row = self
            .store
            .insert(NewKey {
                id: &id,
                workspace,
                name,
                hash: secret.hash(),
                suffix: secret.suffix(),
                created_by: actor.id(),
                create_time: now,
                expire_time: expiration.expire_time(now),
            })
            .await?;
        tracing::info!(key_id = %id, workspace_id = %workspace, actor_id = actor.id(), "key created");
        Ok((row, secret))
    }

    pub async fn list(
        &self,
        workspace: &WorkspaceId,
        page_size: u64,
        after: Option<&PageCursor>,
    ) -> Result<Page, ApiError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        // One extra row tells whether another page follows, without a count query.
        let mut keys = self.store.list(workspace, after, page_size + 1).await?;
        let next = if keys.len() as u64 > page_size {
            keys.truncate(page_size as usize);
            keys.last().and_then(|last| {
                Some(PageCursor {
                    create_time_us: last.create_time_us,
                    id: KeyId::parse(&last.id).ok()?,
                })
            })
        } else {
            None
        };
        Ok(Page { keys, next })
    }

    pub async fn delete(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
    ) -> Result<(), ApiError> {
        if !self.store.delete(workspace, id, self.now()).await? {
            return Err(ApiError::KeyNotFound);
        }
        tracing::info!(key_id = %id, workspace_id = %workspace, actor_id = actor.id(), "key deleted");
        Ok(())
    }

    pub async fn validate(&self, presented: &str) -> Result<ValidateOutcome, ApiError> {
        // Garbage and typos are answered here, without touching the database.
        let Ok(key) = PresentedKey::parse(presented) else {
            return Ok(ValidateOutcome {
                result: Validation::Malformed,
                key: None,
            });
        };
        let Some(row) = self.store.find_by_hash(&key.hash()).await? else {
            return Ok(ValidateOutcome {
                result: Validation::NotFound,
                key: None,
            });
        };
        let now = self.now();
        let result = status_at(&row, now);
        if result == Validation::Valid {
            let stale = row.last_used_time_us.is_none_or(|used| {
                now.timestamp_micros() - used
                    >= LAST_USED_RESOLUTION.num_microseconds().unwrap_or(0)
            });
            if stale {
                // Losing a last-used update must never turn a valid key away.
                if let Err(err) = self.store.record_use(&row.id, now).await {
                    tracing::warn!(key_id = %row.id, error = %err, "could not record key use");
                }
            }
        }
        Ok(ValidateOutcome {
            result,
            key: Some(row),
        })
    }
}

/// Whether a stored key validates at `now`.
pub fn status_at(row: &KeyRow, now: DateTime<Utc>) -> Validation {
    if row.delete_time_us.is_some() {
        Validation::Deleted
    } else if row
        .expire_time_us
        .is_some_and(|expiry| expiry <= now.timestamp_micros())
    {
        Validation::Expired
    } else {
        Validation::Valid
    }
}
