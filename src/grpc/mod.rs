//! The gRPC edge: generated code, proto <-> domain conversion, and the ApiKeys service.

mod api_keys;
pub(crate) mod codec;
pub(crate) mod ext_authz;
pub mod guard;

pub use api_keys::{ApiKeysService, VALIDATE_MAX_BYTES};
pub use codec::{ApiKeysRoutes, ExtAuthzServer};
pub use ext_authz::{DEFAULT_HEADER_PREFIX, ExtAuthzService, GatewaySettings};

/// The path of Envoy's external authorization call.
pub const EXT_AUTHZ_CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Code generated from `proto/cloodot/apikeys/v1/api_keys.proto`.
#[allow(clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("cloodot.apikeys.v1");

    /// The encoded descriptors of the contract (imports included), served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("apikeys_descriptor");
}
