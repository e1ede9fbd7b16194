//! The `api_keys` table. Times are microseconds since the Unix epoch (see the migration).

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    /// blake3 of the full key; the key itself is never stored.
    #[sea_orm(unique)]
    pub key_hash: Vec<u8>,
    /// The key's last four characters, for the masked preview.
    pub key_suffix: String,
    pub created_by: String,
    pub create_time_us: i64,
    pub expire_time_us: Option<i64>,
    pub last_used_time_us: Option<i64>,
    /// Set when the key is deleted; the row stays as a tombstone so ValidateKey can answer
    /// DELETED rather than NOT_FOUND.
    pub delete_time_us: Option<i64>,
    /// The revision of the last change to this row; see the migrations.
    pub revision: i64,
    /// Set while the key is disabled.
    pub disable_time_us: Option<i64>,
    /// Sorted, separated by single spaces; '' for none.
    pub scopes: String,
    /// The id of the key RotateKey issued to replace this one.
    pub rotated_to: Option<String>,
    /// The client IP of the last valid use, when the gateway sent one.
    pub last_used_ip: Option<String>,
}

impl ActiveModelBehavior for ActiveModel {}
