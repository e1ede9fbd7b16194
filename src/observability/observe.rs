//! The outermost layer: every call, the ones the guards turn away included, is counted and
//! timed (with metrics on) and gets a server span in the caller's trace (with traces on).
//! Method and code come from fixed lists, never from what a caller sent, so neither a label
//! nor a span name can carry a secret or grow without bound.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::propagation::Extractor;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{metrics::Metrics, telemetry};

/// The ApiKeys methods: the only method names besides health, reflection and `unknown`.
pub const API_METHODS: [&str; 12] = [
    "CreateKey",
    "ListKeys",
    "DeleteKey",
    "ValidateKey",
    "ValidateKeys",
    "GetKey",
    "UpdateKey",
    "DisableKey",
    "EnableKey",
    "RotateKey",
    "ListKeyEvents",
    "GetKeyUsage",
];

/// The method of a request path: one of a fixed set.
fn method_of(path: &str) -> &'static str {
    if let Some(method) = path.strip_prefix("/cloodot.apikeys.v1.ApiKeys/") {
        return API_METHODS
            .into_iter()
            .find(|known| *known == method)
            .unwrap_or("unknown");
    }
    match path {
        "/grpc.health.v1.Health/Check" => "health.Check",
        "/grpc.health.v1.Health/Watch" => "health.Watch",
        crate::grpc::EXT_AUTHZ_CHECK_PATH => "ext_authz.Check",
        _ if path.starts_with("/grpc.reflection.") => "reflection",
        _ => "unknown",
    }
}

/// Whether an INVALID_ARGUMENT answer is for a request that was not protobuf at all
/// (`REQUEST_UNDECODABLE`): a broken or hostile client rather than a bad field.
fn is_undecodable(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-message")
        .is_some_and(|message| {
            percent_encoding::percent_decode(message.as_bytes())
                .eq(crate::error::UNDECODABLE_MESSAGE.bytes())
        })
}

/// The status of a response: its `grpc-status` header (every error tonic or a guard answers
/// is trailers-only, so its status is in the headers); without one, the call succeeded and
/// its `OK` comes in the trailers.
fn code_of(response: &http::Response<Body>) -> &'static str {
    let Some(status) = response.headers().get("grpc-status") else {
        return "OK";
    };
    match tonic::Code::from_bytes(status.as_bytes()) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Reads W3C trace context from a call's HTTP/2 headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The layer; a pass-through when neither metrics nor traces are on.
#[derive(Debug, Clone)]
pub(crate) struct Observe(pub Option<Arc<Metrics>>);

impl<S> Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observed {
            metrics: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Observed<S> {
    metrics: Option<Arc<Metrics>>,
    inner: S,
}

impl<S> Service<http::Request<Body>> for Observed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Observing<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let tracing = telemetry::exporting();
        if self.metrics.is_none() && !tracing {
            return Observing {
                response: self.inner.call(request).instrument(tracing::Span::none()),
                call: None,
            };
        }
        let started = Instant::now();
        let method = method_of(request.uri().path());
        let span = if tracing {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            );
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&HeaderExtractor(request.headers()))
            });
            // Fails only when the span is filtered out, and then there is nothing to parent.
            let _ = span.set_parent(parent);
            span
        } else {
            tracing::Span::none()
        };
        Observing {
            response: self.inner.call(request).instrument(span),
            call: Some(Call {
                method,
                started,
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// What an observed call's answer is counted and recorded under.
struct Call {
    method: &'static str,
    started: Instant,
    metrics: Option<Arc<Metrics>>,
}

pin_project_lite::pin_project! {
    /// An observed call's answer, counted and recorded in its span when it comes.
    pub struct Observing<F> {
        #[pin]
        response: Instrumented<F>,
        call: Option<Call>,
    }
}

impl<F, E> std::future::Future for Observing<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let response = std::task::ready!(this.response.as_mut().poll(cx));
        if let (Some(call), Ok(response)) = (this.call.take(), &response) {
            let code = code_of(response);
            if let Some(metrics) = call.metrics {
                metrics.rpc(call.method, code, call.started);
                if code == "INVALID_ARGUMENT" && is_undecodable(response) {
                    metrics.undecodable(call.method);
                }
            }
            let span = this.response.span();
            span.record("rpc.grpc.status_code", code);
            if matches!(
                code,
                "UNKNOWN" | "INTERNAL" | "UNAVAILABLE" | "DATA_LOSS" | "DEADLINE_EXCEEDED"
            ) {
                span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(response)
    }
}
