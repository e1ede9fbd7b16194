//! A key's status at a moment, and what validating a presented key answers: one rule for
//! each, and one enum for each from the index to the wire. Every place an answer becomes
//! something else (a proto value, a metric series, a usage count, an HTTP decision) matches
//! on [`Validation`] exhaustively, so a new answer does not compile until each one says
//! what it means there.

/// A stored key's status at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Disabled,
    Expired,
    Deleted,
}

impl KeyStatus {
    /// The one rule for a key's status at `now_us`: the most lasting reason wins, deleted
    /// before expired before disabled (enabling cannot revive an expired key); a key expires
    /// at its expiry time exactly. `i64::MAX` means never.
    pub fn at(deleted: bool, disabled: bool, expire_time_us: i64, now_us: i64) -> Self {
        if deleted {
            Self::Deleted
        } else if expire_time_us <= now_us {
            Self::Expired
        } else if disabled {
            Self::Disabled
        } else {
            Self::Active
        }
    }
}

/// What a validation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Active, with every scope the request required: accept.
    Valid,
    /// Not a key of ours by its shape or checksum; answered from the input alone.
    Malformed,
    /// Well-formed, but no such key was ever issued.
    NotFound,
    Expired,
    Disabled,
    Deleted,
    /// Active, but without a scope the request required.
    InsufficientScope,
    /// Active, but the request came from outside the key's allowed networks (or from an
    /// unknown address).
    IpNotAllowed,
    /// Active, but a rate limit the request was judged against had too little left.
    RateLimited,
    /// Active and within its rate limits, but its credits cannot pay the request's cost.
    UsageExceeded,
}

/// How a gateway's authorization check (Envoy's ext_authz `Check`) ended: allowed, or denied
/// and why. Its [`reason`](Self::reason) is the denial body's `reason` and the decision
/// metric's label alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDecision {
    /// A valid key with every scope the route requires.
    Allowed,
    /// No configured header carried a key.
    MissingKey,
    /// The route's `required_scopes` is not a list of scopes, or its `rate_limits` not a list
    /// of limits: the gateway is misconfigured.
    RouteMisconfigured,
    /// The index could not answer (stale): denied, failing closed.
    Unavailable,
    /// The key was not accepted, for this answer.
    Refused(Validation),
}

impl CheckDecision {
    /// Whether the request may go upstream.
    pub fn allowed(self) -> bool {
        matches!(self, Self::Allowed)
    }

    /// Why, in lower case: the answer's proto name without its prefix for a refused key.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Allowed => "valid",
            Self::MissingKey => "missing_key",
            Self::RouteMisconfigured => "route_misconfigured",
            Self::Unavailable => "unavailable",
            Self::Refused(answer) => match answer {
                Validation::Valid => "valid",
                Validation::Malformed => "malformed",
                Validation::NotFound => "not_found",
                Validation::Expired => "expired",
                Validation::Disabled => "disabled",
                Validation::Deleted => "deleted",
                Validation::InsufficientScope => "insufficient_scope",
                Validation::IpNotAllowed => "ip_not_allowed",
                Validation::RateLimited => "rate_limited",
                Validation::UsageExceeded => "usage_exceeded",
            },
        }
    }
}

impl Validation {
    /// Every answer, for what is made once per answer (metric series, tests).
    pub const ALL: [Self; 10] = [
        Self::Valid,
        Self::Malformed,
        Self::NotFound,
        Self::Expired,
        Self::Disabled,
        Self::Deleted,
        Self::InsufficientScope,
        Self::IpNotAllowed,
        Self::RateLimited,
        Self::UsageExceeded,
    ];

    /// The answer for a known key: its status first, then where the request came from, then
    /// the scopes.
    pub fn of_known(status: KeyStatus, ip_allowed: bool, has_required_scopes: bool) -> Self {
        match status {
            KeyStatus::Active if !ip_allowed => Self::IpNotAllowed,
            KeyStatus::Active if has_required_scopes => Self::Valid,
            KeyStatus::Active => Self::InsufficientScope,
            KeyStatus::Disabled => Self::Disabled,
            KeyStatus::Expired => Self::Expired,
            KeyStatus::Deleted => Self::Deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_wins_over_expired_which_wins_over_disabled() {
        assert_eq!(KeyStatus::at(true, true, 0, 10), KeyStatus::Deleted);
        assert_eq!(KeyStatus::at(false, true, 10, 10), KeyStatus::Expired);
        assert_eq!(KeyStatus::at(false, true, 11, 10), KeyStatus::Disabled);
        assert_eq!(KeyStatus::at(false, false, i64::MAX, 10), KeyStatus::Active);
    }

    #[test]
    fn scopes_matter_only_for_an_active_key() {
        assert_eq!(
            Validation::of_known(KeyStatus::Active, true, true),
            Validation::Valid
        );
        assert_eq!(
            Validation::of_known(KeyStatus::Active, true, false),
            Validation::InsufficientScope
        );
        assert_eq!(
            Validation::of_known(KeyStatus::Disabled, true, false),
            Validation::Disabled
        );
        assert_eq!(
            Validation::of_known(KeyStatus::Expired, true, true),
            Validation::Expired
        );
    }

    #[test]
    fn the_address_is_judged_after_the_status_and_before_the_scopes() {
        assert_eq!(
            Validation::of_known(KeyStatus::Active, false, false),
            Validation::IpNotAllowed
        );
        assert_eq!(
            Validation::of_known(KeyStatus::Disabled, false, true),
            Validation::Disabled
        );
        assert_eq!(
            Validation::of_known(KeyStatus::Deleted, false, false),
            Validation::Deleted
        );
    }
}
