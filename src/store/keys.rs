//! Keys: issued, read, listed, changed and deleted, each change with its event and revision.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
    sea_query::{Expr, ExprTrait},
};

use super::{
    Store, StoreError,
    entity::key::{ActiveModel, Column, Entity},
    events::{NewEvent, record_event},
};
use crate::domain::{
    AllowedCidrs, Annotations, Credits, Key, KeyCredits, KeyHash, KeyId, KeyName, OwnerId,
    PageCursor, RateLimits, Scopes, WorkspaceId,
};

/// A key to insert, already validated and hashed.
#[derive(Debug)]
pub(crate) struct NewKey<'a> {
    pub id: &'a KeyId,
    pub workspace: &'a WorkspaceId,
    pub name: KeyName,
    pub hash: KeyHash,
    pub suffix: &'a str,
    pub created_by: &'a str,
    pub create_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    pub scopes: Scopes,
    pub owner_id: OwnerId,
    pub annotations: Annotations,
    pub allowed_cidrs: AllowedCidrs,
    pub rate_limits: RateLimits,
    pub credits: KeyCredits,
    /// The balance of a new account, written with the key (a key issued by rotation keeps
    /// its predecessor's account and sets none).
    pub balance: Option<Credits>,
}

impl NewKey<'_> {
    fn into_model(self, revision: i64) -> ActiveModel {
        ActiveModel {
            id: Set(self.id.clone()),
            workspace_id: Set(self.workspace.clone()),
            name: Set(self.name),
            key_hash: Set(self.hash),
            key_suffix: Set(self.suffix.to_owned()),
            created_by: Set(self.created_by.to_owned()),
            create_time_us: Set(self.create_time.timestamp_micros()),
            expire_time_us: Set(self.expire_time.map(|t| t.timestamp_micros())),
            last_used_time_us: Set(None),
            delete_time_us: Set(None),
            revision: Set(revision),
            disable_time_us: Set(None),
            scopes: Set(self.scopes),
            rotated_to: Set(None),
            last_used_ip: Set(None),
            owner_id: Set(self.owner_id),
            annotations: Set(self.annotations),
            allowed_cidrs: Set(self.allowed_cidrs),
            rate_limits: Set(self.rate_limits),
            credits: Set(self.credits),
        }
    }
}

/// What a change sets on an existing key; `None` leaves a column as it is.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyUpdate {
    pub name: Option<KeyName>,
    pub scopes: Option<Scopes>,
    pub disable_time: Option<Option<DateTime<Utc>>>,
    pub expire_time: Option<Option<DateTime<Utc>>>,
    pub rotated_to: Option<KeyId>,
    /// Tombstones the key.
    pub delete_time: Option<DateTime<Utc>>,
    pub owner_id: Option<OwnerId>,
    pub annotations: Option<Annotations>,
    pub allowed_cidrs: Option<AllowedCidrs>,
    pub rate_limits: Option<RateLimits>,
    pub credits: Option<KeyCredits>,
    /// The balance to set on the (new) plan's account.
    pub balance: Option<Credits>,
}

/// A change to a key, decided from the key as stored: an update of its row and, for a
/// rotation, a key to insert with it; and the event that records it.
#[derive(Debug)]
pub(crate) struct Change<'a> {
    pub update: KeyUpdate,
    pub insert: Option<NewKey<'a>>,
    pub event: NewEvent,
}

/// The outcome of [`Store::change`]: the key as now stored, and the key inserted with it.
#[derive(Debug)]
pub(crate) struct Changed {
    pub key: Key,
    pub inserted: Option<Key>,
    /// False when the decision was to change nothing.
    pub changed: bool,
}

impl Store {
    /// Inserts a key with its `created` event.
    pub(crate) async fn insert(&self, key: NewKey<'_>, event: NewEvent) -> Result<Key, StoreError> {
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let balance = key.balance.zip(key.credits.plan().cloned());
        let now_us = key.create_time.timestamp_micros();
        let row = Entity::insert(key.into_model(revision))
            .exec_with_returning(&txn)
            .await?;
        if let Some((balance, plan)) = balance {
            self.set_credits(&txn, &plan.account, plan.generation, &balance, now_us)
                .await?;
        }
        record_event(&txn, revision, &row.workspace_id, &row.id, event).await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(row.into())
    }

    /// A key of the workspace as stored, tombstone or not; `None` when the workspace has no
    /// key with that id.
    pub(crate) async fn get(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
    ) -> Result<Option<Key>, StoreError> {
        Ok(Entity::find_by_id(id.clone())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&self.db)
            .await?
            .map(Key::from))
    }

    /// Changes a key of the workspace in one transaction: `decide` sees the key as stored
    /// (writers are serialised by the revision row, taken first, so nothing changes it
    /// between the read and the write) and answers what to change, nothing (`Ok(None)`), or
    /// an error, which rolls everything back. `Ok(None)` from here: no key with that id in
    /// the workspace.
    pub(crate) async fn change<'a, E: From<StoreError>>(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        decide: impl FnOnce(&Key) -> Result<Option<Change<'a>>, E>,
    ) -> Result<Option<Changed>, E> {
        let txn = self.db.begin().await.map_err(StoreError::from)?;
        let revision = self.next_revision(&txn).await?;
        let Some(stored) = Entity::find_by_id(id.clone())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&txn)
            .await
            .map_err(StoreError::from)?
        else {
            return Ok(None);
        };
        let stored = Key::from(stored);
        let Some(change) = decide(&stored)? else {
            // Dropping the transaction gives the revision back.
            return Ok(Some(Changed {
                key: stored,
                inserted: None,
                changed: false,
            }));
        };
        let inserted = match change.insert {
            Some(key) => Some(
                Entity::insert(key.into_model(revision))
                    .exec_with_returning(&txn)
                    .await
                    .map_err(StoreError::from)?
                    .into(),
            ),
            None => None,
        };
        let KeyUpdate {
            name,
            scopes,
            disable_time,
            expire_time,
            rotated_to,
            delete_time,
            owner_id,
            annotations,
            allowed_cidrs,
            rate_limits,
            mut credits,
            balance,
        } = change.update;
        let now_us = change.event.time_us;
        if let (Some(balance), Some(KeyCredits(Some(plan)))) = (balance, credits.as_mut()) {
            plan.generation = self
                .set_credits(&txn, &plan.account, plan.generation, &balance, now_us)
                .await
                .map_err(StoreError::from)?;
        }
        record_event(&txn, revision, workspace, id, change.event)
            .await
            .map_err(StoreError::from)?;
        let mut update = ActiveModel {
            id: sea_orm::ActiveValue::Unchanged(id.clone()),
            revision: Set(revision),
            ..Default::default()
        };
        if let Some(name) = name {
            update.name = Set(name);
        }
        if let Some(scopes) = scopes {
            update.scopes = Set(scopes);
        }
        let micros = |at: DateTime<Utc>| at.timestamp_micros();
        if let Some(disable_time) = disable_time {
            update.disable_time_us = Set(disable_time.map(micros));
        }
        if let Some(expire_time) = expire_time {
            update.expire_time_us = Set(expire_time.map(micros));
        }
        if let Some(rotated_to) = rotated_to {
            update.rotated_to = Set(Some(rotated_to));
        }
        if let Some(delete_time) = delete_time {
            update.delete_time_us = Set(Some(micros(delete_time)));
        }
        if let Some(owner_id) = owner_id {
            update.owner_id = Set(owner_id);
        }
        if let Some(annotations) = annotations {
            update.annotations = Set(annotations);
        }
        if let Some(allowed_cidrs) = allowed_cidrs {
            update.allowed_cidrs = Set(allowed_cidrs);
        }
        if let Some(rate_limits) = rate_limits {
            update.rate_limits = Set(rate_limits);
        }
        if let Some(credits) = credits {
            update.credits = Set(credits);
        }
        let key = Entity::update(update)
            .exec(&txn)
            .await
            .map_err(StoreError::from)?;
        self.announce(&txn, revision).await?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(Some(Changed {
            key: key.into(),
            inserted,
            changed: true,
        }))
    }

    /// Live keys of a workspace, newest first, after `cursor`; at most `limit`.
    /// With an owner, only that owner's keys.
    pub(crate) async fn list(
        &self,
        workspace: &WorkspaceId,
        owner: &OwnerId,
        cursor: Option<&PageCursor>,
        limit: u64,
    ) -> Result<Vec<Key>, StoreError> {
        let mut query = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null());
        if !owner.is_empty() {
            query = query.filter(Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(cursor) = cursor {
            // A row-value comparison, so both backends seek the index instead of scanning.
            query = query.filter(
                Expr::tuple([Expr::col(Column::CreateTimeUs), Expr::col(Column::Id)]).lt(
                    Expr::tuple([
                        Expr::val(cursor.create_time_us),
                        Expr::val(cursor.id.as_str()),
                    ]),
                ),
            );
        }
        Ok(query
            .order_by_desc(Column::CreateTimeUs)
            .order_by_desc(Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(Key::from)
            .collect())
    }
}
