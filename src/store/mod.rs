//! The database: source of truth for keys. SQLite by default, PostgreSQL for many replicas.

mod changes;
mod columns;
mod credits;
mod entity;
mod events;
mod index_row;
mod keys;
mod sql;
mod sqlite_file;
mod sqlite_scan;
mod usage;
mod windows;

use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait, QueryFilter, RuntimeErr, Statement,
    TransactionTrait,
};

use crate::usage::HOUR_US;
use sql::Placeholders;

pub(crate) use changes::ChangeCursor;
pub(crate) use credits::CreditReturn;
use entity::key::Entity;
/// A row of `api_keys` as stored, for operators' checks and tests; the service works on
/// [`Key`](crate::domain::Key).
pub(crate) use entity::key::Model as KeyRow;
pub(crate) use events::NewEvent;
pub use index_row::IndexRow;
pub(crate) use keys::{Change, Changed, KeyUpdate, NewKey};
pub(crate) use usage::KeyHour;

/// What the pool's PostgreSQL connections call themselves.
const APPLICATION_NAME: &str = "apikeys";
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool exhausted, I/O): the caller
    /// may retry. Nothing was committed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] DbErr),
    /// Anything else: a bug or a schema problem.
    #[error("database error: {0}")]
    Internal(#[source] DbErr),
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        let unavailable = match &err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                matches!(
                    e.as_ref(),
                    sea_orm::sqlx::Error::Io(_)
                        | sea_orm::sqlx::Error::PoolTimedOut
                        | sea_orm::sqlx::Error::PoolClosed
                        | sea_orm::sqlx::Error::Tls(_)
                )
            }
            _ => false,
        };
        if unavailable {
            Self::Unavailable(err)
        } else {
            Self::Internal(err)
        }
    }
}

/// How long a start-up waits for another process to let go of a new SQLite file.
const SQLITE_OPEN_PATIENCE: Duration = Duration::from_secs(10);

/// Connects; on SQLite, a connection refused because another process holds the file (the
/// switch to WAL takes an exclusive lock, and SQLite answers some of its lock conflicts at once
/// instead of waiting out the busy timeout) is tried again while [`SQLITE_OPEN_PATIENCE`] has
/// not passed (the last try may take its own connect timeout more).
async fn connect_waiting_out_locks(options: ConnectOptions) -> Result<DatabaseConnection, DbErr> {
    let deadline = tokio::time::Instant::now() + SQLITE_OPEN_PATIENCE;
    loop {
        match Database::connect(options.clone()).await {
            Err(err) if is_sqlite_lock(&err) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "the SQLite file is locked by another process; trying again");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            outcome => return outcome,
        }
    }
}

/// `SQLITE_BUSY` or `SQLITE_LOCKED`, in any of their extended forms.
fn is_sqlite_lock(err: &DbErr) -> bool {
    let (DbErr::Conn(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e))) = err
    else {
        return false;
    };
    let sea_orm::sqlx::Error::Database(db) = e.as_ref() else {
        return false;
    };
    db.try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
        .is_some()
        && db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// The PostgreSQL advisory lock every migration run holds (an arbitrary constant of ours:
/// "apikeys" in ASCII).
const MIGRATION_LOCK: i64 = 0x0061_7069_6b65_7973;

/// The PostgreSQL channel on which every write announces its revision.
pub(crate) const CHANGES_CHANNEL: &str = "apikeys_changes";

#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    url: String,
    /// The change feed's own reader of a SQLite file, once known (none for PostgreSQL and
    /// an in-memory database).
    change_reader: std::sync::Arc<tokio::sync::OnceCell<Option<sqlite_scan::ChangeReader>>>,
    /// The task that leases rate-limit windows in batches, once started.
    window_leaser: std::sync::Arc<std::sync::OnceLock<windows::Leaser>>,
}

impl Store {
    /// Connects (creating a SQLite file if the URL says `mode=rwc`).
    /// Opens a pool of at most `pool_size` connections (PostgreSQL; an SQLite file is served
    /// by one). On PostgreSQL each one names itself
    /// `apikeys` (`application_name`, as `pg_stat_activity` shows it) unless the URL names it.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        // Before SQLite would create the database file readable by all (0644).
        sqlite_file::prepare(url)
            .map_err(|err| DbErr::Conn(RuntimeErr::Internal(err.to_string())))?;
        let mut options = ConnectOptions::new(url);
        options
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            // Statements are logged by our own spans; sqlx's per-query lines are noise at info.
            .sqlx_logging_level(tracing::log::LevelFilter::Debug)
            .map_sqlx_postgres_opts(|o| match o.get_application_name() {
                Some(_) => o,
                None => o.application_name(APPLICATION_NAME),
            })
            // WAL lets readers proceed while a write commits; sqlx's default busy timeout
            // (5 s) makes concurrent writers wait their turn instead of failing.
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            });
        // An SQLite file keeps sea-orm's single connection (one writer at a time in any case).
        if !url.starts_with("sqlite:") {
            options.max_connections(pool_size);
        }
        let db = connect_waiting_out_locks(options).await?;
        Ok(Self {
            db,
            url: url.to_owned(),
            change_reader: Default::default(),
            window_leaser: Default::default(),
        })
    }

    /// Brings the schema up to date. Safe to run on every start and from many replicas at
    /// once: every migration runs in one transaction that first takes a lock only migrations
    /// take (PostgreSQL: an advisory lock; SQLite: the write lock, `BEGIN IMMEDIATE`, which
    /// waits out the busy timeout), so the first to arrive migrates and the others, once it
    /// has committed, find nothing left to do. Without it two replicas both create the
    /// migrations table and one fails on a duplicate catalog row.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let options = sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        };
        let txn = self.db.begin_with_options(options).await?;
        if self.backend() == DatabaseBackend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK.into()],
            ))
            .await?;
        }
        Migrator::up(&txn, None).await?;
        txn.commit().await?;
        Ok(())
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Connections open in the pool, and how many of them are idle.
    pub(crate) fn pool_use(&self) -> (u32, usize) {
        match self.backend() {
            DatabaseBackend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            DatabaseBackend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => (0, 0),
        }
    }

    /// The URL this store connected with (it may hold a password: never log it).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub async fn close(self) -> Result<(), StoreError> {
        if let Some(Some(reader)) = self.change_reader.get() {
            reader.close();
        }
        self.db.close().await?;
        Ok(())
    }

    /// Takes the next revision. The counter row stays locked until `txn` ends, which orders
    /// revisions by commit (and serialises writers, which are rare).
    async fn next_revision(&self, txn: &DatabaseTransaction) -> Result<i64, StoreError> {
        let sql = "UPDATE api_key_revision SET value = value + 1 WHERE id = 1 RETURNING value";
        let row = txn
            .query_one_raw(Statement::from_string(self.backend(), sql))
            .await?
            .ok_or_else(|| {
                StoreError::Internal(DbErr::RecordNotFound("api_key_revision row".into()))
            })?;
        Ok(row.try_get::<i64>("", "value")?)
    }

    /// Tells listening replicas (PostgreSQL) that `revision` committed; delivered on commit.
    async fn announce(&self, txn: &DatabaseTransaction, revision: i64) -> Result<(), StoreError> {
        if self.backend() == DatabaseBackend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [CHANGES_CHANNEL.into(), revision.to_string().into()],
            ))
            .await?;
        }
        Ok(())
    }

    /// Deletes events older than `cutoff_us` and usage hours that ended before it; returns
    /// how many of each.
    pub(crate) async fn prune(&self, cutoff_us: i64) -> Result<(u64, u64), StoreError> {
        use entity::event::{Column as EventColumn, Entity as Events};
        let events = Events::delete_many()
            .filter(EventColumn::CreateTimeUs.lt(cutoff_us))
            .exec(&self.db)
            .await?
            .rows_affected;
        let backend = self.backend();
        let usage = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "DELETE FROM api_key_usage WHERE start_time_us <= {}",
                    Placeholders::new(backend).next()
                ),
                [cutoff_us.saturating_sub(HOUR_US).into()],
            ))
            .await?
            .rows_affected();
        Ok((events, usage))
    }

    /// The change feed's reader of a SQLite file; `None` where sqlx reads the changes.
    async fn change_reader(&self) -> Result<Option<sqlite_scan::ChangeReader>, StoreError> {
        self.change_reader
            .get_or_try_init(|| async {
                Ok(self
                    .sqlite_file()
                    .await?
                    .map(sqlite_scan::ChangeReader::new))
            })
            .await
            .cloned()
    }

    /// The file of a SQLite database, as SQLite itself names it; `None` for PostgreSQL and
    /// for an in-memory SQLite database.
    pub(crate) async fn sqlite_file(&self) -> Result<Option<PathBuf>, StoreError> {
        if self.backend() != DatabaseBackend::Sqlite {
            return Ok(None);
        }
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Sqlite,
                "PRAGMA database_list",
            ))
            .await?;
        for row in rows {
            let name: String = row.try_get_by_index(1)?;
            let file: String = row.try_get_by_index(2)?;
            if name == "main" && !file.is_empty() {
                return Ok(Some(PathBuf::from(file)));
            }
        }
        Ok(None)
    }

    /// Reads every row of the SQLite file at `path` in one snapshot, handing each to `each`,
    /// and returns the highest revision read. Blocking: run it off the async workers.
    pub(crate) fn scan_sqlite_file(
        path: &std::path::Path,
        each: impl FnMut(IndexRow),
    ) -> Result<i64, StoreError> {
        sqlite_scan::scan(path, each).map_err(|err| {
            StoreError::Internal(DbErr::Custom(format!("reading {}: {err}", path.display())))
        })
    }

    /// How many keys are stored, tombstones included.
    pub(crate) async fn count(&self) -> Result<u64, StoreError> {
        Ok(Entity::find().count(&self.db).await?)
    }

    /// Every stored row, tombstones included; for operators' checks and tests.
    pub async fn all_rows(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(Entity::find().all(&self.db).await?)
    }
}

/// A stored time in microseconds, as a time; one out of chrono's range (never written) is
/// the epoch.
fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}
