//! The operator CLI, `apikeys keys …`: talks to a running server over gRPC, as an admin
//! backend would, and prints tables like the product page or, with `--json`, JSON.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
};

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt;

use crate::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
    GetKeyRequest, GetKeyUsageRequest, GetKeyUsageResponse, KeyEvent, KeyStatus,
    ListKeyEventsRequest, ListKeysRequest, RotateKeyRequest, ValidateKeyRequest,
    ValidateKeyResponse, api_keys_client::ApiKeysClient,
};

/// The product's words, shown with every new secret and before every delete.
pub const SHOWN_ONCE_WARNING: &str = "This is the only time the full key will be shown. Copy it somewhere safe: if you lose it, you'll need to delete the key and create a new one.";
pub const DELETE_WARNING: &str =
    "Any applications using this key will lose access immediately. This action cannot be undone.";

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
        #[arg(long, default_value = "0s", value_parser = crate::config::parse_duration)]
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
        #[arg(long, default_value = "24h", value_parser = crate::config::parse_duration)]
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

async fn execute(connection: &Connection, command: KeysCommand) -> Result<ExitCode, String> {
    let mut client = ApiKeysClient::new(connect(connection).await?);
    let out = &mut std::io::stdout().lock();
    match command {
        KeysCommand::Create {
            workspace,
            name,
            expires,
            scopes,
        } => {
            let request = CreateKeyRequest {
                workspace_id: workspace,
                name,
                expiration: Expiration::from(expires).into(),
                scopes,
                ..Default::default()
            };
            let created = client
                .create_key(connection.request(request)?)
                .await
                .map_err(explain)?
                .into_inner();
            let key = created.key.unwrap_or_default();
            if connection.json {
                let value = json!({"key": key_json(&key), "secret": created.secret});
                writeln!(out, "{value}").map_err(io)?;
            } else {
                eprintln!(
                    "Created key \"{}\" ({}) in workspace {}, expires {}.\n\n{SHOWN_ONCE_WARNING}",
                    key.name,
                    key.id,
                    key.workspace_id,
                    time_or_never(&key.expire_time)
                );
                writeln!(out, "{}", created.secret).map_err(io)?;
            }
        }
        KeysCommand::List { workspace } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = ListKeysRequest {
                    workspace_id: workspace.clone(),
                    page_size: 1000,
                    page_token,
                };
                let page = client
                    .list_keys(connection.request(request)?)
                    .await
                    .map_err(explain)?
                    .into_inner();
                keys.extend(page.keys);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if connection.json {
                let value = Value::Array(keys.iter().map(key_json).collect());
                writeln!(out, "{value}").map_err(io)?;
            } else {
                write!(out, "{}", table(&keys)).map_err(io)?;
            }
        }
        KeysCommand::Get { workspace, key_id } => {
            let request = GetKeyRequest {
                workspace_id: workspace,
                key_id,
            };
            let key = client.get_key(connection.request(request)?).await;
            show(out, connection, &key.map_err(explain)?.into_inner())?;
        }
        KeysCommand::Disable { workspace, key_id } => {
            let request = DisableKeyRequest {
                workspace_id: workspace,
                key_id,
            };
            let key = client.disable_key(connection.request(request)?).await;
            show(out, connection, &key.map_err(explain)?.into_inner())?;
        }
        KeysCommand::Enable { workspace, key_id } => {
            let request = EnableKeyRequest {
                workspace_id: workspace,
                key_id,
            };
            let key = client.enable_key(connection.request(request)?).await;
            show(out, connection, &key.map_err(explain)?.into_inner())?;
        }
        KeysCommand::Rotate {
            workspace,
            key_id,
            grace,
        } => {
            let grace_period = prost_types::Duration::try_from(grace)
                .map_err(|_| "--grace is too long".to_owned())?;
            let request = RotateKeyRequest {
                workspace_id: workspace,
                key_id,
                grace_period: Some(grace_period),
            };
            let rotated = client
                .rotate_key(connection.request(request)?)
                .await
                .map_err(explain)?
                .into_inner();
            let (key, old) = (
                rotated.key.unwrap_or_default(),
                rotated.old_key.unwrap_or_default(),
            );
            if connection.json {
                let value = json!({
                    "key": key_json(&key),
                    "secret": rotated.secret,
                    "old_key": key_json(&old),
                });
                writeln!(out, "{value}").map_err(io)?;
            } else {
                eprintln!(
                    "Rotated \"{}\": new key {} expires {}; the old key {} stops at {}.\n\n{SHOWN_ONCE_WARNING}",
                    key.name,
                    key.id,
                    time_or_never(&key.expire_time),
                    old.id,
                    time_or_never(&old.expire_time)
                );
                writeln!(out, "{}", rotated.secret).map_err(io)?;
            }
        }
        KeysCommand::Delete {
            workspace,
            key_id,
            yes,
        } => {
            if !yes {
                let request = GetKeyRequest {
                    workspace_id: workspace.clone(),
                    key_id: key_id.clone(),
                };
                let key = client
                    .get_key(connection.request(request)?)
                    .await
                    .map_err(explain)?
                    .into_inner();
                if !confirm(&key)? {
                    eprintln!("Not deleted.");
                    return Ok(ExitCode::FAILURE);
                }
            }
            let request = DeleteKeyRequest {
                workspace_id: workspace,
                key_id: key_id.clone(),
            };
            client
                .delete_key(connection.request(request)?)
                .await
                .map_err(explain)?;
            if connection.json {
                writeln!(out, "{}", json!({"deleted": key_id})).map_err(io)?;
            } else {
                writeln!(out, "Deleted {key_id}.").map_err(io)?;
            }
        }
        KeysCommand::Events {
            workspace,
            key_id,
            limit,
        } => {
            let mut events = Vec::new();
            let mut page_token = String::new();
            while events.len() < limit {
                let request = ListKeyEventsRequest {
                    workspace_id: workspace.clone(),
                    key_id: key_id.clone().unwrap_or_default(),
                    page_size: i32::try_from(limit - events.len())
                        .unwrap_or(1000)
                        .min(1000),
                    page_token,
                };
                let page = client
                    .list_key_events(connection.request(request)?)
                    .await
                    .map_err(explain)?
                    .into_inner();
                events.extend(page.events);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if connection.json {
                let value = Value::Array(events.iter().map(event_json).collect());
                writeln!(out, "{value}").map_err(io)?;
            } else {
                write!(out, "{}", events_table(&events)).map_err(io)?;
            }
        }
        KeysCommand::Usage {
            workspace,
            key_id,
            since,
        } => {
            let end = Utc::now();
            let start = chrono::TimeDelta::from_std(since)
                .ok()
                .and_then(|since| end.checked_sub_signed(since))
                .ok_or_else(|| "--since is too long".to_owned())?;
            let at = |t: DateTime<Utc>| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: 0,
            };
            let request = GetKeyUsageRequest {
                workspace_id: workspace,
                key_id,
                start_time: Some(at(start)),
                end_time: Some(at(end)),
            };
            let usage = client
                .get_key_usage(connection.request(request)?)
                .await
                .map_err(explain)?
                .into_inner();
            if connection.json {
                writeln!(out, "{}", usage_json(&usage)).map_err(io)?;
            } else {
                write!(out, "{}", usage_table(&usage)).map_err(io)?;
            }
        }
        KeysCommand::Validate { required_scopes } => {
            let mut key = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut key)
                .map_err(|err| format!("cannot read the key from standard input: {err}"))?;
            let request = ValidateKeyRequest {
                key: key.trim().to_owned(),
                required_scopes,
                ..Default::default()
            };
            let answer = client
                .validate_key(connection.request(request)?)
                .await
                .map_err(explain)?
                .into_inner();
            if connection.json {
                writeln!(out, "{}", validation_json(&answer)).map_err(io)?;
            } else {
                writeln!(out, "{}", validation_text(&answer)).map_err(io)?;
            }
            if !answer.valid {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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

/// One key, as a table row or JSON.
fn show(out: &mut impl Write, connection: &Connection, key: &ApiKey) -> Result<(), String> {
    if connection.json {
        writeln!(out, "{}", key_json(key)).map_err(io)
    } else {
        write!(out, "{}", table(std::slice::from_ref(key))).map_err(io)
    }
}

fn io(err: std::io::Error) -> String {
    format!("cannot write the output: {err}")
}

/// Asks on the terminal; anything but `delete` or `yes` keeps the key.
fn confirm(key: &ApiKey) -> Result<bool, String> {
    if !std::io::stdin().is_terminal() {
        eprint!(
            "Delete key \"{}\" ({})? {DELETE_WARNING} ",
            key.name, key.id
        );
    } else {
        eprint!(
            "Delete key \"{}\" ({})?\n{DELETE_WARNING}\nType \"delete\" to confirm: ",
            key.name, key.id
        );
    }
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|err| format!("cannot read the confirmation: {err}"))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "delete" | "yes" | "y"
    ))
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts.as_ref()?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

fn time_or_never(ts: &Option<prost_types::Timestamp>) -> String {
    time(ts).map_or_else(
        || "Never".into(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

fn status_word(key: &ApiKey) -> &'static str {
    match key.status() {
        KeyStatus::Active => "Active",
        KeyStatus::Disabled => "Disabled",
        KeyStatus::Expired => "Expired",
        KeyStatus::Unspecified => "Unknown",
    }
}

/// The product page's table, with the id to delete by.
fn table(keys: &[ApiKey]) -> String {
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|key| {
            [
                key.id.clone(),
                key.name.clone(),
                key.masked_key.clone(),
                time_or_never(&key.create_time),
                time_or_never(&key.expire_time),
                status_word(key).to_owned(),
                time_or_never(&key.last_used_time),
            ]
        })
        .collect();
    aligned(
        [
            "ID",
            "Name",
            "Key",
            "Created",
            "Expires",
            "Status",
            "Last used",
        ],
        &rows,
        "(no keys)",
    )
}

/// Columns padded to their widest cell; `empty` stands in for no rows.
fn aligned<const N: usize>(header: [&str; N], rows: &[[String; N]], empty: &str) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    };
    line(&header.map(str::to_owned));
    for row in rows {
        line(row);
    }
    if rows.is_empty() {
        text.push_str(empty);
        text.push('\n');
    }
    text
}

fn event_word(event: &KeyEvent) -> String {
    event
        .r#type()
        .as_str_name()
        .trim_start_matches("KEY_EVENT_TYPE_")
        .to_ascii_lowercase()
}

fn events_table(events: &[KeyEvent]) -> String {
    let rows: Vec<[String; 5]> = events
        .iter()
        .map(|event| {
            let detail = if !event.new_key_id.is_empty() {
                format!("replaced by {}", event.new_key_id)
            } else if !event.changed_fields.is_empty() {
                event.changed_fields.join(", ")
            } else {
                String::new()
            };
            [
                time(&event.create_time).map_or_else(String::new, |t| {
                    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                }),
                event_word(event),
                event.key_id.clone(),
                format!("{} ({})", event.actor_id, event.actor_role),
                detail,
            ]
        })
        .collect();
    aligned(
        ["Time", "Event", "Key", "By", "Detail"],
        &rows,
        "(no events)",
    )
}

fn event_json(event: &KeyEvent) -> Value {
    json!({
        "id": event.id,
        "workspace_id": event.workspace_id,
        "key_id": event.key_id,
        "type": event_word(event),
        "actor_id": event.actor_id,
        "actor_role": event.actor_role,
        "create_time": rfc3339(&event.create_time),
        "new_key_id": event.new_key_id,
        "changed_fields": event.changed_fields,
    })
}

fn usage_table(usage: &GetKeyUsageResponse) -> String {
    let rows: Vec<[String; 7]> = usage
        .buckets
        .iter()
        .map(|hour| {
            [
                time_or_never(&hour.start_time),
                hour.valid.to_string(),
                hour.expired.to_string(),
                hour.disabled.to_string(),
                hour.deleted.to_string(),
                hour.insufficient_scope.to_string(),
                hour.distinct_client_ips.to_string(),
            ]
        })
        .collect();
    let mut text = aligned(
        [
            "Hour",
            "Valid",
            "Expired",
            "Disabled",
            "Deleted",
            "Missing scope",
            "Client IPs",
        ],
        &rows,
        "(no use in this period)",
    );
    let from = match usage.last_used_ip.as_str() {
        "" => String::new(),
        ip => format!(" from {ip}"),
    };
    text.push_str(&format!(
        "Last used: {}{from}\n",
        time_or_never(&usage.last_used_time)
    ));
    text
}

fn usage_json(usage: &GetKeyUsageResponse) -> Value {
    let hours: Vec<Value> = usage
        .buckets
        .iter()
        .map(|hour| {
            json!({
                "start_time": rfc3339(&hour.start_time),
                "valid": hour.valid,
                "expired": hour.expired,
                "disabled": hour.disabled,
                "deleted": hour.deleted,
                "insufficient_scope": hour.insufficient_scope,
                "distinct_client_ips": hour.distinct_client_ips,
            })
        })
        .collect();
    json!({
        "hours": hours,
        "last_used_time": rfc3339(&usage.last_used_time),
        "last_used_ip": usage.last_used_ip,
    })
}

fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    time(ts).map_or(Value::Null, |t| {
        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    })
}

fn key_json(key: &ApiKey) -> Value {
    json!({
        "id": key.id,
        "workspace_id": key.workspace_id,
        "name": key.name,
        "masked_key": key.masked_key,
        "create_time": rfc3339(&key.create_time),
        "expire_time": rfc3339(&key.expire_time),
        "status": key.status().as_str_name(),
        "last_used_time": rfc3339(&key.last_used_time),
        "created_by": key.created_by,
        "scopes": key.scopes,
    })
}

fn validation_json(answer: &ValidateKeyResponse) -> Value {
    json!({
        "valid": answer.valid,
        "result": answer.result().as_str_name(),
        "key_id": answer.key_id,
        "workspace_id": answer.workspace_id,
        "expire_time": rfc3339(&answer.expire_time),
        "scopes": answer.scopes,
        "name": answer.name,
    })
}

fn validation_text(answer: &ValidateKeyResponse) -> String {
    let result = answer
        .result()
        .as_str_name()
        .trim_start_matches("VALIDATION_RESULT_");
    if answer.key_id.is_empty() {
        return result.to_owned();
    }
    format!(
        "{result}: key {} (\"{}\") of workspace {}, expires {}",
        answer.key_id,
        answer.name,
        answer.workspace_id,
        time_or_never(&answer.expire_time)
    )
}
