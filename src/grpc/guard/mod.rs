//! Checks every call passes before it reaches a service, as tower layers with one job each,
//! outermost first: [`Authenticate`](crate::auth::Authenticate) admits only known callers in a role that may make the
//! call; [`InFlight`] sheds calls over the server's limit or over the caller's fair share of
//! it, and gives up on request bodies that do not arrive; [`HealthWatches`] caps open health
//! watches; [`ManagementRate`] holds each caller, and each caller in each workspace, to a
//! rate of management calls. Health is exempt from all but the watch cap: Kubernetes probes
//! carry no credentials and must see an overloaded server as alive.

mod body;
mod in_flight;
mod rate;
mod watches;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub(crate) use in_flight::InFlight;
pub use rate::{ManagementRate, Rate};
pub(crate) use watches::HealthWatches;

use crate::{auth::Caller, net::ConnectionInfo};

const API_PREFIX: &str = "/cloodot.apikeys.v1.ApiKeys/";
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const HEALTH_WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// What a call is, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rpc<'a> {
    Health,
    /// ValidateKey, or Envoy's Check.
    Validate,
    /// ValidateKeys: a gateway's long-lived stream of validations.
    ValidateStream,
    /// Any other ApiKeys method: CreateKey, ListKeys, DeleteKey, and whatever is added later.
    Management(&'a str),
    /// Reflection, or a path no service serves (answered UNIMPLEMENTED).
    Other,
}

impl<'a> Rpc<'a> {
    pub(crate) fn of(path: &'a str) -> Self {
        if path.starts_with(HEALTH_PREFIX) {
            Self::Health
        } else if path == super::EXT_AUTHZ_CHECK_PATH {
            // Envoy's ValidateKey: a gateway's call, never rate-limited.
            Self::Validate
        } else if let Some(method) = path.strip_prefix(API_PREFIX) {
            if method == "ValidateKey" {
                Self::Validate
            } else if method == "ValidateKeys" {
                Self::ValidateStream
            } else {
                Self::Management(method)
            }
        } else {
            Self::Other
        }
    }
}

/// Who a call counts against for fair shares and rate limits: the caller its credentials
/// name, or without a callers file, the client IP it comes from.
#[derive(Debug, Clone)]
enum Party {
    Caller(Arc<Caller>),
    Peer(Arc<crate::net::Peer>),
}

impl Party {
    /// The party of a call that passed [`Authenticate`](crate::auth::Authenticate); `None` only for a connection the
    /// server did not accept itself (in-process tests of a layer).
    fn of(extensions: &http::Extensions) -> Option<Self> {
        match extensions.get::<Arc<Caller>>() {
            Some(caller) => Some(Self::Caller(caller.clone())),
            None => extensions
                .get::<ConnectionInfo>()
                .map(|connection| Self::Peer(connection.peer().clone())),
        }
    }

    fn in_flight(&self) -> &std::sync::atomic::AtomicUsize {
        match self {
            Self::Caller(caller) => &caller.in_flight,
            Self::Peer(peer) => &peer.in_flight,
        }
    }
}

/// One check on a call: `Err` answers the call with that status; `Ok` lets it through,
/// holding the value until the service has answered.
pub(crate) trait Check: Clone + Send + Sync + 'static {
    type Hold: Send + 'static;
    /// `rpc` is what [`Rpc::of`] makes of the request's path, worked out once per call.
    fn check(&self, rpc: Rpc<'_>, request: &mut http::Request<Body>) -> Result<Self::Hold, Status>;

    /// How long the service may take to answer the call, if this check bounds it.
    fn deadline(&self, _rpc: Rpc<'_>) -> Option<std::time::Duration> {
        None
    }

    /// What becomes of the hold once the service has answered: by default it is released;
    /// a check on streams keeps it in the response body until the stream ends.
    fn answered(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        drop(hold);
        response
    }
}

/// Two checks as one, the first first: one layer, one boxed future per call however many
/// checks are nested. The second's refusal releases what the first holds.
impl<A: Check, B: Check> Check for (A, B) {
    type Hold = (A::Hold, B::Hold);

    fn check(&self, rpc: Rpc<'_>, request: &mut http::Request<Body>) -> Result<Self::Hold, Status> {
        let first = self.0.check(rpc, request)?;
        let second = self.1.check(rpc, request)?;
        Ok((first, second))
    }

    fn answered(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        let response = B::answered(hold.1, response);
        A::answered(hold.0, response)
    }

    fn deadline(&self, rpc: Rpc<'_>) -> Option<std::time::Duration> {
        self.0.deadline(rpc).or_else(|| self.1.deadline(rpc))
    }
}

/// The server's request timeout, on the calls that can wait (tonic's would arm a timer for
/// every call): a validation (ValidateKey, Check) is answered from memory without waiting
/// for anything, so it gets no timer, and a ValidateKeys stream is long-lived by design.
/// A call past it is answered CANCELLED, as tonic answers. Clients' own deadlines
/// (`grpc-timeout`) are still honoured, by tonic, on every call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(pub std::time::Duration);

impl Check for Deadline {
    type Hold = ();

    fn check(&self, _: Rpc<'_>, _: &mut http::Request<Body>) -> Result<(), Status> {
        Ok(())
    }

    fn deadline(&self, rpc: Rpc<'_>) -> Option<std::time::Duration> {
        match rpc {
            Rpc::Validate | Rpc::ValidateStream => None,
            Rpc::Health | Rpc::Management(_) | Rpc::Other => Some(self.0),
        }
    }
}

/// A response body that keeps a check's hold (a watch counted, a stream's place) until the
/// stream ends or is dropped.
struct Holding<H> {
    body: Body,
    _hold: H,
}

impl<H> Holding<H> {
    fn new(body: Body, hold: H) -> Self {
        Self { body, _hold: hold }
    }
}

impl<H: Unpin> http_body::Body for Holding<H> {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The layer of a [`Check`].
#[derive(Debug, Clone)]
pub(crate) struct Guard<C>(pub C);

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
pub(crate) struct Guarded<C, S> {
    check: C,
    inner: S,
}

impl<C, S> Service<http::Request<Body>> for Guarded<C, S>
where
    C: Check,
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Guarding<C, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // A handle on the path (a reference count), so the checks may change the request.
        let path = request.uri().path_and_query().cloned();
        let rpc = Rpc::of(path.as_ref().map_or("", |path| path.path()));
        let deadline = self.check.deadline(rpc);
        match self.check.check(rpc, &mut request) {
            Err(status) => Guarding::Refused {
                response: Some(status.into_http()),
            },
            Ok(hold) => {
                let response = self.inner.call(request);
                match deadline {
                    None => Guarding::Running {
                        response,
                        hold: Some(hold),
                    },
                    Some(deadline) => Guarding::Timed {
                        response: tokio::time::timeout(deadline, response),
                        hold: Some(hold),
                    },
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A guarded call's answer: the refusal at once, or the service's (within its deadline,
    /// if it has one), with the hold released or handed to the response body.
    #[project = GuardingProjection]
    pub enum Guarding<C: Check, F> {
        Refused { response: Option<http::Response<Body>> },
        Running { #[pin] response: F, hold: Option<C::Hold> },
        Timed { #[pin] response: tokio::time::Timeout<F>, hold: Option<C::Hold> },
    }
}

impl<C, F, E> Future for Guarding<C, F>
where
    C: Check,
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let (response, hold) = match self.project() {
            GuardingProjection::Refused { response } => {
                return Poll::Ready(Ok(response.take().unwrap_or_else(polled_again)));
            }
            GuardingProjection::Running { response, hold } => {
                (std::task::ready!(response.poll(cx)), hold)
            }
            GuardingProjection::Timed { response, hold } => {
                match std::task::ready!(response.poll(cx)) {
                    Ok(response) => (response, hold),
                    // The hold goes with the future.
                    Err(_) => {
                        return Poll::Ready(Ok(Status::cancelled("Timeout expired").into_http()));
                    }
                }
            }
        };
        Poll::Ready(response.map(|response| match hold.take() {
            Some(hold) => C::answered(hold, response),
            None => polled_again(),
        }))
    }
}

/// The answer to a future polled after it has answered, which tower's contract forbids: an
/// error, not a panic on the request path.
fn polled_again() -> http::Response<Body> {
    Status::internal("").into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_told_apart_by_path() {
        assert_eq!(Rpc::of("/grpc.health.v1.Health/Check"), Rpc::Health);
        assert_eq!(Rpc::of(HEALTH_WATCH_PATH), Rpc::Health);
        assert_eq!(
            Rpc::of("/cloodot.apikeys.v1.ApiKeys/ValidateKey"),
            Rpc::Validate
        );
        assert_eq!(
            Rpc::of("/cloodot.apikeys.v1.ApiKeys/ValidateKeys"),
            Rpc::ValidateStream
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
}
