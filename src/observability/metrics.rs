//! Prometheus metrics in the OpenMetrics text format, on a listener of their own
//! (`--metrics-listen` / `APIKEYS_METRICS_LISTEN`, off by default). No label ever carries a
//! key, a caller token, a workspace or any other caller-chosen text: methods and codes come
//! from fixed lists, so a flood of odd requests cannot grow the series either.

use std::{
    convert::Infallible,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{
        EncodeLabelSet,
        text::{encode_eof, encode_registry},
    },
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

use super::process::ProcessCollector;
use crate::{
    domain::{CheckDecision, Validation},
    net::Connections,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The methods whose successful calls are counted without a family lookup.
const HOT_METHODS: [&str; 3] = ["ValidateKey", "ext_authz.Check", "ValidateKeys"];

/// One series per answer, each made at start (so every one shows, at 0), found by an
/// exhaustive match rather than a lookup.
#[derive(Debug)]
struct ValidationCounters {
    valid: Counter,
    malformed: Counter,
    not_found: Counter,
    expired: Counter,
    disabled: Counter,
    deleted: Counter,
    insufficient_scope: Counter,
    ip_not_allowed: Counter,
    rate_limited: Counter,
    usage_exceeded: Counter,
}

impl ValidationCounters {
    fn new(series: impl Fn(Validation) -> Counter) -> Self {
        Self {
            valid: series(Validation::Valid),
            malformed: series(Validation::Malformed),
            not_found: series(Validation::NotFound),
            expired: series(Validation::Expired),
            disabled: series(Validation::Disabled),
            deleted: series(Validation::Deleted),
            insufficient_scope: series(Validation::InsufficientScope),
            ip_not_allowed: series(Validation::IpNotAllowed),
            rate_limited: series(Validation::RateLimited),
            usage_exceeded: series(Validation::UsageExceeded),
        }
    }

    fn of(&self, result: Validation) -> &Counter {
        match result {
            Validation::Valid => &self.valid,
            Validation::Malformed => &self.malformed,
            Validation::NotFound => &self.not_found,
            Validation::Expired => &self.expired,
            Validation::Disabled => &self.disabled,
            Validation::Deleted => &self.deleted,
            Validation::InsufficientScope => &self.insufficient_scope,
            Validation::IpNotAllowed => &self.ip_not_allowed,
            Validation::RateLimited => &self.rate_limited,
            Validation::UsageExceeded => &self.usage_exceeded,
        }
    }
}

/// One series per ext_authz decision, made at start, found by an exhaustive match.
#[derive(Debug)]
struct CheckCounters {
    allowed: Counter,
    missing_key: Counter,
    route_misconfigured: Counter,
    unavailable: Counter,
    refused: ValidationCounters,
}

impl CheckCounters {
    fn new(family: &Family<DecisionLabels, Counter>) -> Self {
        let series = |decision: CheckDecision| {
            let labels = DecisionLabels {
                decision: if decision.allowed() {
                    "allowed"
                } else {
                    "denied"
                },
                reason: decision.reason(),
            };
            family.get_or_create(&labels).clone()
        };
        Self {
            allowed: series(CheckDecision::Allowed),
            missing_key: series(CheckDecision::MissingKey),
            route_misconfigured: series(CheckDecision::RouteMisconfigured),
            unavailable: series(CheckDecision::Unavailable),
            // A VALID answer without its key is denied (failing closed), so it has a series
            // of its own too.
            refused: ValidationCounters::new(|answer| series(CheckDecision::Refused(answer))),
        }
    }

    fn of(&self, decision: CheckDecision) -> &Counter {
        match decision {
            CheckDecision::Allowed => &self.allowed,
            CheckDecision::MissingKey => &self.missing_key,
            CheckDecision::RouteMisconfigured => &self.route_misconfigured,
            CheckDecision::Unavailable => &self.unavailable,
            CheckDecision::Refused(answer) => self.refused.of(answer),
        }
    }
}

/// An answer's `result` label: its name in the proto, as the wire shows it.
pub(crate) fn result_label(result: Validation) -> &'static str {
    match result {
        Validation::Valid => "VALIDATION_RESULT_VALID",
        Validation::Malformed => "VALIDATION_RESULT_MALFORMED",
        Validation::NotFound => "VALIDATION_RESULT_NOT_FOUND",
        Validation::Expired => "VALIDATION_RESULT_EXPIRED",
        Validation::Disabled => "VALIDATION_RESULT_DISABLED",
        Validation::Deleted => "VALIDATION_RESULT_DELETED",
        Validation::InsufficientScope => "VALIDATION_RESULT_INSUFFICIENT_SCOPE",
        Validation::IpNotAllowed => "VALIDATION_RESULT_IP_NOT_ALLOWED",
        Validation::RateLimited => "VALIDATION_RESULT_RATE_LIMITED",
        Validation::UsageExceeded => "VALIDATION_RESULT_USAGE_EXCEEDED",
    }
}

/// Every metric the service keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The standard `process_*` metrics, unprefixed.
    process: Registry,
    rpcs: Family<RpcLabels, Counter>,
    undecodable: Family<MethodLabels, Counter>,
    durations: Family<RpcLabels, Histogram>,
    /// The series of the calls on every gateway request, answered OK, looked up once: a
    /// family lookup hashes its labels under a lock, twice per call.
    hot: [(&'static str, Counter, Histogram); 3],
    /// ValidateKey's answers: an atomic add per call.
    validations: ValidationCounters,
    /// ext_authz Check's decisions, likewise.
    checks: CheckCounters,
    index_keys: Gauge,
    sync_age: Gauge<f64, AtomicU64>,
    pool_connections: Gauge,
    pool_idle: Gauge,
    /// The gRPC port's open connections, when registered.
    connections: Option<(Arc<Connections>, Gauge)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("apikeys");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpcs",
            "gRPC calls answered, by method and status code",
            rpcs.clone(),
        );
        let undecodable = Family::<MethodLabels, Counter>::default();
        registry.register(
            "undecodable_requests",
            "Requests that were not protobuf of their RPC's request at all (INVALID_ARGUMENT, REQUEST_UNDECODABLE), by method: a broken or hostile client, apart from bad fields",
            undecodable.clone(),
        );
        // 50 µs to about 3.3 s.
        let durations = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_05, 2.0, 17))) as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a call's arrival to its response headers, by method and status code",
            durations.clone(),
        );
        let results = Family::<ResultLabels, Counter>::default();
        registry.register(
            "validations",
            "ValidateKey answers, by result",
            results.clone(),
        );
        let validations = ValidationCounters::new(|result| {
            let result = result_label(result);
            results.get_or_create(&ResultLabels { result }).clone()
        });
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "ext_authz_decisions",
            "Envoy ext_authz Check decisions, by decision (allowed, denied) and reason (a denial's reason, as its body says)",
            decisions.clone(),
        );
        let checks = CheckCounters::new(&decisions);
        // A gauge at 1, as Prometheus' own build_info: the OpenMetrics `info` type is not
        // understood by the classic text parsers (promtool's among them).
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running build, by version", build);
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector));
        let index_keys = Gauge::default();
        registry.register(
            "index_keys",
            "Keys in this replica's validation index, tombstones included",
            index_keys.clone(),
        );
        let sync_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "index_sync_age_seconds",
            "Time since this replica's last successful sync with the database started",
            sync_age.clone(),
        );
        let pool_connections = Gauge::default();
        registry.register(
            "db_pool_connections",
            "Open database connections in the pool",
            pool_connections.clone(),
        );
        let pool_idle = Gauge::default();
        registry.register(
            "db_pool_idle_connections",
            "Open database connections not in use",
            pool_idle.clone(),
        );
        let hot = HOT_METHODS.map(|method| {
            let labels = RpcLabels { method, code: "OK" };
            (
                method,
                rpcs.get_or_create(&labels).clone(),
                durations.get_or_create(&labels).clone(),
            )
        });
        Self {
            registry,
            process,
            rpcs,
            undecodable,
            durations,
            hot,
            validations,
            checks,
            index_keys,
            sync_age,
            pool_connections,
            pool_idle,
            connections: None,
        }
    }

    /// Registers the gRPC port's connection counts.
    pub(crate) fn with_connections_of(mut self, connections: &Arc<Connections>) -> Self {
        let open = Gauge::default();
        self.registry.register(
            "connections_open",
            "Open connections to the gRPC port",
            open.clone(),
        );
        self.registry.register(
            "connections_closed_by_server",
            "Connections the server closed or refused: over the cap (limit), over the cap per client IP (peer_limit), no handshake or preface in time (handshake_timeout), idle (idle)",
            connections.refused.clone(),
        );
        self.connections = Some((connections.clone(), open));
        self
    }

    /// Registers the counters of the index's flushes: failed ones, and answers dropped.
    /// Credit leases (`credit_leases`, `credit_lease_failures`) and the credits given back to
    /// their accounts or lost when a return failed, and rate-limit window leases
    /// (`rate_limit_leases`, `rate_limit_lease_failures`), from the syncer.
    pub(crate) fn with_credit_counters(mut self, syncer: &crate::index::Syncer) -> Self {
        for (name, help, counter) in [
            (
                "credit_leases",
                "Credit leases asked of the database (one round trip each; near the end of a balance some find nothing to take)",
                &syncer.credit_leases,
            ),
            (
                "credit_lease_failures",
                "Credit leases that failed (the database unavailable): the requests waiting for them were refused",
                &syncer.credit_lease_failures,
            ),
            (
                "credits_given_back",
                "Credits leased and not spent, given back to their keys' balances (idle near the end of a balance, or at shutdown)",
                &syncer.credits_given_back,
            ),
            (
                "credits_lost",
                "Credits leased and not spent whose return failed: gone from their balances",
                &syncer.credits_lost,
            ),
            (
                "rate_limit_leases",
                "Slices of rate-limit windows leased from the database (one write each; shared by every replica, so replicas together admit at most a limit per window)",
                &syncer.rate_limit_leases,
            ),
            (
                "rate_limit_lease_failures",
                "Rate-limit window leases that failed (the database unavailable): the requests waiting for them were refused",
                &syncer.rate_limit_lease_failures,
            ),
        ] {
            self.registry.register(name, help, counter.clone());
        }
        self
    }

    pub(crate) fn with_flush_counters(mut self, failures: Counter, dropped: Counter) -> Self {
        self.registry.register(
            "flush_failures",
            "Flushes of last-used times and usage that failed (each is retried by the next)",
            failures,
        );
        self.registry.register(
            "usage_dropped_answers",
            "ValidateKey answers counted but dropped: the backlog held while the database was unavailable was full",
            dropped,
        );
        self
    }

    /// Registers the PostgreSQL change listener's state.
    pub(crate) fn with_listener(mut self, connected: Gauge) -> Self {
        self.registry.register(
            "db_listener_connected",
            "1 while the PostgreSQL change listener (LISTEN) is connected; 0 means changes from other replicas arrive by polling only",
            connected,
        );
        self
    }

    /// Counts one request that did not decode.
    pub(crate) fn undecodable(&self, method: &'static str) {
        self.undecodable
            .get_or_create(&MethodLabels { method })
            .inc();
    }

    /// Counts one ext_authz decision.
    pub(crate) fn check_decision(&self, decision: CheckDecision) {
        self.checks.of(decision).inc();
    }

    /// Counts one ValidateKey answer.
    pub(crate) fn validation(&self, result: Validation) {
        self.validations.of(result).inc();
    }

    /// Counts and times one call.
    pub(crate) fn rpc(&self, method: &'static str, code: &'static str, started: Instant) {
        if code == "OK"
            && let Some((_, calls, durations)) = self.hot.iter().find(|hot| hot.0 == method)
        {
            calls.inc();
            durations.observe(started.elapsed().as_secs_f64());
            return;
        }
        let labels = RpcLabels { method, code };
        self.rpcs.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition, with the gauges read now.
    pub(crate) fn render(&self, readings: Readings) -> String {
        self.index_keys.set(readings.index_keys as i64);
        self.sync_age.set(readings.sync_age.as_secs_f64());
        self.pool_connections
            .set(i64::from(readings.pool_connections));
        self.pool_idle.set(readings.pool_idle as i64);
        if let Some((connections, open)) = &self.connections {
            open.set(connections.open() as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &self.process))
            .and_then(|()| encode_eof(&mut text));
        text
    }
}

/// What the gauges show, read at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Readings {
    /// Keys in the validation index, tombstones included.
    pub index_keys: usize,
    /// Time since the index's last successful sync started.
    pub sync_age: Duration,
    /// Open database connections, and how many of them are idle.
    pub pool_connections: u32,
    pub pool_idle: usize,
}

/// How the metrics listener is held in bounds: it is plain HTTP/1, often reachable from the
/// whole cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenerLimits {
    /// Open connections; more are closed at once. One client IP may hold an eighth of them
    /// (at least one), so a client that keeps reopening slow sockets cannot keep the scraper
    /// out.
    pub max_connections: usize,
    /// How long a request's headers may take to arrive; also the most any one connection is
    /// kept open after its last request began.
    pub header_timeout: Duration,
}

/// What `GET /` answers: what the listener serves, and where health is.
const INDEX_PAGE: &str = "apikeys metrics\n\
    \n\
    GET /metrics   Prometheus metrics, OpenMetrics text format (apikeys_*, process_*)\n\
    \n\
    Health is gRPC health (grpc.health.v1.Health) on the gRPC port, not here.\n";

/// Serves `GET /metrics` (and a page at `/` saying so) on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    read: impl Fn() -> Readings + Clone + Send + Sync + 'static,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let open = crate::net::Connections::new(crate::net::ConnectionLimits {
        max_connections: limits.max_connections,
        max_connections_per_ip: (limits.max_connections / 8).max(1),
        handshake_timeout: limits.header_timeout,
        idle_timeout: limits.header_timeout,
    });
    let mut backoff = crate::net::Backoff::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                backoff.failed(&err).await;
                continue;
            }
        };
        backoff.reset();
        let Ok(place) = open.admit(peer.ip()) else {
            // Over a cap: dropping the stream closes it.
            continue;
        };
        let (metrics, read) = (metrics.clone(), read.clone());
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let path = request.uri().path();
            let response = if path == "/" && request.method() == Method::GET {
                reply(StatusCode::OK, INDEX_PAGE)
            } else if path != "/metrics" {
                reply(
                    StatusCode::NOT_FOUND,
                    "not found: metrics are at /metrics\n",
                )
            } else if request.method() != Method::GET {
                reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            } else {
                let mut response = reply(StatusCode::OK, metrics.render(read()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            };
            std::future::ready(Ok::<_, Infallible>(response))
        });
        tokio::spawn(async move {
            let _place = place;
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
