//! How the CLI prints keys, events and usage: tables like the product page, or JSON.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::Connection;
use crate::grpc::proto::{
    ApiKey, GetKeyUsageResponse, KeyEvent, KeyStatus, RefillInterval, ValidateKeyResponse,
};

/// One key, as a table row or JSON.
pub(super) fn show(
    out: &mut impl Write,
    connection: &Connection,
    key: &ApiKey,
) -> Result<(), String> {
    if connection.json {
        writeln!(out, "{}", key_json(key)).map_err(io)
    } else {
        write!(out, "{}", table(std::slice::from_ref(key))).map_err(io)?;
        write!(out, "{}", details(key)).map_err(io)
    }
}

/// What the table leaves out of one key, a line each for what it has.
fn details(key: &ApiKey) -> String {
    let mut text = String::new();
    if !key.scopes.is_empty() {
        text.push_str(&format!("Scopes: {}\n", key.scopes.join(", ")));
    }
    if !key.owner_id.is_empty() {
        text.push_str(&format!("Owner: {}\n", key.owner_id));
    }
    if !key.annotations.is_empty() {
        let pairs: Vec<String> = key
            .annotations
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        text.push_str(&format!("Annotations: {}\n", pairs.join(", ")));
    }
    if !key.allowed_cidrs.is_empty() {
        text.push_str(&format!("Allowed from: {}\n", key.allowed_cidrs.join(", ")));
    }
    if !key.rate_limits.is_empty() {
        let limits: Vec<String> = key
            .rate_limits
            .iter()
            .map(|limit| {
                let window = limit.window.map_or(0, |window| window.seconds);
                let auto = if limit.auto_apply { ",auto" } else { "" };
                format!("{}={}/{window}s{auto}", limit.name, limit.limit)
            })
            .collect();
        text.push_str(&format!("Rate limits: {}\n", limits.join(", ")));
    }
    if let Some(credits) = &key.credits {
        let refill = match &credits.refill {
            Some(refill) => match refill.interval() {
                RefillInterval::Monthly => format!(
                    ", refilled to {} on day {} of each month",
                    refill.amount, refill.day_of_month
                ),
                _ => format!(", refilled to {} each day", refill.amount),
            },
            None => String::new(),
        };
        text.push_str(&format!("Credits: {} left{refill}\n", credits.remaining));
    }
    if !key.etag.is_empty() {
        text.push_str(&format!("Etag: {}\n", key.etag));
    }
    text
}

pub(super) fn io(err: std::io::Error) -> String {
    format!("cannot write the output: {err}")
}

pub(super) fn time(ts: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts.as_ref()?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

pub(super) fn time_or_never(ts: &Option<prost_types::Timestamp>) -> String {
    time(ts).map_or_else(
        || "Never".into(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

pub(super) fn status_word(key: &ApiKey) -> &'static str {
    match key.status() {
        KeyStatus::Active => "Active",
        KeyStatus::Disabled => "Disabled",
        KeyStatus::Expired => "Expired",
        KeyStatus::Unspecified => "Unknown",
    }
}

/// The product page's table, with the id to delete by.
pub(super) fn table(keys: &[ApiKey]) -> String {
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
pub(super) fn aligned<const N: usize>(
    header: [&str; N],
    rows: &[[String; N]],
    empty: &str,
) -> String {
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

pub(super) fn event_word(event: &KeyEvent) -> String {
    event
        .r#type()
        .as_str_name()
        .trim_start_matches("KEY_EVENT_TYPE_")
        .to_ascii_lowercase()
}

pub(super) fn events_table(events: &[KeyEvent]) -> String {
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

pub(super) fn event_json(event: &KeyEvent) -> Value {
    message([
        ("id", json!(event.id)),
        ("workspaceId", json!(event.workspace_id)),
        ("keyId", json!(event.key_id)),
        ("type", json!(event.r#type().as_str_name())),
        ("actorId", json!(event.actor_id)),
        ("actorRole", json!(event.actor_role)),
        ("createTime", rfc3339(&event.create_time)),
        ("newKeyId", json!(event.new_key_id)),
        ("changedFields", json!(event.changed_fields)),
    ])
}

pub(super) fn usage_table(usage: &GetKeyUsageResponse) -> String {
    let rows: Vec<[String; 10]> = usage
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
                hour.ip_not_allowed.to_string(),
                hour.rate_limited.to_string(),
                hour.usage_exceeded.to_string(),
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
            "IP refused",
            "Rate limited",
            "Out of credits",
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

pub(super) fn usage_json(usage: &GetKeyUsageResponse) -> Value {
    let buckets: Vec<Value> = usage
        .buckets
        .iter()
        .map(|hour| {
            message([
                ("startTime", rfc3339(&hour.start_time)),
                ("valid", int64(hour.valid)),
                ("expired", int64(hour.expired)),
                ("disabled", int64(hour.disabled)),
                ("deleted", int64(hour.deleted)),
                ("insufficientScope", int64(hour.insufficient_scope)),
                ("distinctClientIps", int64(hour.distinct_client_ips)),
                ("ipNotAllowed", int64(hour.ip_not_allowed)),
                ("rateLimited", int64(hour.rate_limited)),
                ("usageExceeded", int64(hour.usage_exceeded)),
            ])
        })
        .collect();
    message([
        ("buckets", Value::Array(buckets)),
        ("lastUsedTime", rfc3339(&usage.last_used_time)),
        ("lastUsedIp", json!(usage.last_used_ip)),
    ])
}

/// A message in the proto3 JSON mapping, as grpcurl prints it: lowerCamelCase names, enums by
/// name, int64 as strings, and fields at their default (empty, zero, false) left out.
pub(super) fn message<const N: usize>(fields: [(&str, Value); N]) -> Value {
    let set = |value: &Value| match value {
        Value::Null | Value::Bool(false) => false,
        Value::String(text) => !text.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(entries) => !entries.is_empty(),
        _ => true,
    };
    Value::Object(
        fields
            .into_iter()
            .filter(|(_, value)| set(value))
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

/// An int64 as the proto3 JSON mapping writes it: a string (none at its default, 0).
fn int64(value: i64) -> Value {
    match value {
        0 => Value::Null,
        value => json!(value.to_string()),
    }
}

/// A timestamp as the proto3 JSON mapping writes it: RFC 3339 in UTC, with 0, 3, 6 or 9
/// fractional digits.
pub(super) fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    time(ts).map_or(Value::Null, |t| {
        json!(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    })
}

pub(super) fn key_json(key: &ApiKey) -> Value {
    let mut value = message([
        ("id", json!(key.id)),
        ("workspaceId", json!(key.workspace_id)),
        ("name", json!(key.name)),
        ("maskedKey", json!(key.masked_key)),
        ("createTime", rfc3339(&key.create_time)),
        ("expireTime", rfc3339(&key.expire_time)),
        ("status", json!(key.status().as_str_name())),
        ("lastUsedTime", rfc3339(&key.last_used_time)),
        ("createdBy", json!(key.created_by)),
        ("scopes", json!(key.scopes)),
        ("allowedCidrs", json!(key.allowed_cidrs)),
        ("annotations", sorted_map(&key.annotations)),
        ("ownerId", json!(key.owner_id)),
        ("etag", json!(key.etag)),
        (
            "rateLimits",
            Value::Array(
                key.rate_limits
                    .iter()
                    .map(|limit| {
                        message([
                            ("name", json!(limit.name)),
                            ("limit", int64(limit.limit)),
                            ("window", duration(&limit.window)),
                            ("autoApply", json!(limit.auto_apply)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ]);
    // A message that is set shows, even empty (a balance of 0 without refill is `{}`).
    if let (Some(credits), Value::Object(fields)) = (&key.credits, &mut value) {
        let refill = credits.refill.as_ref().map_or(Value::Null, |refill| {
            message([
                ("amount", int64(refill.amount)),
                ("interval", json!(refill.interval().as_str_name())),
                (
                    "dayOfMonth",
                    match refill.day_of_month {
                        0 => Value::Null,
                        day => json!(day),
                    },
                ),
            ])
        });
        let credits = message([("remaining", int64(credits.remaining)), ("refill", refill)]);
        fields.insert("credits".to_owned(), credits);
    }
    value
}

/// A duration as the proto3 JSON mapping writes it: seconds with 0, 3, 6 or 9 fractional
/// digits and an `s`.
fn duration(duration: &Option<prost_types::Duration>) -> Value {
    let Some(duration) = duration else {
        return Value::Null;
    };
    let fraction = match duration.nanos {
        0 => String::new(),
        nanos if nanos % 1_000_000 == 0 => format!(".{:03}", nanos / 1_000_000),
        nanos if nanos % 1_000 == 0 => format!(".{:06}", nanos / 1_000),
        nanos => format!(".{nanos:09}"),
    };
    json!(format!("{}{fraction}s", duration.seconds))
}

/// A `map<string, string>` as JSON (sorted by key, as the map is).
fn sorted_map(map: &std::collections::BTreeMap<String, String>) -> Value {
    json!(map)
}

pub(super) fn validation_json(answer: &ValidateKeyResponse) -> Value {
    message([
        ("valid", json!(answer.valid)),
        ("result", json!(answer.result().as_str_name())),
        ("keyId", json!(answer.key_id)),
        ("workspaceId", json!(answer.workspace_id)),
        ("expireTime", rfc3339(&answer.expire_time)),
        ("scopes", json!(answer.scopes)),
        ("name", json!(answer.name)),
        ("annotations", sorted_map(&answer.annotations)),
        ("ownerId", json!(answer.owner_id)),
        (
            "rateLimits",
            Value::Array(
                answer
                    .rate_limits
                    .iter()
                    .map(|state| {
                        message([
                            ("name", json!(state.name)),
                            ("limit", int64(state.limit)),
                            ("remaining", int64(state.remaining)),
                            ("resetTime", rfc3339(&state.reset_time)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("retryAfter", duration(&answer.retry_after)),
        // Optional: 0 is shown, as grpcurl shows a field with presence.
        (
            "creditsRemaining",
            answer
                .credits_remaining
                .map_or(Value::Null, |left| json!(left.to_string())),
        ),
    ])
}

pub(super) fn validation_text(answer: &ValidateKeyResponse) -> String {
    let result = answer
        .result()
        .as_str_name()
        .trim_start_matches("VALIDATION_RESULT_");
    if answer.key_id.is_empty() {
        return result.to_owned();
    }
    let mut text = format!(
        "{result}: key {} (\"{}\") of workspace {}, expires {}",
        answer.key_id,
        answer.name,
        answer.workspace_id,
        time_or_never(&answer.expire_time)
    );
    for state in &answer.rate_limits {
        text.push_str(&format!(
            "\n  rate limit {}: {} of {} left until {}",
            state.name,
            state.remaining,
            state.limit,
            time_or_never(&state.reset_time)
        ));
    }
    if let Some(left) = answer.credits_remaining {
        text.push_str(&format!("\n  credits: {left} left"));
    }
    if let Some(wait) = answer.retry_after {
        let millis = wait.seconds * 1_000 + i64::from(wait.nanos / 1_000_000);
        text.push_str(&format!(
            "\n  retry after {}.{:03}s",
            millis / 1_000,
            millis % 1_000
        ));
    }
    text
}
