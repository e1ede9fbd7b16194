//! The operator CLI, `apikeys keys …`: talks to a running server over gRPC, as an admin
//! backend would, and prints tables like the product page or, with `--json`, JSON.

mod checks;
mod keys;
mod render;

use std::{io::StdoutLock, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
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
    grpc::proto::{Expiration, api_keys_client::ApiKeysClient},
};

/// The product's words, shown with every new secret and before every delete.
pub const SHOWN_ONCE_WARNING: &str = "This is the only time the full key will be shown. Copy it somewhere safe: if you lose it, you'll need to delete the key and create a new one.";
pub const DELETE_WARNING: &str =
    "Any applications using this key will lose access immediately. This action cannot be undone.";

#[derive(Debug, Parser)]
#[command(
    name = "apikeys",
    version,
    about = "API keys for Cloodot workspaces, over gRPC"
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
    Serve,
    /// Run pending migrations and exit: for a deploy step that runs before the replicas roll.
    Migrate,
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
        command: KeysCommand,
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
    /// The server: `http://HOST:PORT`, or `https://HOST:PORT` with `--tls-ca`.
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
    /// Who acts, recorded as the key's `created_by` (default: `operator:$USER`).
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

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, on its own line.
    Create {
        #[arg(long)]
        workspace: String,
        /// A friendly label, e.g. "Zapier integration".
        #[arg(long)]
        name: String,
        /// How long the key stays valid.
        #[arg(long, value_enum)]
        expires: Expires,
        /// A scope the key may be used for (repeat for more).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// List a workspace's keys, newest first.
    List {
        #[arg(long)]
        workspace: String,
    },
    /// Show one key.
    Get {
        #[arg(long)]
        workspace: String,
        key_id: String,
    },
    /// Disable a key: it stops validating at once, on every replica; `enable` undoes it.
    Disable {
        #[arg(long)]
        workspace: String,
        key_id: String,
    },
    /// Enable a disabled key again.
    Enable {
        #[arg(long)]
        workspace: String,
        key_id: String,
    },
    /// Rotate a key: a new key with the same name, scopes and lifetime, printed once; the
    /// old key keeps working for `--grace` (0 to 7 days, e.g. 1h or 7d).
    Rotate {
        #[arg(long)]
        workspace: String,
        key_id: String,
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        grace: std::time::Duration,
    },
    /// Delete a key, irreversibly (asks first, unless `--yes`).
    Delete {
        #[arg(long)]
        workspace: String,
        /// The key's id (`key_…`), as `keys list` shows it.
        key_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The audit trail: who created, changed or deleted keys, newest first.
    Events {
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
        #[arg(long)]
        workspace: String,
        key_id: String,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: std::time::Duration,
    },
    /// Validate a key read from standard input (so it stays out of the shell history and the
    /// process list). Exits 0 when valid, 1 when not.
    Validate {
        /// A scope the key must have (repeat for more).
        #[arg(long = "require-scope")]
        required_scopes: Vec<String>,
    },
}

/// The product's expiration choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Expires {
    Never,
    #[value(name = "30d")]
    Days30,
    #[value(name = "90d")]
    Days90,
    #[value(name = "1y")]
    Year,
}

impl From<Expires> for Expiration {
    fn from(expires: Expires) -> Self {
        match expires {
            Expires::Never => Self::Never,
            Expires::Days30 => Self::Expiration30Days,
            Expires::Days90 => Self::Expiration90Days,
            Expires::Year => Self::Expiration1Year,
        }
    }
}

/// Runs one command. Exit codes: 0 done (or valid), 1 a key that is not valid or a delete
/// not confirmed, 2 an error.
pub async fn run(connection: Connection, command: KeysCommand) -> ExitCode {
    match execute(&connection, command).await {
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
        } => keys::create(session, workspace, name, expires, scopes).await,
        KeysCommand::List { workspace } => keys::list(session, workspace).await,
        KeysCommand::Get { workspace, key_id } => {
            keys::one(session, OneKey::Get, workspace, key_id).await
        }
        KeysCommand::Disable { workspace, key_id } => {
            keys::one(session, OneKey::Disable, workspace, key_id).await
        }
        KeysCommand::Enable { workspace, key_id } => {
            keys::one(session, OneKey::Enable, workspace, key_id).await
        }
        KeysCommand::Rotate {
            workspace,
            key_id,
            grace,
        } => keys::rotate(session, workspace, key_id, grace).await,
        KeysCommand::Delete {
            workspace,
            key_id,
            yes,
        } => keys::delete(session, workspace, key_id, yes).await,
        KeysCommand::Events {
            workspace,
            key_id,
            limit,
        } => checks::events(session, workspace, key_id, limit).await,
        KeysCommand::Usage {
            workspace,
            key_id,
            since,
        } => checks::usage(session, workspace, key_id, since).await,
        KeysCommand::Validate { required_scopes } => {
            checks::validate(session, required_scopes).await
        }
    }
}

async fn connect(connection: &Connection) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(connection.addr.clone())
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
        .map_err(|err| format!("cannot reach {}: {err}", connection.addr))
}

impl Connection {
    /// A request carrying the actor and, when given, the caller token.
    fn request<T>(&self, message: T) -> Result<Request<T>, String> {
        let mut request = Request::new(message);
        let actor = match &self.actor_id {
            Some(actor) => actor.clone(),
            None => format!(
                "operator:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            ),
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
        assert!(matches!(cli.command, Some(Command::Migrate)));
        assert_eq!(cli.settings.database_url, "sqlite://x.db");
    }
}
