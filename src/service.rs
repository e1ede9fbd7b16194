//! What the API does, in domain terms; the gRPC layer only converts at the edges.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    clock::Clock,
    domain::{
        Actor, Expiration, KeyHash, KeyId, KeyName, PageCursor, PresentedKey, Secret, WorkspaceId,
    },
    error::ApiError,
    index::{Found, KeyIndex, KeyState, Syncer},
    store::{KeyRow, NewKey, Store},
};

/// ListKeys page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// ListKeys never returns more than this many keys at once.
pub const MAX_PAGE_SIZE: u64 = 1000;
/// A key's last use is noted in memory at most this often; a flush writes it within about a
/// second more.
const LAST_USED_RESOLUTION: TimeDelta = TimeDelta::seconds(1);

#[derive(Debug, Clone)]
pub struct KeyService {
    store: Store,
    clock: Arc<dyn Clock>,
    syncer: Arc<Syncer>,
    index: Arc<KeyIndex>,
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
    pub key: Option<Found>,
}

#[derive(Debug)]
pub struct Page {
    pub keys: Vec<KeyRow>,
    pub next: Option<PageCursor>,
}

impl KeyService {
    /// `syncer` keeps the index that ValidateKey reads in step with `store`.
    pub fn new(store: Store, clock: Arc<dyn Clock>, syncer: Arc<Syncer>) -> Self {
        let index = syncer.index().clone();
        Self {
            store,
            clock,
            syncer,
            index,
        }
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
        // This replica answers for the key before CreateKey returns.
        self.index.apply(&(&row).into());
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
        // This replica may have seen uses that are not flushed yet.
        for key in &mut keys {
            if let Some(used) =
                KeyHash::from_slice(&key.key_hash).and_then(|hash| self.index.last_used_us(&hash))
            {
                key.last_used_time_us = key.last_used_time_us.max(Some(used));
            }
        }
        Ok(Page { keys, next })
    }

    pub async fn delete(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
    ) -> Result<(), ApiError> {
        let Some(row) = self.store.delete(workspace, id, self.now()).await? else {
            return Err(ApiError::KeyNotFound);
        };
        // The very next ValidateKey on this replica answers DELETED.
        self.index.apply(&(&row).into());
        tracing::info!(key_id = %id, workspace_id = %workspace, actor_id = actor.id(), "key deleted");
        Ok(())
    }

    /// Answers from memory: no database round trip, whatever the input.
    pub fn validate(&self, presented: &str) -> Result<ValidateOutcome, ApiError> {
        // Garbage and typos are answered from the input alone, even when the index is stale.
        let Ok(key) = PresentedKey::parse(presented) else {
            return Ok(ValidateOutcome {
                result: Validation::Malformed,
                key: None,
            });
        };
        // Fail closed: a stale index might still hold a key deleted elsewhere.
        if !self.syncer.is_fresh() {
            return Err(ApiError::IndexStale(self.syncer.staleness()));
        }
        let now = self.clock.now().timestamp_micros();
        let resolution = LAST_USED_RESOLUTION.num_microseconds().unwrap_or(1_000_000);
        let Some(found) = self.index.lookup(&key.hash(), now, resolution) else {
            return Ok(ValidateOutcome {
                result: Validation::NotFound,
                key: None,
            });
        };
        let result = match found.state {
            KeyState::Active => Validation::Valid,
            KeyState::Expired => Validation::Expired,
            KeyState::Deleted => Validation::Deleted,
        };
        Ok(ValidateOutcome {
            result,
            key: Some(found),
        })
    }
}
