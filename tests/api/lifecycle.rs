//! The key lifecycle: disable/enable, rotation with a grace period, custom expiry, scopes,
//! GetKey and UpdateKey.

use apikeys::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
    GetKeyRequest, KeyStatus, RotateKeyRequest, RotateKeyResponse, UpdateKeyRequest,
    ValidateKeyRequest, ValidateKeyResponse, ValidationResult,
};
use chrono::{DateTime, TimeDelta, Utc};
use prost_types::{Duration, FieldMask, Timestamp};
use tonic::{Code, Status};

use crate::support::{
    REFUSED_ACTORS, TestApp, as_actor, as_owner, as_role, assert_error, spawn_app, spawn_app_on,
};

pub(crate) fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn time(ts: &Option<Timestamp>) -> DateTime<Utc> {
    let ts = ts.expect("a timestamp");
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32).unwrap()
}

fn grace(seconds: i64) -> Option<Duration> {
    Some(Duration { seconds, nanos: 0 })
}

/// The lifecycle RPCs, as the admin backend calls them for a workspace owner.
impl TestApp {
    pub(crate) async fn create_with(&mut self, request: CreateKeyRequest) -> (ApiKey, String) {
        let response = self
            .client
            .create_key(as_owner(request))
            .await
            .expect("create a key")
            .into_inner();
        (response.key.unwrap(), response.secret)
    }

    pub(crate) async fn try_disable(
        &mut self,
        workspace: &str,
        id: &str,
    ) -> Result<ApiKey, Status> {
        let request = DisableKeyRequest {
            workspace_id: workspace.into(),
            key_id: id.into(),
            ..Default::default()
        };
        Ok(self
            .client
            .disable_key(as_owner(request))
            .await?
            .into_inner())
    }

    pub(crate) async fn try_enable(&mut self, workspace: &str, id: &str) -> Result<ApiKey, Status> {
        let request = EnableKeyRequest {
            workspace_id: workspace.into(),
            key_id: id.into(),
            ..Default::default()
        };
        Ok(self
            .client
            .enable_key(as_owner(request))
            .await?
            .into_inner())
    }

    pub(crate) async fn try_rotate(
        &mut self,
        workspace: &str,
        id: &str,
        grace_period: Option<Duration>,
    ) -> Result<RotateKeyResponse, Status> {
        let request = RotateKeyRequest {
            workspace_id: workspace.into(),
            key_id: id.into(),
            grace_period,
            ..Default::default()
        };
        Ok(self
            .client
            .rotate_key(as_owner(request))
            .await?
            .into_inner())
    }

    pub(crate) async fn try_get(&mut self, workspace: &str, id: &str) -> Result<ApiKey, Status> {
        let request = GetKeyRequest {
            workspace_id: workspace.into(),
            key_id: id.into(),
        };
        Ok(self.client.get_key(as_owner(request)).await?.into_inner())
    }

    pub(crate) async fn try_update(
        &mut self,
        key: ApiKey,
        paths: &[&str],
    ) -> Result<ApiKey, Status> {
        let update_mask = (!paths.is_empty()).then(|| FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        });
        let request = UpdateKeyRequest {
            key: Some(key),
            update_mask,
        };
        Ok(self
            .client
            .update_key(as_owner(request))
            .await?
            .into_inner())
    }

    pub(crate) async fn validate_with(
        &mut self,
        key: &str,
        required_scopes: &[&str],
    ) -> ValidateKeyResponse {
        self.client
            .validate_key(ValidateKeyRequest {
                key: key.into(),
                required_scopes: required_scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .expect("validate")
            .into_inner()
    }
}

fn scoped(workspace: &str, name: &str, scopes: &[&str]) -> CreateKeyRequest {
    CreateKeyRequest {
        workspace_id: workspace.into(),
        name: name.into(),
        expiration: Expiration::Expiration90Days.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The stored revision of a key: changes exactly when the key changes.
async fn revision(app: &TestApp, id: &str) -> i64 {
    let rows = app.store().await.all_rows().await.unwrap();
    rows.into_iter()
        .find(|row| row.id.as_str() == id)
        .unwrap()
        .revision
}

#[tokio::test]
async fn a_disabled_key_is_rejected_at_once_and_enabling_restores_it() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "ci", Expiration::Never).await;

    let disabled = app.try_disable("acme", &key.id).await.unwrap();

    assert_eq!(disabled.status(), KeyStatus::Disabled);
    assert_eq!(disabled.id, key.id);
    let answer = app.validate(&secret).await;
    assert!(!answer.valid);
    assert_eq!(answer.result(), ValidationResult::Disabled);
    assert_eq!(answer.key_id, key.id);
    assert_eq!(app.list("acme").await[0].status(), KeyStatus::Disabled);
    assert_eq!(
        app.try_get("acme", &key.id).await.unwrap().status(),
        KeyStatus::Disabled
    );

    // Disabling twice changes nothing.
    let before = revision(&app, &key.id).await;
    assert_eq!(app.try_disable("acme", &key.id).await.unwrap(), disabled);
    assert_eq!(revision(&app, &key.id).await, before);

    let enabled = app.try_enable("acme", &key.id).await.unwrap();

    assert_eq!(enabled.status(), KeyStatus::Active);
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    assert_eq!(app.list("acme").await[0].status(), KeyStatus::Active);
    let before = revision(&app, &key.id).await;
    assert_eq!(
        app.try_enable("acme", &key.id).await.unwrap().status(),
        KeyStatus::Active
    );
    assert_eq!(revision(&app, &key.id).await, before);
}

#[tokio::test]
async fn a_disabled_key_that_expires_is_expired_and_cannot_be_enabled() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_key("acme", "month", Expiration::Expiration30Days)
        .await;
    app.try_disable("acme", &key.id).await.unwrap();

    app.clock.advance(TimeDelta::days(30));

    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(app.list("acme").await[0].status(), KeyStatus::Expired);
    let status = app.try_enable("acme", &key.id).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "KEY_EXPIRED");
    // Nor can one that was never disabled.
    let (other, _) = app
        .create_key("acme", "other", Expiration::Expiration30Days)
        .await;
    app.clock.advance(TimeDelta::days(30));
    let status = app.try_enable("acme", &other.id).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "KEY_EXPIRED");
    // Disabling an expired key is harmless and keeps it expired.
    assert_eq!(
        app.try_disable("acme", &key.id).await.unwrap().status(),
        KeyStatus::Expired
    );
}

#[tokio::test]
async fn deleted_keys_cannot_be_changed_or_fetched() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_key("acme", "gone", Expiration::Never).await;
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();

    for status in [
        app.try_disable("acme", &key.id).await.unwrap_err(),
        app.try_enable("acme", &key.id).await.unwrap_err(),
        app.try_rotate("acme", &key.id, None).await.unwrap_err(),
        app.try_update(
            ApiKey {
                name: "back".into(),
                ..key.clone()
            },
            &["name"],
        )
        .await
        .unwrap_err(),
    ] {
        assert_error(&status, Code::FailedPrecondition, "KEY_DELETED");
    }
    let status = app.try_get("acme", &key.id).await.unwrap_err();
    assert_error(&status, Code::NotFound, "KEY_NOT_FOUND");
    // Nothing was inserted or revived.
    let rows = app.store().await.all_rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].delete_time_us.is_some());
    assert_eq!(rows[0].name.as_str(), "gone");
}

#[tokio::test]
async fn another_workspaces_key_is_out_of_reach_of_every_lifecycle_rpc() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "theirs", Expiration::Never).await;
    let unknown = "key_00000000000000000000";

    for id in [key.id.as_str(), unknown] {
        for status in [
            app.try_get("globex", id).await.unwrap_err(),
            app.try_disable("globex", id).await.unwrap_err(),
            app.try_enable("globex", id).await.unwrap_err(),
            app.try_rotate("globex", id, None).await.unwrap_err(),
            app.try_update(
                ApiKey {
                    workspace_id: "globex".into(),
                    id: id.into(),
                    name: "mine now".into(),
                    ..Default::default()
                },
                &["name"],
            )
            .await
            .unwrap_err(),
        ] {
            // The same answer for another workspace's key as for no key at all.
            assert_error(&status, Code::NotFound, "KEY_NOT_FOUND");
            assert!(!status.message().contains(&key.id));
        }
    }
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    let listed = app.list("acme").await.remove(0);
    assert_eq!(
        ApiKey {
            last_used_time: None,
            ..listed
        },
        key
    );
    assert_eq!(app.store().await.all_rows().await.unwrap().len(), 1);
}

#[tokio::test]
async fn lifecycle_rpcs_need_an_owner_or_admin_and_well_formed_ids() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_key("acme", "k", Expiration::Never).await;
    let get = || GetKeyRequest {
        workspace_id: "acme".into(),
        key_id: key.id.clone(),
    };
    let disable = || DisableKeyRequest {
        workspace_id: "acme".into(),
        key_id: key.id.clone(),
        ..Default::default()
    };
    let enable = || EnableKeyRequest {
        workspace_id: "acme".into(),
        key_id: key.id.clone(),
        ..Default::default()
    };
    let rotate = || RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: key.id.clone(),
        grace_period: None,
        ..Default::default()
    };
    let update = || UpdateKeyRequest {
        key: Some(ApiKey {
            name: "renamed".into(),
            ..key.clone()
        }),
        update_mask: None,
    };
    for (actor, code, reason) in REFUSED_ACTORS {
        let c = &mut app.client;
        for status in [
            c.get_key(as_role(actor, get())).await.unwrap_err(),
            c.disable_key(as_role(actor, disable())).await.unwrap_err(),
            c.enable_key(as_role(actor, enable())).await.unwrap_err(),
            c.rotate_key(as_role(actor, rotate())).await.unwrap_err(),
            c.update_key(as_role(actor, update())).await.unwrap_err(),
        ] {
            assert_error(&status, code, reason);
        }
    }
    // Admins may, like owners.
    app.client
        .disable_key(as_actor(disable(), "user_2", "admin"))
        .await
        .unwrap();

    for (workspace, id, reason) in [
        ("acme", "key_short", "KEY_ID_INVALID"),
        ("acme", "", "KEY_ID_INVALID"),
        ("", key.id.as_str(), "WORKSPACE_ID_INVALID"),
        ("a b", key.id.as_str(), "WORKSPACE_ID_INVALID"),
    ] {
        for status in [
            app.try_get(workspace, id).await.unwrap_err(),
            app.try_disable(workspace, id).await.unwrap_err(),
            app.try_enable(workspace, id).await.unwrap_err(),
            app.try_rotate(workspace, id, None).await.unwrap_err(),
            app.try_update(
                ApiKey {
                    workspace_id: workspace.into(),
                    id: id.into(),
                    name: "x".into(),
                    ..Default::default()
                },
                &[],
            )
            .await
            .unwrap_err(),
        ] {
            assert_error(&status, Code::InvalidArgument, reason);
        }
    }
}

#[tokio::test]
async fn rotating_issues_a_like_key_and_the_old_one_works_for_the_grace_period() {
    let mut app = spawn_app().await;
    let (old, old_secret) = app
        .create_with(scoped(
            "acme",
            "billing sync",
            &["invoices:read", "orders:read"],
        ))
        .await;
    app.clock.advance(TimeDelta::days(10));
    let now = time(&old.create_time) + TimeDelta::days(10);

    let request = RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: old.id.clone(),
        grace_period: grace(3600),
        ..Default::default()
    };
    let rotated = app
        .client
        .rotate_key(as_actor(request, "user_rotator", "admin"))
        .await
        .unwrap()
        .into_inner();

    let new = rotated.key.unwrap();
    assert_ne!(new.id, old.id);
    assert_eq!(new.name, "billing sync");
    assert_eq!(new.scopes, ["invoices:read", "orders:read"]);
    assert_eq!(new.created_by, "user_rotator");
    assert_eq!(new.status(), KeyStatus::Active);
    assert_eq!(time(&new.create_time), now);
    // The same 90-day lifetime, from now.
    assert_eq!(time(&new.expire_time), now + TimeDelta::days(90));
    assert_ne!(rotated.secret, old_secret);
    assert!(new.masked_key.ends_with(&rotated.secret[38..]));
    let old_now = rotated.old_key.unwrap();
    assert_eq!(old_now.id, old.id);
    assert_eq!(time(&old_now.expire_time), now + TimeDelta::hours(1));
    assert_eq!(old_now.status(), KeyStatus::Active);

    let answer = app.validate(&rotated.secret).await;
    assert_eq!(answer.result(), ValidationResult::Valid);
    assert_eq!(answer.key_id, new.id);
    assert_eq!(answer.scopes, ["invoices:read", "orders:read"]);
    // Both work during the grace period, and both are listed.
    assert_eq!(
        app.validate(&old_secret).await.result(),
        ValidationResult::Valid
    );
    let listed: Vec<_> = app.list("acme").await.into_iter().map(|k| k.id).collect();
    assert_eq!(listed, [new.id.clone(), old.id.clone()]);

    app.clock
        .advance(TimeDelta::hours(1) - TimeDelta::microseconds(1));
    assert_eq!(
        app.validate(&old_secret).await.result(),
        ValidationResult::Valid
    );
    app.clock.advance(TimeDelta::microseconds(1));
    assert_eq!(
        app.validate(&old_secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(
        app.validate(&rotated.secret).await.result(),
        ValidationResult::Valid
    );
    assert_eq!(
        app.try_get("acme", &old.id).await.unwrap().status(),
        KeyStatus::Expired
    );
}

#[tokio::test]
async fn rotating_with_no_grace_stops_the_old_key_at_once_and_never_stays_never() {
    let mut app = spawn_app().await;
    let (old, old_secret) = app.create_key("acme", "forever", Expiration::Never).await;

    let rotated = app.try_rotate("acme", &old.id, None).await.unwrap();

    assert_eq!(
        app.validate(&old_secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(rotated.old_key.unwrap().status(), KeyStatus::Expired);
    let new = rotated.key.unwrap();
    assert_eq!(new.expire_time, None);
    app.clock.advance(TimeDelta::days(365 * 20));
    assert_eq!(
        app.validate(&rotated.secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn rotation_never_extends_the_old_key() {
    let mut app = spawn_app().await;
    let (old, _) = app
        .create_key("acme", "month", Expiration::Expiration30Days)
        .await;
    app.clock.advance(TimeDelta::days(29));

    let rotated = app
        .try_rotate("acme", &old.id, grace(7 * 24 * 3600))
        .await
        .unwrap();

    assert_eq!(rotated.old_key.unwrap().expire_time, old.expire_time);
    let new = rotated.key.unwrap();
    assert_eq!(
        time(&new.expire_time) - time(&new.create_time),
        TimeDelta::days(30)
    );
}

#[tokio::test]
async fn only_an_active_key_can_be_rotated_and_the_grace_is_bounded() {
    let mut app = spawn_app().await;
    let (disabled, _) = app.create_key("acme", "off", Expiration::Never).await;
    app.try_disable("acme", &disabled.id).await.unwrap();
    let (expired, _) = app
        .create_key("acme", "old", Expiration::Expiration30Days)
        .await;
    let (active, secret) = app.create_key("acme", "on", Expiration::Never).await;
    app.clock.advance(TimeDelta::days(31));

    let status = app
        .try_rotate("acme", &disabled.id, None)
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "KEY_DISABLED");
    let status = app.try_rotate("acme", &expired.id, None).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "KEY_EXPIRED");
    for bad in [
        Duration {
            seconds: -1,
            nanos: 0,
        },
        Duration {
            seconds: 0,
            nanos: -1,
        },
        Duration {
            seconds: 7 * 24 * 3600,
            nanos: 1000,
        },
        Duration {
            seconds: 0,
            nanos: 1_000_000_000,
        },
        Duration {
            seconds: i64::MAX,
            nanos: 0,
        },
    ] {
        let status = app
            .try_rotate("acme", &active.id, Some(bad))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "GRACE_PERIOD_INVALID");
    }
    // Nothing was issued by the refused rotations.
    assert_eq!(app.store().await.all_rows().await.unwrap().len(), 3);
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    // Exactly seven days is allowed.
    let rotated = app
        .try_rotate("acme", &active.id, grace(7 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(
        time(&rotated.old_key.unwrap().expire_time),
        app.clock_now() + TimeDelta::days(7)
    );
}

impl TestApp {
    /// The server's time, at the microsecond precision it keeps.
    pub(crate) fn clock_now(&self) -> DateTime<Utc> {
        use apikeys::clock::Clock;
        let now = self.clock.now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap()
    }
}

#[tokio::test]
async fn a_custom_expire_time_is_kept_to_the_microsecond_and_expires_exactly_then() {
    let mut app = spawn_app().await;
    let at = app.clock_now() + TimeDelta::days(45) + TimeDelta::nanoseconds(123_456_789);
    let kept = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap();

    let (key, secret) = app
        .create_with(CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "until the launch".into(),
            expire_time: Some(timestamp(at)),
            ..Default::default()
        })
        .await;

    assert_eq!(time(&key.expire_time), kept);
    assert_eq!(app.list("acme").await[0].expire_time, key.expire_time);
    let until = kept - app.clock_now();
    app.clock.advance(until - TimeDelta::microseconds(1));
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    app.clock.advance(TimeDelta::microseconds(1));
    let answer = app.validate(&secret).await;
    assert_eq!(answer.result(), ValidationResult::Expired);
    assert_eq!(answer.expire_time, key.expire_time);
}

#[tokio::test]
async fn a_custom_expire_time_is_in_the_next_five_years_and_excludes_a_preset() {
    let mut app = spawn_app().await;
    let now = app.clock_now();
    let custom = |at: DateTime<Utc>, expiration: Expiration| CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "k".into(),
        expiration: expiration.into(),
        expire_time: Some(timestamp(at)),
        ..Default::default()
    };
    let five_years = now.checked_add_months(chrono::Months::new(60)).unwrap();
    for (request, reason) in [
        (custom(now, Expiration::Unspecified), "EXPIRE_TIME_IN_PAST"),
        (
            custom(now - TimeDelta::days(1), Expiration::Unspecified),
            "EXPIRE_TIME_IN_PAST",
        ),
        (
            custom(
                five_years + TimeDelta::microseconds(1),
                Expiration::Unspecified,
            ),
            "EXPIRE_TIME_TOO_FAR",
        ),
        (
            custom(now + TimeDelta::days(1), Expiration::Never),
            "EXPIRATION_CONFLICT",
        ),
    ] {
        let status = app.client.create_key(as_owner(request)).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
    }
    assert!(app.store().await.all_rows().await.unwrap().is_empty());

    let (key, _) = app
        .create_with(custom(five_years, Expiration::Unspecified))
        .await;
    assert_eq!(time(&key.expire_time), five_years);
}

#[tokio::test]
async fn scopes_are_kept_sorted_and_enforced_by_validate_key() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(scoped(
            "acme",
            "orders bot",
            &["orders:write", "orders:read", "orders:write"],
        ))
        .await;
    assert_eq!(key.scopes, ["orders:read", "orders:write"]);
    assert_eq!(app.list("acme").await[0].scopes, key.scopes);

    let answer = app.validate_with(&secret, &["orders:read"]).await;
    assert!(answer.valid);
    assert_eq!(answer.result(), ValidationResult::Valid);
    assert_eq!(answer.scopes, ["orders:read", "orders:write"]);
    assert_eq!(answer.name, "orders bot");
    assert!(
        app.validate_with(&secret, &["orders:write", "orders:read"])
            .await
            .valid
    );
    assert!(app.validate_with(&secret, &[]).await.valid);

    let answer = app
        .validate_with(&secret, &["orders:read", "refunds:write"])
        .await;
    assert!(!answer.valid);
    assert_eq!(answer.result(), ValidationResult::InsufficientScope);
    assert_eq!(answer.key_id, key.id);
    assert_eq!(answer.scopes, ["orders:read", "orders:write"]);

    // A key with no scopes passes only requests that require none.
    let (_, bare) = app.create_with(scoped("acme", "bare", &[])).await;
    assert!(app.validate_with(&bare, &[]).await.valid);
    assert_eq!(
        app.validate_with(&bare, &["orders:read"]).await.result(),
        ValidationResult::InsufficientScope
    );

    // The key's state comes first: a disabled key is DISABLED whatever the scopes.
    app.try_disable("acme", &key.id).await.unwrap();
    assert_eq!(
        app.validate_with(&secret, &["refunds:write"])
            .await
            .result(),
        ValidationResult::Disabled
    );
}

#[tokio::test]
async fn a_refusal_for_scope_is_not_a_use_of_the_key() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_with(scoped("acme", "k", &["a"])).await;

    app.validate_with(&secret, &["b"]).await;

    assert_eq!(
        app.try_get("acme", &key.id).await.unwrap().last_used_time,
        None
    );
    app.validate_with(&secret, &["a"]).await;
    assert!(
        app.try_get("acme", &key.id)
            .await
            .unwrap()
            .last_used_time
            .is_some()
    );
}

#[tokio::test]
async fn ill_formed_scopes_are_invalid_arguments() {
    let mut app = spawn_app().await;
    let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for (scopes, reason) in [
        (vec!["Orders:Read"], "SCOPE_INVALID"),
        (vec!["orders read"], "SCOPE_INVALID"),
        (vec![""], "SCOPE_INVALID"),
        (
            vec!["x"; 1].into_iter().chain(["ü"]).collect(),
            "SCOPE_INVALID",
        ),
        (many.clone(), "TOO_MANY_SCOPES"),
    ] {
        let status = app
            .client
            .create_key(as_owner(scoped("acme", "k", &scopes)))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
    }
    assert!(app.store().await.all_rows().await.unwrap().is_empty());

    let (_, secret) = app.create_with(scoped("acme", "k", &many[..32])).await;
    for required in [&many[..], &["Admin"][..], &[""][..]] {
        let status = app
            .client
            .validate_key(ValidateKeyRequest {
                key: secret.clone(),
                required_scopes: required.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "REQUIRED_SCOPES_INVALID");
        // The scope is named by its rule, never echoed.
        assert!(!status.message().contains("Admin"));
    }
    assert!(app.validate_with(&secret, &many[..32]).await.valid);
}

#[tokio::test]
async fn get_key_returns_the_key_as_listed() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_with(scoped("acme", "k", &["a:b"])).await;
    app.validate(&secret).await;

    let got = app.try_get("acme", &key.id).await.unwrap();

    assert_eq!(got, app.list("acme").await[0]);
    assert!(got.last_used_time.is_some());
    assert_eq!(
        ApiKey {
            last_used_time: None,
            ..got
        },
        key
    );
}

#[tokio::test]
async fn update_key_changes_what_the_mask_names_and_validate_key_sees_it_at_once() {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_with(scoped("acme", "old name", &["orders:read"]))
        .await;
    let edit = |name: &str, scopes: &[&str]| ApiKey {
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        // Output-only fields are ignored.
        masked_key: "clo_********XXXX".into(),
        created_by: "someone else".into(),
        // No etag: whatever the key is now.
        etag: String::new(),
        ..key.clone()
    };

    // Only the masked field changes.
    let updated = app
        .try_update(edit("  new name  ", &["ignored"]), &["name"])
        .await
        .unwrap();
    assert_eq!(updated.name, "new name");
    assert_eq!(updated.scopes, ["orders:read"]);
    assert_eq!(updated.masked_key, key.masked_key);
    assert_eq!(updated.created_by, key.created_by);

    let updated = app
        .try_update(
            edit("ignored", &["refunds:write", "orders:read"]),
            &["scopes"],
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "new name");
    assert_eq!(updated.scopes, ["orders:read", "refunds:write"]);
    let answer = app.validate_with(&secret, &["refunds:write"]).await;
    assert!(answer.valid);
    assert_eq!(answer.name, "new name");

    // `*` replaces both; an empty scope list removes every scope.
    let updated = app.try_update(edit("third", &[]), &["*"]).await.unwrap();
    assert_eq!((updated.name.as_str(), updated.scopes.len()), ("third", 0));
    assert_eq!(
        app.validate_with(&secret, &["orders:read"]).await.result(),
        ValidationResult::InsufficientScope
    );

    // No mask: the fields that are set.
    let updated = app.try_update(edit("", &["x"]), &[]).await.unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.scopes.as_slice()),
        ("third", &["x".to_owned()][..])
    );

    // An unchanged value is no change.
    let before = revision(&app, &key.id).await;
    app.try_update(edit("third", &["x"]), &["*"]).await.unwrap();
    assert_eq!(revision(&app, &key.id).await, before);

    // A disabled key can still be renamed, and stays disabled.
    app.try_disable("acme", &key.id).await.unwrap();
    let updated = app
        .try_update(edit("fourth", &[]), &["name"])
        .await
        .unwrap();
    assert_eq!(updated.status(), KeyStatus::Disabled);
    assert_eq!(app.list("acme").await[0].name, "fourth");
}

#[tokio::test]
async fn update_key_rejects_bad_masks_and_values_and_changes_nothing() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_with(scoped("acme", "k", &["a"])).await;
    let pasted = apikeys::domain::Secret::generate();
    for (name, scopes, paths, reason) in [
        ("n", vec![], vec!["expire_time"], "UPDATE_MASK_INVALID"),
        ("n", vec![], vec!["name", "status"], "UPDATE_MASK_INVALID"),
        ("n", vec![], vec!["Name"], "UPDATE_MASK_INVALID"),
        ("", vec![], vec!["name"], "NAME_EMPTY"),
        ("   ", vec![], vec!["*"], "NAME_EMPTY"),
        (&"x".repeat(101)[..], vec![], vec!["name"], "NAME_TOO_LONG"),
        (pasted.expose(), vec![], vec!["name"], "NAME_CONTAINS_KEY"),
        ("n", vec!["B"], vec!["scopes"], "SCOPE_INVALID"),
    ] {
        let status = app
            .try_update(
                ApiKey {
                    name: name.into(),
                    scopes: scopes.iter().map(|s: &&str| s.to_string()).collect(),
                    ..key.clone()
                },
                &paths,
            )
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
        assert!(!status.message().contains(pasted.expose()));
    }
    let status = app
        .client
        .update_key(as_owner(UpdateKeyRequest {
            key: None,
            update_mask: None,
        }))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "WORKSPACE_ID_INVALID");
    assert_eq!(app.try_get("acme", &key.id).await.unwrap(), key);
}

#[tokio::test]
async fn lifecycle_state_survives_a_restart() {
    let mut app = spawn_app().await;
    let (off, off_secret) = app.create_with(scoped("acme", "off", &["a"])).await;
    app.try_disable("acme", &off.id).await.unwrap();
    let (rolled, rolled_secret) = app.create_with(scoped("acme", "rolled", &["b"])).await;
    let rotated = app.try_rotate("acme", &rolled.id, grace(60)).await.unwrap();
    let (renamed, renamed_secret) = app.create_with(scoped("acme", "before", &["c"])).await;
    app.try_update(
        ApiKey {
            name: "after".into(),
            scopes: vec!["d".into()],
            ..renamed
        },
        &["*"],
    )
    .await
    .unwrap();
    let (db, clock) = app.stop().await;

    let mut app = spawn_app_on(db, clock).await;

    assert_eq!(
        app.validate(&off_secret).await.result(),
        ValidationResult::Disabled
    );
    let answer = app.validate_with(&rotated.secret, &["b"]).await;
    assert!(answer.valid);
    assert_eq!(answer.name, "rolled");
    let answer = app.validate_with(&renamed_secret, &["d"]).await;
    assert!(answer.valid);
    assert_eq!(answer.name, "after");
    assert_eq!(
        app.validate_with(&renamed_secret, &["c"]).await.result(),
        ValidationResult::InsufficientScope
    );
    assert_eq!(
        app.validate(&rolled_secret).await.result(),
        ValidationResult::Valid
    );
    app.clock.advance(TimeDelta::seconds(60));
    assert_eq!(
        app.validate(&rolled_secret).await.result(),
        ValidationResult::Expired
    );
}

#[tokio::test]
async fn a_key_is_rotated_at_most_once() {
    let mut app = spawn_app().await;
    let (old, old_secret) = app.create_key("acme", "forever", Expiration::Never).await;
    let first = app.try_rotate("acme", &old.id, grace(3600)).await.unwrap();

    // A retry, or a second click, while the old key is in its grace period.
    let status = app
        .try_rotate("acme", &old.id, grace(3600))
        .await
        .unwrap_err();

    assert_error(&status, Code::FailedPrecondition, "KEY_ROTATED");
    assert_eq!(app.store().await.all_rows().await.unwrap().len(), 2);
    assert_eq!(
        app.validate(&old_secret).await.result(),
        ValidationResult::Valid
    );
    // The successor rolls on, and never still means never.
    let successor = first.key.unwrap();
    let second = app.try_rotate("acme", &successor.id, None).await.unwrap();
    assert_eq!(second.key.unwrap().expire_time, None);
    assert_eq!(
        app.validate(&first.secret).await.result(),
        ValidationResult::Expired
    );
}

#[tokio::test]
async fn concurrent_rotations_of_one_key_issue_one_successor() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_key("acme", "racy", Expiration::Never).await;
    let (mut a, mut b) = (app.client.clone(), app.client.clone());
    let rotate = || RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: key.id.clone(),
        grace_period: grace(60),
        ..Default::default()
    };

    let (first, second) = tokio::join!(
        a.rotate_key(as_owner(rotate())),
        b.rotate_key(as_owner(rotate()))
    );

    let (won, lost): (Vec<_>, Vec<_>) = [first, second].into_iter().partition(Result::is_ok);
    assert_eq!((won.len(), lost.len()), (1, 1));
    let status = lost.into_iter().next().unwrap().unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "KEY_ROTATED");
    assert_eq!(app.store().await.all_rows().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_disable_racing_a_delete_leaves_the_key_deleted() {
    let mut app = spawn_app().await;
    for i in 0..5 {
        let (key, secret) = app
            .create_key("acme", &format!("k{i}"), Expiration::Never)
            .await;
        let (mut a, mut b) = (app.client.clone(), app.client.clone());
        let (disabled, deleted) = tokio::join!(
            a.disable_key(as_owner(DisableKeyRequest {
                workspace_id: "acme".into(),
                key_id: key.id.clone(),
                ..Default::default()
            })),
            b.delete_key(as_owner(DeleteKeyRequest {
                workspace_id: "acme".into(),
                key_id: key.id.clone(),
                ..Default::default()
            }))
        );
        deleted.unwrap();
        // Either it was disabled first, or it was deleted already.
        if let Err(status) = disabled {
            assert_error(&status, Code::FailedPrecondition, "KEY_DELETED");
        }
        assert_eq!(
            app.validate(&secret).await.result(),
            ValidationResult::Deleted
        );
    }
    assert!(app.list("acme").await.is_empty());
}

#[tokio::test]
async fn an_expire_time_that_is_no_timestamp_is_an_invalid_argument() {
    let mut app = spawn_app().await;
    for (seconds, nanos, reason) in [
        (2_000_000_000, -1, "EXPIRE_TIME_INVALID"),
        (2_000_000_000, 1_000_000_000, "EXPIRE_TIME_INVALID"),
        (i64::MIN, 0, "EXPIRE_TIME_IN_PAST"),
        (i64::MAX, 0, "EXPIRE_TIME_TOO_FAR"),
    ] {
        let request = CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "k".into(),
            expire_time: Some(Timestamp { seconds, nanos }),
            ..Default::default()
        };
        let status = app.client.create_key(as_owner(request)).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, reason);
    }
    assert!(app.store().await.all_rows().await.unwrap().is_empty());
}

#[tokio::test]
async fn actor_metadata_sent_twice_is_refused_whichever_value_comes_first() {
    use tonic_types::StatusExt;
    let mut app = spawn_app().await;
    // An admin backend that forwards its client's metadata and appends its own.
    for (header, values) in [
        ("x-actor-role", ["owner", "member"]),
        ("x-actor-role", ["member", "owner"]),
        ("x-actor-id", ["user_1", "user_2"]),
    ] {
        let mut request = as_actor(
            CreateKeyRequest {
                workspace_id: "acme".into(),
                name: "forwarded".into(),
                expiration: Expiration::Never.into(),
                ..Default::default()
            },
            "user_1",
            "owner",
        );
        request.metadata_mut().remove(header);
        for value in values {
            request
                .metadata_mut()
                .append(header, value.parse().unwrap());
        }

        let status = app.client.create_key(request).await.unwrap_err();

        assert_error(&status, Code::InvalidArgument, "ACTOR_DUPLICATED");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata["header"], header, "{status:?}");
        assert!(status.message().contains(header), "{status:?}");
    }
    assert!(app.store().await.all_rows().await.unwrap().is_empty());
}
