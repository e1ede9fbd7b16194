//! Requests as the admin backend sends them, and assertions on the errors they get.

use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// A request from a workspace owner, as the admin backend sends it.
pub(crate) fn as_owner<T>(message: T) -> Request<T> {
    as_actor(message, "user_owner", "owner")
}

/// Actors that may not manage keys, with the refusal each gets: a role that is not owner or
/// admin, and no actor at all.
pub(crate) const REFUSED_ACTORS: [(Option<&str>, Code, &str); 2] = [
    (Some("member"), Code::PermissionDenied, "ROLE_NOT_ALLOWED"),
    (None, Code::Unauthenticated, "ACTOR_MISSING"),
];

/// A request from `user_1` in `role`, or with no actor metadata at all.
pub(crate) fn as_role<T>(role: Option<&str>, message: T) -> Request<T> {
    match role {
        Some(role) => as_actor(message, "user_1", role),
        None => Request::new(message),
    }
}

pub(crate) fn as_actor<T>(message: T, id: &str, role: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-actor-id", id.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-actor-role", role.parse().unwrap());
    request
}

/// Asserts a gRPC error's code and its `google.rpc.ErrorInfo` reason and domain.
pub(crate) fn assert_error(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "apikeys.cloodot");
}
