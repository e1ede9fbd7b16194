//! Closed-loop gRPC load generator: ValidateKey (hits, unknown keys, malformed keys) against a
//! real `apikeys` process, and the same RPC against a bare tonic service that answers at once
//! (the transport baseline), with the servers pinned to core 0 and this generator to core 1.
//!
//!     cargo bench --bench load                      # SQLite in a temp dir, 3 rounds × 5 s per scenario
//!     cargo bench --bench load -- --seconds 5 --concurrency 64 --database-url postgres://...
//!
//! Prints one line per scenario: throughput, p50/p99/p999 latency and the ratio to the echo
//! baseline. BENCHMARKS.md quotes its output. Two more measurements:
//!
//!     cargo bench --bench load -- --startup-keys 1000000 [--database-url postgres://HOST/DB]
//!         index load time and resident memory with that many stored keys (and with none)
//!     cargo bench --bench load -- --revocation-trials 200 --database-url postgres://HOST/DB
//!         two replicas: time from DeleteKey on A to DELETED on B, plain and with B's
//!         listener connection killed before each delete
//!
//! A PostgreSQL URL names a server database this tool may create databases beside.
//!
//! With `--db-backed-bin PATH` (a build of commit f4f862b, whose ValidateKey read the database
//! on every call) that server runs too, on a database of its own, and its ValidateKey hits and
//! unknown keys join the rounds: the database-backed baseline, measured in the same run.
//!
//! With `--previous-bin PATH` (a build of an earlier commit of this service) that server runs
//! too, likewise, so a change's effect on ValidateKey is measured in one run, not across runs.
//!
//! A second apikeys server with usage recording off (`APIKEYS_RECORD_USAGE=false`) always
//! runs beside the default one, so the cost of counting usage is measured in the same run.
//! Every ValidateKey request carries a `client_ip` (one of 16 per scenario), as a gateway's
//! would. `ext_authz Check hit` asks the same server with Envoy's Check, as Envoy does (the
//! key in `authorization: Bearer`, the client's address in the attributes).

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{
    self, ApiKey, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse,
    DisableKeyRequest, EnableKeyRequest, Expiration, GetKeyRequest, GetKeyUsageRequest,
    GetKeyUsageResponse, ListKeyEventsRequest, ListKeyEventsResponse, ListKeysRequest,
    ListKeysResponse, RotateKeyRequest, RotateKeyResponse, UpdateKeyRequest, ValidateKeyRequest,
    ValidateKeyResponse, ValidationResult,
    api_keys_client::ApiKeysClient,
    api_keys_server::{ApiKeys, ApiKeysServer},
};
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address},
    service::auth::v3::{
        AttributeContext, CheckRequest, attribute_context,
        authorization_client::AuthorizationClient,
    },
};
use hdrhistogram::Histogram;
use tonic::{Request, Response, Status, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_apikeys");

#[derive(Debug, Clone)]
struct Options {
    seconds: u64,
    rounds: usize,
    warmup: u64,
    concurrency: usize,
    connections: usize,
    keys: usize,
    database_url: Option<String>,
    server_core: String,
    client_core: String,
    startup_keys: Option<usize>,
    revocation_trials: Option<usize>,
    db_backed_bin: Option<String>,
    previous_bin: Option<String>,
}

fn options() -> Options {
    let mut options = Options {
        seconds: 5,
        rounds: 3,
        warmup: 1,
        concurrency: 64,
        connections: 4,
        keys: 1000,
        database_url: None,
        server_core: "0".into(),
        client_core: "1".into(),
        startup_keys: None,
        revocation_trials: None,
        db_backed_bin: None,
        previous_bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--rounds" => options.rounds = value().parse().unwrap(),
            "--warmup" => options.warmup = value().parse().unwrap(),
            "--concurrency" => options.concurrency = value().parse().unwrap(),
            "--connections" => options.connections = value().parse().unwrap(),
            "--keys" => options.keys = value().parse().unwrap(),
            "--database-url" => options.database_url = Some(value()),
            "--server-core" => options.server_core = value(),
            "--client-core" => options.client_core = value(),
            "--startup-keys" => options.startup_keys = Some(value().parse().unwrap()),
            "--revocation-trials" => options.revocation_trials = Some(value().parse().unwrap()),
            "--db-backed-bin" => options.db_backed_bin = Some(value()),
            "--previous-bin" => options.previous_bin = Some(value()),
            "--serve-echo" => serve_echo(&value()),
            "--bench" => {} // cargo bench passes this to every bench target
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

fn main() {
    let options = options();
    // Pin this process (and the runtime threads it is about to start) to the client core.
    pin(std::process::id(), &options.client_core);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    if let Some(n) = options.startup_keys {
        return run_startup(&options, n).await;
    }
    if let Some(trials) = options.revocation_trials {
        return run_revocation(&options, trials).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let database_url = options.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        )
    });
    println!(
        "# {} rounds of {} s per scenario after {} s warm-up, {} requests in flight over {} connections; servers on core {}, generator on core {}",
        options.rounds,
        options.seconds,
        options.warmup,
        options.concurrency,
        options.connections,
        options.server_core,
        options.client_core
    );
    println!("# database: {}", redact(&database_url));

    let echo = Server::start_echo(&options);
    let apikeys = Server::start_apikeys(&options, BIN, &database_url, &[]);
    let usage_off_url = fresh_database(&options, dir.path(), "apikeys_bench_usage_off").await;
    let usage_off = Server::start_apikeys(
        &options,
        BIN,
        &usage_off_url,
        &[("APIKEYS_RECORD_USAGE", "false")],
    );
    let db_backed = match &options.db_backed_bin {
        Some(bin) => {
            let url = fresh_database(&options, dir.path(), "apikeys_bench_db_backed").await;
            Some(Server::start_apikeys(&options, bin, &url, &[]))
        }
        None => None,
    };
    let previous = match &options.previous_bin {
        Some(bin) => {
            let url = fresh_database(&options, dir.path(), "apikeys_bench_previous").await;
            Some(Server::start_apikeys(&options, bin, &url, &[]))
        }
        None => None,
    };

    let echo_channels = channels(&echo.addr, options.connections).await;
    let api_channels = channels(&apikeys.addr, options.connections).await;
    let secrets = create_keys(&api_channels[0], options.keys, &[]).await;
    // The same keys with two scopes each, validated with one of them required.
    let scoped_secrets = create_keys(
        &api_channels[0],
        options.keys,
        &["bench:read", "bench:write"],
    )
    .await;
    let unknown: Vec<String> = (0..options.keys)
        .map(|_| apikeys::domain::Secret::generate().expose().to_owned())
        .collect();
    let malformed: Vec<String> = (0..options.keys)
        .map(|i| format!("clo_not-a-key-{i}"))
        .collect();

    // Rounds interleave the scenarios so that the machine's drift hits them alike; each
    // line reports the median round's throughput and the latency of all rounds together.
    let db_backed_channels = match &db_backed {
        Some(server) => channels(&server.addr, options.connections).await,
        None => Vec::new(),
    };
    let db_backed_secrets = match db_backed_channels.first() {
        Some(channel) => create_keys(channel, options.keys, &[]).await,
        None => Vec::new(),
    };
    let usage_off_channels = channels(&usage_off.addr, options.connections).await;
    let usage_off_secrets = create_keys(&usage_off_channels[0], options.keys, &[]).await;
    let previous_channels = match &previous {
        Some(server) => channels(&server.addr, options.connections).await,
        None => Vec::new(),
    };
    let previous_secrets = match previous_channels.first() {
        Some(channel) => create_keys(channel, options.keys, &[]).await,
        None => Vec::new(),
    };
    const NONE: &[&str] = &[];
    let mut plan: Vec<Scenario> = vec![
        (
            "echo (bare tonic)",
            &echo_channels,
            &unknown,
            NONE,
            ValidationResult::Valid,
            Call::ValidateKey,
        ),
        (
            "ValidateKey hit",
            &api_channels,
            &secrets,
            NONE,
            ValidationResult::Valid,
            Call::ValidateKey,
        ),
        (
            "ValidateKey unknown key",
            &api_channels,
            &unknown,
            NONE,
            ValidationResult::NotFound,
            Call::ValidateKey,
        ),
        (
            "ValidateKey malformed",
            &api_channels,
            &malformed,
            NONE,
            ValidationResult::Malformed,
            Call::ValidateKey,
        ),
        (
            "ValidateKey hit, scope required",
            &api_channels,
            &scoped_secrets,
            &["bench:read"],
            ValidationResult::Valid,
            Call::ValidateKey,
        ),
        (
            "ext_authz Check hit",
            &api_channels,
            &secrets,
            NONE,
            ValidationResult::Valid,
            Call::Check,
        ),
        (
            "ValidateKey hit, usage off",
            &usage_off_channels,
            &usage_off_secrets,
            NONE,
            ValidationResult::Valid,
            Call::ValidateKey,
        ),
    ];
    if db_backed.is_some() {
        plan.push((
            "DB-backed hit (f4f862b)",
            &db_backed_channels,
            &db_backed_secrets,
            NONE,
            ValidationResult::Valid,
            Call::ValidateKey,
        ));
        plan.push((
            "DB-backed unknown (f4f862b)",
            &db_backed_channels,
            &unknown,
            NONE,
            ValidationResult::NotFound,
            Call::ValidateKey,
        ));
    }
    if previous.is_some() {
        plan.push((
            "previous hit",
            &previous_channels,
            &previous_secrets,
            NONE,
            ValidationResult::Valid,
            Call::ValidateKey,
        ));
        plan.push((
            "previous unknown",
            &previous_channels,
            &unknown,
            NONE,
            ValidationResult::NotFound,
            Call::ValidateKey,
        ));
    }
    let mut results: Vec<(Vec<f64>, Histogram<u64>)> = plan
        .iter()
        .map(|_| {
            (
                Vec::new(),
                Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            )
        })
        .collect();
    for _ in 0..options.rounds {
        for ((_, channels, keys, required, expected, call), (rates, histogram)) in
            plan.iter().zip(&mut results)
        {
            let (rate, measured) =
                scenario(channels, keys, required, *expected, *call, &options).await;
            rates.push(rate);
            histogram.add(measured).unwrap();
        }
    }
    let median = |rates: &[f64]| {
        let mut sorted = rates.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let echo_rate = median(&results[0].0);
    println!(
        "{:<32} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "req/s", "p50 µs", "p99 µs", "p999 µs", "× echo"
    );
    for ((name, ..), (rates, histogram)) in plan.iter().zip(&results) {
        println!(
            "{:<32} {:>10.0} {:>9} {:>9} {:>9} {:>8.2}",
            name,
            median(rates),
            histogram.value_at_quantile(0.50),
            histogram.value_at_quantile(0.99),
            histogram.value_at_quantile(0.999),
            median(rates) / echo_rate
        );
    }
    let rounds: Vec<String> = results[0]
        .0
        .iter()
        .zip(&results[1].0)
        .map(|(e, h)| format!("{:.2}", h / e))
        .collect();
    println!(
        "# ValidateKey hit / echo, round by round: {}",
        rounds.join(" ")
    );
    let rate_of = |name: &str| {
        plan.iter()
            .position(|(n, ..)| *n == name)
            .map(|i| median(&results[i].0))
    };
    let hit = rate_of("ValidateKey hit").unwrap();
    let unknown = rate_of("ValidateKey unknown key").unwrap();
    if let Some(off_at) = plan
        .iter()
        .position(|(n, ..)| *n == "ValidateKey hit, usage off")
    {
        let off = median(&results[off_at].0);
        let rounds: Vec<String> = results[1]
            .0
            .iter()
            .zip(&results[off_at].0)
            .map(|(on, off)| format!("{:.2}", on / off))
            .collect();
        println!(
            "# ValidateKey hit, usage on / off: {:.2} (round by round: {})",
            hit / off,
            rounds.join(" ")
        );
    }
    if let Some(check) = rate_of("ext_authz Check hit") {
        println!(
            "# ext_authz Check hit / ValidateKey hit: {:.2}",
            check / hit
        );
    }
    if let (Some(db_hit), Some(db_unknown)) = (
        rate_of("DB-backed hit (f4f862b)"),
        rate_of("DB-backed unknown (f4f862b)"),
    ) {
        println!(
            "# ValidateKey hit / DB-backed hit: {:.2}; unknown / DB-backed unknown: {:.2}",
            hit / db_hit,
            unknown / db_unknown
        );
    }
    if let (Some(previous_hit), Some(previous_unknown)) =
        (rate_of("previous hit"), rate_of("previous unknown"))
    {
        println!(
            "# ValidateKey hit / previous hit: {:.2}; unknown / previous unknown: {:.2}",
            hit / previous_hit,
            unknown / previous_unknown
        );
    }
    drop(previous);
    drop(db_backed);
    drop(usage_off);
    drop(apikeys);
    drop(echo);
}

/// A database of its own for one measurement: a SQLite file in `dir`, or a new PostgreSQL
/// database on the server of `--database-url`.
async fn fresh_database(options: &Options, dir: &std::path::Path, name: &str) -> String {
    use sea_orm::{ConnectionTrait, Database};
    match &options.database_url {
        Some(url) if url.starts_with("postgres") => {
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
            let (base, query) = url
                .split_once('?')
                .map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
            let server = &base[..base.rfind('/').unwrap()];
            format!(
                "{server}/{name}{}",
                query.map(|q| format!("?{q}")).unwrap_or_default()
            )
        }
        _ => format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("{name}.db")).display()
        ),
    }
}

async fn run_startup(options: &Options, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let empty = fresh_database(options, dir.path(), "apikeys_bench_empty").await;
    let full = fresh_database(options, dir.path(), "apikeys_bench_full").await;
    println!("# start-up with stored keys; database: {}", redact(&full));
    let (_, rss_empty, _) = startup(&empty, 0).await;
    let (load, rss_full, keys) = startup(&full, n).await;
    let per_key = rss_full.saturating_sub(rss_empty) as f64 / keys.max(1) as f64;
    println!(
        "{:<12} {:>14} {:>16} {:>14}",
        "keys", "index load ms", "process RSS MiB", "bytes per key"
    );
    println!(
        "{:<12} {:>14} {:>16.1} {:>14}",
        0,
        "-",
        rss_empty as f64 / 1048576.0,
        "-"
    );
    println!(
        "{:<12} {:>14} {:>16.1} {:>14.0}",
        keys,
        load.as_millis(),
        rss_full as f64 / 1048576.0,
        per_key
    );
}

async fn run_revocation(options: &Options, trials: usize) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(options, dir.path(), "apikeys_bench_revocation").await;
    assert!(
        url.starts_with("postgres"),
        "--revocation-trials needs --database-url postgres://..."
    );
    let status = Command::new(BIN)
        .arg("migrate")
        .env("APIKEYS_DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    println!(
        "# two replicas on one PostgreSQL: DeleteKey on A returns -> B answers DELETED; {trials} trials each"
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>9}",
        "scenario", "p50 ms", "p99 ms", "max ms", "trials"
    );
    for (name, kill) in [
        ("listener up", false),
        ("listener killed before each delete", true),
    ] {
        let delays = revocation(options, &url, trials, kill).await;
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<36} {:>9.2} {:>9.2} {:>9.2} {:>9}",
            name,
            ms(delays.value_at_quantile(0.5)),
            ms(delays.value_at_quantile(0.99)),
            ms(delays.max()),
            delays.len()
        );
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Runs one closed-loop scenario: its throughput and latency histogram (µs).
/// Name, server, keys, required scopes, expected result, and the call.
type Scenario<'a> = (
    &'a str,
    &'a [Channel],
    &'a [String],
    &'a [&'a str],
    ValidationResult,
    Call,
);

/// How a scenario asks about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    ValidateKey,
    /// Envoy's ext_authz Check, the key in `authorization: Bearer`; `expected` VALID means
    /// allowed.
    Check,
}

/// A Check as Envoy sends it for a request carrying `key`.
fn check_request(key: &str, client_ip: String) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: client_ip,
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: [("authorization".to_owned(), format!("Bearer {key}"))].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn scenario(
    channels: &[Channel],
    keys: &[String],
    required: &[&str],
    expected: ValidationResult,
    call: Call,
    options: &Options,
) -> (f64, Histogram<u64>) {
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    let required: Vec<String> = required.iter().map(|s| s.to_string()).collect();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(options.warmup);
    let end = measure_from + Duration::from_secs(options.seconds);
    let tasks: Vec<_> = (0..options.concurrency)
        .map(|task| {
            let mut client = ApiKeysClient::new(channels[task % channels.len()].clone());
            let mut authz = AuthorizationClient::new(channels[task % channels.len()].clone());
            let keys = keys.clone();
            let required = required.clone();
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut i = task;
                let mut count = 0u64;
                loop {
                    let key = keys[i % keys.len()].clone();
                    i += 7;
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let client_ip = format!("203.0.113.{}", task % 16);
                    match call {
                        Call::ValidateKey => {
                            let response = client
                                .validate_key(ValidateKeyRequest {
                                    key,
                                    required_scopes: required.clone(),
                                    client_ip,
                                })
                                .await
                                .expect("ValidateKey");
                            assert_eq!(response.into_inner().result(), expected);
                        }
                        Call::Check => {
                            let response = authz
                                .check(check_request(&key, client_ip))
                                .await
                                .expect("Check");
                            let allowed =
                                response.into_inner().status.unwrap_or_default().code == 0;
                            assert_eq!(allowed, expected == ValidationResult::Valid);
                        }
                    }
                    let took = sent.elapsed();
                    if sent >= measure_from {
                        histogram.record(took.as_micros().max(1) as u64).unwrap();
                        count += 1;
                    }
                }
                (histogram, count)
            })
        })
        .collect();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut count = 0;
    for task in tasks {
        let (h, c) = task.await.unwrap();
        histogram.add(h).unwrap();
        count += c;
    }
    (count as f64 / options.seconds as f64, histogram)
}

async fn channels(addr: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    channels
}

async fn create_keys(channel: &Channel, n: usize, scopes: &[&str]) -> Vec<String> {
    let mut client = ApiKeysClient::new(channel.clone());
    let mut secrets = Vec::with_capacity(n);
    for i in 0..n {
        let mut request = Request::new(CreateKeyRequest {
            workspace_id: format!("bench-{}", i % 10),
            name: format!("bench key {i}"),
            expiration: Expiration::Never.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-actor-id", "bench".parse().unwrap());
        request
            .metadata_mut()
            .insert("x-actor-role", "owner".parse().unwrap());
        secrets.push(
            client
                .create_key(request)
                .await
                .unwrap()
                .into_inner()
                .secret,
        );
    }
    secrets
}

fn pin(pid: u32, cores: &str) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cores, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("warning: could not pin pid {pid} to cores {cores} (is taskset installed?)");
    }
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start_apikeys(
        options: &Options,
        bin: &str,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let child = Command::new("taskset")
            .args(["-c", &options.server_core, bin])
            .env("APIKEYS_LISTEN", format!("127.0.0.1:{port}"))
            .env("APIKEYS_DATABASE_URL", database_url)
            // The generator creates and deletes keys far faster than any admin backend.
            .env("APIKEYS_MANAGEMENT_RATE", "1000000")
            .env("APIKEYS_MANAGEMENT_BURST", "1000000")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .spawn()
            .expect("start apikeys");
        Self::ready(child, port)
    }

    fn start_echo(options: &Options) -> Self {
        let port = free_port();
        let me = std::env::current_exe().unwrap();
        let child = Command::new("taskset")
            .args(["-c", &options.server_core])
            .arg(me)
            .args(["--serve-echo", &format!("127.0.0.1:{port}")])
            .spawn()
            .expect("start the echo server");
        Self::ready(child, port)
    }

    fn ready(child: Child, port: u16) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "server on {addr} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The transport baseline: the same service and messages, answering ValidateKey at once.
#[derive(Debug)]
struct Echo;

#[tonic::async_trait]
impl ApiKeys for Echo {
    async fn create_key(
        &self,
        _: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_keys(
        &self,
        _: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn delete_key(
        &self,
        _: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_key(&self, _: Request<GetKeyRequest>) -> Result<Response<ApiKey>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn update_key(&self, _: Request<UpdateKeyRequest>) -> Result<Response<ApiKey>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn disable_key(&self, _: Request<DisableKeyRequest>) -> Result<Response<ApiKey>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn enable_key(&self, _: Request<EnableKeyRequest>) -> Result<Response<ApiKey>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn rotate_key(
        &self,
        _: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_key_events(
        &self,
        _: Request<ListKeyEventsRequest>,
    ) -> Result<Response<ListKeyEventsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_key_usage(
        &self,
        _: Request<GetKeyUsageRequest>,
    ) -> Result<Response<GetKeyUsageResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn validate_key(
        &self,
        request: Request<ValidateKeyRequest>,
    ) -> Result<Response<ValidateKeyResponse>, Status> {
        // Touch the input so the baseline decodes and answers like a real handler, with a
        // response of the same shape (a bench key's name, no scopes).
        let len = request.get_ref().key.len();
        Ok(Response::new(ValidateKeyResponse {
            valid: len > 0,
            result: proto::ValidationResult::Valid.into(),
            key_id: "key_AAAAAAAAAAAAAAAAAAAA".into(),
            workspace_id: "bench-0".into(),
            expire_time: None,
            name: "bench key 0".into(),
            scopes: Vec::new(),
        }))
    }
}

fn serve_echo(addr: &str) -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(ApiKeysServer::new(Echo))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    std::process::exit(0)
}

/// Start-up with `n` keys already stored: how long the index load takes, and the resident
/// memory of the whole process once serving.
async fn startup(database_url: &str, n: usize) -> (Duration, u64, u64) {
    let status = Command::new(BIN)
        .arg("migrate")
        .env("APIKEYS_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success(), "migrate");
    fill(database_url, n).await;
    let port = free_port();
    let started = Instant::now();
    // Unpinned: start-up may use both cores, as in production.
    let mut child = Command::new(BIN)
        .env("APIKEYS_LISTEN", format!("127.0.0.1:{port}"))
        .env("APIKEYS_DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .env("APIKEYS_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log after the line we want: a closed pipe would fail the server's writes.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("key index loaded") {
                let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = tx.send(value["took_ms"].as_u64().unwrap());
            }
        }
    });
    let load_ms = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("apikeys loads its index");
    let server = Server::ready(child, port);
    let ready = started.elapsed();
    // Settle, then read the resident set of the whole process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    drop(server);
    let _ = ready;
    (Duration::from_millis(load_ms), rss_kib * 1024, n as u64)
}

/// Stores `n` keys straight into the database, as a long-lived deployment would have them.
async fn fill(database_url: &str, n: usize) {
    use sea_orm::{
        ConnectionTrait, Database, TransactionTrait,
        sea_query::{Alias, ExprTrait, Query},
    };
    let db = Database::connect(database_url).await.unwrap();
    let txn = db.begin().await.unwrap();
    let columns = [
        "id",
        "workspace_id",
        "name",
        "key_hash",
        "key_suffix",
        "created_by",
        "create_time_us",
        "expire_time_us",
        "last_used_time_us",
        "delete_time_us",
        "revision",
        "disable_time_us",
        "scopes",
    ]
    .map(Alias::new);
    // A few distinct scope sets, as real workspaces have; a twentieth of the keys disabled.
    let scope_sets = [
        "",
        "orders:read",
        "orders:read orders:write",
        "billing:read",
    ];
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new("api_keys"))
            .columns(columns.clone());
        for &i in chunk {
            let id = format!("key_{:0>20}", i);
            let hash = blake3::hash(format!("bench key {i}").as_bytes())
                .as_bytes()
                .to_vec();
            let expire: Option<i64> = (i % 3 == 0).then_some(4_000_000_000_000_000);
            let deleted: Option<i64> = (i % 10 == 0).then_some(1_700_000_000_000_000);
            insert.values_panic([
                id.into(),
                format!("workspace-{}", i % 5000).into(),
                format!("bench key {i}").into(),
                hash.into(),
                "abcd".into(),
                "bench".into(),
                1_700_000_000_000_000i64.into(),
                expire.into(),
                None::<i64>.into(),
                deleted.into(),
                (i as i64 + 1).into(),
                (i % 20 == 1).then_some(1_700_000_000_000_000i64).into(),
                scope_sets[i % scope_sets.len()].into(),
            ]);
        }
        txn.execute(&insert).await.unwrap();
    }
    let mut counter = Query::update();
    counter
        .table(Alias::new("api_key_revision"))
        .value(Alias::new("value"), n as i64)
        .and_where(ExprTrait::eq(
            sea_orm::sea_query::Expr::col(Alias::new("id")),
            1,
        ));
    txn.execute(&counter).await.unwrap();
    txn.commit().await.unwrap();
    // Measure a settled database, as a long-running deployment has: the bulk insert
    // checkpointed and, on PostgreSQL, vacuumed and analysed.
    let settle: &[&str] = match db.get_database_backend() {
        sea_orm::DatabaseBackend::Postgres => &["VACUUM ANALYZE api_keys", "CHECKPOINT"],
        _ => &["PRAGMA wal_checkpoint(TRUNCATE)", "ANALYZE"],
    };
    for statement in settle {
        db.execute_unprepared(statement).await.unwrap();
    }
    db.close().await.unwrap();
}

/// Two replicas on one PostgreSQL: the time from DeleteKey returning on A until B answers
/// DELETED, over `trials` keys; with `kill_listeners`, B's listening connection is
/// terminated just before each delete.
async fn revocation(
    options: &Options,
    database_url: &str,
    trials: usize,
    kill_listeners: bool,
) -> Histogram<u64> {
    use sea_orm::{ConnectionTrait, Database};
    let a = Server::start_apikeys(options, BIN, database_url, &[]);
    let b = Server::start_apikeys(options, BIN, database_url, &[]);
    let mut a_client = ApiKeysClient::new(channels(&a.addr, 1).await.remove(0));
    let mut b_client = ApiKeysClient::new(channels(&b.addr, 1).await.remove(0));
    let admin = Database::connect(database_url).await.unwrap();
    let mut delays = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for trial in 0..trials {
        let mut create = Request::new(CreateKeyRequest {
            workspace_id: "revocation".into(),
            name: format!("trial {trial}"),
            expiration: Expiration::Never.into(),
            ..Default::default()
        });
        create
            .metadata_mut()
            .insert("x-actor-id", "bench".parse().unwrap());
        create
            .metadata_mut()
            .insert("x-actor-role", "owner".parse().unwrap());
        let created = a_client.create_key(create).await.unwrap().into_inner();
        let secret = created.secret;
        wait_for(&mut b_client, &secret, ValidationResult::Valid).await;
        if kill_listeners {
            admin
                .execute_unprepared(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'apikeys-listener' AND datname = current_database()",
                )
                .await
                .unwrap();
        }
        let mut delete = Request::new(DeleteKeyRequest {
            workspace_id: "revocation".into(),
            key_id: created.key.unwrap().id,
        });
        delete
            .metadata_mut()
            .insert("x-actor-id", "bench".parse().unwrap());
        delete
            .metadata_mut()
            .insert("x-actor-role", "owner".parse().unwrap());
        a_client.delete_key(delete).await.unwrap();
        let deleted_at = Instant::now();
        wait_for(&mut b_client, &secret, ValidationResult::Deleted).await;
        delays
            .record(deleted_at.elapsed().as_micros().max(1) as u64)
            .unwrap();
    }
    delays
}

async fn wait_for(client: &mut ApiKeysClient<Channel>, secret: &str, expected: ValidationResult) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = client
            .validate_key(ValidateKeyRequest {
                key: secret.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        if response.into_inner().result() == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{expected:?} never seen");
    }
}
