//! Starts the real server on port 0 against a fresh database, and talks to it with tonic.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use apikeys::{
    app::Application,
    clock::ManualClock,
    config::Settings,
    grpc::proto::{
        ApiKey, CreateKeyRequest, Expiration, ListKeysRequest, ValidateKeyRequest,
        ValidateKeyResponse, api_keys_client::ApiKeysClient,
    },
    store::Store,
};
use sea_orm::{ConnectionTrait, Database};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::scan::{Recording, scan_file};

/// `APIKEYS_TEST_DATABASE_URL` (a PostgreSQL server URL) runs every test on a fresh PostgreSQL
/// database; without it each test gets a fresh SQLite file.
pub(crate) const POSTGRES_ENV: &str = "APIKEYS_TEST_DATABASE_URL";

/// A fresh database for one test, dropped with it (SQLite) or left for the throwaway server.
#[derive(Debug)]
pub(crate) struct TestDb {
    pub(crate) url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub(crate) async fn new() -> Self {
        match std::env::var(POSTGRES_ENV) {
            Ok(server) if !server.is_empty() => {
                let name = format!("apikeys_test_{}", random_suffix());
                let admin = Database::connect(server.as_str())
                    .await
                    .expect("connect to the PostgreSQL test server");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create a test database");
                admin.close().await.ok();
                Self {
                    url: with_database(&server, &name),
                    _dir: None,
                }
            }
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("apikeys.db").display()
                );
                Self {
                    url,
                    _dir: Some(dir),
                }
            }
        }
    }

    /// Another handle on a database that someone else owns (a second replica, a proxy).
    pub(crate) fn sharing(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            _dir: None,
        }
    }

    /// Path of the SQLite file, for tests that read its raw bytes.
    pub(crate) fn sqlite_dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|d| d.path())
    }
}

fn random_suffix() -> String {
    apikeys::domain::KeyId::generate().as_str()[4..].to_ascii_lowercase()
}

/// `postgres://u@h:p/db?x` with `db` replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = server
        .split_once('?')
        .map_or((server, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{}", &base[..host_end], name);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

#[derive(Debug)]
pub(crate) struct TestApp {
    pub(crate) addr: std::net::SocketAddr,
    /// Where Prometheus metrics are served, when the test turned them on.
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) client: ApiKeysClient<Recording>,
    pub(crate) channel: Channel,
    pub(crate) clock: ManualClock,
    pub(crate) db: TestDb,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), apikeys::app::StartupError>>>,
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_on(TestDb::new().await, ManualClock::new(chrono::Utc::now())).await
}

/// Starts a server on an existing database, e.g. after a restart.
pub(crate) async fn spawn_app_on(db: TestDb, clock: ManualClock) -> TestApp {
    spawn_app_with(db, clock, |_| {}).await
}

/// Starts a server with adjusted settings.
pub(crate) async fn spawn_app_with(
    db: TestDb,
    clock: ManualClock,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    capture_logs();
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), db.url.clone());
    // Tests create keys far faster than any person; the rate limit has tests of its own.
    settings.management_rate = std::num::NonZeroU32::MAX;
    settings.management_burst = std::num::NonZeroU32::MAX;
    settings.management_caller_rate = std::num::NonZeroU32::MAX;
    settings.management_caller_burst = std::num::NonZeroU32::MAX;
    adjust(&mut settings);
    let app = Application::build_with_clock(&settings, Arc::new(clock.clone()))
        .await
        .expect("build the app");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let (tx, rx) = oneshot::channel();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    // Lazy: a TLS server's tests bring their own client.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    TestApp {
        addr,
        metrics_addr,
        client: ApiKeysClient::new(Recording(channel.clone())),
        channel,
        clock,
        db,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    /// Stops the server gracefully and hands back its database.
    pub(crate) async fn stop(mut self) -> (TestDb, ManualClock) {
        self.stop_server().await;
        let db = std::mem::replace(
            &mut self.db,
            TestDb {
                url: String::new(),
                _dir: None,
            },
        );
        (db, self.clock.clone())
    }

    async fn stop_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("server stops within its grace")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// A second connection to the same database, to look at what is stored.
    pub(crate) async fn store(&self) -> Store {
        Store::connect(&self.db.url)
            .await
            .expect("connect to the test database")
    }

    pub(crate) async fn create_key(
        &mut self,
        workspace: &str,
        name: &str,
        expiration: Expiration,
    ) -> (ApiKey, String) {
        let response = self
            .client
            .create_key(as_owner(CreateKeyRequest {
                workspace_id: workspace.into(),
                name: name.into(),
                expiration: expiration.into(),
                ..Default::default()
            }))
            .await
            .expect("create a key")
            .into_inner();
        (response.key.expect("created key"), response.secret)
    }

    /// The first page of a workspace's keys, as its owner sees them.
    pub(crate) async fn list(&mut self, workspace: &str) -> Vec<ApiKey> {
        let request = ListKeysRequest {
            workspace_id: workspace.into(),
            ..Default::default()
        };
        self.client
            .list_keys(as_owner(request))
            .await
            .expect("list keys")
            .into_inner()
            .keys
    }

    pub(crate) async fn validate(&mut self, key: &str) -> ValidateKeyResponse {
        self.client
            .validate_key(ValidateKeyRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .expect("validate")
            .into_inner()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A request from a workspace owner, as the admin backend sends it.
pub(crate) fn as_owner<T>(message: T) -> Request<T> {
    as_actor(message, "user_owner", "owner")
}

/// Actors that may not manage keys, with the refusal each gets: a role that is not owner or
/// admin, and no actor at all.
pub(crate) const REFUSED_ACTORS: [(Option<&str>, Code, &str); 2] = [
    (Some("member"), Code::PermissionDenied, "ROLE_NOT_ALLOWED"),
    (None, Code::Unauthenticated, "ACTOR_MISSING"),
];

/// A request from `user_1` in `role`, or with no actor metadata at all.
pub(crate) fn as_role<T>(role: Option<&str>, message: T) -> Request<T> {
    match role {
        Some(role) => as_actor(message, "user_1", role),
        None => Request::new(message),
    }
}

pub(crate) fn as_actor<T>(message: T, id: &str, role: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-actor-id", id.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-actor-role", role.parse().unwrap());
    request
}

/// Asserts a gRPC error's code and its `google.rpc.ErrorInfo` reason and domain.
pub(crate) fn assert_error(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "apikeys.cloodot");
}

/// Everything any test's server logged, at every level, since the test binary started.
pub(crate) fn captured_logs() -> String {
    let logs = LOGS.get().expect("logs are captured");
    String::from_utf8_lossy(&logs.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// The captured logs, and with the log scan on, their file.
#[derive(Clone)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>, Option<Arc<Mutex<std::fs::File>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        if let Some(file) = &self.1 {
            file.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of every level from our code and the database layer goes to one buffer, so
/// tests can prove no secret is ever logged.
fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let file = scan_file("logs").map(|path| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the log file of the log scan");
            Arc::new(Mutex::new(file))
        });
        let writer = LogBuffer(buffer.clone(), file);
        // RUST_LOG=trace (as .ci/run sets for the log scan) takes every crate's every line.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("trace,h2=debug,hyper=debug,tower=debug,tonic=debug")
        });
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init()
            .ok();
        buffer
    });
}

/// A TCP proxy in front of the test database that a test can cut and restore: the database
/// becomes unreachable (connections reset, new ones refused) without stopping the server
/// other tests share.
#[derive(Debug)]
pub(crate) struct TcpCut {
    pub(crate) url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpCut {
    /// Proxies the host and port of a `postgres://` URL; `url` is the same URL via the proxy.
    pub(crate) async fn start(database_url: &str) -> Self {
        let after_scheme = database_url.find("://").unwrap() + 3;
        let authority_end = database_url[after_scheme..]
            .find('/')
            .map_or(database_url.len(), |i| after_scheme + i);
        let authority = &database_url[after_scheme..authority_end];
        let host_port = authority.rsplit('@').next().unwrap().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let user = authority
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        let url = format!(
            "{}{user}{proxy}{}",
            &database_url[..after_scheme],
            &database_url[authority_end..]
        );
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, links) = (cut.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the client sees a reset
                    }
                    let upstream = host_port.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(link.abort_handle());
                }
            })
        };
        Self {
            url,
            cut,
            links,
            accept,
        }
    }

    /// The database becomes unreachable: open connections drop, new ones are refused.
    pub(crate) fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            link.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
