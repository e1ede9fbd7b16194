//! What replicas saw of keys, flushed in batches: hourly usage (counts and client-IP
//! sketches, summed and merged across replicas) and last uses.

use std::collections::HashMap;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseTransaction, DbErr, QueryResult, Statement,
    TransactionTrait,
};

use super::{
    Store, StoreError,
    sql::{Placeholders, binary_chunks},
};
use crate::{
    domain::{KeyId, WorkspaceId},
    usage::{DistinctIps, HourUsage, UsageCounts},
};

/// One key's answers in one hour, to add to what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyHour {
    pub key_id: String,
    pub workspace_id: String,
    pub usage: HourUsage,
}

/// The usage table's count columns, each with its count: the one place they are named.
fn usage_columns(counts: &UsageCounts) -> [(&'static str, u64); 8] {
    let UsageCounts {
        valid,
        expired,
        disabled,
        deleted,
        insufficient_scope,
        ip_not_allowed,
        rate_limited,
        usage_exceeded,
    } = *counts;
    [
        ("valid", valid),
        ("expired", expired),
        ("disabled", disabled),
        ("deleted", deleted),
        ("insufficient_scope", insufficient_scope),
        ("ip_not_allowed", ip_not_allowed),
        ("rate_limited", rate_limited),
        ("usage_exceeded", usage_exceeded),
    ]
}

/// The count columns' names.
fn usage_column_names() -> [&'static str; 8] {
    usage_columns(&UsageCounts::default()).map(|(name, _)| name)
}

/// A stored hour's counts, read by the names [`usage_columns`] writes.
fn read_usage_counts(row: &sea_orm::QueryResult) -> Result<UsageCounts, DbErr> {
    // Stored as BIGINT; never negative, as only additions of counts write it.
    let count = |column: &str| -> Result<u64, DbErr> {
        Ok(u64::try_from(row.try_get::<i64>("", column)?).unwrap_or(0))
    };
    Ok(UsageCounts {
        valid: count("valid")?,
        expired: count("expired")?,
        disabled: count("disabled")?,
        deleted: count("deleted")?,
        insufficient_scope: count("insufficient_scope")?,
        ip_not_allowed: count("ip_not_allowed")?,
        rate_limited: count("rate_limited")?,
        usage_exceeded: count("usage_exceeded")?,
    })
}

/// Merges our sketches into those the upsert returned (a new row holds ours already) and
/// writes back the ones that changed, a chunk per statement.
async fn merge_sketches(
    txn: &DatabaseTransaction,
    backend: DatabaseBackend,
    chunk: &[&KeyHour],
    stored: Vec<QueryResult>,
    per_statement: usize,
) -> Result<(), DbErr> {
    // A new row holds our sketch already; an existing one returns its own to merge.
    let ours: HashMap<(&str, i64), &DistinctIps> = chunk
        .iter()
        .filter(|hour| !hour.usage.client_ips.is_empty())
        .map(|hour| {
            (
                (hour.key_id.as_str(), hour.usage.start_time_us),
                &hour.usage.client_ips,
            )
        })
        .collect();
    let mut merged_rows = Vec::new();
    for row in stored {
        let key_id: String = row.try_get("", "key_id")?;
        let start: i64 = row.try_get("", "start_time_us")?;
        let Some(ips) = ours.get(&(key_id.as_str(), start)) else {
            continue;
        };
        let bytes: Option<Vec<u8>> = row.try_get("", "client_ips")?;
        let stored = decode_ips(bytes.as_deref(), &key_id);
        let mut merged = stored.clone();
        merged.merge(ips);
        if merged != stored {
            merged_rows.push((key_id, start, merged.to_bytes()));
        }
    }
    for merged_rows in binary_chunks(&merged_rows, per_statement) {
        // One statement for the chunk's changed sketches.
        let mut placeholders = Placeholders::new(backend);
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(merged_rows.len() * 5);
        let mut cases = String::new();
        let mut keys = Vec::with_capacity(merged_rows.len());
        for (key_id, start, bytes) in merged_rows {
            let (k, t, b) = (
                placeholders.next(),
                placeholders.next(),
                placeholders.next(),
            );
            cases.push_str(&format!(
                " WHEN key_id = {k} AND start_time_us = {t} THEN {b}"
            ));
            keys.push(format!("({k}, {t})"));
            values.push(key_id.clone().into());
            values.push((*start).into());
            values.push(bytes.clone().into());
        }
        let sql = format!(
            "UPDATE api_key_usage SET client_ips = CASE{cases} ELSE client_ips END \
             WHERE (key_id, start_time_us) IN ({})",
            keys.join(", ")
        );
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
    }
    Ok(())
}

/// A stored sketch; one that cannot be read counts as empty (and is logged), never fails a
/// flush or a read.
fn decode_ips(bytes: Option<&[u8]>, key_id: &str) -> DistinctIps {
    match bytes.map(DistinctIps::from_bytes) {
        None => DistinctIps::default(),
        Some(Ok(ips)) => ips,
        Some(Err(err)) => {
            tracing::warn!(key_id, error = %err, "stored client-IP sketch unreadable; counting from empty");
            DistinctIps::default()
        }
    }
}

impl Store {
    /// Adds each key's hour to what is stored, in one transaction: counts are summed and the
    /// client-IP sketches merged, so every replica and every flush adds its own share.
    pub(crate) async fn record_usage(&self, hours: &[KeyHour]) -> Result<(), StoreError> {
        const PER_STATEMENT: usize = 128;
        let backend = self.backend();
        let mut hours: Vec<&KeyHour> = hours.iter().collect();
        // One lock order for every replica: concurrent flushes wait, never deadlock.
        hours.sort_by(|a, b| {
            (&a.key_id, a.usage.start_time_us).cmp(&(&b.key_id, b.usage.start_time_us))
        });
        // The key, hour and workspace, each count, and the sketch.
        let per_row = 3 + usage_column_names().len() + 1;
        let txn = self.db.begin().await?;
        for chunk in binary_chunks(&hours, PER_STATEMENT) {
            let mut placeholders = Placeholders::new(backend);
            let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * per_row);
            let mut rows = Vec::with_capacity(chunk.len());
            for hour in chunk {
                let columns = (0..per_row)
                    .map(|_| placeholders.next())
                    .collect::<Vec<_>>();
                rows.push(format!("({})", columns.join(", ")));
                values.push(hour.key_id.clone().into());
                values.push(hour.usage.start_time_us.into());
                values.push(hour.workspace_id.clone().into());
                for (_, count) in usage_columns(&hour.usage.counts) {
                    values.push(i64::try_from(count).unwrap_or(i64::MAX).into());
                }
                let ips = &hour.usage.client_ips;
                values.push(sea_orm::Value::Bytes(
                    (!ips.is_empty()).then(|| ips.to_bytes()),
                ));
            }
            let sums = usage_column_names()
                .iter()
                .map(|column| format!("{column} = api_key_usage.{column} + excluded.{column}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO api_key_usage (key_id, start_time_us, workspace_id, {}, client_ips) \
                 VALUES {} ON CONFLICT (key_id, start_time_us) DO UPDATE SET {sums} \
                 RETURNING key_id, start_time_us, client_ips",
                usage_column_names().join(", "),
                rows.join(", ")
            );
            let stored = txn
                .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
                .await?;
            merge_sketches(&txn, backend, chunk, stored, PER_STATEMENT).await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// A key's stored hours in `[from_us, to_us)`, oldest first.
    pub(crate) async fn usage(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        from_us: i64,
        to_us: i64,
    ) -> Result<Vec<HourUsage>, StoreError> {
        let backend = self.backend();
        let mut placeholders = Placeholders::new(backend);
        let sql = format!(
            "SELECT start_time_us, {}, client_ips FROM api_key_usage \
             WHERE key_id = {} AND workspace_id = {} AND start_time_us >= {} AND start_time_us < {} \
             ORDER BY start_time_us",
            usage_column_names().join(", "),
            placeholders.next(),
            placeholders.next(),
            placeholders.next(),
            placeholders.next(),
        );
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [
                    id.as_str().into(),
                    workspace.as_str().into(),
                    from_us.into(),
                    to_us.into(),
                ],
            ))
            .await?;
        rows.into_iter()
            .map(|row| {
                let bytes: Option<Vec<u8>> = row.try_get("", "client_ips")?;
                Ok(HourUsage::stored(
                    row.try_get("", "start_time_us")?,
                    read_usage_counts(&row)?,
                    decode_ips(bytes.as_deref(), id.as_str()),
                ))
            })
            .collect()
    }

    /// Writes a batch of `(key id, last used µs, client IP)`, a few hundred keys per
    /// statement, never moving a time backwards (replicas race): the IP goes with the time.
    /// Not a revision: other replicas' indexes do not need it.
    pub async fn record_uses(
        &self,
        uses: &[(String, i64, Option<String>)],
    ) -> Result<(), StoreError> {
        const PER_STATEMENT: usize = 256;
        let backend = self.backend();
        // SQLite's two-argument max() is a scalar; PostgreSQL spells it GREATEST.
        let (greatest, cast) = match backend {
            DatabaseBackend::Postgres => ("GREATEST", "::bigint"),
            _ => ("MAX", ""),
        };
        // One transaction for the batch (one commit, not one per chunk), its rows in one
        // order for every replica, so concurrent flushes wait rather than deadlock.
        let mut uses: Vec<&(String, i64, Option<String>)> = uses.iter().collect();
        uses.sort_by(|a, b| a.0.cmp(&b.0));
        let txn = self.db.begin().await?;
        for chunk in binary_chunks(&uses, PER_STATEMENT) {
            let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 7);
            let mut placeholders = Placeholders::new(backend);
            let mut times = String::new();
            for (id, at, _) in chunk {
                times.push_str(&format!(
                    " WHEN {} THEN {}{cast}",
                    placeholders.next(),
                    placeholders.next()
                ));
                values.push(id.clone().into());
                values.push((*at).into());
            }
            // SET expressions all read the row as it was, so the time compared is the old one;
            // the times' parameters are numbered, so both expressions share them.
            let old_time = "COALESCE(last_used_time_us, 0)";
            let mut ips = format!("CASE WHEN {old_time} < CASE id{times} END THEN CASE id");
            for (id, _, ip) in chunk {
                ips.push_str(&format!(
                    " WHEN {} THEN {}",
                    placeholders.next(),
                    placeholders.next()
                ));
                values.push(id.clone().into());
                values.push(sea_orm::Value::String(ip.clone()));
            }
            ips.push_str(" END ELSE last_used_ip END");
            let ids: Vec<String> = chunk
                .iter()
                .map(|(id, _, _)| {
                    values.push(id.clone().into());
                    placeholders.next()
                })
                .collect();
            let sql = format!(
                "UPDATE api_keys SET last_used_ip = {ips}, \
                 last_used_time_us = {greatest}({old_time}, CASE id{times} END) \
                 WHERE id IN ({})",
                ids.join(", ")
            );
            txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }
}
