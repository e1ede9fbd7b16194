/// Why a request field was rejected. Each variant is one `google.rpc.ErrorInfo` reason, so
/// clients can branch on it; the message names the limit, never the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("workspace_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'")]
    WorkspaceIdInvalid,
    #[error("name must not be empty, blank or invisible")]
    NameEmpty,
    #[error("name must be at most 100 characters")]
    NameTooLong,
    #[error(
        "name must not contain control, invisible or text-direction characters (a zero-width joiner only inside an emoji)"
    )]
    NameInvalidCharacters,
    #[error("name must not contain an API key")]
    NameContainsKey,
    #[error("expiration must be set: EXPIRATION_NEVER, _30_DAYS, _90_DAYS or _1_YEAR")]
    ExpirationUnspecified,
    #[error("expiration is not a known Expiration value")]
    ExpirationUnknown,
    #[error("set either expiration or expire_time, not both")]
    ExpirationConflict,
    #[error("expire_time must be a valid timestamp (nanos from 0 to 999,999,999)")]
    ExpireTimeInvalid,
    #[error("expire_time must be in the future")]
    ExpireTimeInPast,
    #[error("expire_time must be at most 5 years ahead")]
    ExpireTimeTooFar,
    #[error("each scope must be 1 to 64 characters of a-z, 0-9, '_', '.', ':' or '-'")]
    ScopeInvalid,
    #[error("a key has at most 32 scopes")]
    TooManyScopes,
    #[error(
        "required_scopes must hold at most 32 scopes of 1 to 64 characters of a-z, 0-9, '_', '.', ':' or '-'"
    )]
    RequiredScopesInvalid,
    #[error(
        "update_mask paths must be `name`, `scopes`, `owner_id`, `annotations`, `allowed_cidrs`, `rate_limits` or `*`"
    )]
    UpdateMaskInvalid,
    #[error("grace_period must be between 0 and 7 days")]
    GracePeriodInvalid,
    #[error("page_size must not be negative")]
    PageSizeNegative,
    #[error(
        "page_token is not a token returned by this list for the same workspace_id (and key_id)"
    )]
    PageTokenInvalid,
    #[error("client_ip must be an IPv4 or IPv6 address")]
    ClientIpInvalid,
    #[error(
        "start_time and end_time are required, valid timestamps, start_time before end_time and at most 93 days apart"
    )]
    TimeRangeInvalid,
    #[error("key_id must be a key id as returned by CreateKey or ListKeys")]
    KeyIdInvalid,
    #[error("owner_id must be at most 128 visible ASCII characters (no spaces)")]
    OwnerIdInvalid,
    #[error("each annotation key must be 1 to 64 characters of a-z, 0-9, '_', '.', ':' or '-'")]
    AnnotationKeyInvalid,
    #[error("each annotation value must be at most 256 bytes, without control characters")]
    AnnotationValueInvalid,
    #[error("a key has at most 16 annotations")]
    TooManyAnnotations,
    #[error(
        "each allowed CIDR must be an IPv4 or IPv6 address or network (such as 192.0.2.0/24), with no bits set past its prefix"
    )]
    CidrInvalid,
    #[error("a key has at most 64 allowed CIDRs")]
    TooManyCidrs,
    #[error(
        "each rate limit name must be 1 to 64 characters of a-z, 0-9, '_', '.', ':' or '-', and distinct"
    )]
    RateLimitNameInvalid,
    #[error("each rate limit's limit must be from 1 to 1,000,000,000")]
    RateLimitLimitInvalid,
    #[error("each rate limit's window must be from 1 second to 24 hours, in whole seconds")]
    RateLimitWindowInvalid,
    #[error("a key has, and a request names, at most 8 rate limits")]
    TooManyRateLimits,
    #[error("cost must not be negative")]
    CostInvalid,
    #[error("credits.remaining must be from 0 to 1,000,000,000,000")]
    CreditsInvalid,
    #[error(
        "credits.refill needs an amount from 1 to 1,000,000,000,000 and an interval: daily with day_of_month 0, or monthly with day_of_month 1 to 31"
    )]
    RefillInvalid,
}

impl InvalidInput {
    /// The stable `ErrorInfo.reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::WorkspaceIdInvalid => "WORKSPACE_ID_INVALID",
            Self::NameEmpty => "NAME_EMPTY",
            Self::NameTooLong => "NAME_TOO_LONG",
            Self::NameInvalidCharacters => "NAME_INVALID_CHARACTERS",
            Self::NameContainsKey => "NAME_CONTAINS_KEY",
            Self::ExpirationUnspecified => "EXPIRATION_UNSPECIFIED",
            Self::ExpirationUnknown => "EXPIRATION_UNKNOWN",
            Self::ExpirationConflict => "EXPIRATION_CONFLICT",
            Self::ExpireTimeInvalid => "EXPIRE_TIME_INVALID",
            Self::ExpireTimeInPast => "EXPIRE_TIME_IN_PAST",
            Self::ExpireTimeTooFar => "EXPIRE_TIME_TOO_FAR",
            Self::ScopeInvalid => "SCOPE_INVALID",
            Self::TooManyScopes => "TOO_MANY_SCOPES",
            Self::RequiredScopesInvalid => "REQUIRED_SCOPES_INVALID",
            Self::UpdateMaskInvalid => "UPDATE_MASK_INVALID",
            Self::GracePeriodInvalid => "GRACE_PERIOD_INVALID",
            Self::PageSizeNegative => "PAGE_SIZE_NEGATIVE",
            Self::PageTokenInvalid => "PAGE_TOKEN_INVALID",
            Self::ClientIpInvalid => "CLIENT_IP_INVALID",
            Self::TimeRangeInvalid => "TIME_RANGE_INVALID",
            Self::KeyIdInvalid => "KEY_ID_INVALID",
            Self::OwnerIdInvalid => "OWNER_ID_INVALID",
            Self::AnnotationKeyInvalid => "ANNOTATION_KEY_INVALID",
            Self::AnnotationValueInvalid => "ANNOTATION_VALUE_INVALID",
            Self::TooManyAnnotations => "TOO_MANY_ANNOTATIONS",
            Self::CidrInvalid => "CIDR_INVALID",
            Self::TooManyCidrs => "TOO_MANY_CIDRS",
            Self::RateLimitNameInvalid => "RATE_LIMIT_NAME_INVALID",
            Self::RateLimitLimitInvalid => "RATE_LIMIT_LIMIT_INVALID",
            Self::RateLimitWindowInvalid => "RATE_LIMIT_WINDOW_INVALID",
            Self::TooManyRateLimits => "TOO_MANY_RATE_LIMITS",
            Self::CostInvalid => "COST_INVALID",
            Self::CreditsInvalid => "CREDITS_INVALID",
            Self::RefillInvalid => "REFILL_INVALID",
        }
    }

    /// The request field at fault.
    pub fn field(self) -> &'static str {
        match self {
            Self::WorkspaceIdInvalid => "workspace_id",
            Self::NameEmpty
            | Self::NameTooLong
            | Self::NameInvalidCharacters
            | Self::NameContainsKey => "name",
            Self::ExpirationUnspecified | Self::ExpirationUnknown | Self::ExpirationConflict => {
                "expiration"
            }
            Self::ExpireTimeInvalid | Self::ExpireTimeInPast | Self::ExpireTimeTooFar => {
                "expire_time"
            }
            Self::ScopeInvalid | Self::TooManyScopes => "scopes",
            Self::RequiredScopesInvalid => "required_scopes",
            Self::UpdateMaskInvalid => "update_mask",
            Self::GracePeriodInvalid => "grace_period",
            Self::PageSizeNegative => "page_size",
            Self::PageTokenInvalid => "page_token",
            Self::ClientIpInvalid => "client_ip",
            Self::TimeRangeInvalid => "start_time",
            Self::KeyIdInvalid => "key_id",
            Self::OwnerIdInvalid => "owner_id",
            Self::AnnotationKeyInvalid
            | Self::AnnotationValueInvalid
            | Self::TooManyAnnotations => "annotations",
            Self::CidrInvalid | Self::TooManyCidrs => "allowed_cidrs",
            Self::RateLimitNameInvalid
            | Self::RateLimitLimitInvalid
            | Self::RateLimitWindowInvalid
            | Self::TooManyRateLimits
            | Self::CostInvalid => "rate_limits",
            Self::CreditsInvalid | Self::RefillInvalid => "credits",
        }
    }
}
