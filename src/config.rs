//! The server's settings, from flags and the environment: every flag has an `APIKEYS_*`
//! fallback so containers can be configured by environment alone. The clap definitions are
//! the one place defaults are written.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::ValueEnum;

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address to serve gRPC on. Loopback by default, so a service started by hand is not
    /// reachable from the network until you say so.
    #[arg(long, env = "APIKEYS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database URL: `sqlite://FILE?mode=rwc` (embedded, the default) or
    /// `postgres://USER:PASSWORD@HOST/DB` for many replicas.
    #[arg(
        long,
        env = "APIKEYS_DATABASE_URL",
        default_value = "sqlite://apikeys.db?mode=rwc"
    )]
    pub database_url: String,

    /// Connections the PostgreSQL pool may open (an SQLite file is served by one). Each
    /// replica also holds one more, outside the pool, for the change listener (LISTEN).
    #[arg(
        long,
        env = "APIKEYS_DATABASE_POOL_SIZE",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub database_pool_size: u32,

    /// Log format: `text` for people, `json` for log pipelines. Levels come from RUST_LOG
    /// (default `info`).
    #[arg(long, env = "APIKEYS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long a graceful shutdown waits for in-flight calls and open streams (such as
    /// health watches) before it closes them, e.g. `10s`, `500ms`.
    #[arg(long, env = "APIKEYS_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How long ValidateKey keeps answering from memory after the last successful sync with
    /// the database; past it, it fails closed with UNAVAILABLE and health is NOT_SERVING.
    #[arg(long, env = "APIKEYS_STALENESS_BOUND", default_value = "30s", value_parser = parse_duration)]
    pub staleness_bound: Duration,

    /// How often the key index polls the database for changes, besides PostgreSQL
    /// notifications: the revocation bound when a notification is lost.
    #[arg(long, env = "APIKEYS_SYNC_POLL_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub sync_poll_interval: Duration,

    /// The callers file: who may call, by the blake3 hash of their bearer token, and in what
    /// role (see `apikeys caller-token new`). Without it any caller that can reach the port
    /// is admitted, which start-up allows only on loopback or with --insecure-no-caller-auth.
    #[arg(long, env = "APIKEYS_CALLERS_FILE")]
    pub callers_file: Option<PathBuf>,

    /// Serve a non-loopback address without a callers file, for a mesh that authenticates
    /// callers itself. Anyone who reaches the port can then manage keys for any workspace.
    #[arg(long, env = "APIKEYS_INSECURE_NO_CALLER_AUTH")]
    pub insecure_no_caller_auth: bool,

    /// The longest a call may run before it answers; a client's shorter `grpc-timeout` wins.
    /// Not armed for ValidateKey and Check (answered from memory, they never wait) nor for
    /// ValidateKeys streams.
    #[arg(long, env = "APIKEYS_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Calls in flight across all connections (health excepted) before more are shed with
    /// UNAVAILABLE, so overload fails fast instead of queueing.
    #[arg(long, env = "APIKEYS_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,

    /// Calls one caller (by its credentials; by client IP without a callers file) may have
    /// in flight, so one caller cannot take the whole --max-in-flight; more are shed with
    /// UNAVAILABLE (`CALLER_OVERLOADED`).
    #[arg(long, env = "APIKEYS_MAX_IN_FLIGHT_PER_CALLER", default_value_t = 256)]
    pub max_in_flight_per_caller: usize,

    /// How long after its headers a call's request body may take to arrive; a call still
    /// waiting is answered DEADLINE_EXCEEDED and frees its place in flight.
    #[arg(long, env = "APIKEYS_REQUEST_BODY_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub request_body_timeout: Duration,

    /// Management calls (everything but ValidateKey and health) one caller may make per
    /// second in one workspace, sustained; more are answered RESOURCE_EXHAUSTED with a
    /// retry delay. Kept per workspace, so one busy tenant does not throttle the others.
    #[arg(long, env = "APIKEYS_MANAGEMENT_RATE", default_value = "100")]
    pub management_rate: NonZeroU32,

    /// Management calls a caller may make at once in one workspace above its rate, after a
    /// quiet spell.
    #[arg(long, env = "APIKEYS_MANAGEMENT_BURST", default_value = "200")]
    pub management_burst: NonZeroU32,

    /// Management calls one caller may make per second across all workspaces: the ceiling
    /// above the per-workspace rate, for an admin backend that serves every tenant.
    #[arg(long, env = "APIKEYS_MANAGEMENT_CALLER_RATE", default_value = "5000")]
    pub management_caller_rate: NonZeroU32,

    /// Management calls one caller may make at once across all workspaces above its ceiling.
    #[arg(long, env = "APIKEYS_MANAGEMENT_CALLER_BURST", default_value = "10000")]
    pub management_caller_burst: NonZeroU32,

    /// Open gRPC connections in all; more are closed as soon as they are accepted. Lowered
    /// at start to fit the descriptor limit (`ulimit -n`, less 64 and --metrics-max-connections).
    #[arg(long, env = "APIKEYS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Open gRPC connections from one client IP (a gateway or backend needs a handful).
    #[arg(long, env = "APIKEYS_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// How long a new connection may take to finish its TLS handshake and send the HTTP/2
    /// preface (and the metrics listener a request's headers) before it is closed.
    #[arg(long, env = "APIKEYS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection on which no call has started for this long, with no stream open, is
    /// closed; clients reconnect when they next call.
    #[arg(long, env = "APIKEYS_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// How often the server pings a connection's client (HTTP/2 PING) to find dead peers.
    #[arg(long, env = "APIKEYS_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "APIKEYS_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Streams (calls) one connection may have open at once (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); clients queue beyond it.
    #[arg(long, env = "APIKEYS_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Health watches (grpc.health.v1.Health/Watch streams) open on the server in all.
    #[arg(long, env = "APIKEYS_MAX_HEALTH_WATCHES", default_value_t = 1024)]
    pub max_health_watches: usize,

    /// Health watches open on one connection (a client watches a name or two).
    #[arg(
        long,
        env = "APIKEYS_MAX_HEALTH_WATCHES_PER_CONNECTION",
        default_value_t = 16
    )]
    pub max_health_watches_per_connection: usize,

    /// Open connections to the metrics listener; a scraper needs one.
    #[arg(long, env = "APIKEYS_METRICS_MAX_CONNECTIONS", default_value_t = 64)]
    pub metrics_max_connections: usize,

    /// PEM certificate chain to serve TLS with (needs --tls-key). Without it the port speaks
    /// plaintext HTTP/2: for loopback, or a mesh whose sidecar terminates TLS.
    #[arg(long, env = "APIKEYS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "APIKEYS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate(s) of the CA that signs client certificates: turns on mutual TLS, so
    /// every client must present a certificate it signed. Callers may then be named by a DNS
    /// name in their certificate (`san:` lines of the callers file).
    #[arg(long, env = "APIKEYS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for new contents, so a rotated certificate is
    /// served without a restart; SIGHUP reloads them at once.
    #[arg(long, env = "APIKEYS_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// How often the callers file is checked for new contents, so a caller added or removed
    /// takes effect without a restart; SIGHUP reloads it at once. A file that fails to load
    /// is logged and the callers in force stay.
    #[arg(long, env = "APIKEYS_CALLERS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub callers_reload_interval: Duration,

    /// Where to serve Prometheus metrics over plain HTTP (`GET /metrics`), e.g.
    /// `0.0.0.0:9090`; off when unset. The metrics hold no secret, key or workspace.
    #[arg(long, env = "APIKEYS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Count every ValidateKey answer per key and hour for GetKeyUsage (in memory, written
    /// every 2 s). `false` keeps only each key's last use.
    #[arg(
        long,
        env = "APIKEYS_RECORD_USAGE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub record_usage: bool,

    /// How often each replica writes last-used times and usage counts to the database:
    /// GetKeyUsage shows answers within about this long. Also on graceful shutdown.
    #[arg(long, env = "APIKEYS_FLUSH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// How long key events and hourly usage are kept; older ones are pruned in the
    /// background, e.g. `90d`.
    #[arg(long, env = "APIKEYS_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub retention: Duration,

    /// Headers Envoy's ext_authz Check reads the key from, in order of preference:
    /// `authorization` as `Bearer <key>`, any other as the bare key.
    #[arg(
        long,
        env = "APIKEYS_GATEWAY_KEY_HEADERS",
        default_value = "authorization,x-api-key",
        value_delimiter = ',',
        value_parser = parse_header_name
    )]
    pub gateway_key_headers: Vec<String>,

    /// Whether an allowed ext_authz Check removes the header that carried the key before the
    /// request goes upstream, so backends never see keys.
    #[arg(
        long,
        env = "APIKEYS_GATEWAY_HIDE_CREDENTIALS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub gateway_hide_credentials: bool,

    /// How many proxies in front of the gateway append to `x-forwarded-for` and are trusted.
    /// 0: the client address (for allowed CIDRs and usage) is the Check's source address;
    /// N: it is the Nth address from the right of `x-forwarded-for`, and unknown (refused by
    /// a key with allowed CIDRs) when the header holds fewer. Leave at 0 unless every
    /// request passes through exactly that many proxies that append to the header.
    #[arg(long, env = "APIKEYS_GATEWAY_TRUSTED_HOPS", default_value_t = 0)]
    pub gateway_trusted_hops: usize,

    /// The prefix of the headers an allowed Check sets upstream: `<prefix>key-id`,
    /// `workspace-id`, `key-scopes`, `owner-id` and `annotation-<key>`.
    #[arg(
        long,
        env = "APIKEYS_GATEWAY_HEADER_PREFIX",
        default_value = crate::grpc::DEFAULT_HEADER_PREFIX,
        value_parser = parse_header_name
    )]
    pub gateway_header_prefix: String,

    /// Annotations an allowed Check sends upstream, each as `<prefix>annotation-<key>`
    /// (removed from the request when the key has none), comma-separated; annotation keys
    /// without ':'. Empty: none.
    #[arg(
        long,
        env = "APIKEYS_GATEWAY_FORWARD_ANNOTATIONS",
        value_delimiter = ',',
        value_parser = parse_forwarded_annotation
    )]
    pub gateway_forward_annotations: Vec<String>,

    /// How often the retention task prunes.
    #[arg(long, env = "APIKEYS_PRUNE_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Settings {
    /// Settings for a server on `listen` backed by `database_url`, the flags' defaults
    /// elsewhere (the environment is not read): for tests, benches and embedding.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> Self {
        use clap::{Args, FromArgMatches};
        let flags = Self::augment_args(clap::Command::new("apikeys")).mut_args(|arg| arg.env(None));
        let mut settings = flags
            .try_get_matches_from(["apikeys"])
            .and_then(|defaults| Self::from_arg_matches(&defaults))
            .expect("every flag has a default that parses");
        settings.listen = listen;
        settings.database_url = database_url.into();
        settings
    }

    /// How the index keeps in step with the database.
    pub fn sync_settings(&self) -> crate::index::SyncSettings {
        crate::index::SyncSettings {
            poll_interval: self.sync_poll_interval,
            staleness_bound: self.staleness_bound,
            flush_interval: self.flush_interval,
        }
    }

    /// How gateways present keys to Envoy's Check.
    pub fn gateway_settings(&self) -> crate::grpc::GatewaySettings {
        crate::grpc::GatewaySettings {
            key_headers: self.gateway_key_headers.clone(),
            hide_credentials: self.gateway_hide_credentials,
            trusted_hops: self.gateway_trusted_hops,
            header_prefix: self.gateway_header_prefix.clone(),
            forward_annotations: self.gateway_forward_annotations.clone(),
        }
    }

    /// How connections to the gRPC port are held in bounds.
    pub(crate) fn connection_limits(&self) -> crate::net::ConnectionLimits {
        crate::net::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
        }
    }

    /// The TLS files, when TLS is on.
    pub(crate) fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        }
    }
}

/// An HTTP header name, as Envoy hands it over: lower case.
fn parse_header_name(input: &str) -> Result<String, String> {
    let name = input.trim().to_ascii_lowercase();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("`{input}` is not an HTTP header name"));
    }
    Ok(name)
}

/// An annotation key that can end a header name: an annotation key without ':'.
fn parse_forwarded_annotation(input: &str) -> Result<String, String> {
    let key = input.trim();
    if !crate::domain::is_scope(key) || key.contains(':') {
        return Err(format!(
            "`{input}` is not an annotation key that can name a header (1 to 64 characters of a-z, 0-9, '_', '.' or '-')"
        ));
    }
    Ok(key.to_owned())
}

/// `500ms`, `10s`, `5m`, `1h`, `7d`; a bare number is seconds.
pub(crate) fn parse_duration(input: &str) -> Result<Duration, String> {
    let (number, unit) = input
        .find(|c: char| !c.is_ascii_digit())
        .map_or((input, "s"), |at| input.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{input}` is not a duration like 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(number.saturating_mul(3600))),
        "d" => Ok(Duration::from_secs(number.saturating_mul(86_400))),
        _ => Err(format!("`{input}`: use ms, s, m, h or d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
