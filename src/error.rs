//! The one error type of the request path, and the single place it becomes a gRPC status.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{ActorError, InvalidInput},
    store::StoreError,
};

/// `ErrorInfo.domain` of every error this service returns.
pub(crate) const ERROR_DOMAIN: &str = "apikeys.cloodot";

/// The message of [`ApiError::RequestUndecodable`], by which the metrics tell those apart.
pub(crate) const UNDECODABLE_MESSAGE: &str =
    "the request message is not a valid protobuf encoding of this RPC's request";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// INVALID_ARGUMENT, reason from [`InvalidInput::reason`], `metadata.field` naming the field.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// UNAUTHENTICATED (`ACTOR_MISSING`), PERMISSION_DENIED (`ROLE_NOT_ALLOWED`), or
    /// INVALID_ARGUMENT (`ACTOR_DUPLICATED`, `metadata.header` naming the header sent twice).
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// NOT_FOUND (`KEY_NOT_FOUND`): no live key with that id in that workspace.
    #[error("no API key with that id in this workspace")]
    KeyNotFound,
    /// FAILED_PRECONDITION (`KEY_DELETED`, `KEY_DISABLED`, `KEY_EXPIRED`, `KEY_ROTATED`): the
    /// key exists in this workspace but its state does not allow the change.
    #[error("{}", .0.message())]
    KeyState(KeyStateConflict),
    /// ABORTED (`ETAG_MISMATCH`, AIP-154): the request's etag is not the key's current one;
    /// nothing was changed.
    #[error(
        "the key changed since the etag sent was read (or it is not an etag of this key); read it again"
    )]
    EtagMismatch,
    /// UNAVAILABLE (`DATABASE_UNAVAILABLE`): retry later; nothing was changed.
    /// INTERNAL (`INTERNAL`) for any other store failure: logged here, never sent.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// UNAVAILABLE (`INDEX_STALE`): this replica has not synced with the database within the
    /// staleness bound, so it cannot vouch for any key.
    #[error("cannot confirm keys: this replica last synced with the database {0:?} ago")]
    IndexStale(std::time::Duration),
    /// UNAUTHENTICATED (`CALLER_UNAUTHENTICATED`): no `authorization: Bearer` token, or one
    /// the callers file does not list.
    #[error(
        "this service needs caller credentials: `authorization: Bearer <token>` of a caller in its callers file"
    )]
    CallerUnauthenticated,
    /// PERMISSION_DENIED (`CALLER_ROLE_NOT_ALLOWED`), `metadata.caller_role`: a gateway
    /// calling a management RPC.
    #[error("caller `{caller}` has role {role}, which may not call {rpc}")]
    CallerNotAllowed {
        caller: String,
        role: crate::auth::CallerRole,
        rpc: String,
    },
    /// RESOURCE_EXHAUSTED (`RATE_LIMITED`) with RetryInfo: this caller's management calls, in
    /// all or in this workspace, are over their rate; retry after the delay given.
    #[error("too many management calls from this caller; retry in {0:?}")]
    RateLimited(std::time::Duration),
    /// UNAVAILABLE (`OVERLOADED`): the server is at its limit of calls in flight; retry with
    /// backoff.
    #[error("the server has too many calls in flight; retry later")]
    Overloaded,
    /// UNAUTHENTICATED (`CREDENTIALS_DUPLICATED`): two `authorization` values; which one
    /// speaks for the caller would be a guess.
    #[error("the call carries more than one authorization value; send exactly one")]
    CredentialsDuplicated,
    /// UNAVAILABLE (`CALLER_OVERLOADED`): this caller (or client IP) already has its share of
    /// the server's calls in flight; retry with backoff.
    #[error(
        "this caller already has {limit} calls in flight, its share of the server; retry later"
    )]
    CallerOverloaded { limit: usize },
    /// DEADLINE_EXCEEDED (`REQUEST_BODY_TIMEOUT`): the request's body did not arrive in time
    /// after its headers.
    #[error("the request body did not arrive within {0:?} of its headers")]
    RequestBodyTimeout(std::time::Duration),
    /// RESOURCE_EXHAUSTED (`HEALTH_WATCHES_EXHAUSTED`): too many health watches are open on
    /// this connection or on the server; use health Check, or close a watch.
    #[error(
        "too many health watches are open on this connection or server; use Check or close one"
    )]
    HealthWatchesExhausted,
    /// OUT_OF_RANGE (`REQUEST_TOO_LARGE`), as tonic answers for any message over the
    /// server's limit.
    #[error("a {rpc} request is at most {limit} bytes")]
    RequestTooLarge { rpc: &'static str, limit: usize },
    /// INVALID_ARGUMENT (`REQUEST_UNDECODABLE`): the request is not protobuf of the RPC's
    /// request message (invalid UTF-8 in a string, a truncated field). Carries nothing of it.
    #[error("{}", UNDECODABLE_MESSAGE)]
    RequestUndecodable,
    /// UNAVAILABLE (`SHUTTING_DOWN`): this replica is draining; reconnect (to another).
    #[error("the server is shutting down; reconnect and resend what was not answered")]
    ShuttingDown,
    /// UNAVAILABLE (`CREDITS_BUSY`): the key's credits, or a window of its rate limits, are
    /// spent on this replica faster than it could lease them for this request; retry.
    #[error(
        "the key's credits or rate limits are in too much demand on this replica to judge this request; retry"
    )]
    CreditsBusy,
    /// INVALID_ARGUMENT (`REQUEST_MISSING`): a ValidateKeys request without its `request`.
    #[error("a ValidateKeysRequest must carry a request to validate")]
    RequestMissing,
}

/// Why a key's state rules a change out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStateConflict {
    Deleted,
    Disabled,
    Expired,
    Rotated,
    /// Credits set on a rotated key: its successor spends from the same balance.
    CreditsOfSuccessor,
}

impl KeyStateConflict {
    fn reason(self) -> &'static str {
        match self {
            Self::Deleted => "KEY_DELETED",
            Self::Disabled => "KEY_DISABLED",
            Self::Expired => "KEY_EXPIRED",
            Self::Rotated | Self::CreditsOfSuccessor => "KEY_ROTATED",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Deleted => "the key is deleted; deleting is irreversible",
            Self::Disabled => "the key is disabled; enable it first",
            Self::Expired => "the key has expired; create a new key instead",
            Self::Rotated => "the key was rotated already; rotate the key that replaced it",
            Self::CreditsOfSuccessor => {
                "the key was rotated; set credits on the key that replaced it, which spends from the same balance"
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        err.status(None)
    }
}

impl ApiError {
    /// The status of this error on a ValidateKeys stream, where it ends the stream: as for a
    /// unary call, with the `request_id` of the request at fault in the message and the
    /// ErrorInfo's metadata.
    pub fn in_stream(self, request_id: u64) -> Status {
        self.status(Some(request_id))
    }

    fn status(self, request_id: Option<u64>) -> Status {
        let err = self;
        let (code, reason, mut message, mut metadata) = match &err {
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
            ApiError::Actor(ActorError::Duplicated(header)) => (
                Code::InvalidArgument,
                "ACTOR_DUPLICATED",
                err.to_string(),
                HashMap::from([("header".to_owned(), (*header).to_owned())]),
            ),
            ApiError::KeyNotFound => (
                Code::NotFound,
                "KEY_NOT_FOUND",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::EtagMismatch => (
                Code::Aborted,
                "ETAG_MISMATCH",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::KeyState(conflict) => (
                Code::FailedPrecondition,
                conflict.reason(),
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
            ApiError::CallerUnauthenticated => (
                Code::Unauthenticated,
                "CALLER_UNAUTHENTICATED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::CallerNotAllowed { role, .. } => (
                Code::PermissionDenied,
                "CALLER_ROLE_NOT_ALLOWED",
                err.to_string(),
                HashMap::from([("caller_role".to_owned(), role.to_string())]),
            ),
            ApiError::RateLimited(_) => (
                Code::ResourceExhausted,
                "RATE_LIMITED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::Overloaded => (
                Code::Unavailable,
                "OVERLOADED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::CredentialsDuplicated => (
                Code::Unauthenticated,
                "CREDENTIALS_DUPLICATED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::CallerOverloaded { .. } => (
                Code::Unavailable,
                "CALLER_OVERLOADED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::RequestBodyTimeout(_) => (
                Code::DeadlineExceeded,
                "REQUEST_BODY_TIMEOUT",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::HealthWatchesExhausted => (
                Code::ResourceExhausted,
                "HEALTH_WATCHES_EXHAUSTED",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::RequestTooLarge { .. } => (
                Code::OutOfRange,
                "REQUEST_TOO_LARGE",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::RequestUndecodable => (
                Code::InvalidArgument,
                "REQUEST_UNDECODABLE",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::ShuttingDown => (
                Code::Unavailable,
                "SHUTTING_DOWN",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::CreditsBusy => (
                Code::Unavailable,
                "CREDITS_BUSY",
                err.to_string(),
                HashMap::new(),
            ),
            ApiError::RequestMissing => (
                Code::InvalidArgument,
                "REQUEST_MISSING",
                err.to_string(),
                HashMap::from([("field".to_owned(), "request".to_owned())]),
            ),
        };
        if let Some(id) = request_id {
            message = format!("request_id {id}: {message}");
            metadata.insert("request_id".to_owned(), id.to_string());
        }
        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        if let ApiError::RateLimited(delay) = err {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(code, message, details)
    }
}
