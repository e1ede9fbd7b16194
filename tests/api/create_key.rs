use apikeys::clock::Clock;
use apikeys::grpc::proto::{CreateKeyRequest, Expiration, KeyStatus, ValidationResult};
use chrono::{DateTime, Months, TimeDelta, Utc};
use tonic::{Code, Request};

use crate::support::{as_actor, as_owner, assert_error, spawn_app};

fn request(workspace: &str, name: &str, expiration: Expiration) -> CreateKeyRequest {
    CreateKeyRequest {
        workspace_id: workspace.into(),
        name: name.into(),
        expiration: expiration.into(),
        ..Default::default()
    }
}

fn time(ts: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32).unwrap()
}

#[tokio::test]
async fn creating_a_key_returns_the_secret_once_and_a_masked_key() {
    let mut app = spawn_app().await;
    let now = app.clock.now();

    let response = app
        .client
        .create_key(as_actor(
            request("acme", "  Zapier integration ", Expiration::Never),
            "user_42",
            "admin",
        ))
        .await
        .unwrap()
        .into_inner();

    let key = response.key.unwrap();
    let secret = response.secret;
    assert_eq!(secret.len(), 42);
    assert!(secret.starts_with("clo_"));
    assert!(key.id.starts_with("key_"));
    assert_eq!(key.workspace_id, "acme");
    assert_eq!(key.name, "Zapier integration");
    assert_eq!(key.masked_key, format!("clo_********{}", &secret[38..]));
    assert_eq!(key.status(), KeyStatus::Active);
    assert_eq!(key.created_by, "user_42");
    assert_eq!(key.expire_time, None);
    assert_eq!(key.last_used_time, None);
    assert!((time(key.create_time.as_ref().unwrap()) - now).abs() < TimeDelta::milliseconds(1));
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn expiration_presets_are_computed_by_the_server() {
    let mut app = spawn_app().await;
    let now = app.clock.now();
    let cases = [
        (Expiration::Expiration30Days, now + TimeDelta::days(30)),
        (Expiration::Expiration90Days, now + TimeDelta::days(90)),
        (
            Expiration::Expiration1Year,
            now.checked_add_months(Months::new(12)).unwrap(),
        ),
    ];
    for (expiration, expected) in cases {
        let (key, _) = app.create_key("acme", "expiring", expiration).await;
        let expires = time(key.expire_time.as_ref().unwrap());
        assert!(
            (expires - expected).abs() < TimeDelta::milliseconds(1),
            "{expiration:?}: {expires} vs {expected}"
        );
    }
}

#[tokio::test]
async fn each_key_gets_its_own_secret_and_id() {
    let mut app = spawn_app().await;
    let (a, secret_a) = app.create_key("acme", "one", Expiration::Never).await;
    let (b, secret_b) = app.create_key("acme", "two", Expiration::Never).await;
    assert_ne!(a.id, b.id);
    assert_ne!(secret_a, secret_b);
}

#[tokio::test]
async fn invalid_input_is_rejected_with_a_reason() {
    let mut app = spawn_app().await;
    let long_name = "n".repeat(101);
    let long_workspace = "w".repeat(65);
    let pasted = apikeys::domain::Secret::generate().expose().to_owned();
    let cases = [
        (request("acme", "", Expiration::Never), "NAME_EMPTY"),
        (request("acme", "   ", Expiration::Never), "NAME_EMPTY"),
        (
            request("acme", &long_name, Expiration::Never),
            "NAME_TOO_LONG",
        ),
        (
            request("acme", "bad\u{0}name", Expiration::Never),
            "NAME_INVALID_CHARACTERS",
        ),
        (
            request("acme", "prod\u{202E}gnp.exe", Expiration::Never),
            "NAME_INVALID_CHARACTERS",
        ),
        (
            request("acme", "hidden\u{E0041}\u{E0042}", Expiration::Never),
            "NAME_INVALID_CHARACTERS",
        ),
        (request("acme", "\u{200B}", Expiration::Never), "NAME_EMPTY"),
        (
            request("acme", &format!("prod {pasted}"), Expiration::Never),
            "NAME_CONTAINS_KEY",
        ),
        (
            request(&pasted, "ok", Expiration::Never),
            "WORKSPACE_ID_INVALID",
        ),
        (
            request("acme", "ok", Expiration::Unspecified),
            "EXPIRATION_UNSPECIFIED",
        ),
        (
            CreateKeyRequest {
                workspace_id: "acme".into(),
                name: "ok".into(),
                expiration: 99,
                ..Default::default()
            },
            "EXPIRATION_UNKNOWN",
        ),
        (request("", "ok", Expiration::Never), "WORKSPACE_ID_INVALID"),
        (
            request(&long_workspace, "ok", Expiration::Never),
            "WORKSPACE_ID_INVALID",
        ),
        (
            request("a b", "ok", Expiration::Never),
            "WORKSPACE_ID_INVALID",
        ),
    ];
    for (request, reason) in cases {
        let status = app.client.create_key(as_owner(request)).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
    }
    // Nothing was created by the rejected calls.
    assert!(app.store().await.all_rows().await.unwrap().is_empty());
}

#[tokio::test]
async fn only_owners_and_admins_may_create_keys() {
    let mut app = spawn_app().await;

    let status = app
        .client
        .create_key(Request::new(request("acme", "k", Expiration::Never)))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "ACTOR_MISSING");

    let mut only_role = Request::new(request("acme", "k", Expiration::Never));
    only_role
        .metadata_mut()
        .insert("x-actor-role", "owner".parse().unwrap());
    let status = app.client.create_key(only_role).await.unwrap_err();
    assert_error(&status, Code::Unauthenticated, "ACTOR_MISSING");

    for role in ["member", "viewer", "developer"] {
        let status = app
            .client
            .create_key(as_actor(
                request("acme", "k", Expiration::Never),
                "u1",
                role,
            ))
            .await
            .unwrap_err();
        assert_error(&status, Code::PermissionDenied, "ROLE_NOT_ALLOWED");
    }
    assert!(app.store().await.all_rows().await.unwrap().is_empty());

    for role in ["owner", "admin"] {
        app.client
            .create_key(as_actor(
                request("acme", "k", Expiration::Never),
                "u1",
                role,
            ))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn concurrent_creates_all_succeed_with_distinct_keys() {
    let app = spawn_app().await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .create_key(as_owner(request(
                        "acme",
                        &format!("key {i}"),
                        Expiration::Never,
                    )))
                    .await
                    .map(|r| r.into_inner())
            })
        })
        .collect();
    let mut secrets = std::collections::HashSet::new();
    for task in tasks {
        let response = task
            .await
            .unwrap()
            .expect("every concurrent create succeeds");
        assert!(secrets.insert(response.secret));
    }
    let rows = app.store().await.all_rows().await.unwrap();
    assert_eq!(rows.len(), 40);
}

#[tokio::test]
async fn a_name_in_any_script_or_with_emoji_is_kept_as_written() {
    let mut app = spawn_app().await;
    let name = "\u{1F469}\u{200D}\u{1F4BB} مفتاح 生产 उत्पादन 🇫🇷 ❤️";

    let (key, _) = app.create_key("acme", name, Expiration::Never).await;

    assert_eq!(key.name, name);
    assert_eq!(app.list("acme").await[0].name, name);
}
