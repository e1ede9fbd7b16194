//! Admits callers listed in the callers file, in a role that may make the call.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use tonic::{Status, body::Body};

use super::{CallerRole, LiveCallers};
use crate::{
    error::ApiError,
    grpc::guard::{Check, Rpc},
    net::ConnectionInfo,
};

/// Admits callers listed in the callers file, in a role that may make the call, and hands
/// the `Arc<Caller>` to the layers and services below in the request's extensions. Without a
/// callers file every call is admitted: start-up allows that only on loopback or when told
/// the network authenticates callers itself. Two `authorization` values are refused either
/// way: a proxy that appends its own to a client's would otherwise be spoofable.
#[derive(Debug, Clone)]
pub(crate) struct Authenticate(Option<Arc<LiveCallers>>);

impl Authenticate {
    pub(crate) fn new(callers: Option<Arc<LiveCallers>>) -> Self {
        Self(callers)
    }
}

impl Check for Authenticate {
    type Hold = ();

    fn check(&self, rpc: Rpc<'_>, request: &mut http::Request<Body>) -> Result<(), Status> {
        // Taken out whatever happens, so no later layer or handler can log or echo it; one
        // lookup finds the value and whether there is a second.
        let (presented, duplicated) = match request.headers_mut().entry(AUTHORIZATION) {
            http::header::Entry::Occupied(entry) => {
                let mut values = entry.remove_entry_mult().1;
                (values.next(), values.next().is_some())
            }
            http::header::Entry::Vacant(_) => (None, false),
        };
        if rpc == Rpc::Health {
            return Ok(());
        }
        if duplicated {
            return Err(ApiError::CredentialsDuplicated.into());
        }
        let Some(live) = &self.0 else {
            return Ok(());
        };
        let callers = live.current();
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
                .get::<ConnectionInfo>()
                .and_then(ConnectionInfo::certificates)
                .and_then(|certs| certs.first())
                .and_then(|cert| callers.authenticate_certificate(cert))
                .cloned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_value() {
        assert_eq!(bearer_token("Bearer cct_abc"), Some("cct_abc"));
        assert_eq!(bearer_token("bearer  cct_abc "), Some("cct_abc"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("cct_abc"), None);
    }

    #[test]
    fn two_authorization_values_are_refused_even_if_the_first_is_right() {
        let token = crate::auth::CallerToken::generate();
        let line = format!(
            "backend admin blake3:{}\n",
            blake3::hash(token.expose().as_bytes()).to_hex()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers");
        std::fs::write(&path, line).unwrap();
        let callers = LiveCallers::load(path, false).unwrap();
        let guard = Authenticate::new(Some(std::sync::Arc::new(callers)));
        let mut request = http::Request::builder()
            .uri("/cloodot.apikeys.v1.ApiKeys/ListKeys")
            .body(Body::empty())
            .unwrap();
        let bearer = format!("Bearer {}", token.expose());
        let headers = request.headers_mut();
        headers.append(AUTHORIZATION, bearer.parse().unwrap());
        headers.append(AUTHORIZATION, "Bearer cct_other".parse().unwrap());
        let path = request.uri().path().to_owned();
        let status = guard.check(Rpc::of(&path), &mut request).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(request.headers().get(AUTHORIZATION).is_none());
    }
}
