//! The `api_key_events` table: the audit trail, one row per change to a key.

use sea_orm::entity::prelude::*;

use crate::domain::{EventKind, KeyId, WorkspaceId};

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_key_events")]
pub(crate) struct Model {
    /// The revision the change took: unique, and in the order changes committed.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    pub workspace_id: WorkspaceId,
    pub key_id: KeyId,
    pub kind: EventKind,
    pub actor_id: String,
    pub actor_role: String,
    pub create_time_us: i64,
    /// For `rotated`: the key issued to replace `key_id`.
    pub new_key_id: Option<KeyId>,
    /// For `updated`: the fields changed, separated by single spaces.
    pub changed_fields: String,
}

impl ActiveModelBehavior for ActiveModel {}

impl From<Model> for crate::domain::KeyEvent {
    fn from(row: Model) -> Self {
        Self {
            id: row.id,
            workspace: row.workspace_id,
            key_id: row.key_id,
            kind: row.kind,
            actor_id: row.actor_id,
            actor_role: row.actor_role,
            time: super::super::time(row.create_time_us),
            new_key_id: row.new_key_id,
            changed_fields: row
                .changed_fields
                .split(' ')
                .filter(|field| !field.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}
