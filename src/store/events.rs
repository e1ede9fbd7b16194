//! The audit trail: an event recorded with every change, in its transaction.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait, sea_query::ExprTrait,
};

use super::{Store, StoreError, entity::event};
use crate::domain::{Actor, EventKind, KeyEvent, KeyField, KeyId, WorkspaceId};

/// An event to record with a change, in its transaction; the store adds the key, the
/// workspace and the id (the change's revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewEvent {
    pub kind: EventKind,
    pub actor_id: String,
    pub actor_role: &'static str,
    pub time_us: i64,
    pub new_key_id: Option<KeyId>,
    pub changed_fields: Vec<KeyField>,
}

impl NewEvent {
    pub(crate) fn new(kind: EventKind, actor: &Actor, time: DateTime<Utc>) -> Self {
        Self {
            kind,
            actor_id: actor.id().to_owned(),
            actor_role: actor.role().as_str(),
            time_us: time.timestamp_micros(),
            new_key_id: None,
            changed_fields: Vec::new(),
        }
    }
}

/// Records a change's event, in the change's transaction, under the change's revision.
pub(super) async fn record_event(
    txn: &DatabaseTransaction,
    revision: i64,
    workspace: &WorkspaceId,
    key_id: &KeyId,
    event: NewEvent,
) -> Result<(), DbErr> {
    let changed_fields: Vec<&str> = event.changed_fields.iter().map(|f| f.as_str()).collect();
    event::Entity::insert(event::ActiveModel {
        id: Set(revision),
        workspace_id: Set(workspace.clone()),
        key_id: Set(key_id.clone()),
        kind: Set(event.kind),
        actor_id: Set(event.actor_id),
        actor_role: Set(event.actor_role.to_owned()),
        create_time_us: Set(event.time_us),
        new_key_id: Set(event.new_key_id),
        changed_fields: Set(changed_fields.join(" ")),
    })
    .exec_without_returning(txn)
    .await?;
    Ok(())
}

impl Store {
    /// A workspace's events (or one key's, the rotation that issued it included), newest
    /// first, older than the event `before`; at most `limit`.
    pub(crate) async fn events(
        &self,
        workspace: &WorkspaceId,
        key: Option<&KeyId>,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<KeyEvent>, StoreError> {
        use event::{Column as EventColumn, Entity as Events};
        Ok(Events::find()
            .filter(EventColumn::WorkspaceId.eq(workspace.as_str()))
            .apply_if(key, |query, key| {
                query.filter(
                    EventColumn::KeyId
                        .eq(key.as_str())
                        .or(EventColumn::NewKeyId.eq(key.as_str())),
                )
            })
            .apply_if(before, |query, before| {
                query.filter(EventColumn::Id.lt(before))
            })
            .order_by_desc(EventColumn::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(KeyEvent::from)
            .collect())
    }
}
