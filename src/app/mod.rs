//! The Application: builds the server (database, migrations, the index, services, health,
//! reflection), runs it with its background tasks, and shuts it down.

mod health;
mod retention;
mod router;
pub mod signal;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic_health::server::HealthReporter;

pub use self::health::LIVENESS_NAME;
pub use crate::tls::TlsError;
use crate::{
    auth::{LiveCallers, ReloadError},
    clock::{Clock, SystemClock},
    config::Settings,
    grpc::{
        ApiKeysService, ExtAuthzService,
        guard::{ManagementRate, Rate},
    },
    index::{KeyIndex, Syncer},
    net::{Connections, Incoming},
    observability::metrics::{Metrics, Readings},
    service::KeyService,
    store::{Store, StoreError},
    tls::ReloadableTls,
};

/// The service name health reports on, besides the whole server (`""`).
pub const SERVICE_NAME: &str = "cloodot.apikeys.v1.ApiKeys";

/// The largest request message any service decodes; ValidateKey holds its own to 16 KiB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
    Callers(#[from] ReloadError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] TlsError),
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
    callers: Option<Arc<LiveCallers>>,
    tls: Option<Arc<ReloadableTls>>,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Connects, migrates and binds. Bind to port 0 and read [`Self::local_addr`] in tests.
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
        let store =
            connect_and_migrate(&settings.database_url, settings.database_pool_size).await?;
        let syncer = Arc::new(Syncer::new(
            store.clone(),
            Arc::new(KeyIndex::recording_usage(settings.record_usage)),
            settings.sync_settings(),
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
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let health = HealthReporter::new();
        let health_service = crate::grpc::codec::HealthServer::new(&health);
        let (stop_tasks, tasks_stopped) = watch::channel(false);
        let connections = Connections::new(
            self.settings.connection_limits().within_descriptor_limit(
                self.metrics
                    .as_ref()
                    .map_or(0, |_| self.settings.metrics_max_connections),
            ),
        );
        let (metrics, _metrics_task) = self
            .serve_metrics(&connections, tasks_stopped.clone())
            .unzip();
        let management_rate = self.management_rate();
        // Tells open ValidateKeys streams that the server is draining, so they end at once
        // rather than hold the drain for its whole grace.
        let (draining_tx, draining_rx) = watch::channel(false);
        let (api, ext_authz) = self.services(metrics.clone(), &management_rate, draining_rx);
        let (fresh, mut tasks) = self.syncer.spawn(tasks_stopped.clone());
        tasks.push(tokio::spawn(retention::prune_loop(
            self.store.clone(),
            self.clock.clone(),
            self.settings.retention,
            self.settings.prune_interval,
            tasks_stopped,
        )));
        let (stop_health, health_stopped) = watch::channel(false);
        let reporting = health::report(health, fresh, health_stopped).await;

        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
            let _ = stop_health.send(true);
            // Readiness is NOT_SERVING before the drain begins.
            let _ = reporting.await;
            let _ = draining_tx.send(true);
            let _ = stopping_tx.send(());
        };
        let callers_watch = self
            .callers
            .as_ref()
            .map(|callers| callers.watch(self.settings.callers_reload_interval));
        let server = router::server(
            &self.settings,
            metrics,
            self.callers,
            management_rate,
            router::Services {
                health: health_service,
                api,
                ext_authz,
            },
        )?;
        // Connections are accepted (and TLS handshaken) by tasks of their own, stopped with
        // the server however it stops.
        let (incoming, accepting) =
            crate::net::accept(self.listener, connections, self.tls.clone());
        let mut accept_tasks = vec![accepting];
        if let Some(tls) = &self.tls {
            accept_tasks.push(tls.watch(self.settings.tls_reload_interval));
        }
        accept_tasks.extend(callers_watch);
        let accept_tasks = AbortOnDrop(accept_tasks);
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
        serve(
            server,
            incoming,
            signal,
            stopping_rx,
            self.settings.shutdown_grace,
        )
        .await?;
        drop(accept_tasks);
        // The sync loops end with a last flush of last-used times and usage.
        let _ = stop_tasks.send(true);
        for task in tasks {
            let _ = task.await;
        }
        if let Err(err) = self.store.close().await {
            tracing::warn!(error = %err, "closing the database");
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Starts the Prometheus listener, when metrics are on.
    fn serve_metrics(
        &mut self,
        connections: &Arc<Connections>,
        stop: watch::Receiver<bool>,
    ) -> Option<(Arc<Metrics>, AbortOnDrop)> {
        let (listener, addr) = self.metrics.take()?;
        let mut metrics = Metrics::new()
            .with_flush_counters(
                self.syncer.flush_failures.clone(),
                self.syncer.usage_dropped.clone(),
            )
            .with_credit_counters(&self.syncer)
            .with_connections_of(connections);
        if self.store.backend() == sea_orm::DatabaseBackend::Postgres {
            metrics = metrics.with_listener(self.syncer.listener_connected.clone());
        }
        let metrics = Arc::new(metrics);
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let (syncer, store) = (self.syncer.clone(), self.store.clone());
        let read = move || {
            let (pool_connections, pool_idle) = store.pool_use();
            Readings {
                index_keys: syncer.index().len(),
                sync_age: syncer.staleness(),
                pool_connections,
                pool_idle,
            }
        };
        let serving = tokio::spawn(crate::observability::metrics::serve(
            listener,
            metrics.clone(),
            read,
            crate::observability::metrics::ListenerLimits {
                max_connections: self.settings.metrics_max_connections,
                header_timeout: self.settings.handshake_timeout,
            },
            stop,
        ));
        Some((metrics, AbortOnDrop(vec![serving])))
    }

    /// Management calls' rates: per caller, and per workspace.
    fn management_rate(&self) -> ManagementRate {
        let limits = &self.settings;
        ManagementRate::new(
            Rate {
                per_second: limits.management_caller_rate,
                burst: limits.management_caller_burst,
            },
            Rate {
                per_second: limits.management_rate,
                burst: limits.management_burst,
            },
        )
    }

    /// The ApiKeys service and Envoy's Check, over one key service.
    fn services(
        &self,
        metrics: Option<Arc<Metrics>>,
        management_rate: &ManagementRate,
        draining: watch::Receiver<bool>,
    ) -> (ApiKeysService, ExtAuthzService) {
        let keys = KeyService::new(self.store.clone(), self.clock.clone(), self.syncer.clone());
        let ext_authz = ExtAuthzService::new(
            keys.clone(),
            self.settings.gateway_settings(),
            metrics.clone(),
        );
        let api = ApiKeysService::new(keys, management_rate.clone())
            .with_metrics(metrics)
            .with_draining(draining);
        (api, ext_authz)
    }
}

/// Serves until the shutdown `signal` has run and the drain has ended, or its `grace` (from
/// when `stopping` fired) has passed.
async fn serve(
    server: tonic::transport::server::Router<router::Layers>,
    incoming: Incoming,
    signal: impl Future<Output = ()> + Send + 'static,
    stopping: tokio::sync::oneshot::Receiver<()>,
    grace: std::time::Duration,
) -> Result<(), StartupError> {
    let server = async move {
        match incoming {
            Incoming::Plain(plain) => server.serve_with_incoming_shutdown(plain, signal).await,
            Incoming::Tls(tls) => server.serve_with_incoming_shutdown(tls, signal).await,
        }
    };
    tokio::select! {
        served = server => served?,
        // Long-lived streams (health watches) would hold a graceful drain open forever.
        () = async {
            if stopping.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!(?grace, "calls still open after the shutdown grace; closing them"),
    }
    Ok(())
}

/// Tasks that must not outlive the server.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Opens the database and brings its schema up to date: `apikeys migrate`, and the first step
/// of every start.
pub async fn connect_and_migrate(
    database_url: &str,
    pool_size: u32,
) -> Result<Store, StartupError> {
    let store = Store::connect(database_url, pool_size)
        .await
        .map_err(StartupError::Database)?;
    store.migrate().await.map_err(StartupError::Migrations)?;
    Ok(store)
}

/// The callers file, if any; refuses to go on when nothing would authenticate callers on a
/// port the network can reach.
fn caller_authentication(settings: &Settings) -> Result<Option<Arc<LiveCallers>>, StartupError> {
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
    let callers = LiveCallers::load(path.clone(), mutual_tls)?;
    tracing::info!(
        callers = callers.current().len(),
        "caller authentication on"
    );
    Ok(Some(Arc::new(callers)))
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
