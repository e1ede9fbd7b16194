//! Rate-limit windows shared by every replica (`rate_limit_windows`): how much of each
//! window's budget replicas have leased. A lease is one upsert of the window's row that
//! adds the slice under the row's lock, so no two replicas take the same unit and all of
//! them together never lease more than the limit; the row is made by the window's first
//! lease and pruned an hour after the window ended.

use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

use super::{Store, StoreError, sql::Placeholders};
use crate::domain::MAX_LEASE;

/// How long after a window ended its row is kept: a replica whose clock is behind may
/// still lease from it (and must find what was leased, not a fresh budget).
const KEPT_AFTER_END_US: i64 = 3_600_000_000;

/// SQL for the slice a lease takes when `taken` units are leased already: what
/// [`crate::domain::lease_size`] takes of `limit - taken` for `need` (the same rule, in the
/// database's own arithmetic, so the lease is one statement). The numbers are ours
/// (integers), not a caller's text.
fn slice_sql(backend: DatabaseBackend, taken: &str, limit: i64, need: i64) -> String {
    let (least, greatest) = match backend {
        DatabaseBackend::Postgres => ("LEAST", "GREATEST"),
        _ => ("MIN", "MAX"),
    };
    let left = format!("({limit} - {taken})");
    format!(
        "(CASE WHEN {left} <= 0 OR {need} > {left} THEN 0 \
         ELSE {least}({greatest}({need}, {least}({greatest}({left} / 16, 1), {MAX_LEASE})), {left}) END)"
    )
}

impl Store {
    /// Leases a slice of the window `id` (ending at `ends_us`, its budget `limit`): at least
    /// `need` (0: whatever a lease takes; see [`crate::domain::lease_size`]), or nothing when
    /// less is left; with `take` false, only reads what is left. One statement: an upsert
    /// that adds the slice to what is leased and returns both, so concurrent leases from
    /// any number of replicas never take the same unit. Returns what was granted and what
    /// is left unleased (below zero when a lowered limit is under what was leased).
    pub(crate) async fn lease_window(
        &self,
        id: &str,
        ends_us: i64,
        limit: i64,
        need: i64,
        take: bool,
    ) -> Result<(i64, i64), StoreError> {
        let backend = self.backend();
        let mut p = Placeholders::new(backend);
        if !take {
            let sql = format!(
                "SELECT granted FROM rate_limit_windows WHERE window_id = {}",
                p.next()
            );
            let taken = self
                .db
                .query_one_raw(Statement::from_sql_and_values(backend, sql, [id.into()]))
                .await?
                .map(|row| row.try_get::<i64>("", "granted"))
                .transpose()?
                .unwrap_or(0);
            return Ok((0, limit - taken));
        }
        let (id_mark, ends_mark) = (p.next(), p.next());
        let first = slice_sql(backend, "0", limit, need);
        let next = slice_sql(backend, "rate_limit_windows.granted", limit, need);
        let sql = format!(
            "INSERT INTO rate_limit_windows (window_id, ends_us, granted, last_grant) \
             VALUES ({id_mark}, {ends_mark}, {first}, {first}) \
             ON CONFLICT (window_id) DO UPDATE \
             SET granted = rate_limit_windows.granted + {next}, last_grant = {next} \
             RETURNING granted, last_grant"
        );
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [id.into(), ends_us.into()],
            ))
            .await?
            .ok_or_else(|| {
                StoreError::Unavailable(sea_orm::DbErr::Custom(
                    "a rate-limit window's lease returned no row".into(),
                ))
            })?;
        let taken: i64 = row.try_get("", "granted")?;
        let granted: i64 = row.try_get("", "last_grant")?;
        Ok((granted, limit - taken))
    }

    /// Gives back `amount` units leased of the window `id` and not spent (never below none
    /// leased: a row pruned and made again by a replica far behind keeps its own count).
    pub(crate) async fn return_window(&self, id: &str, amount: i64) -> Result<(), StoreError> {
        let mut p = Placeholders::new(self.backend());
        let sql = format!(
            "UPDATE rate_limit_windows \
             SET granted = CASE WHEN granted > {amount} THEN granted - {amount} ELSE 0 END \
             WHERE window_id = {}",
            p.next()
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [id.into()],
            ))
            .await?;
        Ok(())
    }

    /// Deletes the windows that ended a while before `now_us`; returns how many.
    pub(crate) async fn prune_windows(&self, now_us: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM rate_limit_windows WHERE ends_us < {}",
            Placeholders::new(self.backend()).next()
        );
        let deleted = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [now_us.saturating_sub(KEPT_AFTER_END_US).into()],
            ))
            .await?
            .rows_affected();
        Ok(deleted)
    }
}
