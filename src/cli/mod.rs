//! The operator CLI, `apikeys keys …`: talks to a running server over gRPC, as an admin
//! backend would, and prints tables like the product page or, with `--json`, JSON.

mod checks;
mod keys;
mod render;

use std::{io::StdoutLock, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use keys::OneKey;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt;

use crate::{
    auth::CallerRole,
    config::{Settings, parse_duration},
    grpc::proto::{
        Credits, Expiration, RateLimit, RateLimitRequest, Refill, RefillInterval,
        ValidateKeyRequest, api_keys_client::ApiKeysClient,
    },
};

/// The product's words, shown with every new secret and before every delete.
pub const SHOWN_ONCE_WARNING: &str = "This is the only time the full key will be shown. Copy it somewhere safe: if you lose it, you'll need to delete the key and create a new one.";
pub const DELETE_WARNING: &str =
    "Any applications using this key will lose access immediately. This action cannot be undone.";

/// `apikeys` alone serves, with the server's flags; each subcommand takes only its own
/// (`apikeys serve` and `apikeys migrate` take the server's).
#[derive(Debug, Parser)]
#[command(
    name = "apikeys",
    version,
    about = "API keys for Cloodot workspaces, over gRPC",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run pending migrations, then serve (the default).
    Serve(Box<Settings>),
    /// Run pending migrations and exit: for a deploy step that runs before the replicas roll.
    Migrate(Box<Settings>),
    /// Caller tokens: the credentials admin backends and gateways present.
    CallerToken {
        #[command(subcommand)]
        command: CallerTokenCommand,
    },
    /// Manage and check keys on a running server, over gRPC (an operator's CLI).
    Keys {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: Box<KeysCommand>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallerTokenCommand {
    /// Print a new token for a caller, once, and the line that admits it to the callers file.
    New {
        /// The caller's name, as logs and rate limits will know it (a-z, 0-9, '.', '_', '-').
        #[arg(value_parser = |name: &str| crate::auth::check_name(name).map(|()| name.to_owned()))]
        name: String,
        /// `gateway` may call ValidateKey (and Envoy's Check) only; `admin` may also manage keys.
        #[arg(long, value_enum)]
        role: CallerRole,
    },
}

/// How to reach the server, and as whom.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server: `HOST:PORT` or `http://HOST:PORT`, or `https://HOST:PORT` (plain
    /// `HOST:PORT` means https when `--tls-ca` is given).
    #[arg(
        long,
        env = "APIKEYS_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// The CA certificate (PEM) that signed the server's certificate, for `https://`.
    #[arg(long, env = "APIKEYS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// An `admin` caller token, when the server has a callers file.
    #[arg(
        long,
        env = "APIKEYS_CALLER_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub caller_token: Option<String>,
    /// Who acts, recorded as the key's `created_by` and in the audit trail (default:
    /// `operator:$USER`; required when USER is unset).
    #[arg(long, env = "APIKEYS_ACTOR_ID", global = true)]
    pub actor_id: Option<String>,
    /// The acting person's workspace role: `owner` or `admin`.
    #[arg(
        long,
        env = "APIKEYS_ACTOR_ROLE",
        default_value = "admin",
        global = true
    )]
    pub actor_role: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// What a new key carries besides its name, expiry and scopes.
#[derive(Debug, Clone, Default, Args)]
pub struct KeyTermsArgs {
    /// Your own id for the user or service the key belongs to (up to 128 visible ASCII
    /// characters); `keys list --owner` finds its keys.
    #[arg(long)]
    pub owner: Option<String>,
    /// A label returned with every validation, `KEY=VALUE` (repeat for more, at most 16).
    #[arg(long = "annotation", value_parser = parse_annotation)]
    pub annotations: Vec<(String, String)>,
    /// A network the key may be used from, e.g. `203.0.113.0/24` or `2001:db8::1` (repeat
    /// for more, at most 64); none means any address.
    #[arg(long = "allow-cidr")]
    pub allowed_cidrs: Vec<String>,
    /// A rate limit, `NAME=LIMIT/WINDOW`, with `,auto` to apply it to every validation
    /// (e.g. `requests=100/1m,auto`; a window of 1s to 24h in s, m, h or d); repeat for
    /// more, at most 8.
    #[arg(long = "rate-limit", value_parser = parse_rate_limit)]
    pub rate_limits: Vec<RateLimit>,
    /// Credits the key may spend (each validation spends its cost, 1 by default); absent
    /// means unlimited. On `update`, sets the balance afresh.
    #[arg(long)]
    pub credits: Option<i64>,
    /// How the credits refill: `AMOUNT/daily` (every day at 00:00 UTC) or
    /// `AMOUNT/monthly:DAY` (every month on DAY, 1-31), the balance then becoming AMOUNT.
    #[arg(long, requires = "credits", value_parser = parse_refill)]
    pub refill: Option<Refill>,
}

impl KeyTermsArgs {
    /// The credits given, as the API takes them.
    pub(crate) fn credits(&self) -> Option<Credits> {
        self.credits.map(|remaining| Credits {
            remaining,
            refill: self.refill,
        })
    }
}

/// `AMOUNT/daily` or `AMOUNT/monthly:DAY`.
fn parse_refill(text: &str) -> Result<Refill, String> {
    let shape = || "a refill is AMOUNT/daily or AMOUNT/monthly:DAY, e.g. 1000/monthly:1".to_owned();
    let (amount, rest) = text.split_once('/').ok_or_else(shape)?;
    let amount = amount.parse().map_err(|_| shape())?;
    let (interval, day_of_month) = match rest.split_once(':') {
        None if rest == "daily" => (RefillInterval::Daily, 0),
        Some(("monthly", day)) => (RefillInterval::Monthly, day.parse().map_err(|_| shape())?),
        _ => return Err(shape()),
    };
    Ok(Refill {
        amount,
        interval: interval.into(),
        day_of_month,
    })
}

/// `NAME=LIMIT/WINDOW[,auto]`.
fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let shape = || "a rate limit is NAME=LIMIT/WINDOW[,auto], e.g. requests=100/1m,auto".to_owned();
    let (text, auto_apply) = match text.strip_suffix(",auto") {
        Some(text) => (text, true),
        None => (text, false),
    };
    let (name, rest) = text.split_once('=').ok_or_else(shape)?;
    let (limit, window) = rest.split_once('/').ok_or_else(shape)?;
    let limit = limit.parse().map_err(|_| shape())?;
    let window = parse_duration(window)?;
    Ok(RateLimit {
        name: name.to_owned(),
        limit,
        window: Some(prost_types::Duration {
            seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
        }),
        auto_apply,
    })
}

/// `NAME` or `NAME=COST`.
fn parse_rate_limit_request(text: &str) -> Result<RateLimitRequest, String> {
    let (name, cost) = match text.split_once('=') {
        Some((name, cost)) => {
            let cost = cost
                .parse()
                .map_err(|_| "a rate limit to spend is NAME or NAME=COST".to_owned())?;
            (name, Some(cost))
        }
        None => (text, None),
    };
    Ok(RateLimitRequest {
        name: name.to_owned(),
        cost,
    })
}

/// `KEY=VALUE`, split at the first `=`.
fn parse_annotation(text: &str) -> Result<(String, String), String> {
    // The input is not echoed: it may be a key pasted in the wrong place.
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| "an annotation is KEY=VALUE".to_owned())
}

/// The key a command acts on.
#[derive(Debug, Clone, Args)]
pub struct KeyRef {
    /// The workspace that owns the key (its id in the product).
    #[arg(long)]
    pub workspace: String,
    /// The key's id (`key_…`), as `keys list` shows it.
    pub key_id: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, on its own line.
    Create {
        /// The workspace the key is for (its id in the product).
        #[arg(long)]
        workspace: String,
        /// A friendly label, e.g. "Zapier integration".
        #[arg(long)]
        name: String,
        /// How long the key stays valid: `never`, `30d`, `90d`, `1y`, or until a date and
        /// time (RFC 3339, e.g. `2027-06-30T00:00:00Z`, or a date: midnight UTC), at most 5
        /// years ahead.
        #[arg(long, value_parser = parse_expires)]
        expires: Expires,
        /// A scope the key may be used for (repeat for more).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[command(flatten)]
        terms: KeyTermsArgs,
    },
    /// List a workspace's keys, newest first.
    List {
        /// The workspace (its id in the product).
        #[arg(long)]
        workspace: String,
        /// Only the keys of this owner.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Show one key.
    Get {
        #[command(flatten)]
        key: KeyRef,
    },
    /// Change a key's name, scopes, owner, annotations, allowed networks or rate limits; what is not
    /// given stays as it is, and each list given replaces the key's.
    Update {
        #[command(flatten)]
        key: KeyRef,
        /// The new friendly label.
        #[arg(long)]
        name: Option<String>,
        /// The key's scopes from now on (repeat for more); replaces them all.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Remove every scope (the key may then be used for routes that require none).
        #[arg(long, conflicts_with = "scopes")]
        clear_scopes: bool,
        #[command(flatten)]
        terms: KeyTermsArgs,
        /// Remove the key's owner.
        #[arg(long, conflicts_with = "owner")]
        clear_owner: bool,
        /// Remove every annotation.
        #[arg(long, conflicts_with = "annotations")]
        clear_annotations: bool,
        /// Remove every allowed network: the key may be used from any address.
        #[arg(long, conflicts_with = "allowed_cidrs")]
        clear_cidrs: bool,
        /// Remove every rate limit.
        #[arg(long, conflicts_with = "rate_limits")]
        clear_rate_limits: bool,
        /// Remove the key's credits: it may then be used without limit of credits.
        #[arg(long, conflicts_with = "credits")]
        clear_credits: bool,
        /// Change the key only if its etag is still this one (from `keys get --json`).
        #[arg(long)]
        etag: Option<String>,
    },
    /// Disable a key: it stops validating at once, on every replica; `enable` undoes it.
    Disable {
        #[command(flatten)]
        key: KeyRef,
        /// Disable the key only if its etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Enable a disabled key again.
    Enable {
        #[command(flatten)]
        key: KeyRef,
        /// Enable the key only if its etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Rotate a key: a new key with the same name, scopes, owner, annotations, networks and
    /// lifetime, printed once.
    Rotate {
        #[command(flatten)]
        key: KeyRef,
        /// How long the old key keeps working, so clients can switch: `0s` stops it at once,
        /// up to `7d` (e.g. `1h`). Required: no default decides that for you.
        #[arg(long, value_parser = parse_duration)]
        grace: std::time::Duration,
        /// Rotate the key only if its etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a key, irreversibly (asks first, unless `--yes`).
    Delete {
        #[command(flatten)]
        key: KeyRef,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Delete the key only if its etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// The audit trail: who created, changed or deleted keys, newest first.
    Events {
        /// The workspace (its id in the product).
        #[arg(long)]
        workspace: String,
        /// Only this key's events.
        #[arg(long = "key")]
        key_id: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A key's ValidateKey answers per hour, by result, over the last `--since` (at most 93d).
    Usage {
        #[command(flatten)]
        key: KeyRef,
        /// How far back, e.g. `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: std::time::Duration,
    },
    /// Validate a key read from standard input (so it stays out of the shell history and the
    /// process list). Exits 0 when valid, 1 when not.
    Validate {
        /// A scope the key must have (repeat for more).
        #[arg(long = "require-scope")]
        required_scopes: Vec<String>,
        /// The address the key is presented from, checked against its allowed networks.
        #[arg(long)]
        client_ip: Option<String>,
        /// A rate limit of the key to spend from, `NAME` or `NAME=COST` (repeat for more);
        /// limits applied to every validation are spent from anyway.
        #[arg(long = "rate-limit", value_parser = parse_rate_limit_request)]
        rate_limits: Vec<RateLimitRequest>,
        /// Credits this validation spends, for a key with credits (default 1; 0 only checks
        /// that some are left).
        #[arg(long)]
        cost: Option<i64>,
    },
}

/// How long a new key lives: one of the product's choices, or until a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    Never,
    Days30,
    Days90,
    Year,
    At(chrono::DateTime<chrono::Utc>),
}

/// `never`, `30d`, `90d`, `1y`, an RFC 3339 date and time, or a date (midnight UTC).
fn parse_expires(text: &str) -> Result<Expires, String> {
    Ok(match text {
        "never" => Expires::Never,
        "30d" => Expires::Days30,
        "90d" => Expires::Days90,
        "1y" => Expires::Year,
        _ => Expires::At(
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|at| at.to_utc())
                .or_else(|_| {
                    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                        .map(|day| day.and_time(chrono::NaiveTime::MIN).and_utc())
                })
                .map_err(|_| {
                    "one of never, 30d, 90d, 1y, or a date and time such as 2027-06-30T00:00:00Z \
                     (or 2027-06-30)"
                        .to_owned()
                })?,
        ),
    })
}

impl Expires {
    /// The request's `expiration` and `expire_time`.
    fn request(self) -> (Expiration, Option<prost_types::Timestamp>) {
        match self {
            Self::Never => (Expiration::Never, None),
            Self::Days30 => (Expiration::Expiration30Days, None),
            Self::Days90 => (Expiration::Expiration90Days, None),
            Self::Year => (Expiration::Expiration1Year, None),
            Self::At(at) => (
                Expiration::Unspecified,
                Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: at.timestamp_subsec_nanos() as i32,
                }),
            ),
        }
    }
}

/// Runs one command. Exit codes: 0 done (or valid), 1 a key that is not valid or a delete
/// not confirmed, 2 an error.
pub async fn run(connection: Connection, command: Box<KeysCommand>) -> ExitCode {
    match execute(&connection, *command).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// What every command works with: the client, how it connected, and standard output.
struct Session<'a> {
    client: ApiKeysClient<Channel>,
    connection: &'a Connection,
    out: StdoutLock<'static>,
}

async fn execute(connection: &Connection, command: KeysCommand) -> Result<ExitCode, String> {
    let session = &mut Session {
        client: ApiKeysClient::new(connect(connection).await?),
        connection,
        out: std::io::stdout().lock(),
    };
    match command {
        KeysCommand::Create {
            workspace,
            name,
            expires,
            scopes,
            terms,
        } => keys::create(session, workspace, name, expires, scopes, terms).await,
        KeysCommand::List { workspace, owner } => {
            keys::list(session, workspace, owner.unwrap_or_default()).await
        }
        KeysCommand::Get { key } => keys::one(session, OneKey::Get, key, None).await,
        KeysCommand::Update {
            key,
            name,
            scopes,
            clear_scopes,
            terms,
            clear_owner,
            clear_annotations,
            clear_cidrs,
            clear_rate_limits,
            clear_credits,
            etag,
        } => {
            let given = |clear: bool, empty: bool| clear || !empty;
            let credits = terms.credits();
            let edit = keys::Edit {
                name,
                scopes: given(clear_scopes, scopes.is_empty()).then_some(scopes),
                owner: if clear_owner {
                    Some(String::new())
                } else {
                    terms.owner
                },
                annotations: given(clear_annotations, terms.annotations.is_empty())
                    .then_some(terms.annotations),
                allowed_cidrs: given(clear_cidrs, terms.allowed_cidrs.is_empty())
                    .then_some(terms.allowed_cidrs),
                credits: if clear_credits {
                    Some(None)
                } else {
                    credits.map(Some)
                },
                rate_limits: given(clear_rate_limits, terms.rate_limits.is_empty())
                    .then_some(terms.rate_limits),
                etag: etag.unwrap_or_default(),
            };
            keys::update(session, key, edit).await
        }
        KeysCommand::Disable { key, etag } => keys::one(session, OneKey::Disable, key, etag).await,
        KeysCommand::Enable { key, etag } => keys::one(session, OneKey::Enable, key, etag).await,
        KeysCommand::Rotate { key, grace, etag } => {
            keys::rotate(session, key, grace, etag.unwrap_or_default()).await
        }
        KeysCommand::Delete { key, yes, etag } => {
            keys::delete(session, key, yes, etag.unwrap_or_default()).await
        }
        KeysCommand::Events {
            workspace,
            key_id,
            limit,
        } => checks::events(session, workspace, key_id, limit).await,
        KeysCommand::Usage { key, since } => checks::usage(session, key, since).await,
        KeysCommand::Validate {
            required_scopes,
            client_ip,
            rate_limits,
            cost,
        } => {
            let request = ValidateKeyRequest {
                required_scopes,
                client_ip: client_ip.unwrap_or_default(),
                rate_limits,
                cost,
                ..Default::default()
            };
            checks::validate(session, request).await
        }
    }
}

async fn connect(connection: &Connection) -> Result<Channel, String> {
    let uri = connection.uri();
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|err| format!("--addr {}: {err}", connection.addr))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = &connection.tls_ca {
        let pem = std::fs::read(ca).map_err(|err| format!("--tls-ca {}: {err}", ca.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|err| format!("TLS: {err}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|err| format!("cannot reach {uri}: {err}"))
}

impl Connection {
    /// `--addr` as a URI: `HOST:PORT` alone means `http://`, or `https://` with `--tls-ca`.
    fn uri(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else if self.tls_ca.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// A request carrying the actor and, when given, the caller token.
    fn request<T>(&self, message: T) -> Result<Request<T>, String> {
        let mut request = Request::new(message);
        let actor = match (&self.actor_id, std::env::var("USER")) {
            (Some(actor), _) => actor.clone(),
            (None, Ok(user)) if !user.is_empty() => format!("operator:{user}"),
            (None, _) => {
                return Err(
                    "who acts is recorded with every change: pass --actor-id (or set \
                     APIKEYS_ACTOR_ID); without it the actor is operator:$USER, and USER is unset"
                        .to_owned(),
                );
            }
        };
        let value = |text: &str, what: &str| {
            MetadataValue::try_from(text).map_err(|_| format!("{what} must be printable ASCII"))
        };
        let metadata = request.metadata_mut();
        metadata.insert("x-actor-id", value(&actor, "the actor id")?);
        metadata.insert("x-actor-role", value(&self.actor_role, "the actor role")?);
        if let Some(token) = &self.caller_token {
            let bearer = format!("Bearer {}", token.trim());
            metadata.insert("authorization", value(&bearer, "the caller token")?);
        }
        Ok(request)
    }
}

/// A gRPC error as an operator reads it: code, message and reason.
fn explain(status: Status) -> String {
    let reason = status
        .get_details_error_info()
        .map(|info| format!(" ({})", info.reason))
        .unwrap_or_default();
    format!("{:?}: {}{reason}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_an_embedded_database() {
        let cli = Cli::try_parse_from(["apikeys"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.settings.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(cli.settings.database_url, "sqlite://apikeys.db?mode=rwc");
    }

    #[test]
    fn settings_new_matches_the_command_line_defaults() {
        let cli = Cli::try_parse_from(["apikeys"]).unwrap();
        let new = Settings::new(cli.settings.listen, cli.settings.database_url.clone());
        assert_eq!(format!("{new:?}"), format!("{:?}", cli.settings));
    }

    #[test]
    fn flags_work_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["apikeys", "migrate", "--database-url", "sqlite://x.db"]).unwrap();
        let Some(Command::Migrate(settings)) = cli.command else {
            panic!("not migrate: {:?}", cli.command)
        };
        assert_eq!(settings.database_url, "sqlite://x.db");
    }

    #[test]
    fn the_operator_cli_takes_no_server_flags() {
        let keys: &[&str] = &[
            "apikeys",
            "keys",
            "list",
            "--workspace",
            "w",
            "--listen",
            "0:1",
        ];
        let token: &[&str] = &[
            "apikeys",
            "caller-token",
            "new",
            "x",
            "--role",
            "admin",
            "--retention",
            "1d",
        ];
        for args in [keys, token] {
            let err = Cli::try_parse_from(args.iter().copied()).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{args:?}"
            );
        }
        // Nor a server flag before a subcommand.
        assert!(Cli::try_parse_from(["apikeys", "--listen", "127.0.0.1:1", "migrate"]).is_err());
    }
}
