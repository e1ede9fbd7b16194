//! The one error type of the request path, and the single place it becomes a gRPC status.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{ActorError, InvalidInput},
    store::StoreError,
};

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "apikeys.cloodot";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// INVALID_ARGUMENT, reason from [`InvalidInput::reason`], `metadata.field` naming the field.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// UNAUTHENTICATED (`ACTOR_MISSING`) or PERMISSION_DENIED (`ROLE_NOT_ALLOWED`).
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// NOT_FOUND (`KEY_NOT_FOUND`): no live key with that id in that workspace.
    #[error("no API key with that id in this workspace")]
    KeyNotFound,
    /// UNAVAILABLE (`DATABASE_UNAVAILABLE`): retry later; nothing was changed.
    /// INTERNAL (`INTERNAL`) for any other store failure: logged here, never sent.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// UNAVAILABLE (`INDEX_STALE`): this replica has not synced with the database within the
    /// staleness bound, so it cannot vouch for any key.
    #[error("cannot confirm keys: this replica last synced with the database {0:?} ago")]
    IndexStale(std::time::Duration),
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let (code, reason, message, metadata) = match &err {
            ApiError::InvalidInput(invalid) => (
                Code::InvalidArgument,
                invalid.reason(),
                invalid.to_string(),
                HashMap::from([("field".to_owned(), invalid.field().to_owned())]),
            ),
            ApiError::Actor(ActorError::Missing) => (
                Code::Unauthenticated,
                "ACTOR_MISSING",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::Actor(ActorError::RoleNotAllowed) => (
                Code::PermissionDenied,
                "ROLE_NOT_ALLOWED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::KeyNotFound => (
                Code::NotFound,
                "KEY_NOT_FOUND",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::Store(StoreError::Unavailable(source)) => {
                tracing::warn!(error = %source, "database unavailable");
                (
                    Code::Unavailable,
                    "DATABASE_UNAVAILABLE",
                    "the key database is unavailable; retry later".to_owned(),
                    HashMap::new(),
                )
            }
            ApiError::IndexStale(_) => (
                Code::Unavailable,
                "INDEX_STALE",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::Store(StoreError::Internal(source)) => {
                tracing::error!(error = %source, "database error");
                (
                    Code::Internal,
                    "INTERNAL",
                    "internal error".to_owned(),
                    HashMap::new(),
                )
            }
        };
        Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
        )
    }
}
