//! The `api_keys` table. Times are microseconds since the Unix epoch (see the migration).

use sea_orm::entity::prelude::*;

use crate::domain::{
    AllowedCidrs, Annotations, KeyCredits, KeyHash, KeyId, KeyName, OwnerId, RateLimits, Scopes,
    WorkspaceId,
};

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: KeyName,
    /// blake3 of the full key; the key itself is never stored.
    #[sea_orm(unique)]
    pub key_hash: KeyHash,
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
    pub scopes: Scopes,
    /// The id of the key RotateKey issued to replace this one.
    pub rotated_to: Option<KeyId>,
    /// The client IP of the last valid use, when the gateway sent one.
    pub last_used_ip: Option<String>,
    /// '' for none.
    pub owner_id: OwnerId,
    /// A JSON object of strings; '' for none.
    pub annotations: Annotations,
    /// Canonical networks separated by single spaces; '' for any address.
    pub allowed_cidrs: AllowedCidrs,
    /// A JSON array of limits; '' for none.
    pub rate_limits: RateLimits,
    /// A JSON object naming the account spent from; '' for unlimited.
    pub credits: KeyCredits,
}

impl ActiveModelBehavior for ActiveModel {}

impl From<Model> for crate::domain::Key {
    fn from(row: Model) -> Self {
        Self {
            id: row.id,
            workspace: row.workspace_id,
            name: row.name,
            hash: row.key_hash,
            suffix: row.key_suffix,
            created_by: row.created_by,
            create_time: super::super::time(row.create_time_us),
            expire_time: row.expire_time_us.map(super::super::time),
            last_used_time: row.last_used_time_us.map(super::super::time),
            // Written from a parsed address; anything else is no address.
            last_used_ip: row.last_used_ip.and_then(|ip| ip.parse().ok()),
            disable_time: row.disable_time_us.map(super::super::time),
            delete_time: row.delete_time_us.map(super::super::time),
            scopes: row.scopes,
            rotated_to: row.rotated_to,
            revision: row.revision,
            owner_id: row.owner_id,
            annotations: row.annotations,
            allowed_cidrs: row.allowed_cidrs,
            rate_limits: row.rate_limits,
            credits: row.credits,
            credits_remaining: None,
        }
    }
}
