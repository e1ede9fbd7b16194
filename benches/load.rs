//! Closed-loop gRPC load generator: ValidateKey (hits, unknown keys, malformed keys) against a
//! real `apikeys` process, and the same RPC against a bare tonic service that answers at once
//! (the transport baseline), with the servers pinned to core 0 and this generator to core 1.
//!
//!     cargo bench --bench load                      # SQLite in a temp dir, 10 s per scenario
//!     cargo bench --bench load -- --seconds 5 --concurrency 64 --database-url postgres://...
//!
//! Prints one line per scenario: throughput, p50/p99/p999 latency and the ratio to the echo
//! baseline. BENCHMARKS.md quotes its output.

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{
    self, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse, Expiration,
    ListKeysRequest, ListKeysResponse, ValidateKeyRequest, ValidateKeyResponse, ValidationResult,
    api_keys_client::ApiKeysClient,
    api_keys_server::{ApiKeys, ApiKeysServer},
};
use hdrhistogram::Histogram;
use tonic::{Request, Response, Status, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_apikeys");

#[derive(Debug, Clone)]
struct Options {
    seconds: u64,
    warmup: u64,
    concurrency: usize,
    connections: usize,
    keys: usize,
    database_url: Option<String>,
    server_core: String,
    client_core: String,
}

fn options() -> Options {
    let mut options = Options {
        seconds: 10,
        warmup: 2,
        concurrency: 64,
        connections: 4,
        keys: 1000,
        database_url: None,
        server_core: "0".into(),
        client_core: "1".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--warmup" => options.warmup = value().parse().unwrap(),
            "--concurrency" => options.concurrency = value().parse().unwrap(),
            "--connections" => options.connections = value().parse().unwrap(),
            "--keys" => options.keys = value().parse().unwrap(),
            "--database-url" => options.database_url = Some(value()),
            "--server-core" => options.server_core = value(),
            "--client-core" => options.client_core = value(),
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
    let dir = tempfile::tempdir().unwrap();
    let database_url = options.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        )
    });
    println!(
        "# {} s per scenario after {} s warm-up, {} requests in flight over {} connections; servers on core {}, generator on core {}",
        options.seconds,
        options.warmup,
        options.concurrency,
        options.connections,
        options.server_core,
        options.client_core
    );
    println!("# database: {}", redact(&database_url));

    let echo = Server::start_echo(&options);
    let apikeys = Server::start_apikeys(&options, &database_url);

    let echo_channels = channels(&echo.addr, options.connections).await;
    let api_channels = channels(&apikeys.addr, options.connections).await;
    let secrets = create_keys(&api_channels[0], options.keys).await;
    let unknown: Vec<String> = (0..options.keys)
        .map(|_| apikeys::domain::Secret::generate().expose().to_owned())
        .collect();
    let malformed: Vec<String> = (0..options.keys)
        .map(|i| format!("clo_not-a-key-{i}"))
        .collect();

    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "req/s", "p50 µs", "p99 µs", "p999 µs", "× echo"
    );
    let baseline = scenario(
        "echo (bare tonic)",
        &echo_channels,
        &unknown,
        ValidationResult::Valid,
        &options,
        None,
    )
    .await;
    scenario(
        "ValidateKey hit",
        &api_channels,
        &secrets,
        ValidationResult::Valid,
        &options,
        Some(baseline),
    )
    .await;
    scenario(
        "ValidateKey unknown key",
        &api_channels,
        &unknown,
        ValidationResult::NotFound,
        &options,
        Some(baseline),
    )
    .await;
    scenario(
        "ValidateKey malformed",
        &api_channels,
        &malformed,
        ValidationResult::Malformed,
        &options,
        Some(baseline),
    )
    .await;
    drop(apikeys);
    drop(echo);
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Runs one closed-loop scenario and prints its line; returns its throughput.
async fn scenario(
    name: &str,
    channels: &[Channel],
    keys: &[String],
    expected: ValidationResult,
    options: &Options,
    baseline: Option<f64>,
) -> f64 {
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(options.warmup);
    let end = measure_from + Duration::from_secs(options.seconds);
    let tasks: Vec<_> = (0..options.concurrency)
        .map(|task| {
            let mut client = ApiKeysClient::new(channels[task % channels.len()].clone());
            let keys = keys.clone();
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
                    let response = client
                        .validate_key(ValidateKeyRequest { key })
                        .await
                        .expect("ValidateKey");
                    let took = sent.elapsed();
                    assert_eq!(response.into_inner().result(), expected);
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
    let rate = count as f64 / options.seconds as f64;
    let ratio = baseline.map_or("1.00".to_owned(), |b| format!("{:.2}", rate / b));
    println!(
        "{:<28} {:>10.0} {:>9} {:>9} {:>9} {:>8}",
        name,
        rate,
        histogram.value_at_quantile(0.50),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        ratio
    );
    rate
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

async fn create_keys(channel: &Channel, n: usize) -> Vec<String> {
    let mut client = ApiKeysClient::new(channel.clone());
    let mut secrets = Vec::with_capacity(n);
    for i in 0..n {
        let mut request = Request::new(CreateKeyRequest {
            workspace_id: format!("bench-{}", i % 10),
            name: format!("bench key {i}"),
            expiration: Expiration::Never.into(),
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
    fn start_apikeys(options: &Options, database_url: &str) -> Self {
        let port = free_port();
        let child = Command::new("taskset")
            .args(["-c", &options.server_core, BIN])
            .env("APIKEYS_LISTEN", format!("127.0.0.1:{port}"))
            .env("APIKEYS_DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
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
    async fn validate_key(
        &self,
        request: Request<ValidateKeyRequest>,
    ) -> Result<Response<ValidateKeyResponse>, Status> {
        // Touch the input so the baseline decodes and answers like a real handler.
        let len = request.get_ref().key.len();
        Ok(Response::new(ValidateKeyResponse {
            valid: len > 0,
            result: proto::ValidationResult::Valid.into(),
            key_id: "key_AAAAAAAAAAAAAAAAAAAA".into(),
            workspace_id: "bench-0".into(),
            expire_time: None,
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
