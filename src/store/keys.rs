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
use crate::domain::{Key, KeyHash, KeyId, KeyName, PageCursor, Scopes, WorkspaceId};

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
        let row = Entity::insert(key.into_model(revision))
            .exec_with_returning(&txn)
            .await?;
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
        } = change.update;
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
    pub(crate) async fn list(
        &self,
        workspace: &WorkspaceId,
        cursor: Option<&PageCursor>,
        limit: u64,
    ) -> Result<Vec<Key>, StoreError> {
        let mut query = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null());
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

    /// Tombstones a live key of the workspace, with its `deleted` event, and returns it as
    /// now stored; `None` when there is no such live key (nothing is changed then).
    pub(crate) async fn delete(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        event: NewEvent,
    ) -> Result<Option<Key>, StoreError> {
        let now = event.time_us;
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let result = Entity::update_many()
            .col_expr(Column::DeleteTimeUs, Expr::value(now))
            .col_expr(Column::Revision, Expr::value(revision))
            .filter(Column::Id.eq(id.as_str()))
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null())
            .exec(&txn)
            .await?;
        if result.rows_affected != 1 {
            // Dropping the transaction rolls the revision back too.
            return Ok(None);
        }
        let Some(row) = Entity::find_by_id(id.clone()).one(&txn).await? else {
            return Ok(None);
        };
        record_event(&txn, revision, workspace, id, event).await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(Some(row.into()))
    }
}
