//! Rate-limit windows shared by every replica (`rate_limit_windows`): how much of each
//! window's budget replicas have leased. A lease is one upsert of the window's row that
//! adds the slice under the row's lock, so no two replicas take the same unit and all of
//! them together never lease more than the limit; the row is made by the window's first
//! lease and pruned an hour after the window ended.

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, Statement, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

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

/// How many leases one transaction takes at most.
const BATCH: usize = 64;

/// A lease waiting for the batch it goes in.
pub(crate) struct Ask {
    id: String,
    ends_us: i64,
    limit: i64,
    need: i64,
    reply: oneshot::Sender<Result<(i64, i64), StoreError>>,
}

/// The sending side of the task that leases windows: the leases asked for while one batch
/// runs go together in the next, in one transaction (one commit, where SQLite's is a sync
/// of its log), so a replica starting under load does not pay a commit per key and limit.
pub(crate) type Leaser = mpsc::UnboundedSender<Ask>;

/// Takes leases off `asks` in batches until every sender is gone.
async fn lease_batches(db: DatabaseConnection, mut asks: mpsc::UnboundedReceiver<Ask>) {
    let backend = db.get_database_backend();
    while let Some(first) = asks.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match asks.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        // One order of rows for every replica's batches: no two transactions wait for each
        // other's row locks.
        batch.sort_by(|a, b| a.id.cmp(&b.id));
        match lease_batch(&db, backend, &batch).await {
            Ok(leases) => {
                for (ask, lease) in batch.into_iter().zip(leases) {
                    let _ = ask.reply.send(Ok(lease));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for ask in batch {
                    let _ = ask
                        .reply
                        .send(Err(StoreError::Unavailable(DbErr::Custom(message.clone()))));
                }
            }
        }
    }
}

/// Leases each of `batch` in one transaction: what each was granted and what it left.
async fn lease_batch(
    db: &DatabaseConnection,
    backend: DatabaseBackend,
    batch: &[Ask],
) -> Result<Vec<(i64, i64)>, StoreError> {
    let txn = db.begin().await?;
    let mut leases = Vec::with_capacity(batch.len());
    for ask in batch {
        let mut p = Placeholders::new(backend);
        let (id_mark, ends_mark) = (p.next(), p.next());
        let first = slice_sql(backend, "0", ask.limit, ask.need);
        let next = slice_sql(backend, "rate_limit_windows.granted", ask.limit, ask.need);
        let sql = format!(
            "INSERT INTO rate_limit_windows (window_id, ends_us, granted, last_grant) \
             VALUES ({id_mark}, {ends_mark}, {first}, {first}) \
             ON CONFLICT (window_id) DO UPDATE \
             SET granted = rate_limit_windows.granted + {next}, last_grant = {next} \
             RETURNING granted, last_grant"
        );
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [ask.id.as_str().into(), ask.ends_us.into()],
            ))
            .await?
            .ok_or_else(|| {
                StoreError::Unavailable(DbErr::Custom(
                    "a rate-limit window's lease returned no row".into(),
                ))
            })?;
        let taken: i64 = row.try_get("", "granted")?;
        let granted: i64 = row.try_get("", "last_grant")?;
        leases.push((granted, ask.limit - taken));
    }
    txn.commit().await?;
    Ok(leases)
}

impl Store {
    /// Leases a slice of the window `id` (ending at `ends_us`, its budget `limit`): at least
    /// `need` (0: whatever a lease takes; see [`crate::domain::lease_size`]), or nothing when
    /// less is left; with `take` false, only reads what is left. One upsert, in a batch with
    /// the other leases asked for meanwhile: it adds the slice to what is leased and returns
    /// both, under the row's lock, so concurrent leases from any number of replicas never
    /// take the same unit. Returns what was granted and what is left unleased (below zero
    /// when a lowered limit is under what was leased).
    pub(crate) async fn lease_window(
        &self,
        id: &str,
        ends_us: i64,
        limit: i64,
        need: i64,
        take: bool,
    ) -> Result<(i64, i64), StoreError> {
        let backend = self.backend();
        if !take {
            let mut p = Placeholders::new(backend);
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
        let leaser = self.window_leaser.get_or_init(|| {
            let (asks, taken) = mpsc::unbounded_channel();
            tokio::spawn(lease_batches(self.db.clone(), taken));
            asks
        });
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Unavailable(DbErr::Custom("the window leaser stopped".into()));
        leaser
            .send(Ask {
                id: id.to_owned(),
                ends_us,
                limit,
                need,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Gives back what was leased of each window (its id and the units) and not spent, in
    /// one transaction; never below none leased (a row pruned and made again by a replica
    /// far behind keeps its own count).
    pub(crate) async fn return_windows(&self, returns: &[(String, i64)]) -> Result<(), StoreError> {
        let backend = self.backend();
        let txn = self.db.begin().await?;
        for (id, amount) in returns {
            let sql = format!(
                "UPDATE rate_limit_windows \
                 SET granted = CASE WHEN granted > {amount} THEN granted - {amount} ELSE 0 END \
                 WHERE window_id = {}",
                Placeholders::new(backend).next()
            );
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [id.as_str().into()],
            ))
            .await?;
        }
        txn.commit().await?;
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
