//! Logs and traces. Logs: human-readable, or JSON with `APIKEYS_LOG_FORMAT=json`. Traces:
//! OpenTelemetry over OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with `OTEL_SERVICE_NAME` (default
//! `apikeys`), `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER`/`_ARG` honoured; a W3C
//! `traceparent` in a call's metadata continues the caller's trace.
//!
//! Secrets never reach either: the key types print `clo_****`, and no span or event records a
//! presented key, a caller token or any other header.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::Targets, fmt::MakeWriter, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::config::LogFormat;

/// Whether spans are exported; calls get no server span otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// The span of a call on the validation path (ValidateKey, Check): `make()`'s when spans are
/// exported, else none. At the default `info` the log layer would keep every such span, its
/// fields formatted, for every call, though no event in it is ever logged: per-call work only
/// needed when someone looks.
pub(crate) fn hot_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// What must be shut down before exit: the span exporter, flushing what it holds.
#[derive(Debug, Default)]
#[must_use = "dropping it without shutdown() loses the spans not yet exported"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(err) = traces.shutdown()
        {
            eprintln!("apikeys: exporting the last spans failed: {err}");
        }
    }
}

/// Whether OTLP export is configured in the environment (and not disabled).
fn otlp_configured() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber, writing logs to `writer`, filtered by RUST_LOG (default
/// `info`); colours only when `ansi`. With OTLP configured, also exports this service's spans
/// (the per-call span and the handlers' spans, at info and above). Fails if a subscriber is
/// installed already or the exporter cannot be built. Call from within the Tokio runtime.
pub fn init<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let logs = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let mut telemetry = Telemetry::default();
    let traces = if otlp_configured() {
        // The exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _TIMEOUT and _HEADERS.
        let exporter = SpanExporter::builder().with_tonic().build()?;
        let mut resource = Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name("apikeys");
        }
        // The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("apikeys");
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        telemetry.traces = Some(provider);
        EXPORTING.store(true, Ordering::Release);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target("apikeys", tracing::Level::INFO)),
        )
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    Ok(telemetry)
}
