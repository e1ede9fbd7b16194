//! Looking at keys: the audit trail, usage, and validating a key as a gateway would.

use std::{
    io::{BufRead, Write},
    process::ExitCode,
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    KeyRef, Session, explain,
    render::{
        event_json, events_table, io, message, usage_json, usage_table, validation_json,
        validation_text,
    },
};
use crate::grpc::proto::{GetKeyUsageRequest, ListKeyEventsRequest, ValidateKeyRequest};

/// Prints the audit trail, newest first.
pub(super) async fn events(
    session: &mut Session<'_>,
    workspace: String,
    key_id: Option<String>,
    limit: usize,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
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
        let value = message([(
            "events",
            Value::Array(events.iter().map(event_json).collect()),
        )]);
        writeln!(out, "{value}").map_err(io)?;
    } else {
        write!(out, "{}", events_table(&events)).map_err(io)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a key's usage per hour.
pub(super) async fn usage(
    session: &mut Session<'_>,
    KeyRef { workspace, key_id }: KeyRef,
    since: Duration,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
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
    Ok(ExitCode::SUCCESS)
}

/// Validates a key read from standard input, as `request` (without its key) asks.
pub(super) async fn validate(
    session: &mut Session<'_>,
    mut request: ValidateKeyRequest,
) -> Result<ExitCode, String> {
    let connection = session.connection;
    let (client, out) = (&mut session.client, &mut session.out);
    let mut key = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut key)
        .map_err(|err| format!("cannot read the key from standard input: {err}"))?;
    request.key = key.trim().to_owned();
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
    Ok(ExitCode::SUCCESS)
}
