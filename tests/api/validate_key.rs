use std::sync::Arc;

use apikeys::{
    clock::ManualClock,
    config::Settings,
    domain::Validation,
    grpc::proto::{DeleteKeyRequest, Expiration, ValidationResult},
    index::{KeyIndex, Syncer},
    service::{KeyService, Validated},
    store::Store,
};
use chrono::{TimeDelta, Utc};

use crate::support::{TestDb, as_owner, spawn_app, spawn_app_on};

/// Inputs a gateway may pass on: empty, huge, other vendors' keys, typos.
fn garbage(valid: &str) -> Vec<String> {
    let mut typo = valid.as_bytes().to_vec();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    vec![
        String::new(),
        "x".repeat(10 * 1024),
        "Bearer ".to_owned() + valid,
        format!("sk_{}", &valid[3..]),
        valid[..41].to_owned(),
        format!("{valid}A"),
        String::from_utf8(typo).unwrap(),
        valid.to_ascii_uppercase(),
        "clo_".to_owned() + &"é".repeat(19),
    ]
}

#[tokio::test]
async fn a_fresh_key_is_valid_and_says_whose_it_is() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_key("acme", "gateway", Expiration::Expiration90Days)
        .await;

    let response = app.validate(&secret).await;

    assert!(response.valid);
    assert_eq!(response.result(), ValidationResult::Valid);
    assert_eq!(response.key_id, key.id);
    assert_eq!(response.workspace_id, "acme");
    assert_eq!(response.expire_time, key.expire_time);
}

#[tokio::test]
async fn garbage_is_malformed_not_an_error() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "k", Expiration::Never).await;
    for input in garbage(&secret) {
        let response = app.validate(&input).await;
        assert!(!response.valid);
        assert_eq!(
            response.result(),
            ValidationResult::Malformed,
            "{:.60}",
            input
        );
        assert_eq!(response.key_id, "");
        assert_eq!(response.workspace_id, "");
    }
}

#[tokio::test]
async fn validation_is_answered_without_the_database() {
    let db = TestDb::new().await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let syncer = Arc::new(Syncer::new(
        store.clone(),
        Arc::new(KeyIndex::new()),
        Settings::new("127.0.0.1:0".parse().unwrap(), db.url.clone()).sync_settings(),
    ));
    syncer.catch_up().await.unwrap();
    let service = KeyService::new(
        store.clone(),
        Arc::new(ManualClock::new(Utc::now())),
        syncer,
    );
    // Close the pool: any query now fails.
    store.close().await.unwrap();

    for input in garbage(apikeys::domain::Secret::generate().expose()) {
        let outcome = service
            .validate(&input, &[] as &[&str], None, &[], 1)
            .expect("answered without the database");
        assert!(
            matches!(outcome, Validated::Answer(outcome) if outcome.result == Validation::Malformed)
        );
    }
    // Well-formed keys too: validation is a memory lookup.
    let unknown = apikeys::domain::Secret::generate();
    let outcome = service
        .validate(unknown.expose(), &[] as &[&str], None, &[], 1)
        .expect("answered without the database");
    assert!(
        matches!(outcome, Validated::Answer(outcome) if outcome.result == Validation::NotFound)
    );
}

#[tokio::test]
async fn a_well_formed_key_never_issued_is_not_found() {
    let mut app = spawn_app().await;
    let response = app
        .validate(apikeys::domain::Secret::generate().expose())
        .await;
    assert!(!response.valid);
    assert_eq!(response.result(), ValidationResult::NotFound);
    assert_eq!(response.key_id, "");
}

#[tokio::test]
async fn a_key_expires_exactly_at_its_expire_time() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_key("acme", "month", Expiration::Expiration30Days)
        .await;

    app.clock
        .advance(TimeDelta::days(30) - TimeDelta::milliseconds(1));
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    app.clock.advance(TimeDelta::milliseconds(1));
    let response = app.validate(&secret).await;
    assert!(!response.valid);
    assert_eq!(response.result(), ValidationResult::Expired);
    assert_eq!(response.key_id, key.id);
    assert_eq!(response.expire_time, key.expire_time);
}

#[tokio::test]
async fn a_key_that_never_expires_is_valid_decades_later() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "forever", Expiration::Never).await;
    app.clock.advance(TimeDelta::days(365 * 30));
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn a_valid_use_shows_as_last_used_time() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "used", Expiration::Never).await;
    app.clock.advance(TimeDelta::minutes(3));
    let used_at = apikeys::clock::Clock::now(&app.clock);

    app.validate(&secret).await;

    // Recorded in memory, flushed in batches: visible within 5 s.
    let start = std::time::Instant::now();
    let listed = loop {
        let listed = app.list("acme").await;
        if listed[0].last_used_time.is_some() {
            break listed;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "last_used_time not visible within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let last_used = listed[0].last_used_time.expect("last_used_time is set");
    assert_eq!(listed[0].id, key.id);
    assert_eq!(last_used.seconds, used_at.timestamp());

    // Other replicas list from the database: the batched flush reaches it within 5 s.
    let store = app.store().await;
    let start = std::time::Instant::now();
    while store.all_rows().await.unwrap()[0]
        .last_used_time_us
        .is_none()
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "last use not flushed within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_graceful_shutdown_writes_the_last_uses() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "used", Expiration::Never).await;
    app.validate(&secret).await;
    let (db, _) = app.stop().await;

    let store = Store::connect(&db.url, 4).await.unwrap();
    assert!(
        store.all_rows().await.unwrap()[0]
            .last_used_time_us
            .is_some(),
        "a recorded use was lost"
    );
}

#[tokio::test]
async fn keys_and_deletions_survive_a_restart() {
    let mut app = spawn_app().await;
    let (kept, kept_secret) = app.create_key("acme", "kept", Expiration::Never).await;
    let (gone, gone_secret) = app.create_key("acme", "gone", Expiration::Never).await;
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: gone.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let (db, clock) = app.stop().await;

    let mut app = spawn_app_on(db, clock).await;

    assert_eq!(
        app.validate(&kept_secret).await.result(),
        ValidationResult::Valid
    );
    assert_eq!(
        app.validate(&gone_secret).await.result(),
        ValidationResult::Deleted
    );
    let listed = app.list("acme").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, kept.id);
}

#[tokio::test]
async fn expiry_and_workspace_survive_a_restart() {
    let mut app = spawn_app().await;
    let (month, month_secret) = app
        .create_key("acme", "month", Expiration::Expiration30Days)
        .await;
    let (_, forever_secret) = app.create_key("globex", "forever", Expiration::Never).await;
    let (db, clock) = app.stop().await;

    let mut app = spawn_app_on(db, clock).await;

    let answer = app.validate(&month_secret).await;
    assert_eq!(answer.result(), ValidationResult::Valid);
    assert_eq!(answer.key_id, month.id);
    assert_eq!(answer.workspace_id, "acme");
    assert_eq!(answer.expire_time, month.expire_time);
    let answer = app.validate(&forever_secret).await;
    assert_eq!(answer.workspace_id, "globex");
    assert_eq!(answer.expire_time, None);

    app.clock.advance(TimeDelta::days(30));

    assert_eq!(
        app.validate(&month_secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(
        app.validate(&forever_secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn recorded_uses_never_move_back_in_time_and_keep_their_client_ip() {
    let mut app = spawn_app().await;
    let (a, _) = app.create_key("acme", "a", Expiration::Never).await;
    let (b, _) = app.create_key("acme", "b", Expiration::Never).await;
    let store = app.store().await;
    let later = 1_900_000_000_000_000;
    let earlier = later - 60_000_000;

    let ip = |n: u8| Some(format!("10.0.0.{n}"));
    store
        .record_uses(&[(a.id.clone(), later, ip(1)), (b.id.clone(), earlier, ip(2))])
        .await
        .unwrap();
    // Another replica flushes an older use of `a` after ours.
    store
        .record_uses(&[(a.id.clone(), earlier, ip(3)), (b.id.clone(), later, ip(4))])
        .await
        .unwrap();

    let rows = store.all_rows().await.unwrap();
    let used = |id: &str| {
        rows.iter()
            .find(|r| r.id.as_str() == id)
            .unwrap()
            .last_used_time_us
    };
    assert_eq!(used(&a.id), Some(later));
    assert_eq!(used(&b.id), Some(later));
    let ip_of = |id: &str| {
        rows.iter()
            .find(|r| r.id.as_str() == id)
            .unwrap()
            .last_used_ip
            .clone()
    };
    assert_eq!(ip_of(&a.id), ip(1));
    assert_eq!(ip_of(&b.id), ip(4));
}
