//! Caller authentication, secure defaults and abuse limits.

use std::{num::NonZeroU32, time::Duration};

use apikeys::{
    app::{Application, StartupError},
    auth::{CallerRole, CallerToken, file_line},
    clock::ManualClock,
    config::Settings,
    grpc::{
        VALIDATE_MAX_BYTES,
        proto::{
            ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest,
            Expiration, GetKeyRequest, GetKeyUsageRequest, ListKeyEventsRequest, ListKeysRequest,
            RotateKeyRequest, UpdateKeyRequest, ValidateKeyRequest, ValidationResult,
        },
    },
};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, TransactionTrait};
use tonic::{Code, Request, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest,
};
use tonic_types::StatusExt;

use crate::scan::caller_token;
use crate::support::{TestApp, TestDb, as_owner, assert_error, captured_logs, spawn_app_with};

/// A server with a callers file listing one admin and one gateway.
pub(crate) struct Guarded {
    pub(crate) app: TestApp,
    pub(crate) admin: CallerToken,
    pub(crate) gateway: CallerToken,
    _dir: tempfile::TempDir,
}

pub(crate) async fn spawn_guarded(adjust: impl FnOnce(&mut Settings)) -> Guarded {
    let (admin, gateway) = (caller_token(), caller_token());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers");
    std::fs::write(
        &path,
        format!(
            "# who may call\n{}\n{}\n",
            file_line("billing-admin", CallerRole::Admin, &admin),
            file_line("edge-gateway", CallerRole::Gateway, &gateway)
        ),
    )
    .unwrap();
    let app = spawn_app_with(
        TestDb::new().await,
        ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.callers_file = Some(path);
            adjust(settings);
        },
    )
    .await;
    Guarded {
        app,
        admin,
        gateway,
        _dir: dir,
    }
}

fn with_authorization<T>(mut request: Request<T>, value: &str) -> Request<T> {
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    request
}

fn bearer<T>(request: Request<T>, token: &CallerToken) -> Request<T> {
    with_authorization(request, &format!("Bearer {}", token.expose()))
}

/// Which call, and with which credential.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Create,
    List,
    Delete,
    Get,
    Update,
    Disable,
    Enable,
    Rotate,
    Events,
    Usage,
    Validate,
    Reflection,
    Health,
}

#[derive(Debug, Clone, Copy)]
enum Credential {
    None,
    UnknownToken,
    NotBearer,
    Gateway,
    Admin,
}

async fn call(guarded: &mut Guarded, rpc: Rpc, credential: Credential) -> Result<(), Status> {
    let authorize = |request: Request<()>| -> Request<()> {
        match credential {
            Credential::None => request,
            Credential::UnknownToken => bearer(request, &caller_token()),
            Credential::NotBearer => {
                with_authorization(request, &format!("Basic {}", guarded.admin.expose()))
            }
            Credential::Gateway => bearer(request, &guarded.gateway),
            Credential::Admin => bearer(request, &guarded.admin),
        }
    };
    // The credential (and the owner's actor metadata), carried over to each real message.
    let (metadata, _, ()) = authorize(as_owner(())).into_parts();
    fn carry<T>(metadata: &tonic::metadata::MetadataMap, message: T) -> Request<T> {
        Request::from_parts(metadata.clone(), Default::default(), message)
    }
    let client = &mut guarded.app.client;
    // Admitted calls about a key that does not exist: NOT_FOUND is the service's answer,
    // not the guard's.
    fn admitted<T>(outcome: Result<T, Status>) -> Result<(), Status> {
        match outcome {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => other.map(drop),
        }
    }
    const NO_SUCH_KEY: &str = "key_00000000000000000000";
    match rpc {
        Rpc::Get => admitted(
            client
                .get_key(carry(
                    &metadata,
                    GetKeyRequest {
                        workspace_id: "acme".into(),
                        key_id: NO_SUCH_KEY.into(),
                    },
                ))
                .await,
        ),
        Rpc::Update => admitted(
            client
                .update_key(carry(
                    &metadata,
                    UpdateKeyRequest {
                        key: Some(ApiKey {
                            workspace_id: "acme".into(),
                            id: NO_SUCH_KEY.into(),
                            name: "renamed".into(),
                            ..Default::default()
                        }),
                        update_mask: None,
                    },
                ))
                .await,
        ),
        Rpc::Disable => admitted(
            client
                .disable_key(carry(
                    &metadata,
                    DisableKeyRequest {
                        workspace_id: "acme".into(),
                        key_id: NO_SUCH_KEY.into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        Rpc::Enable => admitted(
            client
                .enable_key(carry(
                    &metadata,
                    EnableKeyRequest {
                        workspace_id: "acme".into(),
                        key_id: NO_SUCH_KEY.into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        Rpc::Rotate => admitted(
            client
                .rotate_key(carry(
                    &metadata,
                    RotateKeyRequest {
                        workspace_id: "acme".into(),
                        key_id: NO_SUCH_KEY.into(),
                        grace_period: None,
                        ..Default::default()
                    },
                ))
                .await,
        ),
        Rpc::Events => client
            .list_key_events(carry(
                &metadata,
                ListKeyEventsRequest {
                    workspace_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::Usage => admitted(
            client
                .get_key_usage(carry(
                    &metadata,
                    GetKeyUsageRequest {
                        workspace_id: "acme".into(),
                        key_id: NO_SUCH_KEY.into(),
                        start_time: Some(prost_types::Timestamp::default()),
                        end_time: Some(prost_types::Timestamp {
                            seconds: 3600,
                            nanos: 0,
                        }),
                    },
                ))
                .await,
        ),
        Rpc::Create => client
            .create_key(carry(
                &metadata,
                CreateKeyRequest {
                    workspace_id: "acme".into(),
                    name: "k".into(),
                    expiration: Expiration::Never.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::List => client
            .list_keys(carry(
                &metadata,
                ListKeysRequest {
                    workspace_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::Delete => match client
            .delete_key(carry(
                &metadata,
                DeleteKeyRequest {
                    workspace_id: "acme".into(),
                    key_id: "key_0000000000000000".into(),
                    ..Default::default()
                },
            ))
            .await
        {
            // Admitted: the id names no key, which is the service's answer, not the guard's.
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) if status.code() == Code::InvalidArgument => Ok(()),
            other => other.map(drop),
        },
        Rpc::Validate => client
            .validate_key(carry(
                &metadata,
                ValidateKeyRequest {
                    key: "clo_unknown".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::Reflection => {
            let mut reflection = ServerReflectionClient::new(guarded.app.channel.clone());
            let message = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let request = carry(&metadata, tokio_stream::once(message));
            let mut stream = reflection
                .server_reflection_info(request)
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
        Rpc::Health => {
            let mut health = HealthClient::new(guarded.app.channel.clone());
            health
                .check(carry(
                    &metadata,
                    HealthCheckRequest {
                        service: String::new(),
                    },
                ))
                .await
                .map(drop)
        }
    }
}

#[tokio::test]
async fn each_caller_may_make_exactly_the_calls_of_its_role() {
    use Credential as C;
    use Rpc as R;
    let mut guarded = spawn_guarded(|_| {}).await;
    let unauthenticated = Some((Code::Unauthenticated, "CALLER_UNAUTHENTICATED"));
    let denied = Some((Code::PermissionDenied, "CALLER_ROLE_NOT_ALLOWED"));

    for rpc in [
        R::Create,
        R::List,
        R::Delete,
        R::Get,
        R::Update,
        R::Disable,
        R::Enable,
        R::Rotate,
        R::Events,
        R::Usage,
        R::Validate,
        R::Reflection,
        R::Health,
    ] {
        for credential in [C::None, C::UnknownToken, C::NotBearer, C::Gateway, C::Admin] {
            let expected = match (rpc, credential) {
                // Kubernetes probes carry no credentials.
                (R::Health, _) => None,
                (_, C::None | C::UnknownToken | C::NotBearer) => unauthenticated,
                (
                    R::Create
                    | R::List
                    | R::Delete
                    | R::Get
                    | R::Update
                    | R::Disable
                    | R::Enable
                    | R::Rotate
                    | R::Events
                    | R::Usage,
                    C::Gateway,
                ) => denied,
                (_, C::Gateway | C::Admin) => None,
            };

            let outcome = call(&mut guarded, rpc, credential).await;

            match (expected, outcome) {
                (None, Ok(())) => {}
                (Some((code, reason)), Err(status)) => assert_error(&status, code, reason),
                (expected, outcome) => {
                    panic!("{rpc:?} with {credential:?}: expected {expected:?}, got {outcome:?}")
                }
            }
        }
    }
}

#[tokio::test]
async fn a_gateway_is_told_which_role_it_lacks_and_no_token_is_ever_logged() {
    let mut guarded = spawn_guarded(|_| {}).await;

    let status = call(&mut guarded, Rpc::Create, Credential::Gateway)
        .await
        .unwrap_err();

    assert_error(&status, Code::PermissionDenied, "CALLER_ROLE_NOT_ALLOWED");
    assert!(status.message().contains("edge-gateway"), "{status:?}");
    assert!(status.message().contains("CreateKey"), "{status:?}");
    let logs = captured_logs();
    for token in [&guarded.admin, &guarded.gateway] {
        assert!(!logs.contains(token.expose()), "a caller token was logged");
        assert!(!status.message().contains(token.expose()));
    }
}

#[tokio::test]
async fn without_caller_auth_a_reachable_address_is_refused_with_how_to_fix_it() {
    let db = TestDb::new().await;
    // Refused before anything is bound, so nothing listens beyond loopback.
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let settings = Settings::new(listen.parse().unwrap(), db.url.clone());

        let err = Application::build(&settings).await.unwrap_err();

        assert!(
            matches!(err, StartupError::InsecureListen { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        for hint in [
            "caller-token new",
            "--callers-file",
            "loopback",
            "--insecure-no-caller-auth",
        ] {
            assert!(message.contains(hint), "{message:?} should mention {hint}");
        }
    }
}

#[tokio::test]
async fn a_broken_callers_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers");
    let token = caller_token();
    // The token itself pasted where its hash belongs.
    std::fs::write(&path, format!("ops admin {}\n", token.expose())).unwrap();
    let db = TestDb::new().await;
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), db.url.clone());
    settings.callers_file = Some(path);

    let err = Application::build(&settings).await.unwrap_err();

    let message = err.to_string();
    assert!(message.contains("line 1"), "{message}");
    assert!(!message.contains(token.expose()), "{message}");
}

#[tokio::test]
async fn validate_key_answers_junk_up_to_16_kib_and_refuses_more() {
    let mut guarded = spawn_guarded(|_| {}).await;
    let request = |key: String| {
        bearer(
            Request::new(ValidateKeyRequest {
                key,
                ..Default::default()
            }),
            &guarded.gateway,
        )
    };
    // The message's own framing takes a few bytes of the limit.
    let junk = "x".repeat(VALIDATE_MAX_BYTES - 4);

    let answer = guarded
        .app
        .client
        .validate_key(request(junk))
        .await
        .expect("junk under the limit is answered")
        .into_inner();
    let status = guarded
        .app
        .client
        .validate_key(request("x".repeat(VALIDATE_MAX_BYTES + 1)))
        .await
        .unwrap_err();

    assert_eq!(answer.result(), ValidationResult::Malformed);
    assert_error(&status, Code::OutOfRange, "REQUEST_TOO_LARGE");
}

#[tokio::test]
async fn management_requests_over_64_kib_are_refused() {
    let mut guarded = spawn_guarded(|_| {}).await;

    let status = guarded
        .app
        .client
        .create_key(bearer(
            as_owner(CreateKeyRequest {
                workspace_id: "acme".into(),
                name: "n".repeat(65 * 1024),
                expiration: Expiration::Never.into(),
                ..Default::default()
            }),
            &guarded.admin,
        ))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(stored_keys(&guarded.app).await, 0);
}

#[tokio::test]
async fn a_caller_over_its_management_rate_is_told_when_to_retry() {
    let mut guarded = spawn_guarded(|settings| {
        settings.management_rate = NonZeroU32::new(1).unwrap();
        settings.management_burst = NonZeroU32::new(3).unwrap();
    })
    .await;
    for _ in 0..3 {
        call(&mut guarded, Rpc::List, Credential::Admin)
            .await
            .expect("within the burst");
    }

    let status = call(&mut guarded, Rpc::List, Credential::Admin)
        .await
        .unwrap_err();

    assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    let delay = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    // ValidateKey is never rate-limited: it is the gateway's users' traffic.
    for _ in 0..50 {
        call(&mut guarded, Rpc::Validate, Credential::Admin)
            .await
            .expect("ValidateKey is not limited");
    }
    // The wait it named is enough.
    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    call(&mut guarded, Rpc::List, Credential::Admin)
        .await
        .expect("allowed again after the delay");
}

/// How many keys the database holds, tombstones included.
async fn stored_keys(app: &TestApp) -> usize {
    app.store().await.all_rows().await.unwrap().len()
}

/// Holds the database's write lock (the revision counter row) until dropped, so writes wait.
async fn hold_writes(app: &TestApp) -> (sea_orm::DatabaseTransaction, sea_orm::DatabaseConnection) {
    let db = sea_orm::Database::connect(app.db.url.as_str())
        .await
        .unwrap();
    let txn = db.begin().await.unwrap();
    let backend = txn.get_database_backend();
    txn.execute_raw(Statement::from_string(
        backend,
        "UPDATE api_key_revision SET value = value WHERE id = 1",
    ))
    .await
    .unwrap();
    assert!(matches!(
        backend,
        DatabaseBackend::Sqlite | DatabaseBackend::Postgres
    ));
    (txn, db)
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_are_shed_but_health_still_answers() {
    let mut guarded = spawn_guarded(|settings| settings.max_in_flight = 1).await;
    let lock = hold_writes(&guarded.app).await;
    let mut client = guarded.app.client.clone();
    let create = bearer(
        as_owner(CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "slow".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        }),
        &guarded.admin,
    );
    let slow = tokio::spawn(async move { client.create_key(create).await });

    // Once the create holds the only slot, the next call is shed at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let shed = loop {
        match call(&mut guarded, Rpc::Validate, Credential::Gateway).await {
            Err(status) => break status,
            Ok(()) => {
                assert!(std::time::Instant::now() < deadline, "nothing was shed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let health = call(&mut guarded, Rpc::Health, Credential::None).await;
    drop(lock);
    let created = slow.await.unwrap();

    assert_error(&shed, Code::Unavailable, "OVERLOADED");
    assert!(health.is_ok(), "health is exempt: {health:?}");
    assert!(created.is_ok(), "the call in flight completes: {created:?}");
    call(&mut guarded, Rpc::Validate, Credential::Gateway)
        .await
        .expect("the slot is free again");
}

#[tokio::test]
async fn a_call_over_the_request_timeout_is_cut_off_and_commits_nothing() {
    let mut guarded =
        spawn_guarded(|settings| settings.request_timeout = Duration::from_millis(300)).await;
    let lock = hold_writes(&guarded.app).await;

    let started = std::time::Instant::now();
    let outcome = call(&mut guarded, Rpc::Create, Credential::Admin).await;
    let took = started.elapsed();
    drop(lock);

    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        stored_keys(&guarded.app).await,
        0,
        "a create cut off by the timeout must not be stored"
    );
}

/// ListKeys as the caller holding `token`: admitted, or the code it was refused with.
async fn list_keys_as(guarded: &Guarded, token: &CallerToken) -> Result<(), Code> {
    let request = bearer(
        as_owner(ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        }),
        token,
    );
    let mut client = guarded.app.client.clone();
    client
        .list_keys(request)
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

/// ListKeys as `token` until it is admitted (or not), as the file is read again.
async fn until_admitted(
    guarded: &Guarded,
    token: &CallerToken,
    admitted: bool,
) -> Result<(), Code> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = list_keys_as(guarded, token).await;
        if answer.is_ok() == admitted {
            return answer;
        }
        assert!(std::time::Instant::now() < deadline, "{answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_callers_file_is_reloaded_without_a_restart_and_a_broken_one_changes_nothing() {
    let guarded = spawn_guarded(|settings| {
        settings.callers_reload_interval = Duration::from_millis(50);
    })
    .await;
    let path = guarded._dir.path().join("callers");
    let newcomer = CallerToken::generate();
    assert_eq!(
        list_keys_as(&guarded, &newcomer).await,
        Err(Code::Unauthenticated)
    );

    // A caller added: admitted; billing-admin, dropped from the file: refused.
    std::fs::write(
        &path,
        format!(
            "{}\n{}\n",
            file_line("reporting", CallerRole::Admin, &newcomer),
            file_line("edge-gateway", CallerRole::Gateway, &guarded.gateway)
        ),
    )
    .unwrap();
    until_admitted(&guarded, &newcomer, true).await.unwrap();
    let dropped = until_admitted(&guarded, &guarded.admin, false).await;
    assert_eq!(dropped, Err(Code::Unauthenticated));

    // A broken file (a token pasted where its hash goes) is refused: the callers in force
    // stay, for longer than a few reloads.
    std::fs::write(&path, format!("reporting admin {}\n", newcomer.expose())).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(list_keys_as(&guarded, &newcomer).await, Ok(()));
    assert_eq!(
        list_keys_as(&guarded, &guarded.admin).await,
        Err(Code::Unauthenticated)
    );
}
