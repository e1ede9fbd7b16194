//! OpenTelemetry traces: the real binary exports over OTLP/gRPC to a minimal collector.

use std::sync::{Arc, Mutex, PoisonError};

use apikeys::grpc::proto::{CreateKeyRequest, Expiration, api_keys_client::ApiKeysClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use tonic::{Request, Response, Status};

use crate::{
    binary::{command, start_command, terminate},
    scan::remember,
    support::{TestDb, as_owner},
};

/// Keeps every export it receives.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Starts on loopback; returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// Every span received, with the service name of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let exports = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut spans = Vec::new();
        for export in exports.iter() {
            for resource_spans in &export.resource_spans {
                let service = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|r| text(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn every_value(attributes: &[KeyValue]) -> String {
    attributes
        .iter()
        .map(|kv| {
            format!(
                "{}={:?}",
                kv.key,
                kv.value.as_ref().map(|v: &AnyValue| &v.value)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn a_create_key_is_traced_in_the_callers_trace_and_no_secret_is_an_attribute() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let db = TestDb::new().await;
    let mut server = command(&db);
    server
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "apikeys-under-test");
    let (child, addr, _logs) = start_command(server);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ApiKeysClient::new(channel);

    // The admin backend's trace: its trace id and the id of its client span.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = as_owner(CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "traced".into(),
        expiration: Expiration::Never.into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    let created = client.create_key(request).await.unwrap().into_inner();
    remember(&created.secret);
    let key_id = created.key.unwrap().id;

    // Spans are batched; a graceful shutdown flushes them.
    assert!(terminate(child).await.success());

    let spans = collector.spans();
    let ours: Vec<&(String, Span)> = spans
        .iter()
        .filter(|(_, span)| hex(&span.trace_id) == trace_id)
        .collect();
    let (service, server_span) = ours
        .iter()
        .find(|(_, span)| span.name == "CreateKey" && hex(&span.parent_span_id) == parent_id)
        .unwrap_or_else(|| panic!("no CreateKey server span in the caller's trace: {spans:?}"));
    assert_eq!(service, "apikeys-under-test");
    // SpanKind::Server is 2.
    assert_eq!(server_span.kind, 2);
    assert_eq!(
        text(&server_span.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        text(&server_span.attributes, "rpc.grpc.status_code").as_deref(),
        Some("OK")
    );
    // The handler's span nests in it, with the workspace and the new key's id.
    let handler = ours
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.parent_span_id == server_span.span_id)
        .expect("the handler's span");
    assert_eq!(
        text(&handler.attributes, "workspace_id").as_deref(),
        Some("acme")
    );
    assert_eq!(
        text(&handler.attributes, "key_id").as_deref(),
        Some(key_id.as_str())
    );

    for (_, span) in &spans {
        let values = every_value(&span.attributes);
        assert!(
            !values.contains(&created.secret[4..36]),
            "a secret in {values}"
        );
        for event in &span.events {
            let values = every_value(&event.attributes);
            assert!(
                !values.contains(&created.secret[4..36]),
                "a secret in {values}"
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
