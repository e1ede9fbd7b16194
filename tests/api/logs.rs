//! The developer logs: the audit trail (ListKeyEvents) and per-key hourly usage (GetKeyUsage).

use std::time::{Duration, Instant};

use apikeys::{
    clock::ManualClock,
    grpc::proto::{
        ApiKey, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
        GetKeyUsageRequest, GetKeyUsageResponse, KeyEvent, KeyEventType, ListKeyEventsRequest,
        RotateKeyRequest, UpdateKeyRequest, UsageBucket, ValidateKeyRequest, ValidationResult,
    },
};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, Database};
use tonic::{Code, Status};

use crate::{
    lifecycle::timestamp,
    support::{
        REFUSED_ACTORS, TestApp, TestDb, as_actor, as_owner, as_role, assert_error, spawn_app,
        spawn_app_on, spawn_app_with,
    },
};

impl TestApp {
    async fn try_events(
        &mut self,
        request: ListKeyEventsRequest,
    ) -> Result<(Vec<KeyEvent>, String), Status> {
        let response = self
            .client
            .list_key_events(as_owner(request))
            .await?
            .into_inner();
        Ok((response.events, response.next_page_token))
    }

    /// Every event of the workspace (or of one key), page after page, newest first.
    async fn events(&mut self, workspace: &str, key_id: &str) -> Vec<KeyEvent> {
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let (page, next) = self
                .try_events(ListKeyEventsRequest {
                    workspace_id: workspace.into(),
                    key_id: key_id.into(),
                    page_size: 2,
                    page_token,
                })
                .await
                .expect("list events");
            events.extend(page);
            if next.is_empty() {
                return events;
            }
            page_token = next;
        }
    }

    async fn try_usage(
        &mut self,
        workspace: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<GetKeyUsageResponse, Status> {
        Ok(self
            .client
            .get_key_usage(as_owner(GetKeyUsageRequest {
                workspace_id: workspace.into(),
                key_id: key_id.into(),
                start_time: Some(timestamp(start)),
                end_time: Some(timestamp(end)),
            }))
            .await?
            .into_inner())
    }

    /// The key's usage over the day around the clock's time, once `done` holds of it; fails
    /// after 5 s.
    pub(crate) async fn usage_when(
        &mut self,
        workspace: &str,
        key_id: &str,
        done: impl Fn(&GetKeyUsageResponse) -> bool,
    ) -> GetKeyUsageResponse {
        let now = self.clock_now();
        let (start, end) = (now - TimeDelta::hours(12), now + TimeDelta::hours(12));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let usage = self
                .try_usage(workspace, key_id, start, end)
                .await
                .expect("get usage");
            if done(&usage) {
                return usage;
            }
            assert!(
                Instant::now() < deadline,
                "usage not as expected within 5 s: {usage:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn validate_from(
        &mut self,
        key: &str,
        client_ip: &str,
        required_scopes: &[&str],
    ) -> ValidationResult {
        self.client
            .validate_key(ValidateKeyRequest {
                key: key.into(),
                required_scopes: required_scopes.iter().map(|s| s.to_string()).collect(),
                client_ip: client_ip.into(),
                rate_limits: Vec::new(),
                cost: None,
            })
            .await
            .expect("validate")
            .into_inner()
            .result()
    }
}

fn ids(events: &[KeyEvent]) -> Vec<(KeyEventType, &str)> {
    events
        .iter()
        .map(|event| (event.r#type(), event.key_id.as_str()))
        .collect()
}

/// A clock one second before an hour ends, so a test can cross into the next hour.
fn clock_before_the_hour() -> ManualClock {
    let hour = Utc::now()
        .duration_trunc(TimeDelta::hours(1))
        .expect("an hour");
    ManualClock::new(hour + TimeDelta::minutes(59) + TimeDelta::seconds(58))
}

fn totals(buckets: &[UsageBucket]) -> [i64; 5] {
    buckets.iter().fold([0; 5], |mut sum, bucket| {
        for (total, count) in sum.iter_mut().zip([
            bucket.valid,
            bucket.expired,
            bucket.disabled,
            bucket.deleted,
            bucket.insufficient_scope,
        ]) {
            *total += count;
        }
        sum
    })
}

#[tokio::test]
async fn every_change_to_a_key_records_exactly_one_event_newest_first() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_key("acme", "deploy", Expiration::Never).await;
    let id = key.id.clone();
    let c = &mut app.client;
    let rename = |name: &str| UpdateKeyRequest {
        key: Some(ApiKey {
            name: name.into(),
            etag: String::new(),
            ..key.clone()
        }),
        update_mask: None,
    };
    let disable = || DisableKeyRequest {
        workspace_id: "acme".into(),
        key_id: id.clone(),
        ..Default::default()
    };
    c.update_key(as_actor(rename("ci"), "user_admin", "admin"))
        .await
        .unwrap();
    // Requests that change nothing record nothing.
    c.update_key(as_owner(rename("ci"))).await.unwrap();
    c.disable_key(as_owner(disable())).await.unwrap();
    c.disable_key(as_owner(disable())).await.unwrap();
    c.enable_key(as_owner(EnableKeyRequest {
        workspace_id: "acme".into(),
        key_id: id.clone(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let rotate = || RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: id.clone(),
        grace_period: None,
        ..Default::default()
    };
    let rotated = c.rotate_key(as_owner(rotate())).await.unwrap().into_inner();
    let new_id = rotated.key.unwrap().id;
    // Failed requests record nothing either.
    c.rotate_key(as_owner(rotate())).await.unwrap_err();
    let delete = || DeleteKeyRequest {
        workspace_id: "acme".into(),
        key_id: id.clone(),
        ..Default::default()
    };
    c.delete_key(as_owner(delete())).await.unwrap();
    c.delete_key(as_owner(delete())).await.unwrap_err();

    let events = app.events("acme", &id).await;

    use KeyEventType as E;
    assert_eq!(
        ids(&events),
        [
            (E::Deleted, id.as_str()),
            (E::Rotated, id.as_str()),
            (E::Enabled, id.as_str()),
            (E::Disabled, id.as_str()),
            (E::Updated, id.as_str()),
            (E::Created, id.as_str()),
        ]
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|event| event.id.strip_prefix("evt_").unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|two| two[0] > two[1]), "{numbers:?}");
    for event in &events {
        assert_eq!(event.workspace_id, "acme");
        assert_eq!(event.create_time, Some(timestamp(app.clock_now())));
    }
    let updated = &events[4];
    assert_eq!(
        (updated.actor_id.as_str(), updated.actor_role.as_str()),
        ("user_admin", "admin")
    );
    assert_eq!(updated.changed_fields, ["name"]);
    assert_eq!(
        (events[5].actor_id.as_str(), events[5].actor_role.as_str()),
        ("user_owner", "owner")
    );
    assert_eq!(events[1].new_key_id, new_id);
    assert!(
        events
            .iter()
            .all(|e| e.r#type() == E::Rotated || e.new_key_id.is_empty())
    );
    // The new key's trail starts with the rotation that issued it.
    assert_eq!(
        ids(&app.events("acme", &new_id).await),
        [(E::Rotated, id.as_str())]
    );
}

#[tokio::test]
async fn a_change_whose_event_cannot_be_written_is_not_made() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "kept", Expiration::Never).await;
    let db = Database::connect(app.db.url.as_str()).await.unwrap();
    // Occupy the id the next change's event will take: its insert must fail.
    let next = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT value + 1 AS next FROM api_key_revision",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "next")
        .unwrap();
    let occupy = format!(
        "INSERT INTO api_key_events (id, workspace_id, key_id, kind, actor_id, actor_role, create_time_us, changed_fields) \
         VALUES ({next}, 'elsewhere', 'key_x', 'created', 'x', 'owner', 0, '')"
    );
    db.execute_unprepared(&occupy).await.unwrap();

    let deleted = app
        .client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await;
    let created = app
        .client
        .create_key(as_owner(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "lost".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        }))
        .await;

    assert_eq!(deleted.unwrap_err().code(), Code::Internal);
    assert_eq!(created.unwrap_err().code(), Code::Internal);
    // Neither change happened: the key still works, no key was added, no event recorded.
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    let listed: Vec<String> = app.list("acme").await.into_iter().map(|k| k.id).collect();
    assert_eq!(listed, [key.id.as_str()]);
    assert_eq!(
        ids(&app.events("acme", "").await),
        [(KeyEventType::Created, key.id.as_str())]
    );
    let rows = app.store().await.all_rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].delete_time_us, None);
}

#[tokio::test]
async fn events_page_newest_first_and_stay_in_their_workspace() {
    let mut app = spawn_app().await;
    let mut created = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        created.push(app.create_key("acme", name, Expiration::Never).await.0.id);
    }
    let (other, _) = app.create_key("globex", "x", Expiration::Never).await;

    let events = app.events("acme", "").await;

    created.reverse();
    let listed: Vec<&str> = events.iter().map(|e| e.key_id.as_str()).collect();
    assert_eq!(listed, created);
    assert!(app.events("acme", &other.id).await.is_empty());
    assert_eq!(app.events("globex", "").await.len(), 1);
    let (_, token) = app
        .try_events(ListKeyEventsRequest {
            workspace_id: "acme".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    for (workspace, page_token, page_size, key_id, reason) in [
        ("globex", token.as_str(), 0, "", "PAGE_TOKEN_INVALID"),
        ("acme", "garbage", 0, "", "PAGE_TOKEN_INVALID"),
        ("acme", "", -1, "", "PAGE_SIZE_NEGATIVE"),
        ("acme", "", 0, "key_nope", "KEY_ID_INVALID"),
        ("a b", "", 0, "", "WORKSPACE_ID_INVALID"),
    ] {
        let status = app
            .try_events(ListKeyEventsRequest {
                workspace_id: workspace.into(),
                key_id: key_id.into(),
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
    }
}

#[tokio::test]
async fn validations_show_up_in_get_key_usage_by_result_and_hour_within_seconds() {
    let clock = clock_before_the_hour();
    let mut app = spawn_app_on(TestDb::new().await, clock.clone()).await;
    let (key, secret) = app
        .create_with(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "orders".into(),
            expiration: Expiration::Never.into(),
            scopes: vec!["orders:read".into()],
            ..Default::default()
        })
        .await;
    let first_hour = app.clock_now().duration_trunc(TimeDelta::hours(1)).unwrap();

    assert_eq!(
        app.validate_from(&secret, "10.0.0.1", &[]).await,
        ValidationResult::Valid
    );
    assert_eq!(
        app.validate_from(&secret, "10.0.0.2", &["orders:write"])
            .await,
        ValidationResult::InsufficientScope
    );
    clock.advance(TimeDelta::seconds(1)); // the next hour
    for ip in ["10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"] {
        // Far enough apart to be noted as the last use each time.
        clock.advance(TimeDelta::seconds(2));
        assert_eq!(
            app.validate_from(&secret, ip, &["orders:read"]).await,
            ValidationResult::Valid
        );
    }
    app.try_disable("acme", &key.id).await.unwrap();
    assert_eq!(
        app.validate_from(&secret, "", &[]).await,
        ValidationResult::Disabled
    );
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            app.validate_from(&secret, "192.0.2.9", &[]).await,
            ValidationResult::Deleted
        );
    }
    // Unknown and malformed keys are no key's usage.
    app.validate_from("clo_nothing", "10.0.0.1", &[]).await;

    let usage = app
        .usage_when("acme", &key.id, |usage| {
            totals(&usage.buckets).iter().sum::<i64>() == 8
        })
        .await;

    let bucket = |start: DateTime<Utc>, counts: [i64; 5], ips: i64| UsageBucket {
        start_time: Some(timestamp(start)),
        valid: counts[0],
        expired: counts[1],
        disabled: counts[2],
        deleted: counts[3],
        insufficient_scope: counts[4],
        distinct_client_ips: ips,
        ..Default::default()
    };
    assert_eq!(
        usage.buckets,
        [
            bucket(first_hour, [1, 0, 0, 0, 1], 2),
            // 10.0.0.1 and its IPv4-mapped form are one client.
            bucket(first_hour + TimeDelta::hours(1), [3, 0, 1, 2, 0], 3),
        ]
    );
    assert_eq!(usage.last_used_ip, "::ffff:10.0.0.1");
    assert_eq!(usage.last_used_time, Some(timestamp(app.clock_now())));
    // The range picks hours: the first hour alone.
    let first = app
        .try_usage(
            "acme",
            &key.id,
            first_hour + TimeDelta::minutes(30),
            first_hour + TimeDelta::minutes(31),
        )
        .await
        .unwrap();
    assert_eq!(first.buckets, usage.buckets[..1]);

    // No range is the last 24 hours; an end alone, the day before it.
    let in_range = |start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>| {
        let mut client = app.client.clone();
        let key_id = key.id.clone();
        async move {
            client
                .get_key_usage(as_owner(GetKeyUsageRequest {
                    workspace_id: "acme".into(),
                    key_id,
                    start_time: start.map(timestamp),
                    end_time: end.map(timestamp),
                }))
                .await
                .unwrap()
                .into_inner()
                .buckets
        }
    };
    assert_eq!(in_range(None, None).await, usage.buckets);
    let end = first_hour + TimeDelta::minutes(30);
    assert_eq!(in_range(None, Some(end)).await, usage.buckets[..1]);
    assert_eq!(
        in_range(Some(first_hour + TimeDelta::hours(1)), None).await,
        usage.buckets[1..]
    );
    clock.advance(TimeDelta::hours(25));
    assert_eq!(in_range(None, None).await, []);
}

#[tokio::test]
async fn an_expired_key_is_counted_expired() {
    let clock = ManualClock::new(Utc::now());
    let mut app = spawn_app_on(TestDb::new().await, clock.clone()).await;
    let (key, secret) = app
        .create_key("acme", "old", Expiration::Expiration30Days)
        .await;
    clock.advance(TimeDelta::days(31));

    assert_eq!(
        app.validate_from(&secret, "10.1.1.1", &[]).await,
        ValidationResult::Expired
    );

    let usage = app
        .usage_when("acme", &key.id, |usage| !usage.buckets.is_empty())
        .await;
    assert_eq!(totals(&usage.buckets), [0, 1, 0, 0, 0]);
    assert_eq!(usage.last_used_time, None);
    assert_eq!(usage.last_used_ip, "");
}

#[tokio::test]
async fn a_graceful_shutdown_loses_no_counted_usage() {
    let db = TestDb::new().await;
    let clock = ManualClock::new(Utc::now());
    // No periodic flush during the test: only the one at shutdown can write.
    let mut app = spawn_app_with(db, clock.clone(), |settings| {
        settings.flush_interval = Duration::from_secs(3600);
    })
    .await;
    let (key, secret) = app.create_key("acme", "busy", Expiration::Never).await;
    for i in 0..25 {
        app.validate_from(&secret, &format!("10.2.0.{i}"), &[])
            .await;
    }
    app.validate_from(&secret, "10.2.0.99", &["admin"]).await;

    let (db, clock) = app.stop().await;
    let mut app = spawn_app_on(db, clock).await;

    let usage = app.usage_when("acme", &key.id, |_| true).await;
    assert_eq!(totals(&usage.buckets), [25, 0, 0, 0, 1]);
    // An estimate, exact in practice for a few clients and close for more.
    assert!((24..=28).contains(&usage.buckets[0].distinct_client_ips));
    assert_eq!(usage.last_used_ip, "10.2.0.0");
}

#[tokio::test]
async fn usage_seen_by_two_replicas_adds_up() {
    let mut a = spawn_app().await;
    let url = a.db.url.clone();
    let mut b = spawn_app_on(TestDb::sharing(&url), a.clock.clone()).await;
    let (key, secret) = a.create_key("acme", "shared", Expiration::Never).await;
    // b learns of the key within the sync bound.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.validate_from(&secret, "10.3.0.1", &[]).await != ValidationResult::Valid {
        assert!(Instant::now() < deadline, "replica b never saw the key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ip in ["10.3.0.1", "10.3.0.2"] {
        a.validate_from(&secret, ip, &[]).await;
    }
    b.validate_from(&secret, "10.3.0.3", &[]).await;

    let usage = a
        .usage_when("acme", &key.id, |usage| totals(&usage.buckets)[0] == 4)
        .await;

    assert_eq!(usage.buckets.len(), 1);
    assert_eq!(usage.buckets[0].distinct_client_ips, 3);
    // Both replicas flush again, into the same hour: still a sum and a union.
    b.validate_from(&secret, "10.3.0.1", &[]).await;
    let usage = a
        .usage_when("acme", &key.id, |usage| totals(&usage.buckets)[0] == 5)
        .await;
    assert_eq!(usage.buckets[0].distinct_client_ips, 3);
}

#[tokio::test]
async fn logs_need_an_owner_or_admin_and_stay_in_their_workspace() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "k", Expiration::Never).await;
    app.validate_from(&secret, "10.4.0.1", &[]).await;
    let now = app.clock_now();
    let usage = |workspace: &str| GetKeyUsageRequest {
        workspace_id: workspace.into(),
        key_id: key.id.clone(),
        start_time: Some(timestamp(now - TimeDelta::hours(1))),
        end_time: Some(timestamp(now + TimeDelta::hours(1))),
    };
    let events = || ListKeyEventsRequest {
        workspace_id: "acme".into(),
        ..Default::default()
    };

    for (role, code, reason) in REFUSED_ACTORS {
        let c = &mut app.client;
        for status in [
            c.get_key_usage(as_role(role, usage("acme")))
                .await
                .unwrap_err(),
            c.list_key_events(as_role(role, events()))
                .await
                .unwrap_err(),
        ] {
            assert_error(&status, code, reason);
        }
    }
    // Another workspace's key is as unknown as a missing one.
    let status = app
        .client
        .get_key_usage(as_owner(usage("globex")))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "KEY_NOT_FOUND");
    assert!(app.events("globex", &key.id).await.is_empty());

    let hour = TimeDelta::hours(1);
    for (start, end) in [
        // The end defaults to now, so a start in the future is after it.
        (Some(now + hour), None),
        (Some(now), Some(now)),
        (Some(now), Some(now - hour)),
        (Some(now - TimeDelta::days(94)), Some(now)),
    ] {
        let status = app
            .client
            .get_key_usage(as_owner(GetKeyUsageRequest {
                start_time: start.map(timestamp),
                end_time: end.map(timestamp),
                ..usage("acme")
            }))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "TIME_RANGE_INVALID");
    }
    let status = app
        .client
        .validate_key(ValidateKeyRequest {
            key: secret.clone(),
            client_ip: "10.4.0.1:443".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "CLIENT_IP_INVALID");
    assert!(!status.message().contains("10.4.0.1"));
}

#[tokio::test]
async fn events_and_usage_older_than_the_retention_are_pruned() {
    let clock = ManualClock::new(Utc::now());
    let mut app = spawn_app_with(TestDb::new().await, clock.clone(), |settings| {
        settings.prune_interval = Duration::from_millis(100);
    })
    .await;
    let (key, secret) = app.create_key("acme", "k", Expiration::Never).await;
    app.validate_from(&secret, "10.5.0.1", &[]).await;
    let then = app.clock_now();
    app.usage_when("acme", &key.id, |usage| !usage.buckets.is_empty())
        .await;

    clock.advance(TimeDelta::days(89));
    app.try_disable("acme", &key.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Within the 90 days: everything kept.
    assert_eq!(app.events("acme", "").await.len(), 2);
    clock.advance(TimeDelta::days(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.events("acme", "").await.len() != 1 {
        assert!(Instant::now() < deadline, "old events never pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        ids(&app.events("acme", "").await),
        [(KeyEventType::Disabled, key.id.as_str())]
    );
    let usage = app
        .try_usage(
            "acme",
            &key.id,
            then - TimeDelta::hours(2),
            then + TimeDelta::hours(2),
        )
        .await
        .unwrap();
    assert!(usage.buckets.is_empty());
}

#[tokio::test]
async fn with_usage_recording_off_only_the_last_use_is_kept() {
    let clock = ManualClock::new(Utc::now());
    let mut app = spawn_app_with(TestDb::new().await, clock, |settings| {
        settings.record_usage = false;
    })
    .await;
    let (key, secret) = app.create_key("acme", "quiet", Expiration::Never).await;
    app.validate_from(&secret, "10.6.0.1", &[]).await;

    let usage = app
        .usage_when("acme", &key.id, |usage| usage.last_used_time.is_some())
        .await;

    assert!(usage.buckets.is_empty());
    assert_eq!(usage.last_used_ip, "10.6.0.1");
}

#[tokio::test]
async fn an_events_page_token_pages_on_only_with_the_key_filter_it_was_issued_for() {
    let mut app = spawn_app().await;
    let (one, _) = app.create_key("acme", "one", Expiration::Never).await;
    let (another, _) = app.create_key("acme", "another", Expiration::Never).await;
    for id in [&one.id, &another.id] {
        app.client
            .disable_key(as_owner(DisableKeyRequest {
                workspace_id: "acme".into(),
                key_id: id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let first_page = |key_id: &str| ListKeyEventsRequest {
        workspace_id: "acme".into(),
        key_id: key_id.into(),
        page_size: 1,
        ..Default::default()
    };
    let (_, of_one) = app.try_events(first_page(&one.id)).await.unwrap();
    let (_, of_all) = app.try_events(first_page("")).await.unwrap();
    assert!(
        !of_one.is_empty() && !of_all.is_empty(),
        "more pages follow"
    );

    for (token, key_id) in [
        (&of_one, another.id.as_str()),
        (&of_one, ""),
        (&of_all, one.id.as_str()),
    ] {
        let status = app
            .try_events(ListKeyEventsRequest {
                page_token: token.clone(),
                ..first_page(key_id)
            })
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "PAGE_TOKEN_INVALID");
    }
    let (rest, _) = app
        .try_events(ListKeyEventsRequest {
            page_token: of_one,
            ..first_page(&one.id)
        })
        .await
        .unwrap();
    assert_eq!(ids(&rest), [(KeyEventType::Created, one.id.as_str())]);
}
