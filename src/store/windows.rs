//! Rate-limit windows shared by every replica (`rate_limit_windows`): how much of each
//! window's budget replicas have leased. A lease is one compare-and-set on the window's
//! row, so no two replicas take the same unit and all of them together never lease more
//! than the limit; the row is made by the window's first lease and pruned once it ended.

use sea_orm::{ConnectionTrait, DbErr, Statement, Value};

use super::{Store, StoreError, sql::Placeholders};
use crate::domain::lease_size;

/// How many times a lease tries its compare-and-set before it reports the window busy.
const LEASE_ATTEMPTS: usize = 64;

/// How long after a window ended its row is kept: a replica whose clock is behind may
/// still lease from it.
const KEPT_AFTER_END_US: i64 = 60_000_000;

impl Store {
    /// Leases a slice of the window `id` (ending at `ends_us`, its budget `limit`): at least
    /// `need` (0: whatever a lease takes; see [`lease_size`]), or nothing when less is left.
    /// Returns what was granted and what is left unleased.
    pub(crate) async fn lease_window(
        &self,
        id: &str,
        ends_us: i64,
        limit: i64,
        need: i64,
    ) -> Result<(i64, i64), StoreError> {
        for _ in 0..LEASE_ATTEMPTS {
            let mut p = Placeholders::new(self.backend());
            let sql = format!(
                "SELECT granted FROM rate_limit_windows WHERE window_id = {}",
                p.next()
            );
            let stored = self
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    self.backend(),
                    sql,
                    [id.into()],
                ))
                .await?
                .map(|row| row.try_get::<i64>("", "granted"))
                .transpose()?;
            let taken = stored.unwrap_or(0);
            let left = (limit - taken).max(0);
            let granted = lease_size(left, need);
            if granted == 0 {
                // Nothing to take: the read is the answer.
                return Ok((0, left));
            }
            let mut p = Placeholders::new(self.backend());
            let (sql, values): (String, Vec<Value>) = match stored {
                None => (
                    format!(
                        "INSERT INTO rate_limit_windows (window_id, ends_us, granted) \
                         VALUES ({}, {}, {}) ON CONFLICT (window_id) DO NOTHING",
                        p.next(),
                        p.next(),
                        p.next()
                    ),
                    vec![id.into(), ends_us.into(), granted.into()],
                ),
                Some(taken) => (
                    format!(
                        "UPDATE rate_limit_windows SET granted = {} \
                         WHERE window_id = {} AND granted = {}",
                        p.next(),
                        p.next(),
                        p.next()
                    ),
                    vec![(taken + granted).into(), id.into(), taken.into()],
                ),
            };
            let written = self
                .db
                .execute_raw(Statement::from_sql_and_values(self.backend(), sql, values))
                .await?;
            if written.rows_affected() == 1 {
                return Ok((granted, left - granted));
            }
            // Another replica leased in between: read again.
        }
        Err(StoreError::Unavailable(DbErr::Custom(format!(
            "rate-limit window stayed busy for {LEASE_ATTEMPTS} attempts"
        ))))
    }

    /// Gives back `amount` units leased of the window `id` and not spent.
    pub(crate) async fn return_window(&self, id: &str, amount: i64) -> Result<(), StoreError> {
        let mut p = Placeholders::new(self.backend());
        let sql = format!(
            "UPDATE rate_limit_windows SET granted = granted - {} WHERE window_id = {}",
            p.next(),
            p.next()
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [amount.into(), id.into()],
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
