//! Between the wire and the domain: requests' fields parsed into domain values, domain
//! values shown as proto messages. Every enum crossing is an exhaustive match.

use chrono::{DateTime, Utc};
use tonic::metadata::MetadataMap;

use crate::{
    domain::{
        Actor, Credits, EventKind, Expiration, Expiry, InvalidInput, Key, LimitJudgement,
        MAX_RATE_LIMITS, RateLimit, RateLimitAsk, RateLimits, Refill, RefillInterval, Validation,
        ceil_div,
    },
    error::ApiError,
    grpc::proto::{self, ApiKey, KeyEvent, KeyEventType, KeyStatus, ValidationResult},
    service::{DEFAULT_PAGE_SIZE, MAX_GRACE_PERIOD},
    usage::hour_start,
};

/// Metadata naming the person a management call acts for.
const ACTOR_ID_HEADER: &str = "x-actor-id";
const ACTOR_ROLE_HEADER: &str = "x-actor-role";
/// GetKeyUsage's longest range: a quarter and a bit, enough for the product's 90 days.
const MAX_USAGE_RANGE_US: i64 = 93 * 24 * 3_600_000_000;
/// GetKeyUsage's range when the request leaves out its start.
const DEFAULT_USAGE_RANGE_US: i64 = 24 * 3_600_000_000;

impl From<Validation> for ValidationResult {
    fn from(validation: Validation) -> Self {
        match validation {
            Validation::Valid => Self::Valid,
            Validation::Malformed => Self::Malformed,
            Validation::NotFound => Self::NotFound,
            Validation::Expired => Self::Expired,
            Validation::Disabled => Self::Disabled,
            Validation::Deleted => Self::Deleted,
            Validation::InsufficientScope => Self::InsufficientScope,
            Validation::IpNotAllowed => Self::IpNotAllowed,
            Validation::RateLimited => Self::RateLimited,
            Validation::UsageExceeded => Self::UsageExceeded,
        }
    }
}

pub(super) fn page_size(size: i32) -> Result<u64, ApiError> {
    match size {
        size if size < 0 => Err(InvalidInput::PageSizeNegative.into()),
        0 => Ok(DEFAULT_PAGE_SIZE),
        size => Ok(size as u64),
    }
}

/// `[start, end)` in microseconds, the start rounded down to its hour.
/// The range GetKeyUsage reads: `end` absent is now, `start` absent is a day before the end,
/// so a request with neither is the last 24 hours.
pub(super) fn usage_range(
    start: Option<prost_types::Timestamp>,
    end: Option<prost_types::Timestamp>,
    now: DateTime<Utc>,
) -> Result<(i64, i64), InvalidInput> {
    let micros = |at: prost_types::Timestamp| {
        let nanos = u32::try_from(at.nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)?;
        Some(DateTime::from_timestamp(at.seconds, nanos)?.timestamp_micros())
    };
    let end = match end {
        None => now.timestamp_micros(),
        Some(end) => micros(end).ok_or(InvalidInput::TimeRangeInvalid)?,
    };
    let start = match start {
        None => end.saturating_sub(DEFAULT_USAGE_RANGE_US),
        Some(start) => micros(start).ok_or(InvalidInput::TimeRangeInvalid)?,
    };
    if start >= end || end - start > MAX_USAGE_RANGE_US {
        return Err(InvalidInput::TimeRangeInvalid);
    }
    Ok((hour_start(start), end))
}

pub(super) fn key_event(event: crate::domain::KeyEvent) -> KeyEvent {
    let kind = match event.kind {
        EventKind::Created => KeyEventType::Created,
        EventKind::Updated => KeyEventType::Updated,
        EventKind::Disabled => KeyEventType::Disabled,
        EventKind::Enabled => KeyEventType::Enabled,
        EventKind::Rotated => KeyEventType::Rotated,
        EventKind::Deleted => KeyEventType::Deleted,
    };
    KeyEvent {
        id: format!("evt_{}", event.id),
        workspace_id: event.workspace.into(),
        key_id: event.key_id.into(),
        r#type: kind.into(),
        actor_id: event.actor_id,
        actor_role: event.actor_role,
        create_time: Some(time(event.time)),
        new_key_id: event.new_key_id.map(String::from).unwrap_or_default(),
        changed_fields: event.changed_fields,
    }
}

pub(super) fn actor(metadata: &MetadataMap) -> Result<Actor, ApiError> {
    // One value or none: never the first of several (ActorError::Duplicated says why).
    let header = |name: &'static str| {
        let mut values = metadata.get_all(name).iter();
        let first = values.next();
        match values.next() {
            Some(_) => Err(crate::domain::ActorError::Duplicated(name)),
            None => Ok(first.and_then(|value| value.to_str().ok())),
        }
    };
    Ok(Actor::parse(
        header(ACTOR_ID_HEADER)?,
        header(ACTOR_ROLE_HEADER)?,
    )?)
}

/// Exactly one of a preset and a custom time.
pub(super) fn expiry(
    preset: i32,
    custom: Option<prost_types::Timestamp>,
) -> Result<Expiry, InvalidInput> {
    match custom {
        None => expiration(preset).map(Expiry::Preset),
        Some(_) if preset != proto::Expiration::Unspecified as i32 => {
            Err(InvalidInput::ExpirationConflict)
        }
        Some(at) => {
            let nanos = u32::try_from(at.nanos)
                .ok()
                .filter(|nanos| *nanos < 1_000_000_000)
                .ok_or(InvalidInput::ExpireTimeInvalid)?;
            // Kept to the microsecond, as stored. Beyond chrono's range (±262,000 years) is
            // far in the past or the future.
            match DateTime::from_timestamp(at.seconds, nanos / 1000 * 1000) {
                Some(at) => Ok(Expiry::At(at)),
                None if at.seconds < 0 => Err(InvalidInput::ExpireTimeInPast),
                None => Err(InvalidInput::ExpireTimeTooFar),
            }
        }
    }
}

/// 0 to 7 days, kept to the microsecond; absent is 0.
pub(super) fn grace_period(
    duration: Option<prost_types::Duration>,
) -> Result<chrono::TimeDelta, InvalidInput> {
    let duration = duration.unwrap_or_default();
    let grace = (duration.seconds >= 0 && (0..1_000_000_000).contains(&duration.nanos))
        .then(|| chrono::TimeDelta::new(duration.seconds, duration.nanos as u32 / 1000 * 1000))
        .flatten()
        .filter(|grace| *grace <= MAX_GRACE_PERIOD);
    grace.ok_or(InvalidInput::GracePeriodInvalid)
}

fn expiration(value: i32) -> Result<Expiration, InvalidInput> {
    match proto::Expiration::try_from(value) {
        Ok(proto::Expiration::Unspecified) => Err(InvalidInput::ExpirationUnspecified),
        Ok(proto::Expiration::Never) => Ok(Expiration::Never),
        Ok(proto::Expiration::Expiration30Days) => Ok(Expiration::Days30),
        Ok(proto::Expiration::Expiration90Days) => Ok(Expiration::Days90),
        Ok(proto::Expiration::Expiration1Year) => Ok(Expiration::OneYear),
        Err(_) => Err(InvalidInput::ExpirationUnknown),
    }
}

/// A key's limits as given; every one checked, then the list.
pub(super) fn rate_limits(limits: &[proto::RateLimit]) -> Result<RateLimits, InvalidInput> {
    if limits.len() > MAX_RATE_LIMITS {
        return Err(InvalidInput::TooManyRateLimits);
    }
    let limits = limits
        .iter()
        .map(|limit| {
            let window = limit.window.map(|window| (window.seconds, window.nanos));
            RateLimit::parse(&limit.name, limit.limit, window, limit.auto_apply)
        })
        .collect::<Result<_, _>>()?;
    RateLimits::new(limits)
}

/// A key's credits as given: `None` is unlimited.
pub(super) fn credits(given: Option<&proto::Credits>) -> Result<Option<Credits>, InvalidInput> {
    let Some(given) = given else {
        return Ok(None);
    };
    let refill = given
        .refill
        .as_ref()
        .map(|refill| {
            let interval = match proto::RefillInterval::try_from(refill.interval) {
                Ok(proto::RefillInterval::Daily) => Some(RefillInterval::Daily),
                Ok(proto::RefillInterval::Monthly) => Some(RefillInterval::Monthly),
                Ok(proto::RefillInterval::Unspecified) | Err(_) => None,
            };
            Refill::parse(refill.amount, interval, refill.day_of_month)
        })
        .transpose()?;
    Credits::parse(given.remaining, refill).map(Some)
}

/// What a validation asks of its key's limits; no allocation when it asks nothing.
pub(crate) fn rate_limit_asks(
    asks: &[proto::RateLimitRequest],
) -> Result<Vec<RateLimitAsk<'_>>, InvalidInput> {
    if asks.len() > MAX_RATE_LIMITS {
        return Err(InvalidInput::TooManyRateLimits);
    }
    asks.iter()
        .map(|ask| RateLimitAsk::parse(&ask.name, ask.cost))
        .collect()
}

/// Where the limits judged stand, as the wire shows them.
pub(crate) fn rate_limit_states(judged: &LimitJudgement) -> Vec<proto::RateLimitState> {
    judged
        .states
        .iter()
        .map(|state| proto::RateLimitState {
            name: state.name.clone(),
            limit: state.limit,
            remaining: state.remaining,
            reset_time: Some(timestamp(state.reset_us)),
        })
        .collect()
}

/// A wait in microseconds as a Duration, rounded up to the millisecond.
pub(crate) fn retry_after(micros: i64) -> prost_types::Duration {
    let millis = ceil_div(micros.max(0), 1_000);
    prost_types::Duration {
        seconds: millis / 1_000,
        nanos: (millis % 1_000 * 1_000_000) as i32,
    }
}

pub(super) fn api_key(key: Key, now: DateTime<Utc>) -> ApiKey {
    let status = KeyStatus::from(key.status(now));
    ApiKey {
        rate_limits: key
            .rate_limits
            .as_slice()
            .iter()
            .map(|limit| proto::RateLimit {
                name: String::from(&*limit.name),
                limit: limit.limit,
                window: Some(prost_types::Duration {
                    seconds: limit.window_ms / 1_000,
                    nanos: (limit.window_ms % 1_000 * 1_000_000) as i32,
                }),
                auto_apply: limit.auto_apply,
            })
            .collect(),
        credits: key.credits.plan().map(|plan| proto::Credits {
            remaining: key.credits_remaining.unwrap_or(0).max(0),
            refill: plan.refill.map(|refill| proto::Refill {
                amount: refill.amount,
                interval: match refill.interval {
                    RefillInterval::Daily => proto::RefillInterval::Daily,
                    RefillInterval::Monthly => proto::RefillInterval::Monthly,
                }
                .into(),
                day_of_month: i32::from(refill.day_of_month),
            }),
        }),
        etag: key.etag(),
        masked_key: key.masked(),
        allowed_cidrs: key.allowed_cidrs.to_strings(),
        annotations: key
            .annotations
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        owner_id: key.owner_id.into(),
        create_time: Some(time(key.create_time)),
        expire_time: key.expire_time.map(time),
        last_used_time: key.last_used_time.map(time),
        status: status.into(),
        scopes: key.scopes.into_vec(),
        id: key.id.into(),
        workspace_id: key.workspace.into(),
        name: key.name.into(),
        created_by: key.created_by,
    }
}

pub(super) fn time(at: DateTime<Utc>) -> prost_types::Timestamp {
    timestamp(at.timestamp_micros())
}

pub(super) fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

impl From<crate::domain::KeyStatus> for KeyStatus {
    fn from(status: crate::domain::KeyStatus) -> Self {
        match status {
            crate::domain::KeyStatus::Active => Self::Active,
            crate::domain::KeyStatus::Disabled => Self::Disabled,
            crate::domain::KeyStatus::Expired => Self::Expired,
            // Never shown: the API answers NOT_FOUND for a deleted key.
            crate::domain::KeyStatus::Deleted => Self::Unspecified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_own_proto_value_and_metric_label() {
        let mut seen = std::collections::HashSet::new();
        for validation in Validation::ALL {
            let result = ValidationResult::from(validation);
            assert!(seen.insert(result), "{validation:?}");
            assert_eq!(
                crate::observability::metrics::result_label(validation),
                result.as_str_name()
            );
        }
        // Every proto value but UNSPECIFIED is an answer.
        assert!(ValidationResult::try_from(seen.len() as i32 + 1).is_err());
    }
}
