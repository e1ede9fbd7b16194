//! Pure types of the key domain: each can only hold a valid value. No I/O here; the
//! sea-orm derives only say how a type is stored, for the store to use.

mod actor;
pub(crate) mod base62;
mod credits;
mod event;
mod expiration;
mod governance;
mod invalid_input;
mod key;
mod key_id;
mod key_name;
mod legibility;
mod page_token;
mod rate_limit;
mod scopes;
mod secret;
mod validation;
mod workspace_id;

pub use actor::{Actor, ActorError};
pub use credits::{
    CreditLease, CreditPlan, Credits, KeyCredits, MAX_LEASE, Refill, RefillInterval,
    column_credits, credit_period_us, lease_size, parse_credit_cost,
};
pub(crate) use event::{EventKind, KeyEvent, KeyField};
pub(crate) use expiration::{Expiration, Expiry};
pub use governance::{AllowedCidrs, Annotations, Cidr, OwnerId, column_annotations, column_cidrs};
pub(crate) use invalid_input::InvalidInput;
pub(crate) use key::Key;
pub use key_id::KeyId;
pub use key_name::KeyName;
pub(crate) use legibility::{Legibility, legibility};
pub(crate) use page_token::EventCursor;
pub use page_token::PageCursor;
pub use rate_limit::{
    LimitJudgement, LimitState, MAX_RATE_LIMITS, RateLimit, RateLimitAsk, RateLimits, Window,
    WindowLease, ceil_div, column_rate_limits, holds_any, judge as judge_limits, keep_windows_of,
    mark_leasing, take_window_returns, window_held, window_lease_not_taken, window_leased,
    window_ready,
};
pub use scopes::{MAX_SCOPES, Scopes, check_required, column_scopes, is_scope};
pub use secret::{
    KEY_LEN, KEY_PREFIX, KeyHash, MalformedKey, PresentedKey, Secret, contains_key, masked_key,
};
pub use validation::{CheckDecision, KeyStatus, Validation};
pub use workspace_id::WorkspaceId;
