//! Checks every call passes before it reaches a service, as tower layers with one job each:
//! [`InFlight`] sheds calls over the server's limit, [`Authenticate`] admits only known
//! callers in a role that may make the call, [`ManagementRate`] holds each caller to its rate
//! of management calls. Health is exempt from all three: Kubernetes probes carry no
//! credentials and must see an overloaded server as alive.

use std::{
    future::Future,
    net::IpAddr,
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use http::header::AUTHORIZATION;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use crate::{
    callers::{Caller, CallerRole, Callers},
    error::ApiError,
};

const API_PREFIX: &str = "/cloodot.apikeys.v1.ApiKeys/";
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// What a call is, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc<'a> {
    Health,
    Validate,
    /// Any other ApiKeys method: CreateKey, ListKeys, DeleteKey, and whatever is added later.
    Management(&'a str),
    /// Reflection, or a path no service serves (answered UNIMPLEMENTED).
    Other,
}

impl<'a> Rpc<'a> {
    fn of(path: &'a str) -> Self {
        if path.starts_with(HEALTH_PREFIX) {
            Self::Health
        } else if path == super::EXT_AUTHZ_CHECK_PATH {
            // Envoy's ValidateKey: a gateway's call, never rate-limited.
            Self::Validate
        } else if let Some(method) = path.strip_prefix(API_PREFIX) {
            if method == "ValidateKey" {
                Self::Validate
            } else {
                Self::Management(method)
            }
        } else {
            Self::Other
        }
    }
}

/// One check on a call: `Err` answers the call with that status; `Ok` lets it through,
/// holding the value until the service has answered.
pub trait Check: Clone + Send + Sync + 'static {
    type Hold: Send + 'static;
    fn check(&self, request: &mut http::Request<Body>) -> Result<Self::Hold, Status>;
}

/// The layer of a [`Check`].
#[derive(Debug, Clone)]
pub struct Guard<C>(pub C);

impl<C: Clone, S> Layer<S> for Guard<C> {
    type Service = Guarded<C, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            check: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Guarded<C, S> {
    check: C,
    inner: S,
}

impl<C, S> Service<http::Request<Body>> for Guarded<C, S>
where
    C: Check,
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.check.check(&mut request) {
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
            Ok(hold) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await;
                    drop(hold);
                    response
                })
            }
        }
    }
}

/// Sheds calls beyond a limit in flight across all connections, so a flood queues nowhere:
/// the excess is answered UNAVAILABLE (`OVERLOADED`) at once and clients back off.
#[derive(Debug, Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Semaphore::new(limit)))
    }
}

impl Check for InFlight {
    type Hold = Option<OwnedSemaphorePermit>;

    fn check(&self, request: &mut http::Request<Body>) -> Result<Self::Hold, Status> {
        if Rpc::of(request.uri().path()) == Rpc::Health {
            return Ok(None);
        }
        match self.0.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(ApiError::Overloaded.into()),
        }
    }
}

/// Admits callers listed in the callers file, in a role that may make the call, and hands
/// the [`Caller`] to the services in the request's extensions. Without a callers file every
/// call is admitted: start-up allows that only on loopback or when told the network
/// authenticates callers itself.
#[derive(Debug, Clone)]
pub struct Authenticate(Option<Arc<Callers>>);

impl Authenticate {
    pub fn new(callers: Option<Callers>) -> Self {
        Self(callers.map(Arc::new))
    }
}

impl Check for Authenticate {
    type Hold = ();

    fn check(&self, request: &mut http::Request<Body>) -> Result<(), Status> {
        // Taken out whatever happens, so no later layer or handler can log or echo it.
        let presented = request.headers_mut().remove(AUTHORIZATION);
        let rpc = Rpc::of(request.uri().path());
        let Some(callers) = &self.0 else {
            return Ok(());
        };
        if rpc == Rpc::Health {
            return Ok(());
        }
        // A token, when presented, must be right; without one, a client certificate may name
        // the caller (mutual TLS has already verified it against the client CA).
        let caller = match presented {
            Some(value) => value
                .to_str()
                .ok()
                .and_then(bearer_token)
                .and_then(|token| callers.authenticate(token))
                .cloned(),
            None => request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|certs| {
                    certs
                        .first()
                        .and_then(|c| callers.authenticate_certificate(c))
                        .cloned()
                }),
        }
        .ok_or(ApiError::CallerUnauthenticated)?;
        if let (Rpc::Management(method), CallerRole::Gateway) = (rpc, caller.role) {
            return Err(ApiError::CallerNotAllowed {
                caller: caller.name.clone(),
                role: caller.role,
                rpc: method.to_owned(),
            }
            .into());
        }
        request.extensions_mut().insert(caller);
        Ok(())
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Who a call counts against for rate limiting: its caller, or without caller credentials,
/// its peer address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Caller(String),
    Peer(IpAddr),
    Unknown,
}

/// Rate keys remembered before forgetting those whose buckets are full again.
const RATE_KEYS_KEPT: usize = 10_000;

/// Holds each caller to a rate of management calls (GCRA: a steady rate with a burst).
/// ValidateKey is never limited here: a gateway's traffic is its users' traffic.
#[derive(Debug, Clone)]
pub struct ManagementRate(Arc<DefaultKeyedRateLimiter<RateKey>>);

impl ManagementRate {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self(Arc::new(RateLimiter::keyed(quota)))
    }
}

impl Check for ManagementRate {
    type Hold = ();

    fn check(&self, request: &mut http::Request<Body>) -> Result<(), Status> {
        if !matches!(Rpc::of(request.uri().path()), Rpc::Management(_)) {
            return Ok(());
        }
        let extensions = request.extensions();
        let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        });
        let key = match (extensions.get::<Caller>(), tcp) {
            (Some(caller), _) => RateKey::Caller(caller.name.clone()),
            (None, Some(info)) => info
                .remote_addr()
                .map_or(RateKey::Unknown, |addr| RateKey::Peer(addr.ip())),
            (None, None) => RateKey::Unknown,
        };
        if self.0.len() > RATE_KEYS_KEPT {
            self.0.retain_recent();
        }
        self.0.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            ApiError::RateLimited(wait).into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_told_apart_by_path() {
        assert_eq!(Rpc::of("/grpc.health.v1.Health/Check"), Rpc::Health);
        assert_eq!(Rpc::of("/grpc.health.v1.Health/Watch"), Rpc::Health);
        assert_eq!(
            Rpc::of("/cloodot.apikeys.v1.ApiKeys/ValidateKey"),
            Rpc::Validate
        );
        assert_eq!(
            Rpc::of("/cloodot.apikeys.v1.ApiKeys/DeleteKey"),
            Rpc::Management("DeleteKey")
        );
        assert_eq!(
            Rpc::of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Rpc::Other
        );
        assert_eq!(
            Rpc::of("/grpc.health.v1.HealthX/Check"),
            Rpc::Other,
            "only the health service itself is exempt"
        );
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_value() {
        assert_eq!(bearer_token("Bearer cct_abc"), Some("cct_abc"));
        assert_eq!(bearer_token("bearer  cct_abc "), Some("cct_abc"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("cct_abc"), None);
    }
}
