//! The real server on port 0 against a fresh database, and a tonic client for it.

use std::{sync::Arc, time::Duration};

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
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use super::{TestDb, as_owner, logs::capture_logs};
use crate::scan::Recording;

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
        let db = std::mem::replace(&mut self.db, TestDb::handed_back());
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
        Store::connect(&self.db.url, 4)
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
