//! Prometheus metrics: off by default, and when on, counters that move with the calls.

use apikeys::grpc::proto::{DeleteKeyRequest, Expiration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use apikeys::clock::ManualClock;

use crate::support::{TestDb, as_owner, spawn_app, spawn_app_with};

/// One HTTP/1.1 GET: the status line, the headers and the body.
pub(crate) async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// The metrics text, as Prometheus scrapes it.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    get(addr, "/metrics").await.1
}

/// The value of the sample `series` (name and labels exactly as exposed); 0 when absent.
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_are_off_unless_asked_for() {
    let app = spawn_app().await;
    assert_eq!(app.metrics_addr, None);
}

#[tokio::test]
async fn the_counters_move_with_the_calls_and_hold_no_secret() {
    let db = TestDb::new().await;
    let mut app = spawn_app_with(db, ManualClock::new(chrono::Utc::now()), |settings| {
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics listen");
    let (head, before) = get(metrics, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );

    let (key, secret) = app.create_key("acme", "metered", Expiration::Never).await;
    app.validate(&secret).await;
    app.validate(apikeys::domain::Secret::generate().expose())
        .await;
    app.validate("clo_garbage").await;
    let missing = app
        .client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: "key_00000000000000000000".into(),
            ..Default::default()
        }))
        .await;
    assert!(missing.is_err());
    let (_, after) = get(metrics, "/metrics").await;

    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved(r#"apikeys_rpcs_total{method="CreateKey",code="OK"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"apikeys_rpcs_total{method="ValidateKey",code="OK"}"#),
        3.0
    );
    assert_eq!(
        moved(r#"apikeys_rpcs_total{method="DeleteKey",code="NOT_FOUND"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"apikeys_rpc_duration_seconds_count{method="ValidateKey",code="OK"}"#),
        3.0
    );
    for result in ["VALID", "NOT_FOUND", "MALFORMED"] {
        let series = format!(r#"apikeys_validations_total{{result="VALIDATION_RESULT_{result}"}}"#);
        assert_eq!(moved(&series), 1.0, "{series}");
    }
    assert_eq!(sample(&after, "apikeys_index_keys"), 1.0);
    let age = sample(&after, "apikeys_index_sync_age_seconds");
    assert!((0.0..30.0).contains(&age), "sync age {age}");
    assert!(sample(&after, "apikeys_db_pool_connections") >= 1.0);
    // The database took every flush of last-used times and usage.
    assert_eq!(sample(&after, "apikeys_flush_failures_total"), 0.0);
    assert_eq!(sample(&after, "apikeys_usage_dropped_answers_total"), 0.0);
    // Nothing a caller chose, let alone a secret, becomes a label.
    assert!(!after.contains(&secret[4..36]));
    assert!(!after.contains(&key.id));
    assert!(!after.contains("acme"));

    let (head, _) = get(metrics, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[tokio::test]
async fn odd_paths_do_not_grow_the_series() {
    let db = TestDb::new().await;
    let app = spawn_app_with(db, ManualClock::new(chrono::Utc::now()), |settings| {
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    for i in 0..5 {
        grpc.ready().await.unwrap();
        let path = format!("/cloodot.apikeys.v1.ApiKeys/Nope{i}")
            .parse()
            .unwrap();
        let answer: Result<tonic::Response<()>, _> = grpc
            .unary(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await;
        assert_eq!(answer.unwrap_err().code(), tonic::Code::Unimplemented);
    }
    let (_, text) = get(app.metrics_addr.unwrap(), "/metrics").await;
    assert!(!text.contains("Nope"));
    assert_eq!(
        sample(
            &text,
            r#"apikeys_rpcs_total{method="unknown",code="UNIMPLEMENTED"}"#
        ),
        5.0
    );
}

#[tokio::test]
async fn operators_see_the_build_the_process_each_gateway_decision_and_the_listener() {
    let db = TestDb::new().await;
    let postgres = db.sqlite_dir().is_none();
    let mut app = spawn_app_with(db, ManualClock::new(chrono::Utc::now()), |settings| {
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics listen");
    let (head, index) = get(metrics, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(index.contains("GET /metrics"), "{index}");

    let before = scrape(metrics).await;
    let (_, secret) = app.create_key("acme", "gateway", Expiration::Never).await;
    let bearer = format!("Bearer {secret}");
    let decisions = [
        (vec![("authorization", bearer.as_str())], None),
        (
            vec![("authorization", bearer.as_str())],
            Some("orders:write"),
        ),
        (
            vec![("authorization", bearer.as_str())],
            Some("not a scope!"),
        ),
        (vec![], None),
        (vec![("authorization", "Bearer clo_garbage")], None),
    ];
    for (headers, scopes) in decisions {
        app.check(crate::ext_authz::check_request(&headers, scopes))
            .await;
    }
    let after = scrape(metrics).await;
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    for (decision, reason) in [
        ("allowed", "valid"),
        ("denied", "insufficient_scope"),
        ("denied", "route_misconfigured"),
        ("denied", "missing_key"),
        ("denied", "malformed"),
    ] {
        let series = format!(
            r#"apikeys_ext_authz_decisions_total{{decision="{decision}",reason="{reason}"}}"#
        );
        assert_eq!(moved(&series), 1.0, "{series}");
    }
    // Every decision's series is there from the start, at 0 until it happens.
    assert!(before.contains(
        r#"apikeys_ext_authz_decisions_total{decision="denied",reason="unavailable"} 0"#
    ));

    let version = env!("CARGO_PKG_VERSION");
    assert!(
        after.contains(&format!(r#"apikeys_build_info{{version="{version}"}} 1"#)),
        "{after}"
    );
    assert!(sample(&after, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&after, "process_open_fds") > 0.0);
    assert!(sample(&after, "process_max_fds") >= sample(&after, "process_open_fds"));
    assert!(sample(&after, "process_threads") >= 1.0);
    let started = sample(&after, "process_start_time_seconds");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - 3600.0..=now + 1.0).contains(&started), "{started}");
    assert!(after.contains("process_cpu_seconds_total "), "{after}");

    // The PostgreSQL change listener's state; SQLite has none.
    if postgres {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sample(&scrape(metrics).await, "apikeys_db_listener_connected") != 1.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the listener never connected"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    } else {
        assert!(!after.contains("apikeys_db_listener_connected"));
    }
}
