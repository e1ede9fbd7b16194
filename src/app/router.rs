//! The gRPC router: the layers every call passes, outermost first, and the services behind
//! them.

use std::sync::Arc;

use tonic::transport::{Server, server::Router};
use tower::layer::util::{Identity, Stack};

use super::{MAX_REQUEST_BYTES, StartupError};
use crate::{
    auth::{Authenticate, LiveCallers},
    config::Settings,
    grpc::{
        ApiKeysRoutes, ApiKeysService, ExtAuthzServer, ExtAuthzService,
        codec::HealthServer,
        guard::{Deadline, Guard, HealthWatches, InFlight, ManagementRate},
        proto,
    },
    observability::{metrics::Metrics, observe::Observe},
};

/// The largest block of request headers (metadata) a connection accepts.
const MAX_HEADER_BYTES: u32 = 16 * 1024;

/// The layers of [`server`], outermost last.
pub(super) type Layers = Stack<
    Guard<(
        ((Deadline, Authenticate), InFlight),
        (HealthWatches, ManagementRate),
    )>,
    Stack<Observe, Identity>,
>;

/// What the router serves.
pub(super) struct Services {
    pub(super) health: HealthServer,
    pub(super) api: ApiKeysService,
    pub(super) ext_authz: ExtAuthzService,
}

/// The layered router.
pub(super) fn server(
    limits: &Settings,
    metrics: Option<Arc<Metrics>>,
    callers: Option<Arc<LiveCallers>>,
    management_rate: ManagementRate,
    services: Services,
) -> Result<Router<Layers>, StartupError> {
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    Ok(Server::builder()
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // Outermost, so calls the guards turn away are counted and traced too.
        .layer(Observe(metrics))
        // One layer, the checks in this order: authentication before the in-flight
        // limit, which keeps each caller to its share.
        .layer(Guard((
            (
                (Deadline(limits.request_timeout), Authenticate::new(callers)),
                InFlight::new(
                    limits.max_in_flight,
                    limits.max_in_flight_per_caller,
                    limits.request_body_timeout,
                ),
            ),
            (
                HealthWatches::new(
                    limits.max_health_watches,
                    limits.max_health_watches_per_connection,
                ),
                management_rate,
            ),
        )))
        .add_service(services.health.max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(reflection_v1.max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(reflection_v1alpha.max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(ApiKeysRoutes::new(services.api, MAX_REQUEST_BYTES))
        .add_service(
            ExtAuthzServer::new(services.ext_authz).max_decoding_message_size(MAX_REQUEST_BYTES),
        ))
}

/// Reflection over the contract and health, so grpcurl needs no .proto files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // The details errors carry (ErrorInfo, RetryInfo, BadRequest), so grpcurl and
        // `buf curl` print their reasons instead of "not recognized".
        .register_file_descriptor_set(error_details())
}

/// `google/rpc/error_details.proto` as tonic-types compiled it, under its canonical name
/// (tonic-types names it `error_details.proto`, which clients that know the file by its real
/// name do not match).
fn error_details() -> prost_types::FileDescriptorSet {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    set.file.retain(|file| file.name() == "error_details.proto");
    for file in &mut set.file {
        file.name = Some("google/rpc/error_details.proto".to_owned());
    }
    set
}
