//! The reliability suite, whose figures RELIABILITY.md publishes: crash consistency under
//! SIGKILL, a PostgreSQL outage under load, the revocation race on two replicas, rate limits
//! shared by replicas, a model-based test of every key RPC, and a soak.
//!
//! Each test runs a short version in `cargo test` (so in CI, on SQLite and on PostgreSQL) and
//! the full length with `APIKEYS_RELIABILITY=full`, one test at a time so they do not share
//! the two cores with each other:
//!
//! ```sh
//! APIKEYS_RELIABILITY=full cargo test --test api reliability:: -- --test-threads 1 --nocapture
//! ```
//!
//! Every test prints its figures on a line starting `reliability:`.

mod crash;
mod model;
mod outage;
mod race;
mod shared_limits;
mod soak;

use std::time::Duration;

use apikeys::grpc::proto::{
    KeyEventType, ListKeyEventsRequest, ListKeysRequest, ValidateKeyRequest, ValidationResult,
    api_keys_client::ApiKeysClient,
};
use tonic::transport::Channel;

use crate::{
    scan::Recording,
    support::{POSTGRES_ENV, as_owner},
};

pub(crate) const FULL_ENV: &str = "APIKEYS_RELIABILITY";

/// Runs a test on a runtime whose threads log nothing. At RUST_LOG=trace (as CI runs the
/// suite for its log scan) these tests' bulk traffic, HTTP/2 frames and all, made most of
/// the run's 5.4 GB of logs; what they check is state, not logging, which the rest of the
/// suite covers call by call. The binary's own logs still go to the scan (binary.rs).
pub(crate) fn quietly<F: std::future::Future>(test: F) -> F::Output {
    let _quiet = silence();
    quiet_runtime().block_on(test)
}

/// This thread logs nothing until the guard is dropped.
pub(crate) fn silence() -> tracing::dispatcher::DefaultGuard {
    tracing::dispatcher::set_default(&tracing::Dispatch::none())
}

/// A runtime whose threads log nothing (they end with it).
pub(crate) fn quiet_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| std::mem::forget(silence()))
        .build()
        .expect("a runtime")
}

/// `short` in a plain `cargo test`, `full` with `APIKEYS_RELIABILITY=full`.
pub(crate) fn scale<T>(short: T, full: T) -> T {
    if std::env::var(FULL_ENV).is_ok_and(|v| v == "full") {
        full
    } else {
        short
    }
}

pub(crate) fn backend() -> &'static str {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => "postgresql",
        _ => "sqlite",
    }
}

/// Prints one test's figures, for RELIABILITY.md.
pub(crate) fn report(test: &str, figures: std::fmt::Arguments<'_>) {
    println!("reliability: {test} [{}]: {figures}", backend());
}

pub(crate) type Client = ApiKeysClient<Recording>;

/// A client of the server at `addr` (a running binary).
pub(crate) async fn connect(addr: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to apikeys");
    ApiKeysClient::new(Recording(channel))
}

/// The ids of every key a workspace lists, through all its pages.
pub(crate) async fn listed_ids(client: &mut Client, workspace: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_keys(as_owner(ListKeysRequest {
                workspace_id: workspace.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            }))
            .await
            .expect("list keys")
            .into_inner();
        ids.extend(page.keys.into_iter().map(|key| key.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// Validates every secret, sixteen at a time; the answers in the same order.
pub(crate) async fn validate_all(client: &Client, secrets: &[String]) -> Vec<ValidationResult> {
    let mut tasks = tokio::task::JoinSet::new();
    let chunk = secrets.len().div_ceil(16).max(1);
    for (n, part) in secrets.chunks(chunk).enumerate() {
        let (mut client, part) = (client.clone(), part.to_vec());
        tasks.spawn(async move {
            let mut results = Vec::with_capacity(part.len());
            for key in part {
                let answer = client
                    .validate_key(ValidateKeyRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .expect("validate")
                    .into_inner();
                results.push(answer.result());
            }
            (n, results)
        });
    }
    let mut parts = tasks.join_all().await;
    parts.sort_by_key(|(n, _)| *n);
    parts.into_iter().flat_map(|(_, results)| results).collect()
}

/// Every event of a workspace's audit trail, newest first: (key id, type, new key id).
pub(crate) async fn events(
    client: &mut Client,
    workspace: &str,
) -> Vec<(String, KeyEventType, String)> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_key_events(as_owner(ListKeyEventsRequest {
                workspace_id: workspace.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            }))
            .await
            .expect("list key events")
            .into_inner();
        events.extend(
            page.events
                .into_iter()
                .map(|event| (event.key_id.clone(), event.r#type(), event.new_key_id)),
        );
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// The `apikeys` binary on `db`, its management rate limit out of the load's way (the limit
/// has tests of its own).
pub(crate) fn server(db: &crate::support::TestDb) -> std::process::Command {
    let mut command = crate::binary::command(db);
    command
        .env("APIKEYS_MANAGEMENT_RATE", "1000000")
        .env("APIKEYS_MANAGEMENT_BURST", "1000000");
    command
}
