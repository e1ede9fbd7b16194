//! The `api_key_events` table: the audit trail, one row per change to a key.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_key_events")]
pub struct Model {
    /// The revision the change took: unique, and in the order changes committed.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    pub workspace_id: String,
    pub key_id: String,
    /// `created`, `updated`, `disabled`, `enabled`, `rotated` or `deleted`.
    pub kind: String,
    pub actor_id: String,
    pub actor_role: String,
    pub create_time_us: i64,
    /// For `rotated`: the key issued to replace `key_id`.
    pub new_key_id: Option<String>,
    /// For `updated`: the fields changed, separated by single spaces.
    pub changed_fields: String,
}

impl ActiveModelBehavior for ActiveModel {}
