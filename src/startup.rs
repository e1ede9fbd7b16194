//! Builds the server: database, migrations, services, health, reflection; runs it until told
//! to stop.

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    callers::{Callers, CallersFileError},
    clock::{Clock, SystemClock},
    config::Settings,
    grpc::{
        ApiKeysService,
        guard::{Authenticate, Deadline, Guard, HealthWatches, InFlight, ManagementRate, Rate},
        observe::Observe,
        proto,
    },
    index::{KeyIndex, SyncSettings, Syncer},
    metrics::Metrics,
    net::{Connections, Incoming},
    service::KeyService,
    store::{Store, StoreError},
    tls::ReloadableTls,
};

/// The service name health reports on, besides the whole server (`""`).
pub const SERVICE_NAME: &str = "cloodot.apikeys.v1.ApiKeys";

/// Every name health reports on for readiness: the whole server and the API. Both turn
/// NOT_SERVING when the index is stale and on shutdown.
pub(crate) const HEALTH_NAMES: [&str; 2] = ["", SERVICE_NAME];

/// The health name for liveness probes: SERVING for as long as the process serves, through
/// database outages too (restarting would not bring the database back, and a replica
/// without one could not even start).
pub const LIVENESS_NAME: &str = "liveness";

/// The largest request message any service decodes; ValidateKey holds its own to 16 KiB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest block of request headers (metadata) a connection accepts.
const MAX_HEADER_BYTES: u32 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "refusing to serve {addr} without caller authentication: anyone who reaches it could \
         manage keys for any workspace. Give callers tokens (`apikeys caller-token new NAME \
         --role admin|gateway`, listed in --callers-file / APIKEYS_CALLERS_FILE), or listen on \
         loopback, or, if your network authenticates callers itself, pass \
         --insecure-no-caller-auth"
    )]
    InsecureListen { addr: SocketAddr },
    #[error(transparent)]
    Callers(#[from] CallersFileError),
    #[error(
        "the callers file names callers by certificate (san:), which needs mutual TLS: set --tls-client-ca"
    )]
    CertificateCallersWithoutMutualTls,
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot open the database: {0}")]
    Database(#[source] StoreError),
    #[error("cannot run migrations: {0}")]
    Migrations(#[source] StoreError),
    #[error("cannot load the key index: {0}")]
    IndexLoad(#[source] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A server bound to its port, ready to run.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    /// The Prometheus listener and its address, when metrics are on.
    metrics: Option<(TcpListener, SocketAddr)>,
    store: Store,
    clock: Arc<dyn Clock>,
    syncer: Arc<Syncer>,
    callers: Option<Callers>,
    tls: Option<Arc<ReloadableTls>>,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Connects, migrates and binds. Bind to port 0 and read [`Self::port`] in tests.
    pub async fn build_with_clock(
        settings: &Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let tls = settings
            .tls_files()
            .map(ReloadableTls::load)
            .transpose()?
            .map(Arc::new);
        let callers = caller_authentication(settings)?;
        let store = connect_and_migrate(&settings.database_url).await?;
        let sync_settings = SyncSettings {
            poll_interval: settings.sync_poll_interval,
            staleness_bound: settings.staleness_bound,
            flush_interval: settings.flush_interval,
        };
        let syncer = Arc::new(Syncer::new(
            store.clone(),
            Arc::new(KeyIndex::recording_usage(settings.record_usage)),
            sync_settings,
        ));
        // Health turns SERVING only once every key is in memory.
        let started = std::time::Instant::now();
        let loaded = syncer.load().await.map_err(StartupError::IndexLoad)?;
        tracing::info!(
            keys = loaded,
            took_ms = started.elapsed().as_millis() as u64,
            "key index loaded"
        );
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: settings.listen,
            source,
        })?;
        let metrics = match settings.metrics_listen {
            Some(listen) => {
                let bind_error = |source| StartupError::Bind {
                    addr: listen,
                    source,
                };
                let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
                let addr = listener.local_addr().map_err(bind_error)?;
                Some((listener, addr))
            }
            None => None,
        };
        Ok(Self {
            listener,
            addr,
            metrics,
            store,
            clock,
            syncer,
            callers,
            tls,
            settings: settings.clone(),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where Prometheus metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until `shutdown` resolves: health turns NOT_SERVING at once, in-flight calls
    /// finish (for at most the shutdown grace), then the database is closed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let health = HealthReporter::new();
        let health_service = crate::grpc::codec::HealthServer::new(&health);
        set_health(&health, ServingStatus::Serving).await;
        health
            .set_service_status(LIVENESS_NAME, ServingStatus::Serving)
            .await;

        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let (stop_sync, sync_stopped) = tokio::sync::watch::channel(false);
        let connections = Connections::new(
            self.settings.connection_limits().within_descriptor_limit(
                self.metrics
                    .as_ref()
                    .map_or(0, |_| self.settings.metrics_max_connections),
            ),
        );
        let metrics = self.metrics.map(|(listener, addr)| {
            let metrics = Arc::new(
                Metrics::new()
                    .with_flushes_of(&self.syncer)
                    .with_connections_of(&connections),
            );
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            let serving = tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                self.syncer.clone(),
                self.store.clone(),
                crate::metrics::ListenerLimits {
                    max_connections: self.settings.metrics_max_connections,
                    header_timeout: self.settings.handshake_timeout,
                },
                sync_stopped.clone(),
            ));
            (metrics, AbortOnDrop(vec![serving]))
        });
        let (metrics, _metrics_task) = metrics.unzip();
        let keys = KeyService::new(self.store.clone(), self.clock.clone(), self.syncer.clone());
        let ext_authz = crate::grpc::ExtAuthzService::new(
            keys.clone(),
            crate::grpc::GatewaySettings {
                key_headers: self.settings.gateway_key_headers.clone(),
                hide_credentials: self.settings.gateway_hide_credentials,
            },
            metrics.clone(),
        );
        let limits = &self.settings;
        let management_rate = ManagementRate::new(
            Rate {
                per_second: limits.management_caller_rate,
                burst: limits.management_caller_burst,
            },
            Rate {
                per_second: limits.management_rate,
                burst: limits.management_burst,
            },
        );
        // Tells open ValidateKeys streams that the server is draining, so they end at once
        // rather than hold the drain for its whole grace.
        let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
        let api = ApiKeysService::new(keys, management_rate.clone())
            .with_metrics(metrics.clone())
            .with_draining(draining_rx);
        let mut sync_tasks = self.syncer.spawn(health.clone(), sync_stopped.clone());
        sync_tasks.push(tokio::spawn(crate::retention::prune_loop(
            self.store.clone(),
            self.clock,
            self.settings.retention,
            self.settings.prune_interval,
            sync_stopped,
        )));

        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = {
            let health = health.clone();
            let syncer = self.syncer.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
                syncer.stop_reporting();
                set_health(&health, ServingStatus::NotServing).await;
                let _ = draining_tx.send(true);
                let _ = stopping_tx.send(());
            }
        };

        let server = Server::builder()
            .http2_max_header_list_size(MAX_HEADER_BYTES)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            // Outermost, so calls the guards turn away are counted and traced too.
            .layer(Observe(metrics))
            // One layer, the checks in this order: authentication before the in-flight
            // limit, which keeps each caller to its share.
            .layer(Guard((
                (
                    (
                        Deadline(limits.request_timeout),
                        Authenticate::new(self.callers),
                    ),
                    InFlight::new(
                        limits.max_in_flight,
                        limits.max_in_flight_per_caller,
                        limits.request_body_timeout,
                    ),
                ),
                (
                    HealthWatches::new(
                        limits.max_health_watches,
                        limits.max_health_watches_per_connection,
                    ),
                    management_rate,
                ),
            )))
            .add_service(health_service.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(reflection_v1.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(reflection_v1alpha.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(crate::grpc::ApiKeysRoutes::new(api, MAX_REQUEST_BYTES))
            .add_service(
                crate::grpc::ExtAuthzServer::new(ext_authz)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            );
        // Connections are accepted (and TLS handshaken) by tasks of their own, stopped with
        // the server however it stops.
        let (incoming, accepting) =
            crate::net::accept(self.listener, connections, self.tls.clone());
        let mut tasks = vec![accepting];
        if let Some(tls) = &self.tls {
            tasks.push(tls.watch(self.settings.tls_reload_interval));
        }
        let tls_tasks = AbortOnDrop(tasks);
        // Only now: tests and operators take this line to mean connections are accepted and
        // SIGHUP reloads.
        tracing::info!(
            addr = %self.addr,
            backend = ?self.store.backend(),
            tls = match &self.tls {
                Some(tls) if tls.is_mutual() => "mutual",
                Some(_) => "on",
                None => "off",
            },
            "serving gRPC"
        );
        let server = async move {
            match incoming {
                Incoming::Plain(plain) => server.serve_with_incoming_shutdown(plain, signal).await,
                Incoming::Tls(tls) => server.serve_with_incoming_shutdown(tls, signal).await,
            }
        };
        let grace = self.settings.shutdown_grace;
        tokio::select! {
            served = server => served?,
            // Long-lived streams (health watches) would hold a graceful drain open forever.
            () = async {
                if stopping_rx.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => tracing::warn!(?grace, "calls still open after the shutdown grace; closing them"),
        }
        drop(tls_tasks);
        // The sync loops end with a last flush of last-used times and usage.
        let _ = stop_sync.send(true);
        for task in sync_tasks {
            let _ = task.await;
        }
        if let Err(err) = self.store.close().await {
            tracing::warn!(error = %err, "closing the database");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Tasks that must not outlive the server.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Opens the database and brings its schema up to date: `apikeys migrate`, and the first step
/// of every start.
pub async fn connect_and_migrate(database_url: &str) -> Result<Store, StartupError> {
    let store = Store::connect(database_url)
        .await
        .map_err(StartupError::Database)?;
    store.migrate().await.map_err(StartupError::Migrations)?;
    Ok(store)
}

/// Reflection over the contract and health, so grpcurl needs no .proto files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// The callers file, if any; refuses to go on when nothing would authenticate callers on a
/// port the network can reach.
fn caller_authentication(settings: &Settings) -> Result<Option<Callers>, StartupError> {
    let mutual_tls = settings.tls_files().is_some_and(|f| f.client_ca.is_some());
    let Some(path) = &settings.callers_file else {
        if mutual_tls {
            // Every client proves a certificate from the client CA: that CA is the authority.
            tracing::info!(
                "no callers file: every client with a certificate from the client CA is admitted"
            );
        } else if settings.insecure_no_caller_auth {
            tracing::warn!(
                addr = %settings.listen,
                "--insecure-no-caller-auth: every caller that reaches this port is admitted; \
                 the network must authenticate callers"
            );
        } else if !settings.listen.ip().is_loopback() {
            return Err(StartupError::InsecureListen {
                addr: settings.listen,
            });
        }
        return Ok(None);
    };
    let callers = Callers::load(path)?;
    if callers.names_certificates() && !mutual_tls {
        return Err(StartupError::CertificateCallersWithoutMutualTls);
    }
    tracing::info!(callers = callers.len(), "caller authentication on");
    Ok(Some(callers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(listen: &str) -> Settings {
        Settings::new(listen.parse().unwrap(), "sqlite://unused.db")
    }

    #[test]
    fn only_loopback_may_go_without_caller_authentication() {
        assert!(caller_authentication(&settings("127.0.0.1:50051")).is_ok());
        assert!(caller_authentication(&settings("[::1]:50051")).is_ok());
        for reachable in ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"] {
            assert!(matches!(
                caller_authentication(&settings(reachable)),
                Err(StartupError::InsecureListen { .. })
            ));
            let mut insecure = settings(reachable);
            insecure.insecure_no_caller_auth = true;
            assert!(matches!(caller_authentication(&insecure), Ok(None)));
        }
    }
}
