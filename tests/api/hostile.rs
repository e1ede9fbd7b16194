//! Hostile clients and real deployments: what one client can take of the server (connections,
//! calls in flight, health watches, management rates), and replicas started together.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{ListKeysRequest, ValidateKeyRequest, ValidateKeyResponse};
use http::uri::PathAndQuery;
use tokio::{io::AsyncReadExt, net::TcpStream, task::JoinSet};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::{
    binary::{BIN, Process},
    security::spawn_guarded,
    support::{TestDb, as_owner, assert_error, spawn_app_with},
};

fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Spawns `apikeys` with `args` on `db`, without waiting for anything.
fn spawn(db: &TestDb, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env("APIKEYS_DATABASE_URL", &db.url)
        .env("APIKEYS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start apikeys")
}

/// Reads a server's logs until it serves (`Ok`) or exits (`Err` with its logs).
fn served(child: &mut Child) -> Result<(), String> {
    let stderr = child.stderr.take().unwrap();
    let mut logs = String::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("serving gRPC") {
            return Ok(());
        }
        logs.push_str(&line);
        logs.push('\n');
    }
    Err(logs)
}

#[tokio::test]
async fn replicas_and_migrations_started_at_once_on_an_empty_database_all_succeed() {
    for trial in 0..3 {
        let db = TestDb::new().await;
        // Three replicas and two `apikeys migrate` runs, started back to back.
        let mut servers: Vec<Process> = (0..3).map(|_| Process(spawn(&db, &[]))).collect();
        let migrations: Vec<Child> = (0..2).map(|_| spawn(&db, &["migrate"])).collect();

        let outcomes = tokio::task::spawn_blocking(move || {
            let served: Vec<_> = servers.iter_mut().map(|p| served(&mut p.0)).collect();
            let migrated: Vec<_> = migrations
                .into_iter()
                .map(|child| child.wait_with_output().unwrap())
                .collect();
            (served, migrated, servers)
        })
        .await
        .unwrap();

        let (served, migrated, _servers) = outcomes;
        for (n, outcome) in served.iter().enumerate() {
            assert!(
                outcome.is_ok(),
                "trial {trial}: replica {n} did not start:\n{}",
                outcome.as_ref().unwrap_err()
            );
        }
        for output in migrated {
            assert!(
                output.status.success(),
                "trial {trial}: apikeys migrate failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

async fn list(
    client: &mut apikeys::grpc::proto::api_keys_client::ApiKeysClient<Channel>,
    workspace: &str,
) -> Result<(), Status> {
    client
        .list_keys(as_owner(ListKeysRequest {
            workspace_id: workspace.into(),
            ..Default::default()
        }))
        .await
        .map(drop)
}

// Thousands of calls: logged, they would swell the log scan by hundreds of megabytes at
// trace; what they check is the answers.
#[test]
fn one_busy_workspace_is_held_to_its_rate_while_fifty_others_at_2000_calls_are_not() {
    crate::reliability::quietly(async {
        // The defaults, as an admin backend without a callers file meets them.
        let defaults = apikeys::config::Settings::new("127.0.0.1:0".parse().unwrap(), "");
        let app = spawn_app_with(
            TestDb::new().await,
            apikeys::clock::ManualClock::new(chrono::Utc::now()),
            |settings| {
                settings.management_rate = defaults.management_rate;
                settings.management_burst = defaults.management_burst;
            },
        )
        .await;
        let client = apikeys::grpc::proto::api_keys_client::ApiKeysClient::new(channel(app.addr));
        // The busy tenant's calls on a connection of their own, so they arrive alongside.
        let busy = apikeys::grpc::proto::api_keys_client::ApiKeysClient::new(channel(app.addr));

        // Each backend connection keeps at most 100 calls in flight, as a pool of workers would
        // (well within one caller's fair share of the server).
        let (quiet_workers, busy_workers) = (
            std::sync::Arc::new(tokio::sync::Semaphore::new(100)),
            std::sync::Arc::new(tokio::sync::Semaphore::new(100)),
        );
        let started = Instant::now();
        let mut quiet_calls = JoinSet::new();
        for workspace in 0..50 {
            for _ in 0..40 {
                let (mut client, workers) = (client.clone(), quiet_workers.clone());
                quiet_calls.spawn(async move {
                    let _worker = workers.acquire().await.unwrap();
                    list(&mut client, &format!("tenant-{workspace}")).await
                });
            }
        }
        let mut busy_calls = JoinSet::new();
        for _ in 0..2_000 {
            let (mut client, workers) = (busy.clone(), busy_workers.clone());
            busy_calls.spawn(async move {
                let _worker = workers.acquire().await.unwrap();
                list(&mut client, "busy-tenant").await
            });
        }

        let quiet = quiet_calls.join_all().await;
        let busy = busy_calls.join_all().await;
        let took = started.elapsed();
        let refused: Vec<&Status> = quiet.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            refused.is_empty(),
            "quiet tenants refused: {:?}",
            refused.first()
        );
        let limited: Vec<&Status> = busy.iter().filter_map(|r| r.as_ref().err()).collect();
        // Held to its rate however long the run took on a loaded machine: the burst (200)
        // and 100 calls a second, with a little slack for the clock.
        let answered = busy.len() - limited.len();
        let allowed = 200.0 + 100.0 * (took.as_secs_f64() + 0.5);
        assert!(
            !limited.is_empty() && (answered as f64) <= allowed,
            "the busy tenant had {answered} of 2,000 calls answered in {took:?} (its rate allows {allowed:.0})"
        );
        for status in limited {
            assert_error(status, Code::ResourceExhausted, "RATE_LIMITED");
            assert!(status.get_details_retry_info().is_some(), "RetryInfo");
        }
    })
}

/// A ValidateKey call whose body never comes: headers only, as an attacker holds a place.
async fn half_open_validate(channel: Channel, token: String) -> (Result<(), Status>, Duration) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let started = Instant::now();
    if let Err(err) = grpc.ready().await {
        return (Err(Status::unavailable(err.to_string())), started.elapsed());
    }
    let mut request = Request::new(tokio_stream::pending::<ValidateKeyRequest>());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let outcome = grpc
        .client_streaming::<_, ValidateKeyRequest, ValidateKeyResponse, _>(
            request,
            PathAndQuery::from_static("/cloodot.apikeys.v1.ApiKeys/ValidateKey"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(drop);
    (outcome, started.elapsed())
}

// Thousands of calls: logged, they would swell the log scan by hundreds of megabytes at
// trace; what they check is the answers.
#[test]
fn a_caller_holding_half_open_calls_takes_only_its_share_and_others_are_served() {
    crate::reliability::quietly(async {
        let mut guarded = spawn_guarded(|settings| {
            settings.max_in_flight = 64;
            settings.max_in_flight_per_caller = 16;
            settings.request_body_timeout = Duration::from_secs(1);
        })
        .await;
        // The attacker: the gateway's token, 300 calls over two connections of its own.
        let gateway = guarded.gateway.expose().to_owned();
        let connections = [channel(guarded.app.addr), channel(guarded.app.addr)];
        let mut attack = JoinSet::new();
        for n in 0..300 {
            attack.spawn(half_open_validate(
                connections[n % 2].clone(),
                gateway.clone(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Another caller (the admin backend) meanwhile: ValidateKey and ListKeys all answered.
        let admin = format!("Bearer {}", guarded.admin.expose());
        let honest_started = Instant::now();
        for n in 0..50 {
            let mut request = Request::new(ValidateKeyRequest {
                key: format!("clo_{n}"),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("authorization", admin.parse().unwrap());
            guarded
                .app
                .client
                .validate_key(request)
                .await
                .expect("honest ValidateKey");
            let mut request = as_owner(ListKeysRequest {
                workspace_id: "acme".into(),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("authorization", admin.parse().unwrap());
            guarded
                .app
                .client
                .list_keys(request)
                .await
                .expect("honest ListKeys");
        }
        let honest_took = honest_started.elapsed();

        let attack = attack.join_all().await;
        let (mut shed, mut timed_out) = (0, 0);
        for (outcome, took) in &attack {
            let status = outcome
                .as_ref()
                .expect_err("an attacker's call cannot succeed");
            match status.code() {
                Code::Unavailable => {
                    assert_error(status, Code::Unavailable, "CALLER_OVERLOADED");
                    shed += 1;
                }
                _ => {
                    assert_error(status, Code::DeadlineExceeded, "REQUEST_BODY_TIMEOUT");
                    assert!(
                        *took < Duration::from_secs(5),
                        "held {took:?}: freed long before the request timeout"
                    );
                    timed_out += 1;
                }
            }
        }
        assert!(timed_out >= 16, "the share was held: {timed_out}");
        assert!(shed > 0, "beyond its share the attacker was shed");
        assert!(
            honest_took < Duration::from_secs(5),
            "honest calls took {honest_took:?}"
        );
    })
}

#[tokio::test]
async fn two_authorization_values_are_refused_whatever_the_first_says() {
    let mut guarded = spawn_guarded(|_| {}).await;
    let mut request = as_owner(ListKeysRequest {
        workspace_id: "acme".into(),
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.append(
        "authorization",
        format!("Bearer {}", guarded.admin.expose())
            .parse()
            .unwrap(),
    );
    metadata.append(
        "authorization",
        format!("Bearer {}", guarded.gateway.expose())
            .parse()
            .unwrap(),
    );

    let status = guarded.app.client.list_keys(request).await.unwrap_err();

    assert_error(&status, Code::Unauthenticated, "CREDENTIALS_DUPLICATED");
}

/// Whether the server closes `socket` within `within` (it may first send its HTTP/2
/// SETTINGS, which are read and ignored).
async fn closed_within(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    let closed = async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(within, closed).await.is_ok()
}

#[tokio::test]
async fn connections_over_the_cap_per_ip_are_closed_and_silent_ones_after_the_deadline() {
    let mut app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.max_connections_per_ip = 4;
            settings.handshake_timeout = Duration::from_secs(2);
        },
    )
    .await;
    let mut sockets = Vec::new();
    for _ in 0..8 {
        sockets.push(TcpStream::connect(app.addr).await.unwrap());
    }

    let mut closed_at_once = 0;
    for socket in &mut sockets {
        // 8 × 100 ms: all checked well before the handshake deadline.
        if closed_within(socket, Duration::from_millis(100)).await {
            closed_at_once += 1;
        }
    }
    assert_eq!(
        closed_at_once, 4,
        "the connections over the cap are closed at once"
    );
    for socket in &mut sockets {
        assert!(
            closed_within(socket, Duration::from_secs(3)).await,
            "a connection that never sends the HTTP/2 preface is closed after the deadline"
        );
    }
    drop(sockets);
    // The slots are free again for a real client.
    app.list("acme").await;
}

#[tokio::test]
async fn health_watches_are_capped_per_connection_and_in_all() {
    let app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.max_health_watches_per_connection = 2;
            settings.max_health_watches = 3;
        },
    )
    .await;
    let watch = |channel: Channel| async move {
        let mut health = HealthClient::new(channel);
        let mut stream = health
            .watch(HealthCheckRequest::default())
            .await?
            .into_inner();
        stream.message().await?;
        Ok::<_, Status>(stream)
    };
    let (first, second) = (channel(app.addr), channel(app.addr));

    let a = watch(first.clone()).await.expect("first watch");
    let b = watch(first.clone()).await.expect("second watch");
    let per_connection = watch(first.clone()).await.unwrap_err();
    let c = watch(second.clone())
        .await
        .expect("a watch on another connection");
    let in_all = watch(second.clone()).await.unwrap_err();

    assert_error(
        &per_connection,
        Code::ResourceExhausted,
        "HEALTH_WATCHES_EXHAUSTED",
    );
    assert_error(&in_all, Code::ResourceExhausted, "HEALTH_WATCHES_EXHAUSTED");
    // Health Check, which probes use, is never capped.
    HealthClient::new(second.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health Check");
    // A closed watch gives its place back.
    drop((a, b, c));
    let deadline = Instant::now() + Duration::from_secs(3);
    while watch(first.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "closed watches still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_one_with_a_watch_is_not() {
    let mut app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.idle_timeout = Duration::from_millis(300);
            settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        },
    )
    .await;
    let watching = channel(app.addr);
    let mut watch = HealthClient::new(watching)
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap();
    app.list("acme").await;

    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let metrics = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
    let idle = crate::metrics::sample(
        &metrics,
        "apikeys_connections_closed_by_server_total{reason=\"idle\"}",
    );
    assert_eq!(idle, 1.0, "one idle connection closed:\n{metrics}");
    let open = crate::metrics::sample(&metrics, "apikeys_connections_open");
    assert_eq!(open, 1.0, "the watch's connection is open:\n{metrics}");
    // The watch's connection stays open: no error, no end of stream.
    let next = tokio::time::timeout(Duration::from_millis(100), watch.message()).await;
    assert!(next.is_err(), "the watch is still open: {next:?}");
    // The client whose connection was closed reconnects on its next call.
    app.list("acme").await;
}

/// CPU time a process has used (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn more_sockets_than_descriptors_neither_spin_the_server_nor_stop_its_callers() {
    let db = TestDb::new().await;
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            &format!("ulimit -n 200 && exec {BIN} --max-connections-per-ip 1000"),
        ])
        .env("APIKEYS_DATABASE_URL", &db.url)
        .env("APIKEYS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (process, addr, _logs) = crate::binary::start_command(command);
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    // A gateway connected before the flood keeps calling through it.
    let mut client = apikeys::grpc::proto::api_keys_client::ApiKeysClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let validate = |client: &mut apikeys::grpc::proto::api_keys_client::ApiKeysClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .validate_key(ValidateKeyRequest {
                    key: "clo_x".into(),
                    ..Default::default()
                })
                .await
        }
    };
    validate(&mut client).await.expect("before");

    let before = cpu_time(process.0.id());
    let mut sockets = Vec::new();
    for _ in 0..400 {
        if let Ok(socket) = TcpStream::connect(addr).await {
            sockets.push(socket);
        }
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        validate(&mut client).await.expect("during the flood");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = cpu_time(process.0.id()) - before;
    drop(sockets);

    assert!(
        used < Duration::from_millis(800),
        "the server used {used:?} of CPU in 2 s"
    );
    validate(&mut client).await.expect("after");
}

#[tokio::test]
async fn the_health_check_is_answered_however_many_calls_a_caller_holds() {
    let guarded = spawn_guarded(|settings| {
        settings.max_in_flight_per_caller = 2;
        settings.request_body_timeout = Duration::from_secs(5);
    })
    .await;
    let gateway = guarded.gateway.expose().to_owned();
    let mut attack = JoinSet::new();
    for _ in 0..4 {
        attack.spawn(half_open_validate(
            channel(guarded.app.addr),
            gateway.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    HealthClient::new(channel(guarded.app.addr))
        .check(HealthCheckRequest::default())
        .await
        .expect("health is exempt from fair shares");
    attack.abort_all();
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    let app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.keepalive_interval = Duration::from_millis(200);
            settings.keepalive_timeout = Duration::from_millis(200);
        },
    )
    .await;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame: a connected client, which then goes
    // silent (a peer whose host died), answering neither the server's SETTINGS nor its PINGs.
    tokio::io::AsyncWriteExt::write_all(
        &mut socket,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .await
    .unwrap();

    assert!(
        closed_within(&mut socket, Duration::from_secs(3)).await,
        "the server gives up on a peer that answers no ping"
    );
}

#[tokio::test]
async fn a_client_holding_slow_sockets_cannot_keep_the_scraper_from_the_metrics() {
    let app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            settings.metrics_max_connections = 16;
        },
    )
    .await;
    let metrics = app.metrics_addr.unwrap();
    // From another loopback address: more half-sent requests than the listener's whole cap.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(metrics).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        slow.push(stream);
    }

    let text = crate::metrics::scrape(metrics).await;

    assert!(
        text.contains("apikeys_index_keys"),
        "the scraper was served:\n{text}"
    );
    drop(slow);
}
