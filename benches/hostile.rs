//! Hostile clients, from outside: the attacks of issue 16 against the real `apikeys` release
//! binary, each bounded in time, while an honest caller is measured.
//!
//!     cargo bench --bench hostile                    # SQLite files in a temp dir
//!     APIKEYS_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!         cargo bench --bench hostile                # a fresh PostgreSQL database per server
//!     cargo bench --bench hostile -- --only 2,5      # some attacks only (1 to 5)
//!
//! Prints one markdown table row per attack (RELIABILITY.md quotes them): its size, the honest
//! caller's latency and errors during it, the server's CPU time during it (utime + stime from
//! /proc/PID/stat) and its resident memory before, at the peak during and 3 s after it
//! (VmRSS from /proc/PID/status), and what the attacker got. The whole run takes about two
//! minutes.
//!
//! Attacker, honest caller and server share this machine's cores (and loopback). The honest
//! caller runs on an OS thread of its own, with a runtime of its own, so the attack tasks
//! cannot hold up its measurements in a shared scheduler; the attacks only hold sockets and
//! streams open, and reopen them after a pause, so they spend little CPU themselves (the
//! generator's own CPU time is printed beside the server's).
//!
//! The PostgreSQL URL names a server database beside which this tool may create (and at the
//! end drops) databases called `apikeys_hostile_*`.

use std::{
    collections::BTreeMap,
    future::Future,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use apikeys::grpc::proto::{
    CreateKeyRequest, Expiration, ListKeysRequest, ValidateKeyRequest,
    api_keys_client::ApiKeysClient,
};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::oneshot,
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout, timeout_at},
};
use tonic::{
    Request, Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

const BIN: &str = env!("CARGO_BIN_EXE_apikeys");
const VALIDATE_PATH: &str = "/cloodot.apikeys.v1.ApiKeys/ValidateKey";
const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// How often the honest gateway calls.
const HONEST_PERIOD: Duration = Duration::from_millis(10);
/// How long after an attack its memory is read again.
const SETTLE: Duration = Duration::from_secs(3);

fn main() {
    let mut only: Option<Vec<u32>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => {
                let list = args.next().expect("--only needs a list, e.g. 2,5");
                only = Some(
                    list.split(',')
                        .map(|n| n.parse().expect("1 to 5"))
                        .collect(),
                );
            }
            "--bench" => {} // cargo bench passes this to every bench target
            other => panic!("unknown argument {other}"),
        }
    }
    let wanted = |n: u32| only.as_ref().is_none_or(|only| only.contains(&n));
    // One worker for the attack tasks; each honest caller gets a thread of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let databases = Databases::new().await;
        let started = Instant::now();
        println!(
            "# hostile clients against {BIN}; database: {}",
            databases.describe()
        );
        println!(
            "# machine: {} cores, load average {}; attacker, honest caller and server on this machine, over loopback",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut rows = Vec::new();
        if wanted(1) {
            rows.extend(idle_sockets(&databases).await);
        }
        if wanted(2) {
            rows.push(half_open_calls(&databases).await);
        }
        if wanted(3) {
            rows.extend(health_watches(&databases).await);
        }
        if wanted(4) {
            rows.extend(management(&databases).await);
        }
        if wanted(5) {
            rows.push(concurrent_start(&databases).await);
        }
        databases.drop_all().await;
        println!();
        println!(
            "| attack | size | honest caller during it | server CPU during it | server RSS MiB before → peak → after | what held |"
        );
        println!("|---|---|---|---|---|---|");
        for row in &rows {
            println!("{}", row.markdown());
        }
        println!("# whole run: {:.0} s", started.elapsed().as_secs_f64());
    });
}

// ---------------------------------------------------------------------------------------
// 1. Idle sockets, under a descriptor limit of 400
// ---------------------------------------------------------------------------------------

async fn idle_sockets(databases: &Databases) -> Vec<Row> {
    const SOCKETS: usize = 700;
    const REOPEN_AFTER: Duration = Duration::from_millis(200);
    let url = databases.fresh("apikeys_hostile_idle").await;
    let server = Server::start(
        &url,
        &[
            "--handshake-timeout",
            "5s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        Some(400),
    );
    let (addr, metrics) = (server.addrs.grpc, server.addrs.metrics.unwrap());
    let key = create_key(addr, None, "acme").await;
    let cap = server
        .log_field("connection cap lowered", "max_connections")
        .unwrap_or_else(|| "not lowered".into());
    println!("# 1. idle sockets: `ulimit -n 400`, connection cap {cap}, handshake timeout 5 s");
    let mut rows = Vec::new();

    // The honest gateway alone first: what "unharmed" looks like on this machine.
    let (tally, _, usage) =
        with_honest_gateway(&server, &key, Duration::from_secs(3), None, |_| async {}).await;
    rows.push(Row {
        attack: "none (baseline for 1)".into(),
        size: "honest gateway alone, 3 s".into(),
        honest: tally.summary(),
        cpu: usage.cpu(),
        rss: usage.rss(),
        held: "-".into(),
    });

    for (name, sources, seconds) in [
        ("1. idle sockets, one IP", vec![None], 15),
        (
            "1b. idle sockets, four IPs",
            (1..=4)
                .map(|n| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 1, n))))
                .collect(),
            10,
        ),
    ] {
        let before = scrape(metrics).await.unwrap_or_default();
        let flood = Arc::new(Flood::default());
        let newcomer_at = Duration::from_secs(3);
        let (tally, newcomer, usage) = with_honest_gateway(
            &server,
            &key,
            Duration::from_secs(seconds),
            Some(newcomer_at),
            |end| {
                let flood = flood.clone();
                let sources = sources.clone();
                async move {
                    let mut sockets = JoinSet::new();
                    for n in 0..SOCKETS {
                        sockets.spawn(idle_socket(
                            addr,
                            sources[n % sources.len()],
                            b"",
                            REOPEN_AFTER,
                            end,
                            flood.clone(),
                        ));
                    }
                    sleep(Duration::from_secs(4)).await;
                    let during = scrape(metrics).await.unwrap_or_default();
                    *flood.server_open.lock().unwrap() =
                        sample(&during, "apikeys_connections_open");
                    sockets.join_all().await;
                }
            },
        )
        .await;
        let after = scrape(metrics).await.unwrap_or_default();
        let closed = |reason: &str| {
            let name = format!("apikeys_connections_closed_by_server_total{{reason=\"{reason}\"}}");
            let delta =
                sample(&after, &name).unwrap_or(0.0) - sample(&before, &name).unwrap_or(0.0);
            delta as u64
        };
        let newcomer = newcomer.expect("a newcomer was sent");
        let who = if sources.len() == 1 {
            format!("{SOCKETS} sockets from 127.0.0.1")
        } else {
            format!("{SOCKETS} sockets from 127.0.1.1–4")
        };
        rows.push(Row {
            attack: name.into(),
            size: format!(
                "{who} that never send the HTTP/2 preface, each reopened {} ms after the server closes it, {seconds} s; descriptor limit 400",
                REOPEN_AFTER.as_millis()
            ),
            honest: format!(
                "connection opened before: {}; new connection from 127.0.0.2, {} s in: {}",
                tally.summary(),
                newcomer_at.as_secs(),
                newcomer.describe()
            ),
            cpu: usage.cpu(),
            rss: usage.rss(),
            held: format!(
                "server held {} connections open 4 s in (cap {cap}); {} connects in all ({}/s), {} closed at once (server: {} over the limit, {} over the per-IP limit), {} at the handshake timeout (after {} ms), {} connect errors; {} log lines",
                flood
                    .server_open
                    .lock()
                    .unwrap()
                    .map_or("?".into(), |n| n.to_string()),
                thousands(flood.connects.load(Relaxed)),
                thousands(flood.connects.load(Relaxed) / seconds),
                thousands(flood.closed_at_once.load(Relaxed)),
                thousands(closed("limit")),
                thousands(closed("peer_limit")),
                thousands(closed("handshake_timeout")),
                flood.later(),
                flood.connect_errors.load(Relaxed),
                usage.log_lines,
            ),
        });
        println!("{}", rows.last().unwrap().markdown());
    }

    rows.push(metrics_slowloris(&server, metrics).await);
    rows
}

/// The metrics listener: half-sent request headers (and silent sockets) over its connection
/// cap, while a scraper scrapes every 250 ms.
async fn metrics_slowloris(server: &Server, metrics: SocketAddr) -> Row {
    const SOCKETS: usize = 100;
    const SECONDS: u64 = 12;
    let (partial, silent) = (Arc::new(Flood::default()), Arc::new(Flood::default()));
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Instant>();
    let scraper = on_own_thread("scraper", move || async move {
        let _ = ready_tx.send(());
        let end = go_rx.await.unwrap();
        every(Duration::from_millis(250), end, |_| async move {
            match timeout(Duration::from_secs(2), scrape(metrics)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(err),
                Err(_) => Err("no answer within 2 s".into()),
            }
        })
        .await
    });
    ready_rx.await.unwrap();
    let window = Window::open(server);
    let end = Instant::now() + Duration::from_secs(SECONDS);
    go_tx.send(end).unwrap();
    let mut sockets = JoinSet::new();
    for n in 0..SOCKETS {
        let (payload, flood): (&'static [u8], _) = if n % 2 == 0 {
            (b"GET /metrics HTTP/1.1\r\nHost: bench\r\n", partial.clone())
        } else {
            (b"", silent.clone())
        };
        // From another address than the scraper's: what the per-IP cap (an eighth of 64)
        // keeps apart. An attacker on the scraper's own host shares its slots.
        sockets.spawn(idle_socket(
            metrics,
            Some(IpAddr::from([127, 0, 0, 3])),
            payload,
            Duration::from_millis(200),
            end,
            flood,
        ));
    }
    sockets.join_all().await;
    let usage = window.close(server).await;
    let scrapes = join(scraper).await;
    let lifetimes = |flood: &Flood| {
        format!(
            "{} closed at once, {} after {} ms, {} still open at the end",
            flood.closed_at_once.load(Relaxed),
            flood.closed_later.load(Relaxed),
            flood.later(),
            flood.open_at_end.load(Relaxed),
        )
    };
    let row = Row {
        attack: "1c. metrics listener, slow headers".into(),
        size: format!(
            "{SOCKETS} sockets from 127.0.0.3 (cap 64, 8 per IP): half send `GET /metrics HTTP/1.1` and one header, never the blank line, half send nothing; each reopened 200 ms after it is closed; {SECONDS} s"
        ),
        honest: format!("scraper every 250 ms: {}", scrapes.summary()),
        cpu: usage.cpu(),
        rss: usage.rss(),
        held: format!(
            "half-sent headers: {}; silent: {}",
            lifetimes(&partial),
            lifetimes(&silent)
        ),
    };
    println!("{}", row.markdown());
    row
}

/// What a flood of sockets saw, from the client's side.
#[derive(Default)]
struct Flood {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    /// Closed by the server within a second of connecting (over a cap).
    closed_at_once: AtomicU64,
    /// Closed by the server later (a deadline), and after how long.
    closed_later: AtomicU64,
    /// The shortest and longest of those lifetimes, in ms.
    later_ms: Mutex<Option<(u64, u64)>>,
    open_at_end: AtomicU64,
    server_open: Mutex<Option<f64>>,
}

impl Flood {
    /// The range of lifetimes of the sockets the server closed late, e.g. `5001–5012`.
    fn later(&self) -> String {
        match *self.later_ms.lock().unwrap() {
            Some((min, max)) => format!("{min}–{max}"),
            None => "-".into(),
        }
    }
}

/// One socket that connects (from `source`), sends `payload` and then nothing, waits for
/// the server to close it, and after `pause` connects again, until `end`.
async fn idle_socket(
    addr: SocketAddr,
    source: Option<IpAddr>,
    payload: &'static [u8],
    pause: Duration,
    end: Instant,
    flood: Arc<Flood>,
) {
    while Instant::now() < end {
        let mut stream = match timeout_at(end, connect_from(source, addr)).await {
            Err(_) => return,
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => {
                flood.connect_errors.fetch_add(1, Relaxed);
                sleep_until((Instant::now() + pause).min(end)).await;
                continue;
            }
        };
        flood.connects.fetch_add(1, Relaxed);
        let opened = Instant::now();
        let _ = stream.write_all(payload).await;
        let mut buffer = [0u8; 1024];
        let closed = timeout_at(end, async {
            // The server may send its SETTINGS first; read and ignore them.
            while let Ok(1..) = stream.read(&mut buffer).await {}
        })
        .await;
        if closed.is_err() {
            flood.open_at_end.fetch_add(1, Relaxed);
            return;
        }
        let lived = opened.elapsed();
        if lived < Duration::from_secs(1) {
            flood.closed_at_once.fetch_add(1, Relaxed);
        } else {
            flood.closed_later.fetch_add(1, Relaxed);
            let ms = lived.as_millis() as u64;
            let mut later = flood.later_ms.lock().unwrap();
            let (min, max) = later.get_or_insert((ms, ms));
            (*min, *max) = ((*min).min(ms), (*max).max(ms));
        }
        sleep_until((Instant::now() + pause).min(end)).await;
    }
}

/// A TCP connection to `addr` from `source` (any local address when `None`).
async fn connect_from(source: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The honest gateway: a connection opened before the attack calls ValidateKey every 10 ms
/// for `seconds`, on a thread of its own, while `attack` runs here; with `newcomer`, a new
/// connection from 127.0.0.2 is also made that long into the attack. Returns the
/// gateway's tally, the newcomer's fate and what the server used meanwhile.
async fn with_honest_gateway<F, Fut>(
    server: &Server,
    key: &str,
    seconds: Duration,
    newcomer: Option<Duration>,
    attack: F,
) -> (Tally, Option<Newcomer>, Usage)
where
    F: FnOnce(Instant) -> Fut,
    Fut: Future<Output = ()>,
{
    let addr = server.addrs.grpc;
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Instant>();
    let key = key.to_owned();
    let honest = on_own_thread("honest-gateway", move || async move {
        let client = ApiKeysClient::new(connect(addr).await);
        // Warm the connection before the measurement.
        client
            .clone()
            .validate_key(validate(&key, None))
            .await
            .expect("ValidateKey before the attack");
        let _ = ready_tx.send(());
        let end = go_rx.await.unwrap();
        let newcomer = newcomer.map(|after| {
            let key = key.clone();
            tokio::spawn(async move {
                sleep(after).await;
                newcomer_calls(addr, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), key, end).await
            })
        });
        let tally = every(HONEST_PERIOD, end, |_| {
            let (mut client, request) = (client.clone(), validate(&key, None));
            async move {
                client
                    .validate_key(request)
                    .await
                    .map(drop)
                    .map_err(describe)
            }
        })
        .await;
        let newcomer = match newcomer {
            Some(task) => Some(task.await.unwrap()),
            None => None,
        };
        (tally, newcomer)
    });
    ready_rx.await.unwrap();
    let window = Window::open(server);
    let end = Instant::now() + seconds;
    go_tx.send(end).unwrap();
    attack(end).await;
    sleep_until(end).await;
    let usage = window.close(server).await;
    let (tally, newcomer) = join(honest).await;
    (tally, newcomer, usage)
}

/// A new client's first call, from `source`: retried every 250 ms until it succeeds or
/// `until`.
struct Newcomer {
    attempts: u32,
    first_success: Option<Duration>,
    since_first_attempt: Duration,
    last_error: Option<String>,
}

impl Newcomer {
    fn describe(&self) -> String {
        match (self.first_success, &self.last_error) {
            (Some(took), None) => format!("connected and answered in {}", ms(took)),
            (Some(took), Some(error)) => format!(
                "refused {} times ({error}), then answered (in {}) {} after the first attempt",
                self.attempts - 1,
                ms(took),
                ms(self.since_first_attempt)
            ),
            (None, error) => format!(
                "**never answered**: {} attempts over {} ({})",
                self.attempts,
                ms(self.since_first_attempt),
                error.as_deref().unwrap_or("?")
            ),
        }
    }
}

async fn newcomer_calls(addr: SocketAddr, source: IpAddr, key: String, until: Instant) -> Newcomer {
    let started = Instant::now();
    let mut newcomer = Newcomer {
        attempts: 0,
        first_success: None,
        since_first_attempt: Duration::ZERO,
        last_error: None,
    };
    while Instant::now() < until {
        newcomer.attempts += 1;
        let attempt = Instant::now();
        let key = key.clone();
        let outcome = timeout(Duration::from_secs(2), async move {
            let connector = tower::service_fn(move |_: http::Uri| async move {
                connect_from(Some(source), addr).await.map(TokioIo::new)
            });
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_with_connector(connector)
                .await
                .map_err(|err| format!("connect: {err}"))?;
            ApiKeysClient::new(channel)
                .validate_key(validate(&key, None))
                .await
                .map(drop)
                .map_err(describe)
        })
        .await;
        newcomer.since_first_attempt = started.elapsed();
        match outcome {
            Ok(Ok(())) => {
                newcomer.first_success = Some(attempt.elapsed());
                return newcomer;
            }
            Ok(Err(err)) => newcomer.last_error = Some(err),
            Err(_) => newcomer.last_error = Some("no answer within 2 s".into()),
        }
        sleep(Duration::from_millis(250)).await;
    }
    newcomer
}

// ---------------------------------------------------------------------------------------
// 2. Half-open calls
// ---------------------------------------------------------------------------------------

async fn half_open_calls(databases: &Databases) -> Row {
    const CONNECTIONS: usize = 5;
    const STREAMS_PER_CONNECTION: usize = 220;
    const SECONDS: u64 = 12;
    const REOPEN_AFTER: Duration = Duration::from_millis(100);
    let dir = tempfile::tempdir().unwrap();
    let (attacker, attacker_line) = caller_token("attacker", "gateway");
    let (admin, admin_line) = caller_token("honest", "admin");
    let callers = dir.path().join("callers");
    std::fs::write(&callers, format!("{attacker_line}\n{admin_line}\n")).unwrap();
    set_mode_600(&callers);
    let url = databases.fresh("apikeys_hostile_half_open").await;
    let server = Server::start(&url, &["--callers-file", callers.to_str().unwrap()], None);
    let addr = server.addrs.grpc;
    let key = create_key(addr, Some(&admin), "acme").await;
    println!(
        "# 2. half-open calls: callers file with a gateway (the attacker) and an admin (honest)"
    );

    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Instant>();
    let honest_admin = admin.clone();
    let honest = on_own_thread("honest-admin", move || async move {
        let client = ApiKeysClient::new(connect(addr).await);
        client
            .clone()
            .validate_key(validate(&key, Some(&honest_admin)))
            .await
            .expect("ValidateKey before the attack");
        let _ = ready_tx.send(());
        let end = go_rx.await.unwrap();
        let (mut validations, mut lists) = (Tally::new(), Tally::new());
        let mut tick = tokio::time::interval(HONEST_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            let request = validate(&key, Some(&honest_admin));
            let sent = Instant::now();
            let outcome = client.clone().validate_key(request).await;
            validations.record(sent.elapsed(), outcome.map(drop).map_err(describe));
            // Ten workspaces, so the honest backend stays within each one's rate.
            let request = list(&format!("honest-{}", n % 10), Some(&honest_admin));
            let sent = Instant::now();
            let outcome = client.clone().list_keys(request).await;
            lists.record(sent.elapsed(), outcome.map(drop).map_err(describe));
            n += 1;
        }
        (validations, lists)
    });
    ready_rx.await.unwrap();
    let window = Window::open(&server);
    let end = Instant::now() + Duration::from_secs(SECONDS);
    go_tx.send(end).unwrap();
    let answers = Arc::new(Answers::default());
    let mut connections = JoinSet::new();
    for _ in 0..CONNECTIONS {
        connections.spawn(half_open_connection(
            addr,
            attacker.clone(),
            STREAMS_PER_CONNECTION,
            REOPEN_AFTER,
            end,
            answers.clone(),
        ));
    }
    connections.join_all().await;
    let usage = window.close(&server).await;
    let (validations, lists) = join(honest).await;
    let row = Row {
        attack: "2. half-open calls".into(),
        size: format!(
            "{} ValidateKey streams with the gateway's token over {CONNECTIONS} HTTP/2 connections, HEADERS and never a body, each reopened {} ms after it is answered, {SECONDS} s",
            thousands((CONNECTIONS * STREAMS_PER_CONNECTION) as u64),
            REOPEN_AFTER.as_millis()
        ),
        honest: format!(
            "admin (another caller), every 10 ms: ValidateKey {}; ListKeys {}",
            validations.summary(),
            lists.summary()
        ),
        cpu: usage.cpu(),
        rss: usage.rss(),
        held: format!("attacker's calls: {}", answers.describe()),
    };
    println!("{}", row.markdown());
    row
}

/// How an attacker's calls were answered: by status and reason, with how long each waited.
#[derive(Default)]
struct Answers {
    sent: AtomicU64,
    by_outcome: Mutex<BTreeMap<String, Histogram<u64>>>,
    unanswered_at_end: AtomicU64,
    connection_errors: AtomicU64,
}

impl Answers {
    fn record(&self, outcome: String, waited: Duration) {
        let mut by_outcome = self.by_outcome.lock().unwrap();
        by_outcome
            .entry(outcome)
            .or_insert_with(histogram)
            .saturating_record(waited.as_millis() as u64);
    }

    fn describe(&self) -> String {
        let mut parts = vec![format!("{} sent", thousands(self.sent.load(Relaxed)))];
        for (outcome, waited) in self.by_outcome.lock().unwrap().iter() {
            parts.push(format!(
                "{} {outcome} (answered after p50 {} ms, max {} ms)",
                thousands(waited.len()),
                waited.value_at_quantile(0.5),
                waited.max()
            ));
        }
        parts.push(format!(
            "{} unanswered at the end",
            self.unanswered_at_end.load(Relaxed)
        ));
        let errors = self.connection_errors.load(Relaxed);
        if errors > 0 {
            parts.push(format!("{errors} connection errors"));
        }
        parts.join("; ")
    }
}

/// One attacker connection: `streams` calls at a time, each sending headers only and waiting
/// for its answer, then reopened after `pause`, until `end`; a lost connection is remade.
async fn half_open_connection(
    addr: SocketAddr,
    token: String,
    streams: usize,
    pause: Duration,
    end: Instant,
    answers: Arc<Answers>,
) {
    while Instant::now() < end {
        let Ok(Ok(tcp)) = timeout_at(end, connect_from(None, addr)).await else {
            answers.connection_errors.fetch_add(1, Relaxed);
            sleep_until((Instant::now() + pause).min(end)).await;
            continue;
        };
        let Ok((client, connection)) = h2::client::handshake(tcp).await else {
            answers.connection_errors.fetch_add(1, Relaxed);
            continue;
        };
        let driver = tokio::spawn(connection);
        let mut slots = JoinSet::new();
        for _ in 0..streams {
            let (client, token, answers) = (client.clone(), token.clone(), answers.clone());
            slots.spawn(async move {
                while Instant::now() < end {
                    let Ok(mut ready) = client.clone().ready().await else {
                        answers.connection_errors.fetch_add(1, Relaxed);
                        return;
                    };
                    let request = grpc_request(addr, VALIDATE_PATH, Some(&token));
                    let Ok((response, send)) = ready.send_request(request, false) else {
                        answers.connection_errors.fetch_add(1, Relaxed);
                        return;
                    };
                    answers.sent.fetch_add(1, Relaxed);
                    let sent = Instant::now();
                    match timeout_at(end, final_status(response)).await {
                        Ok(outcome) => answers.record(outcome, sent.elapsed()),
                        Err(_) => {
                            answers.unanswered_at_end.fetch_add(1, Relaxed);
                            return;
                        }
                    }
                    // The body was never sent; its stream goes only now.
                    drop(send);
                    sleep_until((Instant::now() + pause).min(end)).await;
                }
            });
        }
        slots.join_all().await;
        driver.abort();
    }
}

/// The grpc-status (and ErrorInfo reason) a call was answered with, from the response
/// headers (a trailers-only answer) or its trailers.
async fn final_status(response: h2::client::ResponseFuture) -> String {
    let response = match response.await {
        Ok(response) => response,
        Err(err) => return format!("stream error ({err})"),
    };
    if let Some(status) = Status::from_header_map(response.headers()) {
        return describe(status);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Err(err) => return format!("stream error ({err})"),
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => {
            Status::from_header_map(&trailers).map_or_else(|| "no grpc-status".into(), describe)
        }
        Ok(None) => "no trailers".into(),
        Err(err) => format!("stream error ({err})"),
    }
}

// ---------------------------------------------------------------------------------------
// 3. Health watches
// ---------------------------------------------------------------------------------------

async fn health_watches(databases: &Databases) -> Vec<Row> {
    let url = databases.fresh("apikeys_hostile_watches").await;
    let server = Server::start(&url, &["--metrics-listen", "127.0.0.1:0"], None);
    let (addr, metrics) = (server.addrs.grpc, server.addrs.metrics.unwrap());
    let key = create_key(addr, None, "acme").await;
    println!("# 3. health watches, unauthenticated (no callers file)");
    let mut rows = Vec::new();
    for (name, connections, per_connection, send_for, hold_for) in [
        ("3. health watches, two connections", 2, 20_000, 8, 10),
        ("3b. health watches, up to the global cap", 80, 20, 4, 6),
    ] {
        let watches = Arc::new(Watches::default());
        let honest_watch = Arc::new(Mutex::new(None));
        let (tally, _, usage) =
            with_honest_gateway(&server, &key, Duration::from_secs(hold_for), None, |end| {
                let watches = watches.clone();
                let honest_watch = honest_watch.clone();
                async move {
                    let send_until = end - Duration::from_secs(hold_for - send_for);
                    let mut flood = JoinSet::new();
                    for _ in 0..connections {
                        flood.spawn(watch_connection(
                            addr,
                            per_connection,
                            send_until,
                            end,
                            watches.clone(),
                        ));
                    }
                    // An honest client's watch on a new connection, while the flood holds.
                    sleep_until(send_until).await;
                    *honest_watch.lock().unwrap() =
                        Some(honest_watch_on_new_connection(addr).await);
                    flood.join_all().await;
                }
            })
            .await;
        let held = watches.held.load(Relaxed);
        let open_after = scrape(metrics)
            .await
            .ok()
            .and_then(|m| sample(&m, "apikeys_connections_open"))
            .map_or("?".into(), |n| n.to_string());
        let row = Row {
            attack: name.into(),
            size: format!(
                "{connections} connections try to open {} Watch streams in all ({} each, for up to {send_for} s), holding every one they get for {hold_for} s from the start",
                thousands((connections * per_connection) as u64),
                thousands(per_connection as u64)
            ),
            honest: format!(
                "gateway (connection opened before): ValidateKey {}; a new connection's Watch: {}",
                tally.summary(),
                honest_watch
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap_or_else(|| "?".into())
            ),
            cpu: usage.cpu(),
            rss: usage.rss(),
            held: format!(
                "{} attempted: {} held open, {}; {} log lines; {open_after} connections open {} s after",
                thousands(watches.sent.load(Relaxed)),
                thousands(held),
                watches.describe_refusals(),
                usage.log_lines,
                SETTLE.as_secs()
            ),
        };
        println!("{}", row.markdown());
        rows.push(row);
    }
    rows
}

#[derive(Default)]
struct Watches {
    sent: AtomicU64,
    held: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
}

impl Watches {
    fn describe_refusals(&self) -> String {
        let refused = self.refused.lock().unwrap();
        if refused.is_empty() {
            return "none refused".into();
        }
        refused
            .iter()
            .map(|(outcome, n)| format!("{} refused {outcome}", thousands(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One connection opening Watch streams, one after another as fast as the server's stream
/// limit lets it, until `attempts` or `send_until`; the ones it gets are held until `end`.
async fn watch_connection(
    addr: SocketAddr,
    attempts: usize,
    send_until: Instant,
    end: Instant,
    watches: Arc<Watches>,
) {
    let Ok(tcp) = connect_from(None, addr).await else {
        return;
    };
    let Ok((mut client, connection)) = h2::client::handshake(tcp).await else {
        return;
    };
    let driver = tokio::spawn(connection);
    let mut pending = JoinSet::new();
    let mut held = Vec::new();
    let settle = |outcome: Result<h2::RecvStream, String>, held: &mut Vec<_>| match outcome {
        Ok(stream) => {
            watches.held.fetch_add(1, Relaxed);
            held.push(stream);
        }
        Err(outcome) => *watches.refused.lock().unwrap().entry(outcome).or_default() += 1,
    };
    for _ in 0..attempts {
        let Ok(Ok(ready)) = timeout_at(send_until, client.clone().ready()).await else {
            break;
        };
        client = ready;
        let Ok((response, mut body)) =
            client.send_request(grpc_request(addr, WATCH_PATH, None), false)
        else {
            break;
        };
        // The empty HealthCheckRequest, framed: not compressed, length 0.
        let _ = body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        watches.sent.fetch_add(1, Relaxed);
        pending.spawn(async move {
            let response = response.await.map_err(|err| match err.reason() {
                // Opened over the server's stream limit (h2 lets a client send before it has
                // read the server's SETTINGS): refused before any handler saw it.
                Some(h2::Reason::REFUSED_STREAM) => {
                    "by HTTP/2 (REFUSED_STREAM, over the 256-stream limit)".to_owned()
                }
                _ => format!("stream error ({err})"),
            })?;
            match Status::from_header_map(response.headers()) {
                Some(status) => Err(describe(status)),
                None => Ok(response.into_body()),
            }
        });
        while let Some(done) = pending.try_join_next() {
            settle(done.unwrap(), &mut held);
        }
    }
    while let Ok(Some(done)) = timeout_at(end, pending.join_next()).await {
        settle(done.unwrap(), &mut held);
    }
    sleep_until(end).await;
    drop(held);
    drop(client);
    driver.abort();
}

/// An honest client's health Watch on a connection of its own: its first message, or why not.
async fn honest_watch_on_new_connection(addr: SocketAddr) -> String {
    let started = Instant::now();
    let outcome = timeout(Duration::from_secs(2), async {
        let mut health = HealthClient::new(connect(addr).await);
        let mut stream = health
            .watch(HealthCheckRequest::default())
            .await
            .map_err(describe)?
            .into_inner();
        let first = stream.message().await.map_err(describe)?;
        Ok::<_, String>(first.map_or(0, |m| m.status))
    })
    .await;
    match outcome {
        Ok(Ok(1)) => format!("SERVING in {}", ms(started.elapsed())),
        Ok(Ok(status)) => format!("status {status} in {}", ms(started.elapsed())),
        Ok(Err(err)) => format!("refused {err}"),
        Err(_) => "no answer within 2 s".into(),
    }
}

// ---------------------------------------------------------------------------------------
// 4. Management rates
// ---------------------------------------------------------------------------------------

async fn management(databases: &Databases) -> Vec<Row> {
    const WORKSPACES: usize = 50;
    const QUIET_PER_SECOND: usize = 2_000;
    const BUSY_PER_SECOND: usize = 1_000;
    const SECONDS: u64 = 5;
    let url = databases.fresh("apikeys_hostile_management").await;
    let server = Server::start(&url, &[], None);
    let addr = server.addrs.grpc;
    println!("# 4. management rates: one admin backend, no callers file, default limits");

    // 200 CreateKey at once, in one workspace.
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Instant>();
    let creates = on_own_thread("admin-creates", move || async move {
        let client = ApiKeysClient::new(connect(addr).await);
        let _ = ready_tx.send(());
        go_rx.await.unwrap();
        let tally = Arc::new(Mutex::new(Tally::new()));
        let mut calls = JoinSet::new();
        for n in 0..200 {
            let (mut client, tally) = (client.clone(), tally.clone());
            calls.spawn(async move {
                let request = create("launch", &format!("launch key {n}"), None);
                let sent = Instant::now();
                let outcome = client.create_key(request).await;
                let took = sent.elapsed();
                tally
                    .lock()
                    .unwrap()
                    .record(took, outcome.map(drop).map_err(describe));
            });
        }
        calls.join_all().await;
        Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
    });
    ready_rx.await.unwrap();
    let window = Window::open(&server);
    go_tx.send(Instant::now()).unwrap();
    let created = join(creates).await;
    let usage = window.close(&server).await;
    let mut rows = vec![Row {
        attack: "4. management burst".into(),
        size: "200 CreateKey at once from one admin backend, one workspace".into(),
        honest: format!("the same backend: {}", created.summary()),
        cpu: usage.cpu(),
        rss: usage.rss(),
        held: refusal_summary(&created),
    }];
    println!("{}", rows[0].markdown());

    // 2,000 ListKeys/s over 50 workspaces, alone and then beside one workspace at 1,000/s.
    let (ready_tx, ready_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<Instant>();
    let lists = on_own_thread("admin-lists", move || async move {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(connect(addr).await);
        }
        let busy_channel = connect(addr).await;
        let _ = ready_tx.send(());
        let end = go_rx.await.unwrap();
        let quiet_alone = open_loop(
            &channels,
            QUIET_PER_SECOND,
            WORKSPACES,
            end - Duration::from_secs(SECONDS),
        )
        .await;
        let (quiet, busy) = open_loop_with_busy(
            &channels,
            &busy_channel,
            QUIET_PER_SECOND,
            WORKSPACES,
            BUSY_PER_SECOND,
            end,
        )
        .await;
        (quiet_alone, quiet, busy)
    });
    ready_rx.await.unwrap();
    let alone_for = Duration::from_secs(3);
    let window = Window::open(&server);
    go_tx
        .send(Instant::now() + alone_for + Duration::from_secs(SECONDS))
        .unwrap();
    let (quiet_alone, quiet, busy) = join(lists).await;
    let usage = window.close(&server).await;
    let (busy_tally, retry_info) = busy;
    let row = Row {
        attack: "4b. management rates".into(),
        size: format!(
            "ListKeys at {} calls/s spread over {WORKSPACES} workspaces ({} /s each), {SECONDS} s, beside one workspace at {} calls/s (10× its share of 100/s); 3 s of the {WORKSPACES} alone first",
            thousands(QUIET_PER_SECOND as u64),
            QUIET_PER_SECOND / WORKSPACES,
            thousands(BUSY_PER_SECOND as u64)
        ),
        honest: format!(
            "the {WORKSPACES} workspaces alone: {}; beside the busy one: {}",
            quiet_alone.summary(),
            quiet.summary()
        ),
        cpu: usage.cpu(),
        rss: usage.rss(),
        held: format!(
            "the {WORKSPACES} workspaces: {}; the busy one: {} answered, {} ({} with RetryInfo)",
            refusal_summary(&quiet),
            thousands(busy_tally.calls - busy_tally.error_count()),
            busy_tally.errors_described(),
            thousands(retry_info)
        ),
    };
    println!("{}", row.markdown());
    rows.push(row);
    rows
}

fn refusal_summary(tally: &Tally) -> String {
    if tally.error_count() == 0 {
        format!("none of {} refused", thousands(tally.calls))
    } else {
        format!(
            "{} of {} REFUSED: {}",
            thousands(tally.error_count()),
            thousands(tally.calls),
            tally.errors_described()
        )
    }
}

/// ListKeys at `per_second` over `workspaces`, open loop (sent on schedule, whatever the
/// answers), until `end`.
async fn open_loop(
    channels: &[Channel],
    per_second: usize,
    workspaces: usize,
    end: Instant,
) -> Tally {
    open_loop_with_busy(channels, &channels[0], per_second, workspaces, 0, end)
        .await
        .0
}

/// As [`open_loop`], with `busy_per_second` more in one workspace of its own on `busy`;
/// returns both tallies and how many of the busy refusals carried RetryInfo.
async fn open_loop_with_busy(
    channels: &[Channel],
    busy: &Channel,
    per_second: usize,
    workspaces: usize,
    busy_per_second: usize,
    end: Instant,
) -> (Tally, (Tally, u64)) {
    // Every 10 ms, a hundredth of a second's calls.
    let (quiet_per_tick, busy_per_tick) = (per_second / 100, busy_per_second / 100);
    let quiet = Arc::new(Mutex::new(Tally::new()));
    let busy_tally = Arc::new(Mutex::new(Tally::new()));
    let retry_info = Arc::new(AtomicU64::new(0));
    let mut calls = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..quiet_per_tick {
            let mut client = ApiKeysClient::new(channels[n % channels.len()].clone());
            let request = list(&format!("tenant-{}", n % workspaces), None);
            let tally = quiet.clone();
            calls.spawn(async move {
                let sent = Instant::now();
                let outcome = timeout(Duration::from_secs(5), client.list_keys(request)).await;
                let took = sent.elapsed();
                let outcome = match outcome {
                    Ok(outcome) => outcome.map(drop).map_err(describe),
                    Err(_) => Err("no answer within 5 s".into()),
                };
                tally.lock().unwrap().record(took, outcome);
            });
            n += 1;
        }
        for _ in 0..busy_per_tick {
            let mut client = ApiKeysClient::new(busy.clone());
            let request = list("busy-tenant", None);
            let (tally, retry_info) = (busy_tally.clone(), retry_info.clone());
            calls.spawn(async move {
                let sent = Instant::now();
                let outcome = timeout(Duration::from_secs(5), client.list_keys(request)).await;
                let took = sent.elapsed();
                let outcome = match outcome {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => {
                        if status.get_details_retry_info().is_some() {
                            retry_info.fetch_add(1, Relaxed);
                        }
                        Err(describe(status))
                    }
                    Err(_) => Err("no answer within 5 s".into()),
                };
                tally.lock().unwrap().record(took, outcome);
            });
        }
        while calls.try_join_next().is_some() {}
    }
    calls.join_all().await;
    let unwrap =
        |tally: Arc<Mutex<Tally>>| Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    (
        unwrap(quiet),
        (unwrap(busy_tally), retry_info.load(Relaxed)),
    )
}

// ---------------------------------------------------------------------------------------
// 5. Concurrent start
// ---------------------------------------------------------------------------------------

async fn concurrent_start(databases: &Databases) -> Row {
    const TRIALS: usize = 5;
    const REPLICAS: usize = 3;
    println!(
        "# 5. concurrent start: {REPLICAS} replicas and 1 `apikeys migrate` at once on an empty database, {TRIALS} trials"
    );
    let (mut started, mut migrated, mut slowest) = (0, 0, Duration::ZERO);
    let mut failures = Vec::new();
    for trial in 0..TRIALS {
        let url = databases
            .fresh(&format!("apikeys_hostile_start_{trial}"))
            .await;
        let began = Instant::now();
        let replicas: Vec<Server> = (0..REPLICAS)
            .map(|_| Server::spawn(&url, &[], None))
            .collect();
        let migrate = Command::new(BIN)
            .arg("migrate")
            .env("APIKEYS_DATABASE_URL", &url)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start apikeys migrate");
        let (replicas, outcomes, migration) = tokio::task::spawn_blocking(move || {
            let outcomes: Vec<_> = replicas
                .iter()
                .map(|replica| {
                    let outcome = replica.serving(Duration::from_secs(60));
                    (outcome, began.elapsed())
                })
                .collect();
            let migration = migrate.wait_with_output().unwrap();
            (replicas, outcomes, migration)
        })
        .await
        .unwrap();
        for (n, (outcome, took)) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(_) => {
                    started += 1;
                    slowest = slowest.max(took);
                }
                Err(logs) => failures.push(format!(
                    "trial {trial} replica {n}: {}",
                    logs.lines().last().unwrap_or("no logs")
                )),
            }
        }
        if migration.status.success() {
            migrated += 1;
        } else {
            let stderr = String::from_utf8_lossy(&migration.stderr);
            failures.push(format!(
                "trial {trial} migrate: {}",
                stderr.lines().last().unwrap_or("no logs")
            ));
        }
        drop(replicas);
    }
    for failure in &failures {
        println!("#   {failure}");
    }
    let row = Row {
        attack: "5. concurrent start".into(),
        size: format!(
            "{REPLICAS} replicas + 1 `apikeys migrate` started at once on an empty {} database, {TRIALS} trials",
            databases.backend()
        ),
        honest: "-".into(),
        cpu: "-".into(),
        rss: "-".into(),
        held: format!(
            "{started} of {} replicas served (slowest {} after the spawn), {migrated} of {TRIALS} migrate runs exited 0{}",
            REPLICAS * TRIALS,
            ms(slowest),
            if failures.is_empty() {
                String::new()
            } else {
                format!("; FAILED: {}", failures.join("; "))
            }
        ),
    };
    println!("{}", row.markdown());
    row
}

// ---------------------------------------------------------------------------------------
// The server, its databases and what it uses
// ---------------------------------------------------------------------------------------

/// The `apikeys` binary, killed when dropped (on a panic too).
struct Server {
    child: Child,
    log: Arc<Log>,
    ready: std::sync::mpsc::Receiver<Result<Addrs, String>>,
    addrs: Addrs,
}

#[derive(Debug, Clone, Copy)]
struct Addrs {
    grpc: SocketAddr,
    metrics: Option<SocketAddr>,
}

/// The server's log: how many lines, and the first few hundred (for start-up failures).
#[derive(Default)]
struct Log {
    lines: AtomicU64,
    kept: Mutex<Vec<String>>,
}

impl Server {
    /// Starts the binary on a port of its own (port 0: the server logs which), waits until
    /// it logs "serving gRPC", or panics with its logs.
    fn start(database_url: &str, args: &[&str], descriptor_limit: Option<u32>) -> Self {
        let mut server = Self::spawn(database_url, args, descriptor_limit);
        match server.serving(Duration::from_secs(60)) {
            Ok(addrs) => server.addrs = addrs,
            Err(logs) => panic!("apikeys did not start:\n{logs}"),
        }
        server
    }

    /// Starts the binary without waiting; see [`Server::serving`].
    fn spawn(database_url: &str, args: &[&str], descriptor_limit: Option<u32>) -> Self {
        let mut command = match descriptor_limit {
            Some(limit) => {
                let mut command = Command::new("sh");
                command.args([
                    "-c",
                    &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                    BIN,
                ]);
                command
            }
            None => Command::new(BIN),
        };
        command
            .args(args)
            .env("APIKEYS_LISTEN", "127.0.0.1:0")
            .env("APIKEYS_DATABASE_URL", database_url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start apikeys");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        let (tx, ready) = std::sync::mpsc::channel();
        let kept = log.clone();
        // Keep draining after "serving gRPC": a closed pipe would fail the server's writes.
        std::thread::spawn(move || {
            let (mut metrics, mut serving) = (None, false);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lines.fetch_add(1, Relaxed);
                let mut lines = kept.kept.lock().unwrap();
                if lines.len() < 500 {
                    lines.push(line.clone());
                }
                drop(lines);
                if serving {
                    continue;
                }
                if line.contains("serving Prometheus metrics") {
                    metrics = field(&line, "addr").and_then(|a| a.parse().ok());
                }
                if line.contains("serving gRPC")
                    && let Some(grpc) = field(&line, "addr").and_then(|a| a.parse().ok())
                {
                    serving = true;
                    let _ = tx.send(Ok(Addrs { grpc, metrics }));
                }
            }
            if !serving {
                let _ = tx.send(Err(kept.kept.lock().unwrap().join("\n")));
            }
        });
        Self {
            child,
            log,
            ready,
            addrs: Addrs {
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                metrics: None,
            },
        }
    }

    /// Its addresses once it serves, or its logs if it exits first.
    fn serving(&self, within: Duration) -> Result<Addrs, String> {
        match self.ready.recv_timeout(within) {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no \"serving gRPC\" within {within:?}")),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `name=value` from the first kept log line containing `message`.
    fn log_field(&self, message: &str, name: &str) -> Option<String> {
        let lines = self.log.kept.lock().unwrap();
        lines
            .iter()
            .find(|line| line.contains(message))
            .and_then(|line| field(line, name))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `value` of `name=value` in a text log line.
fn field(line: &str, name: &str) -> Option<String> {
    let rest = line.split(&format!("{name}=")).nth(1)?;
    Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
}

/// Where the servers' databases live: SQLite files in a temporary directory, or databases on
/// the PostgreSQL server of APIKEYS_BENCH_DATABASE_URL.
struct Databases {
    dir: tempfile::TempDir,
    postgres: Option<String>,
    made: Mutex<Vec<String>>,
}

impl Databases {
    async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            postgres: std::env::var("APIKEYS_BENCH_DATABASE_URL")
                .ok()
                .filter(|url| url.starts_with("postgres")),
            made: Mutex::default(),
        }
    }

    fn backend(&self) -> &'static str {
        if self.postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    }

    fn describe(&self) -> String {
        match &self.postgres {
            Some(url) => format!(
                "PostgreSQL, a fresh database per server beside {}",
                redact(url)
            ),
            None => "SQLite, a fresh file per server in a temp dir".into(),
        }
    }

    /// An empty database called `name`.
    async fn fresh(&self, name: &str) -> String {
        use sea_orm::{ConnectionTrait, Database};
        let Some(url) = &self.postgres else {
            return format!(
                "sqlite://{}?mode=rwc",
                self.dir.path().join(format!("{name}.db")).display()
            );
        };
        let admin = Database::connect(url.as_str()).await.unwrap();
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        self.made.lock().unwrap().push(name.to_owned());
        let (base, query) = url
            .split_once('?')
            .map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
        let server = &base[..base.rfind('/').unwrap()];
        format!(
            "{server}/{name}{}",
            query.map(|q| format!("?{q}")).unwrap_or_default()
        )
    }

    /// Drops the PostgreSQL databases made (the servers are gone by now).
    async fn drop_all(&self) {
        use sea_orm::{ConnectionTrait, Database};
        let Some(url) = &self.postgres else { return };
        let made = std::mem::take(&mut *self.made.lock().unwrap());
        let admin = Database::connect(url.as_str()).await.unwrap();
        for name in made {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
        let _ = admin.close().await;
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// User + system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// Resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the server used during an attack: CPU, memory (sampled every 100 ms), log lines.
struct Window {
    pid: u32,
    cpu: f64,
    own_cpu: f64,
    lines: u64,
    rss_before: u64,
    started: Instant,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
}

impl Window {
    fn open(server: &Server) -> Self {
        let pid = server.pid();
        let rss_before = rss_kib(pid);
        let (peak, stop) = (
            Arc::new(AtomicU64::new(rss_before)),
            Arc::new(AtomicBool::new(false)),
        );
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    peak.fetch_max(rss_kib(pid), Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            pid,
            cpu: cpu_seconds(pid),
            own_cpu: cpu_seconds(std::process::id()),
            lines: server.log.lines.load(Relaxed),
            rss_before,
            started: Instant::now(),
            peak,
            stop,
            sampler,
        }
    }

    /// Ends the window, then waits [`SETTLE`] for the memory after.
    async fn close(self, server: &Server) -> Usage {
        let seconds = self.started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(self.pid) - self.cpu;
        let own_cpu = cpu_seconds(std::process::id()) - self.own_cpu;
        let log_lines = server.log.lines.load(Relaxed) - self.lines;
        self.stop.store(true, Relaxed);
        self.sampler.join().unwrap();
        let rss_peak = self.peak.load(Relaxed).max(rss_kib(self.pid));
        sleep(SETTLE).await;
        Usage {
            seconds,
            cpu,
            own_cpu,
            log_lines,
            rss_before: self.rss_before,
            rss_peak,
            rss_after: rss_kib(self.pid),
        }
    }
}

struct Usage {
    seconds: f64,
    cpu: f64,
    own_cpu: f64,
    log_lines: u64,
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
}

impl Usage {
    fn cpu(&self) -> String {
        format!(
            "{:.2} s in {:.1} s ({:.0} % of a core); generator {:.2} s",
            self.cpu,
            self.seconds,
            100.0 * self.cpu / self.seconds,
            self.own_cpu
        )
    }

    fn rss(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        format!(
            "{:.1} → {:.1} → {:.1}",
            mib(self.rss_before),
            mib(self.rss_peak),
            mib(self.rss_after)
        )
    }
}

// ---------------------------------------------------------------------------------------
// Honest callers
// ---------------------------------------------------------------------------------------

/// Runs `f` on an OS thread of its own with a single-threaded runtime of its own.
fn on_own_thread<T, F, Fut>(name: &str, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .unwrap()
}

async fn join<T: Send + 'static>(thread: std::thread::JoinHandle<T>) -> T {
    match tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
    {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Calls `call` every `period` until `end`, timing each call.
async fn every<F, Fut>(period: Duration, end: Instant, mut call: F) -> Tally
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut tally = Tally::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0;
    while Instant::now() < end {
        tick.tick().await;
        let call = call(n);
        let sent = Instant::now();
        let outcome = call.await;
        tally.record(sent.elapsed(), outcome);
        n += 1;
    }
    tally
}

/// Calls, their latency (µs) and their errors by status and reason.
struct Tally {
    latency: Histogram<u64>,
    calls: u64,
    errors: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: histogram(),
            calls: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, took: Duration, outcome: Result<(), String>) {
        self.calls += 1;
        self.latency
            .saturating_record(took.as_micros().max(1) as u64);
        if let Err(error) = outcome {
            *self.errors.entry(error).or_default() += 1;
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn errors_described(&self) -> String {
        self.errors
            .iter()
            .map(|(error, n)| format!("{} {error}", thousands(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let errors = match self.error_count() {
            0 => "0 errors".to_owned(),
            n => format!("**{} errors** ({})", thousands(n), self.errors_described()),
        };
        format!(
            "p50 {:.2} / p99 {:.2} / max {:.1} ms, {errors} in {} calls",
            ms(self.latency.value_at_quantile(0.5)),
            ms(self.latency.value_at_quantile(0.99)),
            ms(self.latency.max()),
            thousands(self.calls)
        )
    }
}

/// A status as `Code REASON` (the ErrorInfo reason), or with its message when it has none.
fn describe(status: Status) -> String {
    match status.get_details_error_info() {
        Some(info) => format!("{:?} {}", status.code(), info.reason),
        None if status.code() == tonic::Code::Ok => "OK".into(),
        None => {
            let message: String = status.message().chars().take(60).collect();
            format!("{:?} ({message})", status.code())
        }
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to apikeys")
}

fn with_caller<T>(mut request: Request<T>, bearer: Option<&str>) -> Request<T> {
    if let Some(token) = bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn as_owner<T>(message: T, bearer: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-actor-id", "bench".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-actor-role", "owner".parse().unwrap());
    with_caller(request, bearer)
}

fn validate(key: &str, bearer: Option<&str>) -> Request<ValidateKeyRequest> {
    with_caller(
        Request::new(ValidateKeyRequest {
            key: key.to_owned(),
            client_ip: "203.0.113.7".into(),
            ..Default::default()
        }),
        bearer,
    )
}

fn list(workspace: &str, bearer: Option<&str>) -> Request<ListKeysRequest> {
    as_owner(
        ListKeysRequest {
            workspace_id: workspace.to_owned(),
            ..Default::default()
        },
        bearer,
    )
}

fn create(workspace: &str, name: &str, bearer: Option<&str>) -> Request<CreateKeyRequest> {
    as_owner(
        CreateKeyRequest {
            workspace_id: workspace.to_owned(),
            name: name.to_owned(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        },
        bearer,
    )
}

/// A new key's secret, for the honest gateway to validate.
async fn create_key(addr: SocketAddr, bearer: Option<&str>, workspace: &str) -> String {
    ApiKeysClient::new(connect(addr).await)
        .create_key(create(workspace, "honest gateway's key", bearer))
        .await
        .expect("CreateKey")
        .into_inner()
        .secret
}

/// A new caller token from `apikeys caller-token new`: the token and its callers-file line.
fn caller_token(name: &str, role: &str) -> (String, String) {
    let out = Command::new(BIN)
        .args(["caller-token", "new", name, "--role", role])
        .output()
        .expect("apikeys caller-token new");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let token = lines.next().expect("a token").to_owned();
    let line = lines.next().expect("a callers-file line").to_owned();
    (token, line)
}

fn set_mode_600(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// An HTTP/2 gRPC request's headers, for the raw h2 attackers.
fn grpc_request(addr: SocketAddr, path: &str, bearer: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

/// GET /metrics over HTTP/1.1.
async fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|err| format!("write: {err}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|err| format!("read: {err}"))?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(response)
    } else if response.is_empty() {
        Err("closed without an answer".into())
    } else {
        Err(response.lines().next().unwrap_or("").to_owned())
    }
}

/// A sample's value, by its name and labels as the exposition writes them.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The table row of one attack.
struct Row {
    attack: String,
    size: String,
    honest: String,
    cpu: String,
    rss: String,
    held: String,
}

impl Row {
    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.attack, self.size, self.honest, self.cpu, self.rss, self.held
        )
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
