//! Per-key rate limits, judged in memory on ValidateKey and Envoy's Check: exactly `limit`
//! admissions per window on one replica, all or nothing across a request's limits, RATE_LIMITED
//! with how long to wait, and the IETF RateLimit headers on Check's answers.

use std::time::Duration;

use apikeys::{
    clock::ManualClock,
    grpc::proto::{
        ApiKey, CreateKeyRequest, Expiration, ListKeyEventsRequest, RateLimit, RateLimitRequest,
        RotateKeyRequest, UpdateKeyRequest, ValidateKeyRequest, ValidateKeyResponse,
        ValidationResult,
    },
};
use chrono::{DurationRound, TimeDelta, Utc};
use tonic::Code;

use crate::{
    ext_authz::{check_request, decision},
    lifecycle::timestamp,
    support::{TestApp, TestDb, as_owner, assert_error, spawn_app_on, spawn_app_with},
};

/// A server whose clock stands `into_hour` after the start of an hour, so every window
/// (each divides a day) starts on the hour.
async fn app_at(into_hour: TimeDelta) -> TestApp {
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap();
    spawn_app_with(
        TestDb::new().await,
        ManualClock::new(hour + into_hour),
        |_| {},
    )
    .await
}

fn limit(name: &str, limit: i64, window_seconds: i64, auto_apply: bool) -> RateLimit {
    RateLimit {
        name: name.into(),
        limit,
        window: Some(prost_types::Duration {
            seconds: window_seconds,
            nanos: 0,
        }),
        auto_apply,
    }
}

fn limited(limits: Vec<RateLimit>) -> CreateKeyRequest {
    CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "metered".into(),
        expiration: Expiration::Never.into(),
        rate_limits: limits,
        scopes: vec!["orders:read".into()],
        ..Default::default()
    }
}

fn asking(secret: &str, asks: &[(&str, Option<i64>)]) -> ValidateKeyRequest {
    ValidateKeyRequest {
        key: secret.into(),
        rate_limits: asks
            .iter()
            .map(|(name, cost)| RateLimitRequest {
                name: (*name).into(),
                cost: *cost,
            })
            .collect(),
        ..Default::default()
    }
}

/// Each limit judged: its name, limit and what is left.
fn left(answer: &ValidateKeyResponse) -> Vec<(&str, i64, i64)> {
    answer
        .rate_limits
        .iter()
        .map(|state| (state.name.as_str(), state.limit, state.remaining))
        .collect()
}

fn seconds(duration: &Option<prost_types::Duration>) -> Option<f64> {
    duration
        .as_ref()
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

impl TestApp {
    async fn ask(&mut self, request: ValidateKeyRequest) -> ValidateKeyResponse {
        self.client
            .validate_key(request)
            .await
            .expect("validate")
            .into_inner()
    }
}

#[tokio::test]
async fn a_key_limited_to_n_is_admitted_exactly_n_times_per_window_under_concurrency() {
    let mut app = app_at(TimeDelta::seconds(20)).await;
    let (key, secret) = app
        .create_with(limited(vec![limit("requests", 50, 60, true)]))
        .await;
    assert_eq!(key.rate_limits, [limit("requests", 50, 60, true)]);

    // 8 clients, 40 requests each, all at once: 320 asks of a budget of 50.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = app.client.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..40 {
                let answer = client
                    .validate_key(asking(&secret, &[]))
                    .await
                    .unwrap()
                    .into_inner();
                results.push(answer);
            }
            results
        }));
    }
    let mut admitted = 0;
    let mut refused = 0;
    for task in tasks {
        for answer in task.await.unwrap() {
            match answer.result() {
                ValidationResult::Valid => {
                    assert!(answer.retry_after.is_none(), "{answer:?}");
                    admitted += 1;
                }
                ValidationResult::RateLimited => {
                    assert!(!answer.valid);
                    // The window started on the minute, 20 s ago: 40 s to wait.
                    assert_eq!(seconds(&answer.retry_after), Some(40.0), "{answer:?}");
                    assert_eq!(left(&answer), [("requests", 50, 0)]);
                    // A known key: who it is, as for every other refusal of a known key.
                    assert_eq!(answer.key_id, key.id);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!((admitted, refused), (50, 270));
    let reset = app.clock_now() + TimeDelta::seconds(40);
    let answer = app.ask(asking(&secret, &[])).await;
    assert_eq!(
        answer.rate_limits[0].reset_time,
        Some(timestamp(reset)),
        "{answer:?}"
    );

    // The next window admits again, and counts afresh.
    app.clock.advance(TimeDelta::seconds(40));
    let answer = app.ask(asking(&secret, &[])).await;
    assert_eq!(answer.result(), ValidationResult::Valid, "{answer:?}");
    assert_eq!(left(&answer), [("requests", 50, 49)]);
    assert_eq!(
        answer.rate_limits[0].reset_time,
        Some(timestamp(reset + TimeDelta::seconds(60)))
    );
}

#[tokio::test]
async fn a_refused_request_spends_from_no_limit_and_named_limits_apply_when_asked() {
    let mut app = app_at(TimeDelta::minutes(10)).await;
    let (_, secret) = app
        .create_with(limited(vec![
            limit("writes", 2, 3_600, false),
            limit("burst", 10, 1, true),
        ]))
        .await;
    // Judged in name order; writes only when asked for.
    let plain = app.ask(asking(&secret, &[])).await;
    assert!(plain.valid, "{plain:?}");
    assert_eq!(left(&plain), [("burst", 10, 9)]);

    let write = app.ask(asking(&secret, &[("writes", Some(2))])).await;
    assert!(write.valid, "{write:?}");
    assert_eq!(left(&write), [("burst", 10, 8), ("writes", 2, 0)]);

    // writes is spent: refused, and burst keeps the unit it would have spent.
    let refused = app.ask(asking(&secret, &[("writes", None)])).await;
    assert_eq!(
        refused.result(),
        ValidationResult::RateLimited,
        "{refused:?}"
    );
    assert_eq!(left(&refused), [("burst", 10, 8), ("writes", 2, 0)]);
    // The hour started ten minutes ago.
    assert_eq!(seconds(&refused.retry_after), Some(3_000.0));

    // A check (cost 0) of an exhausted limit is refused too; of burst it spends nothing.
    let check = app.ask(asking(&secret, &[("writes", Some(0))])).await;
    assert_eq!(check.result(), ValidationResult::RateLimited);
    let check = app.ask(asking(&secret, &[("burst", Some(0))])).await;
    assert!(check.valid);
    assert_eq!(left(&check), [("burst", 10, 8)]);
    // A name the key lacks is not judged; a cost above what is left is refused whole.
    let unknown = app.ask(asking(&secret, &[("reads", Some(1_000))])).await;
    assert!(unknown.valid);
    assert_eq!(left(&unknown), [("burst", 10, 7)]);
    let greedy = app.ask(asking(&secret, &[("burst", Some(8))])).await;
    assert_eq!(greedy.result(), ValidationResult::RateLimited);
    assert_eq!(seconds(&greedy.retry_after), Some(1.0));
    assert_eq!(left(&greedy), [("burst", 10, 7)]);
    // More than a whole window allows: refused, with no wait that would help.
    let never = app.ask(asking(&secret, &[("burst", Some(11))])).await;
    assert_eq!(never.result(), ValidationResult::RateLimited);
    assert_eq!(never.retry_after, None, "{never:?}");

    // Judged after the scopes: a request refused for its scopes spends nothing.
    let mut scoped = asking(&secret, &[("burst", Some(5))]);
    scoped.required_scopes = vec!["orders:write".into()];
    let answer = app.ask(scoped).await;
    assert_eq!(answer.result(), ValidationResult::InsufficientScope);
    assert!(answer.rate_limits.is_empty() && answer.retry_after.is_none());
    assert_eq!(
        left(&app.ask(asking(&secret, &[])).await),
        [("burst", 10, 6)]
    );
}

#[tokio::test]
async fn bad_limits_and_bad_asks_are_refused_with_their_reasons() {
    let mut app = app_at(TimeDelta::zero()).await;
    let nine: Vec<RateLimit> = (0..9)
        .map(|i| limit(&format!("l{i}"), 1, 1, false))
        .collect();
    let fractional = RateLimit {
        window: Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000,
        }),
        ..limit("a", 1, 1, false)
    };
    let cases = [
        (
            vec![limit("Requests", 1, 60, false)],
            "RATE_LIMIT_NAME_INVALID",
        ),
        (vec![limit("", 1, 60, false)], "RATE_LIMIT_NAME_INVALID"),
        (
            vec![limit("a", 1, 60, false), limit("a", 2, 60, false)],
            "RATE_LIMIT_NAME_INVALID",
        ),
        (vec![limit("a", 0, 60, false)], "RATE_LIMIT_LIMIT_INVALID"),
        (
            vec![limit("a", 1_000_000_001, 60, false)],
            "RATE_LIMIT_LIMIT_INVALID",
        ),
        (vec![limit("a", 1, 0, false)], "RATE_LIMIT_WINDOW_INVALID"),
        (
            vec![limit("a", 1, 86_401, false)],
            "RATE_LIMIT_WINDOW_INVALID",
        ),
        (vec![fractional], "RATE_LIMIT_WINDOW_INVALID"),
        (
            vec![RateLimit {
                window: None,
                ..limit("a", 1, 1, false)
            }],
            "RATE_LIMIT_WINDOW_INVALID",
        ),
        (nine, "TOO_MANY_RATE_LIMITS"),
    ];
    for (limits, reason) in cases {
        let status = app
            .client
            .create_key(as_owner(limited(limits)))
            .await
            .expect_err(reason);
        assert_error(&status, Code::InvalidArgument, reason);
    }
    assert!(app.list("acme").await.is_empty(), "nothing was created");

    let (_, secret) = app
        .create_with(limited(vec![limit("a", 5, 60, true)]))
        .await;
    let nine: Vec<(String, Option<i64>)> = (0..9).map(|i| (format!("l{i}"), None)).collect();
    let nine: Vec<(&str, Option<i64>)> = nine.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    for (asks, reason) in [
        (vec![("a", Some(-1))], "COST_INVALID"),
        (vec![("A", None)], "RATE_LIMIT_NAME_INVALID"),
        (vec![("a", None), ("a", Some(2))], "RATE_LIMIT_NAME_INVALID"),
        (nine, "TOO_MANY_RATE_LIMITS"),
    ] {
        let status = app
            .client
            .validate_key(asking(&secret, &asks))
            .await
            .expect_err(reason);
        assert_error(&status, Code::InvalidArgument, reason);
        assert!(!status.message().contains(&secret));
    }
    // None of the refusals spent anything.
    assert_eq!(left(&app.ask(asking(&secret, &[])).await), [("a", 5, 4)]);
}

#[tokio::test]
async fn updates_change_limits_at_once_without_refilling_them_and_are_audited() {
    let mut app = app_at(TimeDelta::seconds(5)).await;
    let (key, secret) = app
        .create_with(limited(vec![limit("calls", 2, 60, true)]))
        .await;
    for _ in 0..2 {
        assert!(app.ask(asking(&secret, &[])).await.valid);
    }
    assert_eq!(
        app.ask(asking(&secret, &[])).await.result(),
        ValidationResult::RateLimited
    );
    let update = |limits: Vec<RateLimit>| UpdateKeyRequest {
        key: Some(ApiKey {
            workspace_id: "acme".into(),
            id: key.id.clone(),
            rate_limits: limits,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rate_limits".into()],
        }),
    };
    // A higher limit for the same window: what was spent stays spent.
    let raised = app
        .client
        .update_key(as_owner(update(vec![limit("calls", 3, 60, true)])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.rate_limits, [limit("calls", 3, 60, true)]);
    assert_eq!(
        left(&app.ask(asking(&secret, &[])).await),
        [("calls", 3, 0)]
    );
    assert_eq!(
        app.ask(asking(&secret, &[])).await.result(),
        ValidationResult::RateLimited
    );
    // A different window is a new limit, counted afresh.
    app.client
        .update_key(as_owner(update(vec![limit("calls", 3, 3_600, true)])))
        .await
        .unwrap();
    assert_eq!(
        left(&app.ask(asking(&secret, &[])).await),
        [("calls", 3, 2)]
    );
    // Cleared: unlimited at once, and no state in the answer.
    let cleared = app
        .client
        .update_key(as_owner(update(Vec::new())))
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.rate_limits.is_empty());
    for _ in 0..5 {
        let answer = app.ask(asking(&secret, &[])).await;
        assert!(answer.valid && answer.rate_limits.is_empty(), "{answer:?}");
    }
    // Bad limits in an update change nothing.
    let status = app
        .client
        .update_key(as_owner(update(vec![limit("calls", 0, 60, true)])))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "RATE_LIMIT_LIMIT_INVALID");

    // The successor of a rotation has the same limits (and its own windows).
    app.client
        .update_key(as_owner(update(vec![limit("calls", 1, 60, true)])))
        .await
        .unwrap();
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
    let successor = rotated.key.unwrap();
    assert_eq!(successor.rate_limits, [limit("calls", 1, 60, true)]);
    assert!(app.ask(asking(&rotated.secret, &[])).await.valid);
    assert_eq!(
        app.ask(asking(&rotated.secret, &[])).await.result(),
        ValidationResult::RateLimited
    );

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
    let limit_changes = events
        .iter()
        .filter(|event| event.changed_fields == ["rate_limits"])
        .count();
    assert_eq!(limit_changes, 4, "{events:?}");
}

#[tokio::test]
async fn check_answers_429_with_retry_after_and_ratelimit_headers_and_usage_counts_it() {
    let mut app = app_at(TimeDelta::seconds(30)).await;
    let (key, secret) = app
        .create_with(limited(vec![
            limit("requests", 100, 60, true),
            limit("writes", 2, 3_600, false),
        ]))
        .await;
    let check = |extensions: Option<&str>| {
        let mut request = check_request(&[("x-api-key", secret.as_str())], None);
        if let Some(limits) = extensions {
            let attributes = request.attributes.as_mut().unwrap();
            attributes
                .context_extensions
                .insert("rate_limits".into(), limits.into());
        }
        request
    };
    let allowed = decision(app.check(check(None)).await);
    assert_eq!(allowed.code, Code::Ok, "{allowed:?}");
    // The client learns where it stands: the policy, and what is left until when.
    assert_eq!(
        allowed.to_client["ratelimit-policy"],
        "\"requests\";q=100;w=60"
    );
    assert_eq!(allowed.to_client["ratelimit"], "\"requests\";r=99;t=30");
    assert!(
        !allowed.set.contains_key("ratelimit"),
        "not for the backend"
    );

    // A route that costs two writes.
    let write = decision(app.check(check(Some("writes=2"))).await);
    assert_eq!(write.code, Code::Ok, "{write:?}");
    assert_eq!(
        write.to_client["ratelimit-policy"],
        "\"requests\";q=100;w=60, \"writes\";q=2;w=3600"
    );
    assert_eq!(
        write.to_client["ratelimit"],
        "\"requests\";r=98;t=30, \"writes\";r=0;t=3570"
    );
    app.clock.advance(TimeDelta::seconds(5));
    let refused = decision(app.check(check(Some("writes"))).await);
    assert_eq!(refused.code, Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.http_status, Some(429));
    assert_eq!(refused.body["reason"], "rate_limited");
    assert_eq!(refused.set["retry-after"], "3565");
    assert_eq!(
        refused.set["ratelimit"],
        "\"requests\";r=98;t=25, \"writes\";r=0;t=3565"
    );
    assert!(refused.set.contains_key("ratelimit-policy"));
    // A route that costs more than the limit's whole window: 429, but no Retry-After.
    let never = decision(app.check(check(Some("writes=3"))).await);
    assert_eq!(never.http_status, Some(429), "{never:?}");
    assert!(!never.set.contains_key("retry-after"), "{never:?}");

    // A route whose entry is not a list of limits is the gateway's fault.
    for broken in ["writes=-1", "writes=two", "Writes"] {
        let answer = decision(app.check(check(Some(broken))).await);
        assert_eq!(answer.http_status, Some(500), "{broken}: {answer:?}");
        assert_eq!(answer.body["reason"], "route_misconfigured");
    }

    // Both allowed Checks and both refusals, in the key's hour.
    app.usage_when("acme", &key.id, |usage| {
        usage
            .buckets
            .first()
            .is_some_and(|hour| hour.valid == 2 && hour.rate_limited == 2)
    })
    .await;
}

#[tokio::test]
async fn limits_are_stored_sorted_and_a_restart_refills_no_window() {
    let mut app = app_at(TimeDelta::zero()).await;
    let limits = vec![limit("b", 7, 86_400, false), limit("a", 1, 60, true)];
    let (key, secret) = app.create_with(limited(limits)).await;
    // Sorted by name, as stored.
    let sorted = [limit("a", 1, 60, true), limit("b", 7, 86_400, false)];
    assert_eq!(key.rate_limits, sorted);
    assert_eq!(app.list("acme").await[0].rate_limits, sorted);

    // 3 of the day's 7 spent before the restart stay spent: a restart does not refill.
    let spent = app.ask(asking(&secret, &[("b", Some(3))])).await;
    assert_eq!(left(&spent), [("a", 1, 0), ("b", 7, 4)]);
    let (db, clock) = app.stop().await;
    clock.advance(TimeDelta::minutes(1));
    let mut app = spawn_app_on(db, clock).await;
    assert_eq!(app.list("acme").await[0].rate_limits, sorted);
    let greedy = app.ask(asking(&secret, &[("b", Some(5))])).await;
    assert_eq!(greedy.result(), ValidationResult::RateLimited, "{greedy:?}");
    let answer = app.ask(asking(&secret, &[("b", Some(4))])).await;
    assert!(answer.valid, "{answer:?}");
    assert_eq!(left(&answer), [("a", 1, 0), ("b", 7, 0)]);
    assert_eq!(answer.key_id, key.id);
    let refused = app.ask(asking(&secret, &[])).await;
    assert_eq!(refused.result(), ValidationResult::RateLimited);
}

#[tokio::test]
async fn replicas_share_a_window_so_together_they_admit_at_most_the_limit() {
    let mut a = app_at(TimeDelta::seconds(1)).await;
    let (_, secret) = a
        .create_with(limited(vec![limit("requests", 100, 3_600, true)]))
        .await;
    let (_, other) = a
        .create_with(limited(vec![limit("requests", 100, 3_600, true)]))
        .await;
    let mut replicas = vec![a];
    for _ in 0..2 {
        let (url, clock) = (replicas[0].db.url.clone(), replicas[0].clock.clone());
        replicas.push(spawn_app_with(TestDb::sharing(&url), clock, |_| {}).await);
    }
    // Each replica knows the keys (a check of cost 0 spends nothing).
    for replica in &mut replicas {
        for secret in [&secret, &other] {
            let check = asking(secret, &[("requests", Some(0))]);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !replica.ask(check.clone()).await.valid {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the key never arrived"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Round robin over the three, five times the limit in all.
    let mut admitted = 0;
    for n in 0..500 {
        if replicas[n % 3].ask(asking(&secret, &[])).await.valid {
            admitted += 1;
        }
    }
    // Never more than the limit; what may be missing is held by the other replicas (at
    // most a slice each, a sixteenth of what was left when they leased it).
    assert!((90..=100).contains(&admitted), "admitted {admitted} of 100");

    // The other key: one use on the first replica leases a slice (100 / 16 = 6) and
    // spends 1 of it; the second spends the rest of the window's budget.
    assert!(replicas[0].ask(asking(&other, &[])).await.valid);
    let mut second = 0;
    while replicas[1].ask(asking(&other, &[])).await.valid {
        second += 1;
        assert!(second <= 100, "the window never ran out");
    }
    assert_eq!(second, 94, "the first replica holds 5");
    // The first stops gracefully and gives its 5 back; the second asks its window's budget
    // again a second later (by the request clock), and admits exactly those.
    let mut rest = replicas.split_off(1);
    // (The database outlives the replica that made it: the others still use it.)
    let (_db, _) = replicas.pop().unwrap().stop().await;
    rest[0].clock.advance(TimeDelta::seconds(2));
    let mut given_back = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while given_back < 5 {
        if rest[0].ask(asking(&other, &[])).await.valid {
            given_back += 1;
        } else {
            assert!(
                std::time::Instant::now() < deadline,
                "what was given back never came: {given_back} of 5"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let refused = rest[0].ask(asking(&other, &[])).await;
    assert_eq!(
        refused.result(),
        ValidationResult::RateLimited,
        "{refused:?}"
    );
    assert_eq!(left(&refused), [("requests", 100, 0)]);
}
