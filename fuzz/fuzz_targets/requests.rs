//! Arbitrary bytes as the body of every ApiKeys RPC (a ValidateKeys stream of one message) and of Envoy's ext_authz Check, with
//! arbitrary actor metadata, through tonic's decoding and the real handlers over a real
//! (SQLite) database and key index. No input may panic or hang, every request that decodes
//! must be answered with something better than INTERNAL or UNKNOWN, and every Check that
//! decodes with OK: its decisions are CheckResponses, never RPC errors. (A body that is not a
//! protobuf message of the request's type is answered INTERNAL by tonic's codec, as by every
//! gRPC implementation.)
#![no_main]

use std::sync::{Arc, OnceLock};

use apikeys::{
    app::MAX_REQUEST_BYTES,
    clock::SystemClock,
    config::Settings,
    grpc::{
        ApiKeysRoutes, ApiKeysService, EXT_AUTHZ_CHECK_PATH, ExtAuthzServer, ExtAuthzService,
        guard::{ManagementRate, Rate},
        proto::{
            CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, GetKeyRequest,
            GetKeyUsageRequest, ListKeyEventsRequest, ListKeysRequest, RotateKeyRequest,
            UpdateKeyRequest, ValidateKeyRequest, ValidateKeysRequest,
        },
    },
    index::{KeyIndex, Syncer},
    service::KeyService,
    store::Store,
};
use arbitrary::Arbitrary;
use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tower::Service;

/// Every ApiKeys method, as the server names them.
const METHODS: [&str; 12] = apikeys::observability::observe::API_METHODS;

#[derive(Debug, Arbitrary)]
struct Call {
    method: u8,
    actor_id: Option<String>,
    actor_role: Option<String>,
    /// The gRPC message, framed as sent; `frame_len` lets the length prefix lie.
    message: Vec<u8>,
    frame_len: Option<u32>,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    server: ApiKeysRoutes,
    authz: ExtAuthzServer,
    _dir: tempfile::TempDir,
}

/// No rate limit: the fuzzer calls far faster than any admin backend.
fn unlimited() -> ManagementRate {
    let rate = Rate {
        per_second: std::num::NonZeroU32::MAX,
        burst: std::num::NonZeroU32::MAX,
    };
    ManagementRate::new(rate, rate)
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("fuzz.db").display());
        let settings = Settings::new("127.0.0.1:0".parse().expect("an address"), url.clone());
        let (server, authz) = runtime.block_on(async {
            let store = Store::connect(&url, 4).await.expect("the database");
            store.migrate().await.expect("migrations");
            let syncer = Arc::new(Syncer::new(
                store.clone(),
                Arc::new(KeyIndex::new()),
                settings.sync_settings(),
            ));
            syncer.load().await.expect("the index");
            let keys = KeyService::new(store, Arc::new(SystemClock), syncer);
            (
                ApiKeysRoutes::new(
                    ApiKeysService::new(keys.clone(), unlimited()),
                    MAX_REQUEST_BYTES,
                ),
                ExtAuthzServer::new(ExtAuthzService::new(
                    keys,
                    settings.gateway_settings(),
                    None,
                ))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
        });
        Harness {
            runtime,
            server,
            authz,
            _dir: dir,
        }
    })
}

fuzz_target!(|call: Call| {
    let harness = harness();
    // One choice more than the ApiKeys methods: Envoy's Check.
    let choice = usize::from(call.method) % (METHODS.len() + 1);
    let method = METHODS.get(choice).copied().unwrap_or("Check");
    let path = match METHODS.get(choice) {
        Some(method) => format!("/cloodot.apikeys.v1.ApiKeys/{method}"),
        None => EXT_AUTHZ_CHECK_PATH.to_owned(),
    };
    let mut body = Vec::with_capacity(5 + call.message.len());
    body.push(0);
    let len = call.frame_len.unwrap_or(call.message.len() as u32);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&call.message);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in [
        ("x-actor-id", &call.actor_id),
        ("x-actor-role", &call.actor_role),
    ] {
        if let Some(value) = value
            .as_deref()
            .and_then(|v| http::HeaderValue::from_str(v).ok())
        {
            request = request.header(name, value);
        }
    }
    let request = request
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
        .expect("a request");
    let decodes = call
        .frame_len
        .is_none_or(|len| len as usize == call.message.len())
        && call.message.len() <= MAX_REQUEST_BYTES
        && match method {
            "CreateKey" => CreateKeyRequest::decode(call.message.as_slice()).is_ok(),
            "ListKeys" => ListKeysRequest::decode(call.message.as_slice()).is_ok(),
            "DeleteKey" => DeleteKeyRequest::decode(call.message.as_slice()).is_ok(),
            "GetKey" => GetKeyRequest::decode(call.message.as_slice()).is_ok(),
            "UpdateKey" => UpdateKeyRequest::decode(call.message.as_slice()).is_ok(),
            "DisableKey" => DisableKeyRequest::decode(call.message.as_slice()).is_ok(),
            "EnableKey" => EnableKeyRequest::decode(call.message.as_slice()).is_ok(),
            "RotateKey" => RotateKeyRequest::decode(call.message.as_slice()).is_ok(),
            "ListKeyEvents" => ListKeyEventsRequest::decode(call.message.as_slice()).is_ok(),
            "GetKeyUsage" => GetKeyUsageRequest::decode(call.message.as_slice()).is_ok(),
            "Check" => CheckRequest::decode(call.message.as_slice()).is_ok(),
            "ValidateKeys" => ValidateKeysRequest::decode(call.message.as_slice()).is_ok(),
            _ => ValidateKeyRequest::decode(call.message.as_slice()).is_ok(),
        };
    let (mut server, mut authz) = (harness.server.clone(), harness.authz.clone());
    harness.runtime.block_on(async move {
        let response = if method == "Check" {
            authz.call(request).await
        } else {
            server.call(request).await
        }
        .expect("tonic answers every request");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await;
        let status = parts
            .headers
            .get("grpc-status")
            .cloned()
            .or_else(|| {
                collected
                    .ok()
                    .and_then(|c| c.trailers().and_then(|t| t.get("grpc-status").cloned()))
            })
            .expect("every answer carries a grpc-status");
        let code = tonic::Code::from_bytes(status.as_bytes());
        if decodes && method == "Check" {
            assert_eq!(
                code,
                tonic::Code::Ok,
                "Check answered {code:?}, not a decision"
            );
        } else if decodes {
            assert!(
                !matches!(code, tonic::Code::Internal | tonic::Code::Unknown),
                "{method} answered {code:?} to a well-formed request"
            );
        }
    });
});
