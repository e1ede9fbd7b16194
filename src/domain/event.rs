//! The audit trail: what happened to a key, who did it, and when.

use chrono::{DateTime, Utc};
use sea_orm::{DeriveActiveEnum, EnumIter, sea_query::StringLen};

use super::{KeyId, WorkspaceId};

/// What happened to a key. Stored as its name in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum EventKind {
    #[sea_orm(string_value = "created")]
    Created,
    #[sea_orm(string_value = "updated")]
    Updated,
    #[sea_orm(string_value = "disabled")]
    Disabled,
    #[sea_orm(string_value = "enabled")]
    Enabled,
    #[sea_orm(string_value = "rotated")]
    Rotated,
    #[sea_orm(string_value = "deleted")]
    Deleted,
}

/// A field UpdateKey changed, as the audit trail names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyField {
    Name,
    Scopes,
    OwnerId,
    Annotations,
    AllowedCidrs,
    RateLimits,
    Credits,
}

impl KeyField {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Scopes => "scopes",
            Self::OwnerId => "owner_id",
            Self::Annotations => "annotations",
            Self::AllowedCidrs => "allowed_cidrs",
            Self::RateLimits => "rate_limits",
            Self::Credits => "credits",
        }
    }
}

/// One change to a key, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyEvent {
    /// The revision the change took: unique, and in the order changes committed.
    pub id: i64,
    pub workspace: WorkspaceId,
    pub key_id: KeyId,
    pub kind: EventKind,
    pub actor_id: String,
    pub actor_role: String,
    pub time: DateTime<Utc>,
    /// For a rotation: the key issued to replace `key_id`.
    pub new_key_id: Option<KeyId>,
    /// For an update: the fields changed, as stored.
    pub changed_fields: Vec<String>,
}
