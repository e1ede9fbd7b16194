//! The validation index across replicas and through database trouble: deletes reach every
//! replica within the bound, the index fails closed when it cannot sync, and recovers.

use std::time::{Duration, Instant};

use apikeys::grpc::proto::{DeleteKeyRequest, Expiration, ValidationResult};
use sea_orm::{ConnectionTrait, Database};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{TcpCut, TestApp, TestDb, as_owner, spawn_app, spawn_app_with};

/// The revocation bound promised for other replicas.
const BOUND: Duration = Duration::from_secs(1);

pub(crate) async fn delete(app: &mut TestApp, workspace: &str, id: &str) {
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: workspace.into(),
            key_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
}

/// Polls health until it reports `status`; returns how long that took.
async fn wait_for_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    status: ServingStatus,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let check = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if check.status() == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "health not {status:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `app` until `secret` validates as `expected`; returns how long that took.
async fn time_until(
    app: &mut TestApp,
    secret: &str,
    expected: ValidationResult,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if app.validate(secret).await.result() == expected {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{expected:?} not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_valid_answer_after_delete_returns_under_concurrent_load() {
    let mut app = spawn_app().await;
    let mut keys = Vec::new();
    for i in 0..20 {
        keys.push(
            app.create_key("acme", &format!("k{i}"), Expiration::Never)
                .await,
        );
    }
    let secrets: Vec<String> = keys.iter().map(|(_, s)| s.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let validators: Vec<_> = (0..16)
        .map(|t| {
            let mut client = app.client.clone();
            let secrets = secrets.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut i = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let which = i % secrets.len();
                    i += 1;
                    let sent = Instant::now();
                    let request = apikeys::grpc::proto::ValidateKeyRequest {
                        key: secrets[which].clone(),
                        ..Default::default()
                    };
                    let result = client
                        .validate_key(request)
                        .await
                        .unwrap()
                        .into_inner()
                        .result();
                    answers.push((which, sent, result));
                }
                answers
            })
        })
        .collect();

    let mut deleted_at = vec![None; keys.len()];
    for (which, (key, _)) in keys.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        delete(&mut app, "acme", &key.id).await;
        deleted_at[which] = Some(Instant::now());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut checked = 0;
    for validator in validators {
        for (which, sent, result) in validator.await.unwrap() {
            if deleted_at[which].is_some_and(|at| sent > at) {
                checked += 1;
                assert_eq!(
                    result,
                    ValidationResult::Deleted,
                    "VALID after DeleteKey returned"
                );
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} validations after deletes: the test did not race"
    );
}

#[tokio::test]
async fn a_delete_on_one_replica_reaches_another_within_the_bound() {
    let mut a = spawn_app().await;
    let mut b = spawn_app_with(TestDb::sharing(&a.db.url), a.clock.clone(), |_| {}).await;
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let (key, secret) = a
            .create_key("acme", &format!("k{i}"), Expiration::Never)
            .await;
        time_until(&mut b, &secret, ValidationResult::Valid, BOUND).await;
        delete(&mut a, "acme", &key.id).await;
        worst = worst.max(time_until(&mut b, &secret, ValidationResult::Deleted, BOUND).await);
    }
    println!("worst delay to the other replica: {worst:?}");
}

#[tokio::test]
async fn a_killed_listener_still_delivers_deletes_within_the_bound_on_postgres() {
    let mut a = spawn_app().await;
    if a.db.sqlite_dir().is_some() {
        return; // LISTEN/NOTIFY is PostgreSQL's; SQLite replicas rely on polling (tested above).
    }
    let mut b = spawn_app_with(TestDb::sharing(&a.db.url), a.clock.clone(), |_| {}).await;
    let admin = Database::connect(a.db.url.as_str()).await.unwrap();
    for i in 0..5 {
        let (key, secret) = a
            .create_key("acme", &format!("k{i}"), Expiration::Never)
            .await;
        time_until(&mut b, &secret, ValidationResult::Valid, BOUND).await;
        let killed = admin
            .execute_unprepared(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'apikeys-listener' AND datname = current_database()",
            )
            .await
            .unwrap();
        assert!(
            killed.rows_affected() >= 1,
            "no listener connection to kill"
        );
        delete(&mut a, "acme", &key.id).await;
        time_until(&mut b, &secret, ValidationResult::Deleted, BOUND).await;
    }
}

#[tokio::test]
async fn a_database_outage_is_survived_then_fails_closed_then_recovers_on_postgres() {
    let db = TestDb::new().await;
    if db.sqlite_dir().is_some() {
        return; // An embedded SQLite file cannot become unreachable.
    }
    let cut = TcpCut::start(&db.url).await;
    let db = TestDb::sharing(&cut.url);
    let mut app = spawn_app_with(
        db,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |s| {
            s.staleness_bound = Duration::from_secs(2);
            s.sync_poll_interval = Duration::from_millis(100);
        },
    )
    .await;
    let (_, secret) = app.create_key("acme", "k", Expiration::Never).await;
    let mut health = HealthClient::new(app.channel.clone());

    cut.cut();
    let cut_at = Instant::now();

    // Within the staleness bound: answered from memory.
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    // Writes are never acknowledged without a commit.
    let status = app
        .client
        .create_key(as_owner(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "during outage".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Past the bound: fail closed, and say so on health.
    loop {
        let status = app
            .client
            .validate_key(apikeys::grpc::proto::ValidateKeyRequest {
                key: secret.clone(),
                ..Default::default()
            })
            .await;
        match status {
            Ok(response) => {
                assert_eq!(response.into_inner().result(), ValidationResult::Valid);
                assert!(
                    cut_at.elapsed() < Duration::from_secs(4),
                    "still answering long past the bound"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                // The bound runs from the start of the last successful sync, which may
                // precede the cut by up to a poll interval (100 ms) and the sync itself.
                assert!(
                    cut_at.elapsed() >= Duration::from_millis(1800),
                    "failed closed before the bound: {:?}",
                    cut_at.elapsed()
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_health(
        &mut health,
        ServingStatus::NotServing,
        Duration::from_secs(3),
    )
    .await;
    // Not ready, but alive: a liveness probe must not restart a replica for the database.
    let liveness = health
        .check(HealthCheckRequest {
            service: apikeys::app::LIVENESS_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status(), ServingStatus::Serving);
    // Envoy's Check fails closed as well: a decision, 503, never an allow.
    let check = crate::ext_authz::decision(
        app.check(crate::ext_authz::check_request(
            &[("x-api-key", &secret)],
            None,
        ))
        .await,
    );
    assert_eq!(check.code, Code::Unavailable, "{check:?}");
    assert_eq!(check.http_status, Some(503));
    assert_eq!(check.body["reason"], "unavailable");

    cut.restore();
    // Recovery needs no restart.
    let recovered =
        wait_for_health(&mut health, ServingStatus::Serving, Duration::from_secs(10)).await;
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    println!("recovered {recovered:?} after the database came back");
}

#[tokio::test]
async fn disable_enable_update_and_rotate_reach_another_replica_within_the_bound() {
    let mut a = spawn_app().await;
    let mut b = spawn_app_with(TestDb::sharing(&a.db.url), a.clock.clone(), |_| {}).await;
    let mut worst = Duration::ZERO;
    let (key, secret) = a
        .create_with(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "shared".into(),
            expiration: Expiration::Never.into(),
            scopes: vec!["orders:read".into()],
            ..Default::default()
        })
        .await;
    time_until(&mut b, &secret, ValidationResult::Valid, BOUND).await;

    a.try_disable("acme", &key.id).await.unwrap();
    worst = worst.max(time_until(&mut b, &secret, ValidationResult::Disabled, BOUND).await);
    a.try_enable("acme", &key.id).await.unwrap();
    worst = worst.max(time_until(&mut b, &secret, ValidationResult::Valid, BOUND).await);

    // Scopes taken away on one replica stop passing on the other.
    a.try_update(
        apikeys::grpc::proto::ApiKey {
            scopes: vec!["orders:write".into()],
            etag: String::new(),
            ..key.clone()
        },
        &["scopes"],
    )
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let answer = b.validate_with(&secret, &["orders:read"]).await;
        if answer.result() == ValidationResult::InsufficientScope {
            assert_eq!(answer.scopes, ["orders:write"]);
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "scope change not seen within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    worst = worst.max(start.elapsed());

    // A rotation with no grace: the old key stops on the other replica and the new one works.
    let rotated = a.try_rotate("acme", &key.id, None).await.unwrap();
    let seen = time_until(&mut b, &rotated.secret, ValidationResult::Valid, BOUND).await;
    // The old key's new expiry comes in the same change as the new key.
    assert_eq!(
        b.validate(&secret).await.result(),
        ValidationResult::Expired
    );
    worst = worst.max(seen);
    println!("worst delay to the other replica: {worst:?}");
}

#[tokio::test]
async fn expiry_and_the_end_of_a_grace_period_need_no_sync() {
    let mut a = spawn_app().await;
    let mut b = spawn_app_with(TestDb::sharing(&a.db.url), a.clock.clone(), |_| {}).await;
    let (key, secret) = a
        .create_key("acme", "month", Expiration::Expiration30Days)
        .await;
    time_until(&mut b, &secret, ValidationResult::Valid, BOUND).await;
    let rotated = a
        .try_rotate(
            "acme",
            &key.id,
            Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        )
        .await
        .unwrap();
    time_until(&mut b, &rotated.secret, ValidationResult::Valid, BOUND).await;
    // The old key works on the other replica through its grace period...
    assert_eq!(b.validate(&secret).await.result(), ValidationResult::Valid);

    // ...and stops there the instant the clock passes its end: no change to sync.
    a.clock.advance(chrono::TimeDelta::hours(1));
    assert_eq!(
        b.validate(&secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(
        b.validate(&rotated.secret).await.result(),
        ValidationResult::Valid
    );
    a.clock
        .advance(chrono::TimeDelta::days(30) - chrono::TimeDelta::hours(1));
    assert_eq!(
        b.validate(&rotated.secret).await.result(),
        ValidationResult::Expired
    );
}

#[tokio::test]
async fn every_connection_names_itself_and_the_pool_keeps_to_its_size_on_postgres() {
    let db = TestDb::new().await;
    if db.sqlite_dir().is_some() {
        return; // pg_stat_activity is PostgreSQL's.
    }
    let admin = Database::connect(db.url.as_str()).await.unwrap();
    let mut app = spawn_app_with(
        db,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |s| {
            s.database_pool_size = 3;
        },
    )
    .await;
    // Enough concurrent management calls to want more connections than the pool may open.
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let mut app = app.client.clone();
            async move {
                app.create_key(crate::support::as_owner(
                    apikeys::grpc::proto::CreateKeyRequest {
                        workspace_id: "acme".into(),
                        name: format!("k{i}"),
                        expiration: Expiration::Never.into(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            }
        })
        .collect();
    futures_util::future::join_all(calls).await;
    app.create_key("acme", "last", Expiration::Never).await;

    let names = admin
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT application_name FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ))
        .await
        .unwrap();
    let names: Vec<String> = names
        .iter()
        .map(|row| row.try_get("", "application_name").unwrap())
        .collect();
    let pooled = names.iter().filter(|name| *name == "apikeys").count();
    assert!((1..=3).contains(&pooled), "{names:?}");
    assert!(
        names
            .iter()
            .all(|name| name == "apikeys" || name == "apikeys-listener"),
        "a connection without its name: {names:?}"
    );
}
