//! Sheds calls over the server's in-flight limit or over their caller's share of it, and
//! gives up on request bodies that do not arrive.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{Status, body::Body};

use super::{Check, Holding, Party, Rpc, body::UnaryBody};
use crate::{error::ApiError, net::ConnectionInfo};

/// Sheds calls beyond a limit in flight across all connections, so a flood queues nowhere:
/// the excess is answered UNAVAILABLE (`OVERLOADED`) at once and clients back off. One
/// caller (or client IP, without a callers file) may hold at most `per_caller` of the
/// limit (`CALLER_OVERLOADED`), so it cannot starve the others; and a call whose request
/// body has not fully arrived within `body_timeout` is answered DEADLINE_EXCEEDED
/// (`REQUEST_BODY_TIMEOUT`), freeing its place long before the request timeout.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    /// Calls in flight on the whole server, of at most `limit`: one atomic add each way.
    all: Arc<AtomicUsize>,
    limit: usize,
    per_caller: usize,
    body_timeout: Duration,
}

impl InFlight {
    pub(crate) fn new(limit: usize, per_caller: usize, body_timeout: Duration) -> Self {
        Self {
            all: Arc::new(AtomicUsize::new(0)),
            limit,
            per_caller,
            body_timeout,
        }
    }
}

impl InFlight {
    /// Makes the unary request's body arrive in time and whole (see [`UnaryBody`]).
    fn hold_body_to_time(&self, request: &mut http::Request<Body>) {
        let body = std::mem::take(request.body_mut());
        *request.body_mut() = Body::new(UnaryBody::new(body, self.body_timeout));
    }
}

/// A call's place: one permit of the limit and one of its party's share. A unary call's is
/// given back with its answer; a stream's is kept in the answer's body until the stream ends
/// or is cancelled.
#[derive(Debug)]
pub(crate) struct Place {
    all: Arc<AtomicUsize>,
    party: Option<Party>,
    streaming: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.all.fetch_sub(1, Ordering::Relaxed);
        if let Some(party) = &self.party {
            party.in_flight().fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Check for InFlight {
    type Hold = Option<Place>;

    fn check(&self, rpc: Rpc<'_>, request: &mut http::Request<Body>) -> Result<Self::Hold, Status> {
        let extensions = request.extensions();
        if let Some(connection) = extensions.get::<ConnectionInfo>() {
            connection.call_started();
        }
        let streaming = rpc == Rpc::ValidateStream;
        match rpc {
            // Health must answer however loaded the server is; its requests are unary too.
            Rpc::Health => {
                self.hold_body_to_time(request);
                return Ok(None);
            }
            // Reflection is a long-lived stream of tiny lookups (grpcurl's), bounded by the
            // streams per connection.
            Rpc::Other => return Ok(None),
            Rpc::Validate | Rpc::ValidateStream | Rpc::Management(_) => {}
        }
        let party = Party::of(extensions);
        if let Some(party) = &party {
            let held = party.in_flight().fetch_add(1, Ordering::Relaxed);
            if held >= self.per_caller {
                party.in_flight().fetch_sub(1, Ordering::Relaxed);
                return Err(ApiError::CallerOverloaded {
                    limit: self.per_caller,
                }
                .into());
            }
        }
        if self.all.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.all.fetch_sub(1, Ordering::Relaxed);
            if let Some(party) = &party {
                party.in_flight().fetch_sub(1, Ordering::Relaxed);
            }
            return Err(ApiError::Overloaded.into());
        }
        let place = Place {
            all: self.all.clone(),
            party,
            streaming,
        };
        if streaming {
            // A long-lived stream: one place while it is open, its body without a timeout.
            let body = std::mem::take(request.body_mut());
            *request.body_mut() = Body::new(UnaryBody::stream(body));
        } else {
            self.hold_body_to_time(request);
        }
        Ok(Some(place))
    }

    fn answered(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        match hold {
            Some(place) if place.streaming => {
                response.map(|body| Body::new(Holding::new(body, place)))
            }
            _ => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_cannot_hold_more_than_its_share() {
        let guard = InFlight::new(10, 2, Duration::from_secs(1));
        let token = crate::auth::CallerToken::generate();
        let line = format!(
            "gw gateway blake3:{}\n",
            blake3::hash(token.expose().as_bytes()).to_hex()
        );
        let callers = crate::auth::Callers::parse(&line).unwrap();
        let caller = callers.authenticate(token.expose()).unwrap().clone();
        let request = || {
            let mut request = http::Request::builder()
                .uri("/cloodot.apikeys.v1.ApiKeys/ValidateKey")
                .body(Body::empty())
                .unwrap();
            request.extensions_mut().insert(caller.clone());
            request
        };
        let first = guard.check(Rpc::Validate, &mut request()).unwrap();
        let _second = guard.check(Rpc::Validate, &mut request()).unwrap();
        let refused = guard.check(Rpc::Validate, &mut request()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        drop(first);
        assert!(
            guard.check(Rpc::Validate, &mut request()).is_ok(),
            "an answered call frees its place"
        );
    }
}
