//! The protobuf codec of every RPC of ours, and the services served with it: ValidateKey's
//! direct path, Envoy's `Authorization` and gRPC health.
//!
//! tonic-prost answers a request protobuf cannot decode (invalid UTF-8 in a `string`, a
//! truncated varint, garbage) INTERNAL, as if the server were at fault; those bytes are the
//! caller's, so here they are INVALID_ARGUMENT (`REQUEST_UNDECODABLE`).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use envoy_types::pb::envoy::service::auth::v3::authorization_server::SERVICE_NAME;
use prost::Message;
use tonic::{
    Request, Response, Status,
    body::Body,
    codec::{BufferSettings, DecodeBuf, Decoder},
    codegen::BoxFuture,
    server::{Grpc, NamedService, ServerStreamingService, UnaryService},
};
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, SERVICE_NAME as HEALTH_SERVICE_NAME},
    },
    server::{HealthReporter, HealthService, WatchStream},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use super::{
    ApiKeysService,
    ext_authz::{CheckRequest, CheckResponse, ExtAuthzService},
    proto::{ValidateKeyRequest, ValidateKeyResponse, api_keys_server::ApiKeysServer},
};
use crate::{error::ApiError, grpc::api_keys::Judgement};

/// [`ProstCodec`] with [`ProtoDecoder`]. build.rs generates the ApiKeys server and client with
/// it: on the client side, an undecodable response is reported the same way.
#[derive(Debug, Clone)]
pub(crate) struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`], whose one error, prost's `DecodeError`, becomes
/// [`ApiError::RequestUndecodable`].
#[derive(Debug, Clone)]
pub(crate) struct ProtoDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The status prost's error became is dropped: its text may quote a value read from
        // the request (an invalid tag number).
        self.0
            .decode(buf)
            .map_err(|_| ApiError::RequestUndecodable.into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Envoy's `envoy.service.auth.v3.Authorization` with [`ProtoCodec`], decoding only the part
/// of a `CheckRequest` a decision reads ([`CheckRequest`]) and deciding in the call itself:
/// envoy-types' generated `AuthorizationServer` hard-codes tonic-prost's codec and its full
/// request. Like it, it accepts and sends no compression.
#[derive(Debug, Clone)]
pub struct ExtAuthzServer {
    inner: Arc<ExtAuthzService>,
    max_decoding_message_size: Option<usize>,
}

impl ExtAuthzServer {
    pub fn new(inner: ExtAuthzService) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding_message_size: None,
        }
    }

    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl NamedService for ExtAuthzServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for ExtAuthzServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != super::EXT_AUTHZ_CHECK_PATH {
            // As tonic's router answers a method it does not know.
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        unary(self.clone(), self.max_decoding_message_size, request)
    }
}

/// One unary call to `method`, its request decoded with [`ProtoCodec`] within `limit`.
fn unary<M, S>(
    method: S,
    limit: Option<usize>,
    request: http::Request<Body>,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    M: Message + Default + Send + 'static,
    S: UnaryService<M> + Send + 'static,
    S::Response: Message + Send + 'static,
    S::Future: Send,
{
    Box::pin(async move {
        let mut grpc = Grpc::new(ProtoCodec::default()).apply_max_message_size_config(limit, None);
        Ok(grpc.unary(method, request).await)
    })
}

/// The one method, Check, for [`Grpc::unary`]: decided from memory, so ready at once.
impl UnaryService<CheckRequest> for ExtAuthzServer {
    type Response = CheckResponse;
    type Future = NowOrLater<Result<Response<CheckResponse>, Status>>;

    fn call(&mut self, request: Request<CheckRequest>) -> Self::Future {
        match self.inner.decide(request.get_ref()) {
            Ok(response) => NowOrLater::Now(Some(Ok(Response::new(response)))),
            // Only a key's first use on this replica, or a slice spent out: one lease.
            Err(call) => {
                let inner = self.inner.clone();
                NowOrLater::Later(Box::pin(async move {
                    Ok(Response::new(
                        inner.decide_leasing(request.get_ref(), call).await,
                    ))
                }))
            }
        }
    }
}

/// The ApiKeys service as routed: ValidateKey, the call on every gateway request, is decided
/// in the call itself (from memory, so ready at once), without the two boxed futures the
/// generated server wraps each method in; every other method goes to the generated server.
#[derive(Debug, Clone)]
pub struct ApiKeysRoutes {
    service: Arc<ApiKeysService>,
    generated: ApiKeysServer<ApiKeysService>,
    max_decoding_message_size: Option<usize>,
}

/// The path of ValidateKey.
const VALIDATE_KEY_PATH: &str = "/cloodot.apikeys.v1.ApiKeys/ValidateKey";

impl ApiKeysRoutes {
    /// `limit` bounds a request message, as the generated server's
    /// `max_decoding_message_size`.
    pub fn new(service: ApiKeysService, limit: usize) -> Self {
        let service = Arc::new(service);
        Self {
            generated: ApiKeysServer::from_arc(service.clone()).max_decoding_message_size(limit),
            service,
            max_decoding_message_size: Some(limit),
        }
    }
}

impl NamedService for ApiKeysRoutes {
    const NAME: &'static str = <ApiKeysServer<ApiKeysService> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for ApiKeysRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != VALIDATE_KEY_PATH {
            return self.generated.call(request);
        }
        let validate = ValidateKeyNow(self.service.clone());
        unary(validate, self.max_decoding_message_size, request)
    }
}

struct ValidateKeyNow(Arc<ApiKeysService>);

impl UnaryService<ValidateKeyRequest> for ValidateKeyNow {
    type Response = ValidateKeyResponse;
    type Future = NowOrLater<Result<Response<ValidateKeyResponse>, Status>>;

    fn call(&mut self, request: Request<ValidateKeyRequest>) -> Self::Future {
        match self.0.validate_now(request.get_ref()) {
            Ok(Judgement::Answer(response)) => NowOrLater::Now(Some(Ok(Response::new(response)))),
            Err(status) => NowOrLater::Now(Some(Err(status))),
            // Only a key's first use on this replica, or a slice spent out: one lease.
            Ok(Judgement::Lease(call)) => {
                let service = self.0.clone();
                NowOrLater::Later(Box::pin(async move {
                    service
                        .validate_leasing(request.get_ref(), call)
                        .await
                        .map(Response::new)
                        .map_err(Status::from)
                }))
            }
        }
    }
}

/// A validation's answer: ready at once (no allocation, no await), or after a credit lease.
pub(crate) enum NowOrLater<T> {
    /// Taken when polled; polled once.
    Now(Option<T>),
    Later(std::pin::Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T: Unpin> Future for NowOrLater<T> {
    type Output = T;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            Self::Now(answer) => match answer.take() {
                Some(answer) => Poll::Ready(answer),
                // Polled after it completed: a caller's bug, never ours to panic over.
                None => Poll::Pending,
            },
            Self::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// gRPC health (`grpc.health.v1.Health`: Check and Watch) with [`ProtoCodec`], answering from
/// a [`HealthReporter`]'s statuses as tonic-health's own server does. Health needs no
/// credentials, so its undecodable requests above all must not count as the server's fault.
#[derive(Debug, Clone)]
pub(crate) struct HealthServer {
    inner: Arc<HealthService>,
    max_decoding_message_size: Option<usize>,
}

const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

impl HealthServer {
    pub(crate) fn new(reporter: &HealthReporter) -> Self {
        Self {
            inner: Arc::new(HealthService::from_health_reporter(reporter.clone())),
            max_decoding_message_size: None,
        }
    }

    #[must_use]
    pub(crate) fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl NamedService for HealthServer {
    const NAME: &'static str = HEALTH_SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for HealthServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (inner, limit) = (self.inner.clone(), self.max_decoding_message_size);
        match request.uri().path() {
            HEALTH_CHECK_PATH => unary(HealthCheck(inner), limit, request),
            HEALTH_WATCH_PATH => Box::pin(async move {
                let mut grpc =
                    Grpc::new(ProtoCodec::default()).apply_max_message_size_config(limit, None);
                Ok(grpc.server_streaming(HealthWatch(inner), request).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

struct HealthCheck(Arc<HealthService>);

impl UnaryService<HealthCheckRequest> for HealthCheck {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<Response<HealthCheckResponse>, Status>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.check(request).await })
    }
}

struct HealthWatch(Arc<HealthService>);

impl ServerStreamingService<HealthCheckRequest> for HealthWatch {
    type Response = HealthCheckResponse;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.watch(request).await })
    }
}
