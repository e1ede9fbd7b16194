//! Per-key credits, spent in memory from slices leased from the database: exactly the
//! balance admitted on one replica under any concurrency, never more than it across
//! replicas, whole costs or nothing, refills once per period by the server's clock,
//! durable across restarts, USAGE_EXCEEDED on ValidateKey and 429 on Envoy's Check.

use std::time::Duration;

use apikeys::{
    clock::ManualClock,
    grpc::proto::{
        ApiKey, CreateKeyRequest, Credits, Expiration, GetKeyRequest, ListKeyEventsRequest,
        RateLimit, RateLimitRequest, Refill, RefillInterval, RotateKeyRequest, UpdateKeyRequest,
        ValidateKeyRequest, ValidateKeyResponse, ValidationResult,
    },
};
use chrono::{DurationRound, TimeDelta, Utc};
use tonic::Code;

use crate::{
    ext_authz::{check_request, decision},
    support::{TestApp, TestDb, as_owner, assert_error, spawn_app_on, spawn_app_with},
};

/// A server whose clock stands `into_day` after the start of a UTC day.
async fn app_at(into_day: TimeDelta) -> TestApp {
    let day = Utc::now().duration_trunc(TimeDelta::days(1)).unwrap();
    spawn_app_with(
        TestDb::new().await,
        ManualClock::new(day + into_day),
        |_| {},
    )
    .await
}

fn credits(remaining: i64, refill: Option<(i64, RefillInterval, i32)>) -> Credits {
    Credits {
        remaining,
        refill: refill.map(|(amount, interval, day_of_month)| Refill {
            amount,
            interval: interval.into(),
            day_of_month,
        }),
    }
}

fn metered(credits: Credits) -> CreateKeyRequest {
    CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "metered".into(),
        expiration: Expiration::Never.into(),
        credits: Some(credits),
        ..Default::default()
    }
}

fn costing(secret: &str, cost: Option<i64>) -> ValidateKeyRequest {
    ValidateKeyRequest {
        key: secret.into(),
        cost,
        ..Default::default()
    }
}

fn set_credits(id: &str, credits: Option<Credits>) -> UpdateKeyRequest {
    UpdateKeyRequest {
        key: Some(ApiKey {
            workspace_id: "acme".into(),
            id: id.into(),
            credits,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["credits".into()],
        }),
    }
}

impl TestApp {
    async fn spend(&mut self, request: ValidateKeyRequest) -> ValidateKeyResponse {
        self.client
            .validate_key(request)
            .await
            .expect("validate")
            .into_inner()
    }

    /// The key's balance as GetKey shows it.
    async fn balance(&mut self, id: &str) -> Option<i64> {
        let key = self
            .client
            .get_key(as_owner(GetKeyRequest {
                workspace_id: "acme".into(),
                key_id: id.into(),
            }))
            .await
            .expect("get the key")
            .into_inner();
        key.credits.map(|credits| credits.remaining)
    }
}

#[tokio::test]
async fn a_key_with_n_credits_is_admitted_exactly_n_times_under_concurrency() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = app.create_with(metered(credits(100, None))).await;
    assert_eq!(key.credits, Some(credits(100, None)));

    // 8 clients, 30 requests each, all at once: 240 asks of a balance of 100.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = app.client.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..30 {
                answers.push(
                    client
                        .validate_key(costing(&secret, None))
                        .await
                        .unwrap()
                        .into_inner(),
                );
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    let valid: Vec<_> = answers.iter().filter(|answer| answer.valid).collect();
    assert_eq!(valid.len(), 100);
    assert!(
        answers
            .iter()
            .filter(|answer| !answer.valid)
            .all(|answer| answer.result() == ValidationResult::UsageExceeded
                && answer.credits_remaining == Some(0)),
        "every refusal is USAGE_EXCEEDED with nothing left"
    );
    // Each valid answer says what was left after it: 99 down to 0, each once.
    let mut left: Vec<i64> = valid
        .iter()
        .map(|answer| answer.credits_remaining.unwrap())
        .collect();
    left.sort_unstable();
    assert_eq!(left, (0..100).collect::<Vec<_>>());
    assert_eq!(app.balance(&key.id).await, Some(0));

    // Usage counts both answers.
    app.usage_when("acme", &key.id, |usage| {
        usage
            .buckets
            .iter()
            .any(|hour| hour.valid == 100 && hour.usage_exceeded == 140)
    })
    .await;
}

#[tokio::test]
async fn a_cost_is_paid_whole_or_not_at_all_and_only_after_the_rate_limits_admit() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let mut request = metered(credits(10, None));
    request.rate_limits = vec![RateLimit {
        name: "writes".into(),
        limit: 1,
        window: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        auto_apply: false,
    }];
    let (key, secret) = app.create_with(request).await;

    let paid = app.spend(costing(&secret, Some(4))).await;
    assert!(paid.valid, "{paid:?}");
    assert_eq!(paid.credits_remaining, Some(6));
    // More than is left: refused, nothing spent.
    let refused = app.spend(costing(&secret, Some(7))).await;
    assert_eq!(refused.result(), ValidationResult::UsageExceeded);
    assert_eq!(refused.credits_remaining, Some(6));
    // A cost of 0 only checks.
    let check = app.spend(costing(&secret, Some(0))).await;
    assert!(check.valid);
    assert_eq!(check.credits_remaining, Some(6));

    // A request the credits refuse spends nothing from its limits either...
    let mut write = costing(&secret, Some(50));
    write.rate_limits = vec![RateLimitRequest {
        name: "writes".into(),
        cost: None,
    }];
    let refused = app.spend(write.clone()).await;
    assert_eq!(refused.result(), ValidationResult::UsageExceeded);
    assert_eq!(refused.rate_limits[0].remaining, 1);
    // ... and a request a limit refuses spends no credits.
    write.cost = Some(1);
    assert!(app.spend(write.clone()).await.valid);
    let limited = app.spend(write).await;
    assert_eq!(limited.result(), ValidationResult::RateLimited);
    assert_eq!(limited.credits_remaining, None, "credits not judged");
    assert_eq!(app.balance(&key.id).await, Some(5));

    // The last five, then nothing: a balance of 0 refuses even a check.
    assert!(app.spend(costing(&secret, Some(5))).await.valid);
    let empty = app.spend(costing(&secret, Some(0))).await;
    assert_eq!(empty.result(), ValidationResult::UsageExceeded);
    assert_eq!(empty.credits_remaining, Some(0));

    // A key without credits is unlimited, whatever the cost asked.
    let (_, free) = app
        .create_with(CreateKeyRequest {
            credits: None,
            ..metered(credits(0, None))
        })
        .await;
    let answer = app.spend(costing(&free, Some(1_000_000))).await;
    assert!(answer.valid);
    assert_eq!(answer.credits_remaining, None);
}

#[tokio::test]
async fn credits_refill_once_per_period_by_the_server_clock() {
    let mut app = app_at(TimeDelta::hours(23)).await;
    let daily = credits(2, Some((5, RefillInterval::Daily, 0)));
    let (key, secret) = app.create_with(metered(daily)).await;
    assert_eq!(key.credits, Some(daily));
    for _ in 0..2 {
        assert!(app.spend(costing(&secret, None)).await.valid);
    }
    assert_eq!(
        app.spend(costing(&secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );

    // Midnight UTC: the balance becomes the refill's amount (shown before any use).
    app.clock.advance(TimeDelta::hours(1));
    assert_eq!(app.balance(&key.id).await, Some(5));
    for left in (0..5).rev() {
        let answer = app.spend(costing(&secret, None)).await;
        assert!(answer.valid, "{answer:?}");
        assert_eq!(answer.credits_remaining, Some(left));
    }
    assert_eq!(
        app.spend(costing(&secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );
    // Later the same day: no second refill.
    app.clock.advance(TimeDelta::hours(12));
    assert_eq!(
        app.spend(costing(&secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );
    // What is left does not carry over: the next day starts at the amount again.
    app.clock.advance(TimeDelta::hours(12));
    let answer = app.spend(costing(&secret, Some(2))).await;
    assert_eq!(answer.credits_remaining, Some(3));
    app.clock.advance(TimeDelta::days(1));
    assert_eq!(app.balance(&key.id).await, Some(5));
}

#[tokio::test]
async fn credits_survive_a_restart_and_what_a_replica_held_is_given_back() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = app.create_with(metered(credits(1_000, None))).await;
    for _ in 0..10 {
        assert!(app.spend(costing(&secret, None)).await.valid);
    }
    // This replica holds a slice it leased: shown as part of the balance.
    assert_eq!(app.balance(&key.id).await, Some(990));

    // A graceful stop gives the slice back: nothing spent is refunded, nothing unspent lost.
    let (db, clock) = app.stop().await;
    let mut app = spawn_app_on(db, clock).await;
    assert_eq!(app.balance(&key.id).await, Some(990));
    let answer = app.spend(costing(&secret, Some(90))).await;
    assert!(answer.valid, "{answer:?}");
    assert_eq!(answer.credits_remaining, Some(900));
    assert_eq!(app.balance(&key.id).await, Some(900));
}

#[tokio::test]
async fn setting_credits_starts_the_balance_afresh_is_audited_and_clearing_makes_a_key_unlimited() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = app.create_with(metered(credits(3, None))).await;
    for _ in 0..3 {
        assert!(app.spend(costing(&secret, None)).await.valid);
    }
    let topped = app
        .client
        .update_key(as_owner(set_credits(
            &key.id,
            Some(credits(2, Some((50, RefillInterval::Monthly, 31)))),
        )))
        .await
        .expect("set credits")
        .into_inner();
    assert_eq!(
        topped.credits,
        Some(credits(2, Some((50, RefillInterval::Monthly, 31))))
    );
    // At once on this replica: exactly the new balance.
    for left in [1, 0] {
        let answer = app.spend(costing(&secret, None)).await;
        assert_eq!(answer.credits_remaining, Some(left), "{answer:?}");
    }
    assert_eq!(
        app.spend(costing(&secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );
    // Unlimited again.
    let cleared = app
        .client
        .update_key(as_owner(set_credits(&key.id, None)))
        .await
        .expect("clear credits")
        .into_inner();
    assert_eq!(cleared.credits, None);
    let answer = app.spend(costing(&secret, None)).await;
    assert!(answer.valid);
    assert_eq!(answer.credits_remaining, None);
    // Clearing credits a key does not have changes nothing.
    app.client
        .update_key(as_owner(set_credits(&key.id, None)))
        .await
        .expect("clear again");
    // Set again after a clear: exactly the new balance, whatever this replica held before.
    app.client
        .update_key(as_owner(set_credits(&key.id, Some(credits(4, None)))))
        .await
        .expect("set again");
    let answer = app.spend(costing(&secret, None)).await;
    assert_eq!(answer.credits_remaining, Some(3), "{answer:?}");
    assert_eq!(app.balance(&key.id).await, Some(3));

    let events = app
        .client
        .list_key_events(as_owner(ListKeyEventsRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let changed: Vec<_> = events
        .iter()
        .map(|event| event.changed_fields.clone())
        .collect();
    assert_eq!(
        changed,
        [
            vec!["credits".to_owned()],
            vec!["credits".to_owned()],
            vec!["credits".to_owned()],
            vec![]
        ],
        "set again, cleared, set, created"
    );
}

#[tokio::test]
async fn bad_credits_and_costs_are_refused_with_their_reasons() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let bad = [
        (credits(-1, None), "CREDITS_INVALID"),
        (credits(1_000_000_000_001, None), "CREDITS_INVALID"),
        (
            credits(1, Some((0, RefillInterval::Daily, 0))),
            "REFILL_INVALID",
        ),
        (
            credits(1, Some((1, RefillInterval::Unspecified, 0))),
            "REFILL_INVALID",
        ),
        (
            credits(1, Some((1, RefillInterval::Daily, 3))),
            "REFILL_INVALID",
        ),
        (
            credits(1, Some((1, RefillInterval::Monthly, 0))),
            "REFILL_INVALID",
        ),
        (
            credits(1, Some((1, RefillInterval::Monthly, 32))),
            "REFILL_INVALID",
        ),
    ];
    for (given, reason) in bad {
        let status = app
            .client
            .create_key(as_owner(metered(given)))
            .await
            .expect_err("refused");
        assert_error(&status, Code::InvalidArgument, reason);
    }
    let (key, secret) = app.create_with(metered(credits(1, None))).await;
    let status = app
        .client
        .update_key(as_owner(set_credits(
            &key.id,
            Some(credits(1, Some((1, RefillInterval::Monthly, 0)))),
        )))
        .await
        .expect_err("refused");
    assert_error(&status, Code::InvalidArgument, "REFILL_INVALID");
    let status = app
        .client
        .validate_key(costing(&secret, Some(-1)))
        .await
        .expect_err("refused");
    assert_error(&status, Code::InvalidArgument, "COST_INVALID");
    // Nothing was spent by any of it.
    assert_eq!(app.balance(&key.id).await, Some(1));
}

#[tokio::test]
async fn a_rotated_key_and_its_successor_spend_from_one_balance() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = app.create_with(metered(credits(10, None))).await;
    assert!(app.spend(costing(&secret, Some(4))).await.valid);
    let rotated = app
        .client
        .rotate_key(as_owner(RotateKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 3_600,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await
        .expect("rotate")
        .into_inner();
    let successor = rotated.key.unwrap();
    assert_eq!(successor.credits.map(|c| c.remaining), Some(6));
    // Both keys draw on the same six.
    assert!(app.spend(costing(&rotated.secret, Some(3))).await.valid);
    assert!(app.spend(costing(&secret, Some(3))).await.valid);
    assert_eq!(
        app.spend(costing(&rotated.secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );
    assert_eq!(
        app.spend(costing(&secret, None)).await.result(),
        ValidationResult::UsageExceeded
    );
    // The successor sets them; the rotated key may not.
    let status = app
        .client
        .update_key(as_owner(set_credits(&key.id, Some(credits(100, None)))))
        .await
        .expect_err("refused");
    assert_error(&status, Code::FailedPrecondition, "KEY_ROTATED");
    app.client
        .update_key(as_owner(set_credits(&successor.id, Some(credits(1, None)))))
        .await
        .expect("set on the successor");
    assert!(app.spend(costing(&rotated.secret, None)).await.valid);
    for presented in [&rotated.secret, &secret] {
        assert_eq!(
            app.spend(costing(presented, None)).await.result(),
            ValidationResult::UsageExceeded
        );
    }
}

#[tokio::test]
async fn check_answers_429_when_the_credits_run_out_and_a_route_sets_the_cost() {
    let mut app = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = app.create_with(metered(credits(3, None))).await;
    let check = |cost: Option<&str>| {
        let mut request = check_request(&[("x-api-key", secret.as_str())], None);
        if let Some(cost) = cost {
            let attributes = request.attributes.as_mut().unwrap();
            attributes
                .context_extensions
                .insert("cost".into(), cost.into());
        }
        request
    };
    let allowed = decision(app.check(check(Some("2"))).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    let allowed = decision(app.check(check(None)).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    let refused = decision(app.check(check(None)).await);
    assert_eq!(refused.code, Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.http_status, Some(429));
    assert_eq!(refused.body["reason"], "usage_exceeded");
    assert!(!refused.set.contains_key("retry-after"), "{refused:?}");
    for broken in ["-1", "two", ""] {
        let answer = decision(app.check(check(Some(broken))).await);
        assert_eq!(answer.http_status, Some(500), "{broken}: {answer:?}");
        assert_eq!(answer.body["reason"], "route_misconfigured");
    }
    app.usage_when("acme", &key.id, |usage| {
        usage
            .buckets
            .first()
            .is_some_and(|hour| hour.valid == 2 && hour.usage_exceeded == 1)
    })
    .await;
}

#[tokio::test]
async fn replicas_spending_one_balance_never_spend_more_than_it() {
    let mut a = app_at(TimeDelta::hours(1)).await;
    let (key, secret) = a.create_with(metered(credits(300, None))).await;
    let mut replicas = vec![a];
    for _ in 0..2 {
        let (url, clock) = (replicas[0].db.url.clone(), replicas[0].clock.clone());
        replicas.push(spawn_app_with(TestDb::sharing(&url), clock, |_| {}).await);
    }
    for replica in &mut replicas {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while replica.spend(costing(&secret, Some(0))).await.result() != ValidationResult::Valid {
            assert!(
                std::time::Instant::now() < deadline,
                "the key never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Round robin over the three, five times the balance in all.
    let mut admitted = 0;
    for n in 0..1_500 {
        if replicas[n % 3].spend(costing(&secret, None)).await.valid {
            admitted += 1;
        }
    }
    assert!(admitted <= 300, "admitted {admitted} of 300");
    // What a replica still holds goes back when it stops: then spent + left is the balance.
    let mut last = replicas.pop().unwrap();
    for replica in replicas {
        replica.stop().await;
    }
    let left = last.balance(&key.id).await.unwrap();
    assert_eq!(admitted + left, 300, "admitted {admitted}, left {left}");
    // And the last replica can spend all of what is left.
    let answer = last.spend(costing(&secret, Some(left))).await;
    assert!(left == 0 || answer.valid, "{answer:?}");
}

#[tokio::test]
async fn metrics_count_the_leases_and_the_credits_given_back() {
    let mut app = spawn_app_with(
        TestDb::new().await,
        ManualClock::new(Utc::now()),
        |settings| {
            settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            settings.flush_interval = Duration::from_millis(20);
        },
    )
    .await;
    let metrics = app.metrics_addr.expect("metrics listen");
    // Near the end of a balance: the first use leases 1 and pays it, the prefetch takes 1
    // more, and 3 are left unleased: the replica holds a good part of what is left.
    let (key, secret) = app.create_with(metered(credits(5, None))).await;
    assert!(app.spend(costing(&secret, None)).await.valid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = crate::metrics::get(metrics, "/metrics").await;
        let given_back = crate::metrics::sample(&text, "apikeys_credits_given_back_total");
        // Idle for a few flushes: what this replica held goes back.
        if given_back > 0.0 {
            assert!(crate::metrics::sample(&text, "apikeys_credit_leases_total") >= 1.0);
            assert_eq!(
                crate::metrics::sample(&text, "apikeys_credit_lease_failures_total"),
                0.0
            );
            assert_eq!(
                crate::metrics::sample(&text, "apikeys_credits_lost_total"),
                0.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing given back: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Given back, the balance is whole in the database; the next use leases again.
    assert_eq!(app.balance(&key.id).await, Some(4));
    let answer = app.spend(costing(&secret, None)).await;
    assert_eq!(answer.credits_remaining, Some(3));

    // A slice of a large balance stays while the key is idle: its next use needs no lease.
    let (_, large) = app.create_with(metered(credits(1_000_000, None))).await;
    assert!(app.spend(costing(&large, None)).await.valid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, before) = crate::metrics::get(metrics, "/metrics").await;
    assert!(app.spend(costing(&large, None)).await.valid);
    let (_, after) = crate::metrics::get(metrics, "/metrics").await;
    assert_eq!(
        crate::metrics::sample(&after, "apikeys_credit_leases_total"),
        crate::metrics::sample(&before, "apikeys_credit_leases_total"),
        "the idle key's next use leased again"
    );
}
