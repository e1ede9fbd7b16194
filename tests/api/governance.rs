//! What a key carries besides its identity: owners (and ListKeys' filter), annotations,
//! allowed networks (IP_NOT_ALLOWED, on ValidateKey and Envoy's Check), etags on every change.

use std::collections::BTreeMap;

use apikeys::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
    GetKeyRequest, ListKeysRequest, RotateKeyRequest, UpdateKeyRequest, ValidateKeyRequest,
    ValidationResult,
};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use tonic::Code;

use crate::{
    ext_authz::{check_request, decision},
    support::{TestApp, TestDb, as_owner, assert_error, spawn_app, spawn_app_with},
};

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn governed(owner: &str, pairs: &[(&str, &str)], cidrs: &[&str]) -> CreateKeyRequest {
    CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "partner".into(),
        expiration: Expiration::Never.into(),
        owner_id: owner.into(),
        annotations: annotations(pairs),
        allowed_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
        ..Default::default()
    }
}

impl TestApp {
    /// ValidateKey's answer to `secret` presented from `ip`.
    async fn answer_from(
        &mut self,
        secret: &str,
        ip: &str,
    ) -> apikeys::grpc::proto::ValidateKeyResponse {
        self.client
            .validate_key(ValidateKeyRequest {
                key: secret.into(),
                client_ip: ip.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn validate_ip(&mut self, secret: &str, ip: &str) -> ValidationResult {
        self.answer_from(secret, ip).await.result()
    }

    async fn get(&mut self, id: &str) -> ApiKey {
        self.client
            .get_key(as_owner(GetKeyRequest {
                workspace_id: "acme".into(),
                key_id: id.into(),
            }))
            .await
            .unwrap()
            .into_inner()
    }
}

#[tokio::test]
async fn a_key_carries_its_owner_annotations_and_networks_into_every_validation() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(governed(
            "user_42",
            &[("tier", "gold"), ("region", "eu")],
            &["2001:db8::/32", "192.0.2.7", "10.0.0.0/8"],
        ))
        .await;
    assert_eq!(key.owner_id, "user_42");
    assert_eq!(
        key.annotations,
        annotations(&[("tier", "gold"), ("region", "eu")])
    );
    // Canonical, sorted (IPv4 first), a bare address as a /32.
    assert_eq!(
        key.allowed_cidrs,
        ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    );
    assert_eq!(app.get(&key.id).await, key);

    let answer = app.answer_from(&secret, "10.20.30.40").await;
    assert!(answer.valid, "{answer:?}");
    assert_eq!(answer.owner_id, "user_42");
    assert_eq!(answer.annotations, key.annotations);

    for (ip, result) in [
        ("192.0.2.7", ValidationResult::Valid),
        ("2001:db8:1::9", ValidationResult::Valid),
        // An IPv4 client as a dual-stack socket reports it.
        ("::ffff:10.1.1.1", ValidationResult::Valid),
        ("192.0.2.8", ValidationResult::IpNotAllowed),
        ("203.0.113.1", ValidationResult::IpNotAllowed),
        // No address: cannot be shown to be inside, so refused.
        ("", ValidationResult::IpNotAllowed),
    ] {
        assert_eq!(app.validate_ip(&secret, ip).await, result, "{ip:?}");
    }
}

#[tokio::test]
async fn the_address_is_judged_after_the_keys_state_and_before_its_scopes() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(CreateKeyRequest {
            scopes: vec!["orders:read".into()],
            ..governed("", &[], &["10.0.0.0/8"])
        })
        .await;
    let validate = |required: &[&str], ip: &str| ValidateKeyRequest {
        rate_limits: Vec::new(),
        key: secret.clone(),
        required_scopes: required.iter().map(|s| (*s).to_owned()).collect(),
        client_ip: ip.into(),
        cost: None,
    };
    let result = |answer: tonic::Response<apikeys::grpc::proto::ValidateKeyResponse>| {
        answer.into_inner().result()
    };
    // Outside the networks and lacking the scope: the address is what it is refused for.
    let answer = app
        .client
        .validate_key(validate(&["admin"], "192.0.2.1"))
        .await;
    assert_eq!(result(answer.unwrap()), ValidationResult::IpNotAllowed);
    let answer = app
        .client
        .validate_key(validate(&["admin"], "10.0.0.1"))
        .await;
    assert_eq!(result(answer.unwrap()), ValidationResult::InsufficientScope);
    // A disabled key is disabled, wherever it comes from.
    app.client
        .disable_key(as_owner(DisableKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let answer = app.client.validate_key(validate(&[], "192.0.2.1")).await;
    assert_eq!(result(answer.unwrap()), ValidationResult::Disabled);
}

#[tokio::test]
async fn bad_owners_annotations_and_networks_are_refused_with_their_reasons() {
    let mut app = spawn_app().await;
    let long_value = "v".repeat(257);
    let many_annotations: Vec<(String, String)> =
        (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let many_cidrs: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
    let cases: Vec<(CreateKeyRequest, &str)> = vec![
        (governed(&"u".repeat(129), &[], &[]), "OWNER_ID_INVALID"),
        (governed("two words", &[], &[]), "OWNER_ID_INVALID"),
        (
            governed("", &[("Tier", "gold")], &[]),
            "ANNOTATION_KEY_INVALID",
        ),
        (
            governed("", &[("tier", "a\nb")], &[]),
            "ANNOTATION_VALUE_INVALID",
        ),
        (
            governed("", &[("tier", long_value.as_str())], &[]),
            "ANNOTATION_VALUE_INVALID",
        ),
        (
            CreateKeyRequest {
                annotations: many_annotations.into_iter().collect(),
                ..governed("", &[], &[])
            },
            "TOO_MANY_ANNOTATIONS",
        ),
        (governed("", &[], &["10.0.0.1/8"]), "CIDR_INVALID"),
        (governed("", &[], &["10.0.0.0/33"]), "CIDR_INVALID"),
        (governed("", &[], &["example.com"]), "CIDR_INVALID"),
        (
            CreateKeyRequest {
                allowed_cidrs: many_cidrs,
                ..governed("", &[], &[])
            },
            "TOO_MANY_CIDRS",
        ),
    ];
    for (request, reason) in cases {
        let status = app
            .client
            .create_key(as_owner(request))
            .await
            .expect_err(reason);
        assert_error(&status, Code::InvalidArgument, reason);
    }
    assert!(app.list("acme").await.is_empty(), "nothing was created");
}

#[tokio::test]
async fn list_keys_filters_by_owner_page_by_page_and_binds_its_tokens_to_the_filter() {
    let mut app = spawn_app().await;
    let mut alices = Vec::new();
    for i in 0..5 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let (key, _) = app.create_with(governed(owner, &[], &[])).await;
        if owner == "alice" {
            alices.push(key.id);
        }
    }
    let list = |token: String, owner: &str| ListKeysRequest {
        workspace_id: "acme".into(),
        page_size: 2,
        page_token: token,
        owner_id: owner.into(),
    };
    let first = app
        .client
        .list_keys(as_owner(list(String::new(), "alice")))
        .await
        .unwrap()
        .into_inner();
    let second = app
        .client
        .list_keys(as_owner(list(first.next_page_token.clone(), "alice")))
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<String> = first
        .keys
        .iter()
        .chain(&second.keys)
        .map(|k| k.id.clone())
        .collect();
    listed.sort();
    alices.sort();
    assert_eq!(listed, alices, "alice's keys, each once, over two pages");
    assert!(second.next_page_token.is_empty());
    // Alice's token does not page through Bob's keys.
    let status = app
        .client
        .list_keys(as_owner(list(first.next_page_token, "bob")))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "PAGE_TOKEN_INVALID");
}

#[tokio::test]
async fn updates_replace_or_clear_what_the_mask_names_and_are_audited() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(governed("alice", &[("tier", "free")], &["10.0.0.0/8"]))
        .await;
    let update = |key: ApiKey, paths: &[&str]| UpdateKeyRequest {
        key: Some(key),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    let target = ApiKey {
        workspace_id: "acme".into(),
        id: key.id.clone(),
        ..Default::default()
    };
    // Clear the networks: the key works from anywhere at once.
    let updated = app
        .client
        .update_key(as_owner(update(target.clone(), &["allowed_cidrs"])))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.allowed_cidrs.is_empty());
    assert_eq!(updated.owner_id, "alice", "fields not in the mask stay");
    assert_eq!(
        app.validate_ip(&secret, "203.0.113.1").await,
        ValidationResult::Valid
    );
    // New annotations and owner reach the very next validation.
    let updated = app
        .client
        .update_key(as_owner(update(
            ApiKey {
                owner_id: "bob".into(),
                annotations: annotations(&[("tier", "gold")]),
                allowed_cidrs: vec!["192.0.2.0/24".into()],
                ..target.clone()
            },
            &["owner_id", "annotations", "allowed_cidrs"],
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.owner_id, "bob");
    assert_eq!(updated.allowed_cidrs, ["192.0.2.0/24"]);
    let answer = app.answer_from(&secret, "192.0.2.9").await;
    assert_eq!(answer.owner_id, "bob");
    assert_eq!(answer.annotations, annotations(&[("tier", "gold")]));
    assert_eq!(
        app.validate_ip(&secret, "10.0.0.1").await,
        ValidationResult::IpNotAllowed
    );

    let status = app
        .client
        .update_key(as_owner(update(target.clone(), &["etag"])))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "UPDATE_MASK_INVALID");

    let events = app
        .client
        .list_key_events(as_owner(apikeys::grpc::proto::ListKeyEventsRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let changed: Vec<&[String]> = events.iter().map(|e| e.changed_fields.as_slice()).collect();
    assert_eq!(
        changed,
        [
            &["owner_id", "annotations", "allowed_cidrs"][..],
            &["allowed_cidrs"][..],
            &[][..],
        ]
    );
}

#[tokio::test]
async fn a_stale_etag_aborts_every_change_and_changes_nothing() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_with(governed("alice", &[], &[])).await;
    let stale = key.etag.clone();
    assert_eq!(stale.len(), 16, "{stale:?}");
    // A change moves the etag on; reading it again gives the same one.
    let renamed = app
        .client
        .update_key(as_owner(UpdateKeyRequest {
            key: Some(ApiKey {
                name: "renamed".into(),
                ..key.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(renamed.etag, stale);
    assert_eq!(app.get(&key.id).await.etag, renamed.etag);

    let ws = || "acme".to_owned();
    let id = || key.id.clone();
    let mut c = app.client.clone();
    let aborted = [
        c.update_key(as_owner(UpdateKeyRequest {
            key: Some(ApiKey {
                name: "again".into(),
                ..key.clone()
            }),
            update_mask: None,
        }))
        .await
        .map(drop),
        c.disable_key(as_owner(DisableKeyRequest {
            workspace_id: ws(),
            key_id: id(),
            etag: stale.clone(),
        }))
        .await
        .map(drop),
        c.enable_key(as_owner(EnableKeyRequest {
            workspace_id: ws(),
            key_id: id(),
            etag: "not an etag".into(),
        }))
        .await
        .map(drop),
        c.rotate_key(as_owner(RotateKeyRequest {
            workspace_id: ws(),
            key_id: id(),
            grace_period: None,
            etag: stale.clone(),
        }))
        .await
        .map(drop),
        c.delete_key(as_owner(DeleteKeyRequest {
            workspace_id: ws(),
            key_id: id(),
            etag: stale.clone(),
        }))
        .await
        .map(drop),
    ];
    for outcome in aborted {
        assert_error(&outcome.unwrap_err(), Code::Aborted, "ETAG_MISMATCH");
    }
    assert_eq!(app.get(&key.id).await, renamed, "nothing changed");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    // With the current etag, the change goes through.
    c.delete_key(as_owner(DeleteKeyRequest {
        workspace_id: ws(),
        key_id: id(),
        etag: renamed.etag,
    }))
    .await
    .unwrap();
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Deleted
    );
}

#[tokio::test]
async fn a_rotated_key_keeps_its_owner_annotations_and_networks() {
    let mut app = spawn_app().await;
    let (key, _) = app
        .create_with(governed("alice", &[("tier", "gold")], &["10.0.0.0/8"]))
        .await;
    let rotated = app
        .client
        .rotate_key(as_owner(RotateKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let new = rotated.key.unwrap();
    assert_eq!(new.owner_id, key.owner_id);
    assert_eq!(new.annotations, key.annotations);
    assert_eq!(new.allowed_cidrs, key.allowed_cidrs);
    assert_eq!(
        app.validate_ip(&rotated.secret, "10.0.0.1").await,
        ValidationResult::Valid
    );
    assert_eq!(
        app.validate_ip(&rotated.secret, "192.0.2.1").await,
        ValidationResult::IpNotAllowed
    );
}

/// The HTTP part of a Check request, to change.
fn http_of(
    request: &mut envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> &mut envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
    let attributes = request.attributes.as_mut().unwrap();
    attributes.request.as_mut().unwrap().http.as_mut().unwrap()
}

/// A Check from `source` with `headers`.
fn check_from(
    source: &str,
    headers: &[(&str, &str)],
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let mut request = check_request(headers, None);
    let attributes = request.attributes.as_mut().unwrap();
    attributes.source.as_mut().unwrap().address = Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: source.into(),
            ..Default::default()
        })),
    });
    request
}

#[tokio::test]
async fn check_refuses_an_address_outside_the_keys_networks_with_403_and_counts_it() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(governed("alice", &[("tier", "gold")], &["198.51.100.0/24"]))
        .await;
    let presented = [("x-api-key", secret.as_str())];
    let allowed = decision(app.check(check_from("198.51.100.23", &presented)).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    assert_eq!(allowed.set["x-cloodot-owner-id"], "alice");
    // Annotations go upstream only when the server is told to forward them.
    assert!(!allowed.set.contains_key("x-cloodot-annotation-tier"));

    let refused = decision(app.check(check_from("203.0.113.5", &presented)).await);
    assert_eq!(refused.code, Code::PermissionDenied, "{refused:?}");
    assert_eq!(refused.http_status, Some(403));
    assert_eq!(refused.body["reason"], "ip_not_allowed");

    let usage = app
        .usage_when("acme", &key.id, |usage| {
            usage
                .buckets
                .first()
                .is_some_and(|hour| hour.valid == 1 && hour.ip_not_allowed == 1)
        })
        .await;
    assert_eq!(usage.buckets[0].distinct_client_ips, 2);
}

#[tokio::test]
async fn behind_trusted_proxies_the_client_is_read_from_x_forwarded_for() {
    let clock = apikeys::clock::ManualClock::new(chrono::Utc::now());
    let mut app = spawn_app_with(TestDb::new().await, clock, |settings| {
        settings.gateway_trusted_hops = 2;
        settings.gateway_header_prefix = "x-acme-".into();
        settings.gateway_forward_annotations = vec!["tier".into(), "region".into()];
    })
    .await;
    let (_, secret) = app
        .create_with(governed("alice", &[("tier", "gold")], &["192.0.2.0/24"]))
        .await;
    let check = |xff: Option<&str>| {
        let mut headers = vec![("x-api-key", secret.as_str())];
        if let Some(xff) = xff {
            headers.push(("x-forwarded-for", xff));
        }
        // The gateway's peer is the nearest proxy, never the client.
        check_from("10.0.0.2", &headers)
    };
    // Two trusted proxies each appended the address they were reached from: the client,
    // then the first proxy. The client is second from the right.
    let allowed = decision(app.check(check(Some("192.0.2.66, 10.0.0.1"))).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    assert_eq!(allowed.set["x-acme-key-id"].len(), 24);
    assert_eq!(allowed.set["x-acme-owner-id"], "alice");
    assert_eq!(allowed.set["x-acme-annotation-tier"], "gold");
    // An annotation the key lacks is removed, so a client cannot send its own.
    assert!(
        allowed
            .removed
            .contains(&"x-acme-annotation-region".to_owned())
    );
    assert!(allowed.removed.contains(&"x-acme-key-scopes".to_owned()));

    // A client that sends its own x-forwarded-for claiming an allowed address is still
    // judged by the address the first proxy saw.
    let spoofed = decision(
        app.check(check(Some("192.0.2.1, 203.0.113.7, 10.0.0.1")))
            .await,
    );
    assert_eq!(spoofed.http_status, Some(403), "{spoofed:?}");
    // Fewer addresses than trusted hops, or none: the client is unknown, and refused.
    for xff in [Some("10.0.0.1"), None] {
        let unknown = decision(app.check(check(xff)).await);
        assert_eq!(unknown.http_status, Some(403), "{xff:?}: {unknown:?}");
    }
}

#[tokio::test]
async fn x_forwarded_for_on_several_lines_is_one_list_and_a_repeated_forward_is_sent_once() {
    let clock = apikeys::clock::ManualClock::new(chrono::Utc::now());
    let app = spawn_app_with(TestDb::new().await, clock, |settings| {
        settings.gateway_trusted_hops = 1;
        settings.gateway_forward_annotations = vec!["tier".into(), "tier".into()];
    })
    .await;
    let mut app = app;
    let (_, secret) = app
        .create_with(governed("", &[("tier", "gold")], &["192.0.2.0/24"]))
        .await;
    // A client's own line first, then the one line the trusted proxy appended.
    let mut request = check_from("10.0.0.2", &[]);
    let http = http_of(&mut request);
    http.headers.clear();
    let line = |key: &str, value: &str| envoy_types::pb::envoy::config::core::v3::HeaderValue {
        key: key.into(),
        raw_value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    http.header_map = Some(envoy_types::pb::envoy::config::core::v3::HeaderMap {
        headers: vec![
            line("x-api-key", &secret),
            line("x-forwarded-for", "203.0.113.9"),
            line("x-forwarded-for", "192.0.2.44"),
        ],
    });
    let allowed = decision(app.check(request.clone()).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    assert_eq!(allowed.set["x-cloodot-annotation-tier"], "gold");
    assert!(
        !allowed
            .removed
            .contains(&"x-cloodot-annotation-tier".to_owned())
    );
    // The client's line last: it is the one the proxy's count lands on, and it is outside.
    let http = http_of(&mut request);
    http.header_map.as_mut().unwrap().headers.swap(1, 2);
    let refused = decision(app.check(request).await);
    assert_eq!(refused.http_status, Some(403), "{refused:?}");
}
