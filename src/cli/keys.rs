//! Managing keys: create, list, show, disable, enable, rotate, delete.

use std::{
    io::{BufRead, IsTerminal, Write},
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};

use super::{
    DELETE_WARNING, Expires, KeyRef, KeyTermsArgs, SHOWN_ONCE_WARNING, Session, explain,
    render::{io, key_json, message, show, table, time_or_never},
};
use crate::grpc::proto::{
    ApiKey, CreateKeyRequest, Credits, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest,
    GetKeyRequest, ListKeysRequest, RateLimit, RotateKeyRequest, UpdateKeyRequest,
};

/// Creates a key and prints its secret, once.
pub(super) async fn create(
    session: &mut Session<'_>,
    workspace: String,
    name: String,
    expires: Expires,
    scopes: Vec<String>,
    terms: KeyTermsArgs,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
    let (expiration, expire_time) = expires.request();
    let credits = terms.credits();
    let request = CreateKeyRequest {
        workspace_id: workspace,
        name,
        expiration: expiration.into(),
        expire_time,
        scopes,
        allowed_cidrs: terms.allowed_cidrs,
        annotations: terms.annotations.into_iter().collect(),
        owner_id: terms.owner.unwrap_or_default(),
        credits,
        rate_limits: terms.rate_limits,
    };
    let created = client
        .create_key(connection.request(request)?)
        .await
        .map_err(explain)?
        .into_inner();
    let key = created.key.unwrap_or_default();
    if connection.json {
        let value = message([("key", key_json(&key)), ("secret", json!(created.secret))]);
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
    Ok(ExitCode::SUCCESS)
}

/// Lists every key of a workspace (or of one owner in it: `owner` not empty), page by page.
pub(super) async fn list(
    session: &mut Session<'_>,
    workspace: String,
    owner: String,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListKeysRequest {
            workspace_id: workspace.clone(),
            page_size: 1000,
            page_token,
            owner_id: owner.clone(),
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
        // As ListKeys answers, with every page in one.
        let value = message([("keys", Value::Array(keys.iter().map(key_json).collect()))]);
        writeln!(out, "{value}").map_err(io)?;
    } else {
        write!(out, "{}", table(&keys)).map_err(io)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `get`, `disable` and `enable` do to the key they name, before showing it.
#[derive(Debug, Clone, Copy)]
pub(super) enum OneKey {
    Get,
    Disable,
    Enable,
}

/// Gets, disables or enables a key, and shows it.
pub(super) async fn one(
    session: &mut Session<'_>,
    action: OneKey,
    KeyRef {
        workspace: workspace_id,
        key_id,
    }: KeyRef,
    etag: Option<String>,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let client = &mut session.client;
    let etag = etag.unwrap_or_default();
    let key = match action {
        OneKey::Get => {
            let request = GetKeyRequest {
                workspace_id,
                key_id,
            };
            client.get_key(connection.request(request)?).await
        }
        OneKey::Disable => {
            let request = DisableKeyRequest {
                workspace_id,
                key_id,
                etag,
            };
            client.disable_key(connection.request(request)?).await
        }
        OneKey::Enable => {
            let request = EnableKeyRequest {
                workspace_id,
                key_id,
                etag,
            };
            client.enable_key(connection.request(request)?).await
        }
    };
    show(
        &mut session.out,
        connection,
        &key.map_err(explain)?.into_inner(),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// What `keys update` changes: each field given (`Some`, an empty value clearing it).
#[derive(Debug, Default)]
pub(super) struct Edit {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub owner: Option<String>,
    pub annotations: Option<Vec<(String, String)>>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub rate_limits: Option<Vec<RateLimit>>,
    /// `Some(None)` removes the key's credits.
    pub credits: Option<Option<Credits>>,
    /// Empty: whatever the key is now.
    pub etag: String,
}

/// Changes the fields of a key that `edit` gives, and shows it.
pub(super) async fn update(
    session: &mut Session<'_>,
    KeyRef { workspace, key_id }: KeyRef,
    edit: Edit,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let paths: Vec<String> = [
        ("name", edit.name.is_some()),
        ("scopes", edit.scopes.is_some()),
        ("owner_id", edit.owner.is_some()),
        ("annotations", edit.annotations.is_some()),
        ("allowed_cidrs", edit.allowed_cidrs.is_some()),
        ("rate_limits", edit.rate_limits.is_some()),
        ("credits", edit.credits.is_some()),
    ]
    .into_iter()
    .filter(|(_, given)| *given)
    .map(|(path, _)| path.to_owned())
    .collect();
    if paths.is_empty() {
        return Err(
            "nothing to change: give --name, --scope, --owner, --annotation, --allow-cidr, --rate-limit, --credits or a --clear-… flag"
                .to_owned(),
        );
    }
    let request = UpdateKeyRequest {
        key: Some(ApiKey {
            workspace_id: workspace,
            id: key_id,
            name: edit.name.unwrap_or_default(),
            scopes: edit.scopes.unwrap_or_default(),
            owner_id: edit.owner.unwrap_or_default(),
            annotations: edit.annotations.unwrap_or_default().into_iter().collect(),
            allowed_cidrs: edit.allowed_cidrs.unwrap_or_default(),
            rate_limits: edit.rate_limits.unwrap_or_default(),
            credits: edit.credits.flatten(),
            etag: edit.etag,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    };
    let key = session
        .client
        .update_key(connection.request(request)?)
        .await
        .map_err(explain)?
        .into_inner();
    show(&mut session.out, connection, &key)?;
    Ok(ExitCode::SUCCESS)
}

/// Rotates a key and prints the new secret, once.
pub(super) async fn rotate(
    session: &mut Session<'_>,
    KeyRef { workspace, key_id }: KeyRef,
    grace: Duration,
    etag: String,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
    let grace_period =
        prost_types::Duration::try_from(grace).map_err(|_| "--grace is too long".to_owned())?;
    let request = RotateKeyRequest {
        workspace_id: workspace,
        key_id,
        grace_period: Some(grace_period),
        etag,
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
        let value = message([
            ("key", key_json(&key)),
            ("secret", json!(rotated.secret)),
            ("oldKey", key_json(&old)),
        ]);
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
    Ok(ExitCode::SUCCESS)
}

/// Deletes a key, once confirmed.
pub(super) async fn delete(
    session: &mut Session<'_>,
    KeyRef { workspace, key_id }: KeyRef,
    yes: bool,
    etag: String,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
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
        etag,
    };
    client
        .delete_key(connection.request(request)?)
        .await
        .map_err(explain)?;
    if connection.json {
        // DeleteKey's answer, as grpcurl prints it.
        writeln!(out, "{{}}").map_err(io)?;
    } else {
        writeln!(out, "Deleted {key_id}.").map_err(io)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; anything but exactly `delete` or `yes` keeps the key.
fn confirm(key: &ApiKey) -> Result<bool, String> {
    if !std::io::stdin().is_terminal() {
        eprint!(
            "Delete key \"{}\" ({})? {DELETE_WARNING} Answer \"delete\" or \"yes\": ",
            key.name, key.id
        );
    } else {
        eprint!(
            "Delete key \"{}\" ({})?\n{DELETE_WARNING}\nType \"delete\" (or \"yes\") to confirm: ",
            key.name, key.id
        );
    }
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|err| format!("cannot read the confirmation: {err}"))?;
    Ok(matches!(answer.trim(), "delete" | "yes"))
}
