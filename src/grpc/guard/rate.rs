//! Rates of management calls: each caller's in each workspace, under a ceiling for the
//! caller in all.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use tonic::{Status, body::Body};

use super::{Check, Party, Rpc};
use crate::{domain::WorkspaceId, error::ApiError};

/// Who a rate is kept for: a caller by name, or a client IP without a callers file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Caller(String),
    Peer(IpAddr),
    Unknown,
}

impl RateKey {
    fn of(extensions: &http::Extensions) -> Self {
        match Party::of(extensions) {
            Some(Party::Caller(caller)) => Self::Caller(caller.name.clone()),
            Some(Party::Peer(peer)) => Self::Peer(peer.ip()),
            None => Self::Unknown,
        }
    }
}

/// Keys remembered before forgetting those whose buckets are full again.
const RATE_KEYS_KEPT: usize = 100_000;

/// A steady rate and a burst, GCRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// Holds management calls to two rates (GCRA: a steady rate with a burst). One admin backend
/// is one caller for every workspace, so the rate that keeps one busy tenant from slowing the
/// others is per caller *and workspace*: checked by the service once the request names its
/// workspace ([`Self::check_workspace`]). The caller's own ceiling, far above one workspace's
/// share, is checked here before anything is decoded. ValidateKey is never limited: a
/// gateway's traffic is its users' traffic. Over either rate a call is answered
/// RESOURCE_EXHAUSTED (`RATE_LIMITED`) with RetryInfo.
#[derive(Debug, Clone)]
pub struct ManagementRate {
    caller: Arc<DefaultKeyedRateLimiter<RateKey>>,
    workspace: Arc<DefaultKeyedRateLimiter<(RateKey, String)>>,
}

impl ManagementRate {
    pub fn new(caller: Rate, workspace: Rate) -> Self {
        let quota = |rate: Rate| Quota::per_second(rate.per_second).allow_burst(rate.burst);
        Self {
            caller: Arc::new(RateLimiter::keyed(quota(caller))),
            workspace: Arc::new(RateLimiter::keyed(quota(workspace))),
        }
    }

    /// Counts a management call of the caller in `extensions` against its rate in
    /// `workspace`.
    pub(crate) fn check_workspace(
        &self,
        extensions: &http::Extensions,
        workspace: &WorkspaceId,
    ) -> Result<(), ApiError> {
        let key = (RateKey::of(extensions), workspace.as_str().to_owned());
        limit(&self.workspace, &key)
    }
}

fn limit<K>(limiter: &DefaultKeyedRateLimiter<K>, key: &K) -> Result<(), ApiError>
where
    K: Clone + Eq + std::hash::Hash,
{
    if limiter.len() > RATE_KEYS_KEPT {
        limiter.retain_recent();
    }
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        ApiError::RateLimited(wait)
    })
}

impl Check for ManagementRate {
    type Hold = ();

    fn check(&self, rpc: Rpc<'_>, request: &mut http::Request<Body>) -> Result<(), Status> {
        if !matches!(rpc, Rpc::Management(_)) {
            return Ok(());
        }
        Ok(limit(&self.caller, &RateKey::of(request.extensions()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn a_busy_workspace_is_limited_without_touching_another() {
        let rates = ManagementRate::new(rate(1000, 1000), rate(1, 3));
        let extensions = http::Extensions::new();
        let busy = WorkspaceId::parse("busy").unwrap();
        let quiet = WorkspaceId::parse("quiet").unwrap();
        for _ in 0..3 {
            rates.check_workspace(&extensions, &busy).unwrap();
        }
        assert!(matches!(
            rates.check_workspace(&extensions, &busy),
            Err(ApiError::RateLimited(_))
        ));
        assert!(rates.check_workspace(&extensions, &quiet).is_ok());
    }
}
