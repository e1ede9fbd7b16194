//! Envoy's ext_authz Check, driven with envoy-types' client as Envoy would call it.

use std::{collections::HashMap, time::Duration};

use apikeys::grpc::proto::{
    CreateKeyRequest, DeleteKeyRequest, Expiration, GetKeyUsageRequest, ValidationResult,
};
use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            Address, HeaderMap, HeaderValue, HeaderValueOption, SocketAddress, address,
            header_value_option,
        },
        service::auth::v3::{
            AttributeContext, CheckRequest, CheckResponse, attribute_context,
            authorization_client::AuthorizationClient, check_response::HttpResponse,
        },
    },
    google::rpc::Status as RpcStatus,
};
use serde_json::Value;
use tonic::{Code, Request};

use crate::{
    lifecycle::timestamp,
    security::spawn_guarded,
    support::{TestApp, TestDb, as_owner, spawn_app, spawn_app_with},
};

/// A request as Envoy sends it: headers (lower-case names), the peer's address and the
/// route's context extensions.
pub(crate) fn check_request(
    headers: &[(&str, &str)],
    required_scopes: Option<&str>,
) -> CheckRequest {
    let mut context_extensions = HashMap::new();
    if let Some(scopes) = required_scopes {
        context_extensions.insert("required_scopes".to_owned(), scopes.to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "198.51.100.23".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: headers
                        .iter()
                        .map(|(name, value)| (name.to_string(), value.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions,
            ..Default::default()
        }),
    }
}

impl TestApp {
    pub(crate) async fn check(&self, request: CheckRequest) -> CheckResponse {
        AuthorizationClient::new(self.channel.clone())
            .check(request)
            .await
            .expect("Check answers every request with a decision")
            .into_inner()
    }
}

/// What a decision says, as Envoy applies it.
#[derive(Debug)]
pub(crate) struct Decision {
    pub(crate) code: Code,
    pub(crate) http_status: Option<i32>,
    pub(crate) set: HashMap<String, String>,
    pub(crate) removed: Vec<String>,
    /// Headers added to the response Envoy sends the client, when allowed.
    pub(crate) to_client: HashMap<String, String>,
    pub(crate) body: Value,
}

fn headers(options: &[HeaderValueOption]) -> HashMap<String, String> {
    options
        .iter()
        .map(|option| {
            assert_eq!(
                option.append_action,
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "a header the client may have sent must be overwritten, not appended"
            );
            let header = option.header.as_ref().unwrap();
            (header.key.clone(), header.value.clone())
        })
        .collect()
}

pub(crate) fn decision(response: CheckResponse) -> Decision {
    let status: RpcStatus = response.status.unwrap_or_default();
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Decision {
            code: Code::from(status.code),
            http_status: None,
            set: headers(&ok.headers),
            removed: ok.headers_to_remove,
            to_client: headers(&ok.response_headers_to_add),
            body: Value::Null,
        },
        Some(HttpResponse::DeniedResponse(denied)) => Decision {
            code: Code::from(status.code),
            http_status: denied.status.map(|s| s.code),
            set: headers(&denied.headers),
            removed: Vec::new(),
            to_client: HashMap::new(),
            body: serde_json::from_str(&denied.body).expect("a JSON body"),
        },
        other => panic!("no HTTP response: {other:?}"),
    }
}

fn assert_denied(decision: &Decision, http_status: i32, challenge: &str, reason: &str) {
    assert_eq!(decision.code, Code::Unauthenticated, "{decision:?}");
    assert_eq!(decision.http_status, Some(http_status), "{decision:?}");
    assert_eq!(decision.set["www-authenticate"], challenge, "{decision:?}");
    assert_eq!(decision.set["content-type"], "application/json");
    assert_eq!(decision.body["reason"], reason, "{decision:?}");
}

async fn scoped_key(app: &mut TestApp, scopes: &[&str]) -> (String, String) {
    let (key, secret) = app
        .create_with(CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "gateway".into(),
            expiration: Expiration::Expiration30Days.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    (key.id, secret)
}

#[tokio::test]
async fn a_valid_key_in_either_header_is_allowed_with_its_identity_and_the_credential_removed() {
    let mut app = spawn_app().await;
    let (id, secret) = scoped_key(&mut app, &["orders:read", "orders:write"]).await;
    let bearer = format!("Bearer {secret}");

    for (header, value) in [
        ("authorization", bearer.as_str()),
        ("x-api-key", secret.as_str()),
    ] {
        let allowed = decision(
            app.check(check_request(
                &[(header, value), ("x-cloodot-key-id", "key_spoofed")],
                None,
            ))
            .await,
        );

        assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
        assert_eq!(allowed.set["x-cloodot-key-id"], id);
        assert_eq!(allowed.set["x-cloodot-workspace-id"], "acme");
        assert_eq!(
            allowed.set["x-cloodot-key-scopes"],
            "orders:read,orders:write"
        );
        // The key's header, and the owner header a client may have sent: this key has none.
        assert_eq!(allowed.removed, [header, "x-cloodot-owner-id"]);
    }
    // The scheme is case-insensitive; authorization wins when both are present.
    let lower = format!("bearer {secret}");
    let both = decision(
        app.check(check_request(
            &[("authorization", &lower), ("x-api-key", "clo_other")],
            None,
        ))
        .await,
    );
    assert_eq!(both.code, Code::Ok, "{both:?}");
    assert_eq!(both.removed, ["authorization", "x-cloodot-owner-id"]);
}

#[tokio::test]
async fn raw_header_values_are_read_and_one_that_is_not_utf8_is_a_malformed_key() {
    let mut app = spawn_app().await;
    let (id, secret) = scoped_key(&mut app, &["orders:read"]).await;
    // Envoy told to send raw header values: `header_map`, names as the client sent them.
    let raw = |value: Vec<u8>| {
        let mut request = check_request(&[], None);
        let attributes = request.attributes.as_mut().unwrap();
        let http = attributes.request.as_mut().unwrap().http.as_mut().unwrap();
        http.header_map = Some(HeaderMap {
            headers: vec![
                HeaderValue {
                    key: "user-agent".into(),
                    raw_value: b"curl/8".to_vec(),
                    ..Default::default()
                },
                HeaderValue {
                    key: "Authorization".into(),
                    raw_value: value,
                    ..Default::default()
                },
            ],
        });
        http.raw_body = vec![0xff, 0x00];
        request
    };

    let allowed = decision(
        app.check(raw(format!("Bearer {secret}").into_bytes()))
            .await,
    );
    let refused = decision(app.check(raw(b"Bearer clo_\xff\xfe".to_vec())).await);

    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    assert_eq!(allowed.set["x-cloodot-key-id"], id);
    assert_eq!(allowed.removed, ["authorization", "x-cloodot-owner-id"]);
    assert_denied(&refused, 401, "Bearer error=\"invalid_token\"", "malformed");
}

#[tokio::test]
async fn a_key_without_scopes_has_a_client_sent_scopes_header_removed() {
    let mut app = spawn_app().await;
    let (_, secret) = scoped_key(&mut app, &[]).await;

    let allowed = decision(
        app.check(check_request(
            &[("x-api-key", &secret), ("x-cloodot-key-scopes", "admin")],
            None,
        ))
        .await,
    );

    assert_eq!(allowed.code, Code::Ok);
    assert!(!allowed.set.contains_key("x-cloodot-key-scopes"));
    assert!(allowed.removed.contains(&"x-cloodot-key-scopes".to_owned()));
}

#[tokio::test]
async fn every_refusal_is_a_401_decision_naming_its_reason() {
    let mut app = spawn_app().await;
    let (_, expiring_secret) = app
        .create_key("acme", "a", Expiration::Expiration30Days)
        .await;
    let (disabled, disabled_secret) = app.create_key("acme", "b", Expiration::Never).await;
    let (deleted, deleted_secret) = app.create_key("acme", "c", Expiration::Never).await;
    app.try_disable("acme", &disabled.id).await.unwrap();
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: deleted.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    app.clock.advance(chrono::TimeDelta::days(31));
    let unknown = apikeys::domain::Secret::generate();
    let bearer = |key: &str| format!("Bearer {key}");

    for (headers, reason) in [
        (vec![("x-api-key", expiring_secret.clone())], "expired"),
        (vec![("x-api-key", disabled_secret.clone())], "disabled"),
        (vec![("authorization", bearer(&deleted_secret))], "deleted"),
        (
            vec![("authorization", bearer(unknown.expose()))],
            "not_found",
        ),
        (vec![("authorization", bearer("clo_garbage"))], "malformed"),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(h, v)| (*h, v.as_str())).collect();
        let refused = decision(app.check(check_request(&headers, None)).await);
        assert_denied(&refused, 401, "Bearer error=\"invalid_token\"", reason);
        assert!(!refused.set.contains_key("x-cloodot-key-id"));
    }
    // No key at all, or a credential of another scheme: a bare challenge.
    for headers in [
        vec![],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", "Bearer")],
        vec![("cookie", "session=1")],
    ] {
        let refused = decision(app.check(check_request(&headers, None)).await);
        assert_denied(&refused, 401, "Bearer", "missing_key");
    }
}

#[tokio::test]
async fn routes_require_scopes_through_context_extensions() {
    let mut app = spawn_app().await;
    let (_, secret) = scoped_key(&mut app, &["orders:read"]).await;
    let key = [("x-api-key", secret.as_str())];

    let read = decision(app.check(check_request(&key, Some("orders:read"))).await);
    let write = decision(
        app.check(check_request(&key, Some(" orders:read, orders:write ")))
            .await,
    );
    let broken = decision(app.check(check_request(&key, Some("Orders Read"))).await);

    assert_eq!(read.code, Code::Ok);
    assert_eq!(write.code, Code::PermissionDenied);
    assert_eq!(write.http_status, Some(403));
    assert_eq!(
        write.set["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"orders:read orders:write\""
    );
    assert_eq!(write.body["reason"], "insufficient_scope");
    // A route's own configuration at fault fails closed, as a server error.
    assert_eq!(broken.code, Code::Internal);
    assert_eq!(broken.http_status, Some(500));
    assert_eq!(broken.body["reason"], "route_misconfigured");
}

#[tokio::test]
async fn header_names_and_credential_removal_are_configurable() {
    let db = TestDb::new().await;
    let clock = apikeys::clock::ManualClock::new(chrono::Utc::now());
    let mut app = spawn_app_with(db, clock, |settings| {
        settings.gateway_key_headers = vec!["x-cloodot-key".into()];
        settings.gateway_hide_credentials = false;
    })
    .await;
    let (_, secret) = scoped_key(&mut app, &[]).await;

    let allowed = decision(
        app.check(check_request(&[("x-cloodot-key", &secret)], None))
            .await,
    );
    let ignored = decision(
        app.check(check_request(&[("x-api-key", &secret)], None))
            .await,
    );

    assert_eq!(allowed.code, Code::Ok);
    assert!(!allowed.removed.contains(&"x-cloodot-key".to_owned()));
    assert_denied(&ignored, 401, "Bearer", "missing_key");
}

#[tokio::test]
async fn checks_count_in_the_keys_usage_with_the_client_ip() {
    let mut app = spawn_app().await;
    let (id, secret) = scoped_key(&mut app, &["orders:read"]).await;
    let key = [("x-api-key", secret.as_str())];
    app.check(check_request(&key, None)).await;
    app.check(check_request(&key, Some("orders:write"))).await;
    let now = app.clock_now();

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let usage = loop {
        let usage = app
            .client
            .get_key_usage(as_owner(GetKeyUsageRequest {
                workspace_id: "acme".into(),
                key_id: id.clone(),
                start_time: Some(timestamp(now - chrono::TimeDelta::hours(1))),
                end_time: Some(timestamp(now + chrono::TimeDelta::hours(1))),
            }))
            .await
            .unwrap()
            .into_inner();
        if !usage.buckets.is_empty() || std::time::Instant::now() > deadline {
            break usage;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(usage.buckets.len(), 1, "{usage:?}");
    assert_eq!(usage.buckets[0].valid, 1);
    assert_eq!(usage.buckets[0].insufficient_scope, 1);
    assert_eq!(usage.buckets[0].distinct_client_ips, 1);
    assert_eq!(usage.last_used_ip, "198.51.100.23");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn a_gateway_caller_may_check_and_an_unknown_caller_may_not() {
    let guarded = spawn_guarded(|_| {}).await;
    let client = || AuthorizationClient::new(guarded.app.channel.clone());
    let with_token = |token: &str| {
        let mut request = Request::new(check_request(&[], None));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };

    let gateway = client()
        .check(with_token(guarded.gateway.expose()))
        .await
        .unwrap()
        .into_inner();
    let stranger = client()
        .check(with_token("not-a-caller-token"))
        .await
        .unwrap_err();

    assert_denied(&decision(gateway), 401, "Bearer", "missing_key");
    assert_eq!(stranger.code(), Code::Unauthenticated);
}
