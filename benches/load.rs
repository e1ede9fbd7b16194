//! Closed-loop gRPC load generator: ValidateKey (hits, unknown keys, malformed keys), Envoy's
//! Check and the ValidateKeys stream against a real `apikeys` process, and the same calls
//! against a bare tonic service that answers at once (the transport baseline), with the
//! servers pinned to core 0 and this generator to core 1.
//!
//!     cargo bench --bench load                      # SQLite in a temp dir, 7 rounds × 2 s per scenario
//!     cargo bench --bench load -- --database-url postgres://...
//!
//! The generator is built not to be the bottleneck (BENCHMARKS.md gives its ceiling): HTTP/2
//! straight from `h2` on one connection, every request encoded before the run and sent as
//! bytes, no answer decoded in the timed loop (one in 1,024 is kept as bytes and checked
//! after the round), all calls of a scenario polled by one task on a current-thread runtime.
//! Each line reports the median round's throughput, the latency of all rounds together, the
//! median of the rounds' ratios to the echo of the same round, and the CPU both sides used
//! (a server pinned to one core and saturated shows ~100 %; the generator must show less).
//!
//! Two more measurements:
//!
//!     cargo bench --bench load -- --startup-keys 1000000 [--database-url postgres://HOST/DB]
//!         index load time and resident memory with that many stored keys (and with none)
//!     cargo bench --bench load -- --revocation-trials 200 --database-url postgres://HOST/DB
//!         two replicas: time from DeleteKey on A to DELETED on B, plain and with B's
//!         listener connection killed before each delete
//!     cargo bench --bench load -- --callgrind 20000 [--previous-bin PATH]
//!         instructions per call (valgrind's callgrind, counting only while the calls run)
//!         for the echo, ValidateKey hit/unknown/malformed (and a hit on a key with allowed
//!         networks and annotations), Check hit and the stream
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
//! Beside the default server (no callers file, usage recording on, logging at its default
//! `info`) run one with usage recording off (`APIKEYS_RECORD_USAGE=false`) and one with a
//! callers file (its gateway's token on every call), so what each costs is measured in the
//! same run. `ext_authz Check hit` asks the default server with Envoy's Check, as Envoy does
//! (the key in `authorization: Bearer`, the client's address in the attributes).

#[path = "load/wire.rs"]
mod wire;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{
    self, ApiKey, CreateKeyRequest, CreateKeyResponse, Credits, DeleteKeyRequest,
    DeleteKeyResponse, DisableKeyRequest, EnableKeyRequest, Expiration, GetKeyRequest,
    GetKeyUsageRequest, GetKeyUsageResponse, ListKeyEventsRequest, ListKeyEventsResponse,
    ListKeysRequest, ListKeysResponse, RateLimit, RateLimitRequest, RotateKeyRequest,
    RotateKeyResponse, UpdateKeyRequest, ValidateKeyRequest, ValidateKeyResponse,
    ValidateKeysRequest, ValidateKeysResponse, ValidationResult,
    api_keys_client::ApiKeysClient,
    api_keys_server::{ApiKeys, ApiKeysServer},
};
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address},
    service::auth::v3::{AttributeContext, CheckRequest, CheckResponse, attribute_context},
};
use futures_util::{StreamExt as _, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_apikeys");
const VALIDATE_KEY: &str = "/cloodot.apikeys.v1.ApiKeys/ValidateKey";
const VALIDATE_KEYS: &str = "/cloodot.apikeys.v1.ApiKeys/ValidateKeys";
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
/// One answer in this many is kept and checked after its round.
const SAMPLE_EVERY: usize = 1024;

#[derive(Debug, Clone)]
struct Options {
    seconds: f64,
    rounds: usize,
    warmup: f64,
    concurrency: usize,
    connections: usize,
    stream_depth: usize,
    keys: usize,
    database_url: Option<String>,
    server_core: String,
    client_core: String,
    startup_keys: Option<usize>,
    revocation_trials: Option<usize>,
    callgrind: Option<usize>,
    /// Only the scenarios whose names contain one of these (the echo always runs).
    only: Vec<String>,
    db_backed_bin: Option<String>,
    previous_bin: Option<String>,
}

fn options() -> Options {
    let mut options = Options {
        seconds: 2.0,
        rounds: 7,
        warmup: 0.5,
        concurrency: 64,
        connections: 1,
        stream_depth: 512,
        keys: 1000,
        database_url: None,
        server_core: "0".into(),
        client_core: "1".into(),
        startup_keys: None,
        revocation_trials: None,
        callgrind: None,
        only: Vec::new(),
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
            "--stream-depth" => options.stream_depth = value().parse().unwrap(),
            "--keys" => options.keys = value().parse().unwrap(),
            "--database-url" => options.database_url = Some(value()),
            "--server-core" => options.server_core = value(),
            "--client-core" => options.client_core = value(),
            "--startup-keys" => options.startup_keys = Some(value().parse().unwrap()),
            "--revocation-trials" => options.revocation_trials = Some(value().parse().unwrap()),
            "--callgrind" => options.callgrind = Some(value().parse().unwrap()),
            "--only" => options.only = value().split(',').map(str::to_owned).collect(),
            "--db-backed-bin" => options.db_backed_bin = Some(value()),
            "--previous-bin" => options.previous_bin = Some(value()),
            "--serve-echo" => serve_echo(&value()),
            "--bench" => {} // cargo bench passes this to every bench target
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        options.stream_depth <= options.keys,
        "--stream-depth must not exceed --keys: request ids are the keys' places"
    );
    options
}

fn main() {
    let options = options();
    // Pin this process (and the runtime threads it is about to start) to the client core.
    pin(std::process::id(), &options.client_core);
    // One thread polls every call: the generator's whole cost is on the core it is pinned to.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(options));
}

/// What a scenario's answers must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A ValidateKey (or ValidateKeys) answer with this result.
    Result(ValidationResult),
    /// A Check answer allowing (or denying) the request.
    Allowed(bool),
}

/// Unary calls, or one ValidateKeys stream per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Unary,
    Stream,
}

/// One line of the table: calls to one server, encoded before the run.
struct Scenario {
    name: String,
    pid: u32,
    connections: Vec<h2::client::SendRequest<Bytes>>,
    head: wire::Head,
    shape: Shape,
    /// Framed request messages, sent in turn (unary: every 7th, so neighbours differ).
    bodies: Vec<Bytes>,
    expect: Expect,
}

/// What one round of a scenario measured.
struct Round {
    rate: f64,
    latency: Histogram<u64>,
    /// CPU time over wall time, this process and the server, warm-up included.
    generator_cpu: f64,
    server_cpu: f64,
}

/// A server this run talks to: where, which process, and the token it wants.
struct Target<'a> {
    server: &'a Server,
    token: Option<&'a str>,
}

impl Target<'_> {
    async fn scenario(
        &self,
        options: &Options,
        name: &str,
        shape: Shape,
        bodies: Vec<Bytes>,
        expect: Expect,
    ) -> Scenario {
        let path = match (shape, expect) {
            (Shape::Stream, _) => VALIDATE_KEYS,
            (Shape::Unary, Expect::Allowed(_)) => CHECK,
            (Shape::Unary, Expect::Result(_)) => VALIDATE_KEY,
        };
        let mut connections = Vec::new();
        for _ in 0..options.connections {
            connections.push(wire::connect(&self.server.addr).await);
        }
        Scenario {
            name: name.to_owned(),
            pid: self.server.child.id(),
            connections,
            head: wire::Head::new(&self.server.addr, path, self.token),
            shape,
            bodies,
            expect,
        }
    }
}

/// ValidateKey requests for `keys`, framed; with `client_ip`, one of 16 addresses each.
fn validate_bodies(keys: &[String], required: &[&str], client_ip: bool) -> Vec<Bytes> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| wire::frame(&validate_request(key, required, client_ip, i)))
        .collect()
}

/// ValidateKey requests for `keys` from one of 16 addresses, each spending 1 from `writes`.
fn limited_bodies(keys: &[String]) -> Vec<Bytes> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let mut request = validate_request(key, &[], true, i);
            request.rate_limits.push(RateLimitRequest {
                name: "writes".into(),
                cost: None,
            });
            wire::frame(&request)
        })
        .collect()
}

fn validate_request(key: &str, required: &[&str], client_ip: bool, i: usize) -> ValidateKeyRequest {
    ValidateKeyRequest {
        key: key.to_owned(),
        required_scopes: required.iter().map(|s| s.to_string()).collect(),
        client_ip: if client_ip {
            format!("203.0.113.{}", i % 16)
        } else {
            String::new()
        },
        rate_limits: Vec::new(),
        cost: None,
    }
}

/// ValidateKeys requests for `keys`: each one's `request_id` is its place.
fn stream_bodies(keys: &[String]) -> Vec<Bytes> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            wire::frame(&ValidateKeysRequest {
                request_id: i as u64,
                request: Some(validate_request(key, &[], true, i)),
            })
        })
        .collect()
}

fn check_bodies(keys: &[String]) -> Vec<Bytes> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| wire::frame(&check_request(key, format!("203.0.113.{}", i % 16))))
        .collect()
}

async fn run(options: Options) {
    if let Some(n) = options.startup_keys {
        return run_startup(&options, n).await;
    }
    if let Some(trials) = options.revocation_trials {
        return run_revocation(&options, trials).await;
    }
    if let Some(calls) = options.callgrind {
        return run_callgrind(&options, calls).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let database_url = options.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        )
    });
    println!(
        "# {} rounds of {} s per scenario after {} s warm-up; unary: {} calls in flight over {} HTTP/2 connection(s); \
         stream: {} requests ahead on each of {} stream(s); servers on core {}, generator on core {}",
        options.rounds,
        options.seconds,
        options.warmup,
        options.concurrency,
        options.connections,
        options.stream_depth,
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
    let (admin_token, admin_line) = caller_token("bench-admin", apikeys::auth::CallerRole::Admin);
    let (gateway_token, gateway_line) =
        caller_token("bench-gateway", apikeys::auth::CallerRole::Gateway);
    let callers_file = dir.path().join("callers");
    std::fs::write(&callers_file, format!("{admin_line}\n{gateway_line}\n")).unwrap();
    std::fs::set_permissions(
        &callers_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let callers_url = fresh_database(&options, dir.path(), "apikeys_bench_callers").await;
    let callers = Server::start_apikeys(
        &options,
        BIN,
        &callers_url,
        &[("APIKEYS_CALLERS_FILE", callers_file.to_str().unwrap())],
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

    let secrets = create_keys(&apikeys.addr, None, options.keys, &[]).await;
    // The same keys with two scopes each, validated with one of them required.
    let scoped_secrets = create_keys(
        &apikeys.addr,
        None,
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
    let governed_secrets = create_governed_keys(&apikeys.addr, options.keys).await;
    let limited_secrets = create_limited_keys(&apikeys.addr, options.keys).await;
    let metered_secrets = create_metered_keys(&apikeys.addr, options.keys).await;
    let usage_off_secrets = create_keys(&usage_off.addr, None, options.keys, &[]).await;
    let callers_secrets = create_keys(&callers.addr, Some(&admin_token), options.keys, &[]).await;

    let valid = Expect::Result(ValidationResult::Valid);
    let plain = |server| Target {
        server,
        token: None,
    };
    let mut plan = vec![
        plain(&echo)
            .scenario(
                &options,
                "echo (bare tonic)",
                Shape::Unary,
                validate_bodies(&unknown, &[], true),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit",
                Shape::Unary,
                validate_bodies(&secrets, &[], false),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit, client_ip",
                Shape::Unary,
                validate_bodies(&secrets, &[], true),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit, allowlist",
                Shape::Unary,
                validate_bodies(&governed_secrets, &[], true),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit, allowlist + two limits",
                Shape::Unary,
                limited_bodies(&limited_secrets),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit, allowlist + two limits + credits",
                Shape::Unary,
                limited_bodies(&metered_secrets),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey unknown key",
                Shape::Unary,
                validate_bodies(&unknown, &[], true),
                Expect::Result(ValidationResult::NotFound),
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey malformed",
                Shape::Unary,
                validate_bodies(&malformed, &[], true),
                Expect::Result(ValidationResult::Malformed),
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKey hit, scope required",
                Shape::Unary,
                validate_bodies(&scoped_secrets, &["bench:read"], true),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ext_authz Check hit",
                Shape::Unary,
                check_bodies(&secrets),
                Expect::Allowed(true),
            )
            .await,
        plain(&usage_off)
            .scenario(
                &options,
                "ValidateKey hit, usage off",
                Shape::Unary,
                validate_bodies(&usage_off_secrets, &[], true),
                valid,
            )
            .await,
        Target {
            server: &callers,
            token: Some(&gateway_token),
        }
        .scenario(
            &options,
            "ValidateKey hit, callers file",
            Shape::Unary,
            validate_bodies(&callers_secrets, &[], true),
            valid,
        )
        .await,
        plain(&echo)
            .scenario(
                &options,
                "stream echo (bare tonic)",
                Shape::Stream,
                stream_bodies(&unknown),
                valid,
            )
            .await,
        plain(&apikeys)
            .scenario(
                &options,
                "ValidateKeys stream hit",
                Shape::Stream,
                stream_bodies(&secrets),
                valid,
            )
            .await,
    ];
    if let Some(server) = &db_backed {
        let db_backed_secrets = create_keys(&server.addr, None, options.keys, &[]).await;
        plan.push(
            plain(server)
                .scenario(
                    &options,
                    "DB-backed hit (f4f862b)",
                    Shape::Unary,
                    validate_bodies(&db_backed_secrets, &[], true),
                    valid,
                )
                .await,
        );
        plan.push(
            plain(server)
                .scenario(
                    &options,
                    "DB-backed unknown (f4f862b)",
                    Shape::Unary,
                    validate_bodies(&unknown, &[], true),
                    Expect::Result(ValidationResult::NotFound),
                )
                .await,
        );
    }
    if let Some(server) = &previous {
        let previous_secrets = create_keys(&server.addr, None, options.keys, &[]).await;
        for (name, keys, expect) in [
            ("previous hit, client_ip", &previous_secrets, valid),
            (
                "previous unknown",
                &unknown,
                Expect::Result(ValidationResult::NotFound),
            ),
            (
                "previous malformed",
                &malformed,
                Expect::Result(ValidationResult::Malformed),
            ),
        ] {
            plan.push(
                plain(server)
                    .scenario(
                        &options,
                        name,
                        Shape::Unary,
                        validate_bodies(keys, &[], true),
                        expect,
                    )
                    .await,
            );
        }
        plan.push(
            plain(server)
                .scenario(
                    &options,
                    "previous Check hit",
                    Shape::Unary,
                    check_bodies(&previous_secrets),
                    Expect::Allowed(true),
                )
                .await,
        );
    }

    if !options.only.is_empty() {
        plan.retain(|s| {
            s.name == "echo (bare tonic)" || options.only.iter().any(|only| s.name.contains(only))
        });
    }
    // Rounds interleave the scenarios so that the machine's drift hits them alike.
    let mut rounds: Vec<Vec<Round>> = plan.iter().map(|_| Vec::new()).collect();
    for _ in 0..options.rounds {
        for (scenario, results) in plan.iter().zip(&mut rounds) {
            results.push(measure(scenario, &options).await);
        }
    }
    report(&plan, &rounds);
    drop(previous);
    drop(db_backed);
    drop(callers);
    drop(usage_off);
    drop(apikeys);
    drop(echo);
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn report(plan: &[Scenario], rounds: &[Vec<Round>]) {
    let echo = &rounds[0];
    let stream_echo = plan
        .iter()
        .position(|s| s.name == "stream echo (bare tonic)");
    println!(
        "{:<40} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>6}",
        "scenario",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "× echo",
        "server",
        "generator",
        "/ core"
    );
    for (scenario, results) in plan.iter().zip(rounds) {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for round in results {
            latency.add(&round.latency).unwrap();
        }
        // Each round against the echo of the same round: the machine drifts between rounds.
        let ratio = median(results.iter().zip(echo).map(|(r, e)| r.rate / e.rate));
        let server_cpu = median(results.iter().map(|r| r.server_cpu));
        let per_core = median(results.iter().map(|r| r.rate / r.server_cpu.max(0.01)))
            / median(echo.iter().map(|r| r.rate / r.server_cpu.max(0.01)));
        println!(
            "{:<40} {:>9.0} {:>8} {:>8} {:>8} {:>7.2} {:>6.0}% {:>8.0}% {:>6.2}",
            scenario.name,
            median(results.iter().map(|r| r.rate)),
            latency.value_at_quantile(0.50),
            latency.value_at_quantile(0.99),
            latency.value_at_quantile(0.999),
            ratio,
            server_cpu * 100.0,
            median(results.iter().map(|r| r.generator_cpu)) * 100.0,
            per_core,
        );
    }
    let ratios = |name: &str, against: usize| {
        let at = plan.iter().position(|s| s.name == name)?;
        let by_round: Vec<String> = rounds[at]
            .iter()
            .zip(&rounds[against])
            .map(|(r, e)| format!("{:.2}", r.rate / e.rate))
            .collect();
        Some(by_round.join(" "))
    };
    for name in [
        "ValidateKey hit",
        "ValidateKey hit, client_ip",
        "ValidateKey hit, allowlist",
        "ValidateKey hit, allowlist + two limits",
        "ValidateKey hit, allowlist + two limits + credits",
        "ValidateKey unknown key",
        "ValidateKey malformed",
        "ext_authz Check hit",
        "ValidateKey hit, callers file",
        "ValidateKeys stream hit",
    ] {
        if let Some(by_round) = ratios(name, 0) {
            println!("# {name} / echo, round by round: {by_round}");
        }
    }
    if let Some(stream_echo) = stream_echo
        && let Some(by_round) = ratios("ValidateKeys stream hit", stream_echo)
    {
        println!("# ValidateKeys stream hit / stream echo, round by round: {by_round}");
    }
    let pairs = [
        ("ValidateKey hit, client_ip", "ValidateKey hit, usage off"),
        ("ValidateKey hit, allowlist", "ValidateKey hit, client_ip"),
        ("ValidateKey hit, client_ip", "DB-backed hit (f4f862b)"),
        ("ValidateKey unknown key", "DB-backed unknown (f4f862b)"),
        ("ValidateKey hit, client_ip", "previous hit, client_ip"),
        ("ValidateKey unknown key", "previous unknown"),
        ("ValidateKey malformed", "previous malformed"),
        ("ext_authz Check hit", "previous Check hit"),
    ];
    for (this, that) in pairs {
        let (Some(a), Some(b)) = (
            plan.iter().position(|s| s.name == this),
            plan.iter().position(|s| s.name == that),
        ) else {
            continue;
        };
        let ratio = median(
            rounds[a]
                .iter()
                .zip(&rounds[b])
                .map(|(x, y)| x.rate / y.rate),
        );
        println!("# {this} / {that}: {ratio:.2} (median of the rounds' ratios)");
    }
}

/// CPU time (user + system) a process has used so far, from `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks of 1/100 s on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// One round of one scenario.
async fn measure(scenario: &Scenario, options: &Options) -> Round {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(options.warmup);
    let end = measure_from + Duration::from_secs_f64(options.seconds);
    let generator_before = cpu_time(std::process::id());
    let server_before = cpu_time(scenario.pid);
    let (count, latency, samples) = match scenario.shape {
        Shape::Unary => unary_round(scenario, options, measure_from, end, usize::MAX).await,
        Shape::Stream => stream_round(scenario, options, measure_from, end, usize::MAX).await,
    };
    let wall = start.elapsed().as_secs_f64();
    for sample in &samples {
        check_answer(scenario, sample);
    }
    assert!(
        !samples.is_empty(),
        "{}: no answer was sampled",
        scenario.name
    );
    Round {
        rate: count as f64 / options.seconds,
        latency,
        generator_cpu: (cpu_time(std::process::id()) - generator_before).as_secs_f64() / wall,
        server_cpu: (cpu_time(scenario.pid) - server_before).as_secs_f64() / wall,
    }
}

/// Decodes a sampled answer and checks it says what the scenario expects.
fn check_answer(scenario: &Scenario, message: &Bytes) {
    let name = &scenario.name;
    match (scenario.shape, scenario.expect) {
        (Shape::Unary, Expect::Result(expected)) => {
            let response = ValidateKeyResponse::decode(message.as_ref()).expect("a response");
            assert_eq!(response.result(), expected, "{name}");
        }
        (Shape::Unary, Expect::Allowed(allowed)) => {
            let response = CheckResponse::decode(message.as_ref()).expect("a Check response");
            let code = response.status.unwrap_or_default().code;
            assert_eq!(code == 0, allowed, "{name}: Check answered code {code}");
        }
        (Shape::Stream, Expect::Result(expected)) => {
            let response = ValidateKeysResponse::decode(message.as_ref()).expect("a response");
            assert!(
                (response.request_id as usize) < scenario.bodies.len(),
                "{name}: an id never sent"
            );
            assert_eq!(
                response.response.unwrap_or_default().result(),
                expected,
                "{name}"
            );
        }
        (Shape::Stream, Expect::Allowed(_)) => unreachable!("streams are ValidateKeys"),
    }
}

type Measured = (u64, Histogram<u64>, Vec<Bytes>);

/// `options.concurrency` unary calls in flight, each answered call replaced by the next, until
/// `end` or `calls` calls.
async fn unary_round(
    scenario: &Scenario,
    options: &Options,
    measure_from: Instant,
    end: Instant,
    calls: usize,
) -> Measured {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut samples = Vec::new();
    let mut count = 0u64;
    let connections = &scenario.connections;
    let bodies = &scenario.bodies;
    let call = |n: usize| {
        wire::unary(
            connections[n % connections.len()].clone(),
            &scenario.head,
            bodies[(n * 7) % bodies.len()].clone(),
            n.is_multiple_of(SAMPLE_EVERY),
        )
    };
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0;
    while next < options.concurrency.min(calls) {
        in_flight.push(call(next));
        next += 1;
    }
    while let Some(answered) = in_flight.next().await {
        let (sent, answered, message) = answered
            .unwrap_or_else(|failed| panic!("{}: a call failed: {}", scenario.name, failed.0));
        if sent >= measure_from && answered <= end {
            latency
                .record((answered - sent).as_micros().max(1) as u64)
                .unwrap();
            count += 1;
        }
        samples.extend(message);
        if answered < end && next < calls {
            in_flight.push(call(next));
            next += 1;
        }
    }
    (count, latency, samples)
}

/// One ValidateKeys stream per connection, `options.stream_depth` requests unanswered on each,
/// until `end` or `requests` requests in all.
async fn stream_round(
    scenario: &Scenario,
    options: &Options,
    measure_from: Instant,
    end: Instant,
    requests: usize,
) -> Measured {
    let each = requests / scenario.connections.len();
    let streams: Vec<_> = scenario
        .connections
        .iter()
        .map(|connection| {
            stream_one(
                scenario,
                connection.clone(),
                options,
                (measure_from, end),
                each,
            )
        })
        .collect();
    let mut count = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut samples = Vec::new();
    for (c, l, s) in futures_util::future::join_all(streams).await {
        count += c;
        latency.add(l).unwrap();
        samples.extend(s);
    }
    (count, latency, samples)
}

async fn stream_one(
    scenario: &Scenario,
    connection: h2::client::SendRequest<Bytes>,
    options: &Options,
    (measure_from, end): (Instant, Instant),
    requests: usize,
) -> Measured {
    let name = &scenario.name;
    let mut stream = wire::open_stream(connection, &scenario.head)
        .await
        .unwrap_or_else(|failed| panic!("{name}: {}", failed.0));
    let bodies = &scenario.bodies;
    let mut requests_sent = Sent {
        next: 0,
        at: vec![Instant::now(); bodies.len()],
    };
    let send = |tx: &mut h2::SendStream<Bytes>, n: usize, sent: &mut Sent| {
        // The next `n` requests as one DATA frame, as a client library batches them.
        let mut batch = BytesMut::with_capacity(n * bodies[0].len() * 2);
        let now = Instant::now();
        for _ in 0..n {
            let at = sent.next % bodies.len();
            sent.at[at] = now;
            batch.extend_from_slice(&bodies[at]);
            sent.next += 1;
        }
        tx.send_data(batch.freeze(), false)
            .unwrap_or_else(|err| panic!("{name}: sending failed: {err}"));
    };
    let first = options.stream_depth.min(requests);
    send(&mut stream.tx, first, &mut requests_sent);
    let mut requested = first;
    let mut unanswered = first;
    let mut deframer = wire::Deframer::default();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut samples = Vec::new();
    let mut count = 0u64;
    let mut answers = 0usize;
    let mut closed = false;
    while let Some(chunk) = stream.rx.data().await {
        let chunk = chunk.unwrap_or_else(|err| panic!("{name}: reading failed: {err}"));
        let _ = stream.rx.flow_control().release_capacity(chunk.len());
        deframer.push(&chunk);
        let now = Instant::now();
        let mut answered = 0;
        while let Some(message) = deframer.next_message() {
            let id = wire::request_id(&message).expect("a request id") as usize;
            let sent = requests_sent.at[id];
            if sent >= measure_from && now <= end {
                latency
                    .record((now - sent).as_micros().max(1) as u64)
                    .unwrap();
                count += 1;
            }
            if answers.is_multiple_of(SAMPLE_EVERY) {
                samples.push(message);
            }
            answers += 1;
            answered += 1;
        }
        unanswered -= answered;
        let more = answered.min(requests - requested);
        if now < end && more > 0 {
            send(&mut stream.tx, more, &mut requests_sent);
            requested += more;
            unanswered += more;
        } else if !closed && (now >= end || unanswered == 0) {
            closed = true;
            stream
                .tx
                .send_data(Bytes::new(), true)
                .unwrap_or_else(|err| panic!("{name}: closing failed: {err}"));
        }
        if closed && unanswered == 0 {
            // The server ends the stream once it has answered everything.
            continue;
        }
    }
    assert_eq!(
        unanswered, 0,
        "{name}: the stream ended with requests unanswered"
    );
    let trailers = stream
        .rx
        .trailers()
        .await
        .unwrap_or_else(|err| panic!("{name}: no trailers: {err}"))
        .unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|s| s.as_bytes()),
        Some(&b"0"[..]),
        "{name}: the stream ended with {trailers:?}"
    );
    (count, latency, samples)
}

/// When each request of a stream was sent, by its place (its id), and the next to send.
struct Sent {
    next: usize,
    at: Vec<Instant>,
}

/// A new caller token from `apikeys caller-token new`'s library function: the token and its
/// callers-file line.
fn caller_token(name: &str, role: apikeys::auth::CallerRole) -> (String, String) {
    let text = apikeys::auth::new_token_instructions(name, role);
    let mut lines = text.lines().filter(|line| !line.starts_with('#'));
    let token = lines.next().expect("a token").to_owned();
    let line = lines.next().expect("a callers-file line").to_owned();
    (token, line)
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

async fn create_keys(addr: &str, token: Option<&str>, n: usize, scopes: &[&str]) -> Vec<String> {
    let terms = CreateKeyRequest {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    create_keys_with(addr, token, n, &terms).await
}

/// Keys with an owner, two annotations and three allowed networks, one of which holds every
/// `client_ip` the bench sends (203.0.113.0–15).
async fn create_governed_keys(addr: &str, n: usize) -> Vec<String> {
    let terms = CreateKeyRequest {
        owner_id: "bench-owner".into(),
        annotations: [("plan", "enterprise"), ("region", "eu")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        allowed_cidrs: ["198.51.100.0/24", "2001:db8::/32", "203.0.113.0/28"]
            .map(str::to_owned)
            .into(),
        ..Default::default()
    };
    create_keys_with(addr, None, n, &terms).await
}

/// `n` governed keys that also have two rate limits: `requests`, applied to every validation,
/// and `writes`, which the scenario names. Both far above what a run can spend.
async fn create_limited_keys(addr: &str, n: usize) -> Vec<String> {
    create_keys_with(addr, None, n, &limited_terms()).await
}

/// An owner, three networks and the two limits of [`create_limited_keys`].
fn limited_terms() -> CreateKeyRequest {
    let limit = |name: &str, auto_apply| RateLimit {
        name: name.into(),
        limit: 1_000_000_000,
        window: Some(prost_types::Duration {
            seconds: 86_400,
            nanos: 0,
        }),
        auto_apply,
    };
    CreateKeyRequest {
        owner_id: "bench-owner".into(),
        allowed_cidrs: ["198.51.100.0/24", "2001:db8::/32", "203.0.113.0/28"]
            .map(str::to_owned)
            .into(),
        rate_limits: vec![limit("requests", true), limit("writes", false)],
        ..Default::default()
    }
}

/// `n` limited keys that also have credits, far more than a run can spend: each validation
/// spends 1 from a slice its replica leased (a lease per 1,000 spends, off the request path).
async fn create_metered_keys(addr: &str, n: usize) -> Vec<String> {
    let terms = CreateKeyRequest {
        credits: Some(Credits {
            remaining: 1_000_000_000_000,
            refill: None,
        }),
        ..limited_terms()
    };
    create_keys_with(addr, None, n, &terms).await
}

/// `n` keys, each with the scopes, owner, annotations and networks of `terms`.
async fn create_keys_with(
    addr: &str,
    token: Option<&str>,
    n: usize,
    terms: &CreateKeyRequest,
) -> Vec<String> {
    let mut client = ApiKeysClient::new(channels(addr, 1).await.remove(0));
    let mut secrets = Vec::with_capacity(n);
    for i in 0..n {
        let mut request = Request::new(CreateKeyRequest {
            workspace_id: format!("bench-{}", i % 10),
            name: format!("bench key {i}"),
            expiration: Expiration::Never.into(),
            ..terms.clone()
        });
        let metadata = request.metadata_mut();
        metadata.insert("x-actor-id", "bench".parse().unwrap());
        metadata.insert("x-actor-role", "owner".parse().unwrap());
        if let Some(token) = token {
            metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
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
            // As in production: metrics on, logging at its default level (`info`).
            .env(
                "APIKEYS_METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env_remove("RUST_LOG")
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
        Ok(Response::new(echo_answer(request.get_ref())))
    }

    type ValidateKeysStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<ValidateKeysResponse, Status>> + Send>,
    >;

    async fn validate_keys(
        &self,
        request: Request<Streaming<ValidateKeysRequest>>,
    ) -> Result<Response<Self::ValidateKeysStream>, Status> {
        // Answers each request as it is read: the stream's transport cost alone.
        let answers = request.into_inner().map(|request| {
            request.map(|request| ValidateKeysResponse {
                request_id: request.request_id,
                response: Some(echo_answer(&request.request.unwrap_or_default())),
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Touches the input so the baseline decodes and answers like a real handler, with a
/// response of the same shape (a bench key's name, no scopes).
fn echo_answer(request: &ValidateKeyRequest) -> ValidateKeyResponse {
    ValidateKeyResponse {
        valid: !request.key.is_empty(),
        result: proto::ValidationResult::Valid.into(),
        key_id: "key_AAAAAAAAAAAAAAAAAAAA".into(),
        workspace_id: "bench-0".into(),
        expire_time: None,
        name: "bench key 0".into(),
        scopes: Vec::new(),
        ..Default::default()
    }
}

fn serve_echo(addr: &str) -> ! {
    // A subscriber, as every real server has (ours logs at `info` by default): without one,
    // tracing's `log` fallback formats h2's and hyper's trace spans on every call, about
    // 10,000 instructions a call that would make the baseline slower than the transport.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
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
            ..Default::default()
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

/// Instructions per call, counted by valgrind's callgrind in each server while exactly
/// `calls` calls run (64 in flight, as in the load rounds), the counts zeroed before them and
/// dumped after them with `callgrind_control`: start-up, key creation and warm-up are not counted;
/// the server's background work during the calls (usage flushes, index syncs) is.
async fn run_callgrind(options: &Options, calls: usize) {
    let dir = tempfile::tempdir().unwrap();
    println!("# instructions per call (callgrind), {calls} calls per scenario, 64 in flight");
    println!("{:<40} {:>14}", "scenario", "instructions");
    let keys = 200;
    let unknown: Vec<String> = (0..keys)
        .map(|_| apikeys::domain::Secret::generate().expose().to_owned())
        .collect();
    let malformed: Vec<String> = (0..keys).map(|i| format!("clo_not-a-key-{i}")).collect();
    let me = std::env::current_exe().unwrap();
    let echo = Callgrind::start(dir.path(), "echo", &me, &["--serve-echo"], None);
    let valid = Expect::Result(ValidationResult::Valid);
    let target = Target {
        server: &echo.server,
        token: None,
    };
    let echo_unary = target
        .scenario(
            options,
            "echo (bare tonic)",
            Shape::Unary,
            validate_bodies(&unknown, &[], true),
            valid,
        )
        .await;
    echo.count(&echo_unary, calls).await;
    let echo_stream = target
        .scenario(
            options,
            "stream echo (bare tonic)",
            Shape::Stream,
            stream_bodies(&unknown),
            valid,
        )
        .await;
    echo.count(&echo_stream, calls).await;
    drop(echo);
    let mut servers = vec![("", BIN.to_owned())];
    if let Some(previous) = &options.previous_bin {
        servers.push(("previous ", previous.clone()));
    }
    for (label, bin) in servers {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path()
                .join(format!("{}callgrind.db", label.trim()))
                .display()
        );
        let server = Callgrind::start(dir.path(), label, bin.as_ref(), &[], Some(&url));
        let secrets = create_keys(&server.server.addr, None, keys, &[]).await;
        let scoped = create_keys(
            &server.server.addr,
            None,
            keys,
            &["bench:read", "bench:write"],
        )
        .await;
        let target = Target {
            server: &server.server,
            token: None,
        };
        let mut plan = vec![
            (
                "ValidateKey hit",
                Shape::Unary,
                validate_bodies(&secrets, &[], false),
                valid,
            ),
            (
                "ValidateKey hit, client_ip",
                Shape::Unary,
                validate_bodies(&secrets, &[], true),
                valid,
            ),
            (
                "ValidateKey hit, scope required",
                Shape::Unary,
                validate_bodies(&scoped, &["bench:read"], true),
                valid,
            ),
            (
                "ValidateKey unknown key",
                Shape::Unary,
                validate_bodies(&unknown, &[], true),
                Expect::Result(ValidationResult::NotFound),
            ),
            (
                "ValidateKey malformed",
                Shape::Unary,
                validate_bodies(&malformed, &[], true),
                Expect::Result(ValidationResult::Malformed),
            ),
            (
                "ext_authz Check hit",
                Shape::Unary,
                check_bodies(&secrets),
                Expect::Allowed(true),
            ),
        ];
        if label.is_empty() {
            let governed = create_governed_keys(&server.server.addr, keys).await;
            plan.push((
                "ValidateKey hit, allowlist",
                Shape::Unary,
                validate_bodies(&governed, &[], true),
                valid,
            ));
            let limited = create_limited_keys(&server.server.addr, keys).await;
            plan.push((
                "ValidateKey hit, allowlist + two limits",
                Shape::Unary,
                limited_bodies(&limited),
                valid,
            ));
            let metered = create_metered_keys(&server.server.addr, keys).await;
            plan.push((
                "ValidateKey hit, allowlist + two limits + credits",
                Shape::Unary,
                limited_bodies(&metered),
                valid,
            ));
            plan.push((
                "ValidateKeys stream hit",
                Shape::Stream,
                stream_bodies(&secrets),
                valid,
            ));
        }
        for (name, shape, bodies, expect) in plan {
            let scenario = target
                .scenario(options, &format!("{label}{name}"), shape, bodies, expect)
                .await;
            server.count(&scenario, calls).await;
        }
    }
}

/// A server run under callgrind, collecting only when told.
struct Callgrind {
    server: Server,
    out: std::path::PathBuf,
}

impl Callgrind {
    fn start(
        dir: &std::path::Path,
        label: &str,
        bin: &std::path::Path,
        args: &[&str],
        database_url: Option<&str>,
    ) -> Self {
        let port = free_port();
        let out = dir.join(format!("callgrind.{}.out", label.trim().replace(' ', "-")));
        let mut command = Command::new("valgrind");
        command
            // Each dump readable on its own by callgrind_annotate.
            .args([
                "--tool=callgrind",
                "--compress-strings=no",
                "--compress-pos=no",
            ])
            .arg(format!("--callgrind-out-file={}", out.display()))
            // More of callgrind's options, e.g. `--cache-sim=yes` for cache misses.
            .args(
                std::env::var("APIKEYS_BENCH_CALLGRIND_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .arg(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match database_url {
            // The echo takes its address as an argument.
            None => {
                command.arg(format!("127.0.0.1:{port}"));
            }
            Some(url) => {
                command
                    .env("APIKEYS_LISTEN", format!("127.0.0.1:{port}"))
                    .env("APIKEYS_DATABASE_URL", url)
                    .env("APIKEYS_MANAGEMENT_RATE", "1000000")
                    .env("APIKEYS_MANAGEMENT_BURST", "1000000")
                    .env(
                        "APIKEYS_METRICS_LISTEN",
                        format!("127.0.0.1:{}", free_port()),
                    )
                    // No usage flush within the counted calls: under valgrind they take 50
                    // times as long, so the flushes every 2 s would weigh 50 times as much per
                    // call as at full speed (the load rounds measure them: usage on / off).
                    .env("APIKEYS_FLUSH_INTERVAL", "1h")
                    // The index poll likewise (about 600 instructions a call at 250 ms under
                    // valgrind, about 10 at full speed): every 5 s, within the staleness bound.
                    .env("APIKEYS_SYNC_POLL_INTERVAL", "5s")
                    .env_remove("RUST_LOG");
            }
        }
        let child = command
            .spawn()
            .expect("valgrind (apt-get install valgrind)");
        Self {
            server: Server::ready(child, port),
            out,
        }
    }

    fn control(&self, args: &[&str]) {
        let status = Command::new("callgrind_control")
            .args(args)
            .arg(self.server.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("callgrind_control");
        assert!(status.success(), "callgrind_control {args:?}");
    }

    /// Runs `calls` calls of `scenario` (after a warm-up) and prints instructions per call.
    async fn count(&self, scenario: &Scenario, calls: usize) {
        // As the load rounds make them: 64 calls in flight, 512 requests ahead on a stream.
        let warm_up = Options {
            concurrency: 64,
            stream_depth: 512,
            ..options()
        };
        counted(scenario, &warm_up, calls / 10).await;
        // Counts since the last zeroing, dumped to a file of their own.
        self.control(&["--zero"]);
        counted(scenario, &warm_up, calls).await;
        self.control(&["--dump"]);
        // Ir, then with `--cache-sim=yes` Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
        let events: Vec<u64> = std::fs::read_dir(self.out.parent().unwrap())
            .unwrap()
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let name = path.file_name()?.to_str()?.to_owned();
                name.starts_with(self.out.file_name()?.to_str()?)
                    .then_some(path)
            })
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap();
                // With APIKEYS_BENCH_CALLGRIND_DIR, the dumps are kept for callgrind_annotate.
                match std::env::var_os("APIKEYS_BENCH_CALLGRIND_DIR") {
                    Some(keep) if !text.is_empty() && !text.contains("totals: 0\n") => {
                        let name =
                            format!("{}.callgrind", scenario.name.replace([' ', ',', '/'], "_"));
                        std::fs::rename(&path, std::path::Path::new(&keep).join(name)).unwrap();
                    }
                    _ => std::fs::remove_file(&path).unwrap(),
                }
                text.lines()
                    .find_map(|line| {
                        line.strip_prefix("summary: ")
                            .or(line.strip_prefix("totals: "))
                    })
                    .map(|counts| {
                        counts
                            .split_whitespace()
                            .map(|n| n.parse::<u64>().unwrap_or(0))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .fold(Vec::new(), |mut sum, counts| {
                sum.resize(sum.len().max(counts.len()), 0);
                sum.iter_mut().zip(counts).for_each(|(sum, n)| *sum += n);
                sum
            });
        let per_call = |i: usize| events.get(i).copied().unwrap_or(0) as f64 / calls as f64;
        let misses = if events.len() > 5 {
            format!(
                "   I1 misses {:>6.0}, D1 misses {:>5.0} read {:>5.0} write",
                per_call(3),
                per_call(4),
                per_call(5)
            )
        } else {
            String::new()
        };
        println!("{:<40} {:>14.0}{misses}", scenario.name, per_call(0));
    }
}

/// Exactly `calls` calls of `scenario`, as the load rounds make them, with no time limit.
async fn counted(scenario: &Scenario, options: &Options, calls: usize) {
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    match scenario.shape {
        Shape::Unary => unary_round(scenario, options, now, far, calls).await,
        Shape::Stream => stream_round(scenario, options, now, far, calls).await,
    };
}
