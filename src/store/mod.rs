//! The database: source of truth for keys. SQLite by default, PostgreSQL for many replicas.

mod entity;
mod sqlite_scan;

use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, RuntimeErr, Statement, TransactionTrait,
    sea_query::{Expr, ExprTrait},
};

use crate::domain::{KeyHash, KeyId, PageCursor, WorkspaceId};

pub use entity::Model as KeyRow;
use entity::{ActiveModel, Column, Entity};

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

/// [`IndexRow`]'s columns in order, as decoded.
type IndexTuple = (
    String,
    String,
    Vec<u8>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    String,
    Option<i64>,
    String,
);

/// What the validation index needs of a stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub id: String,
    pub workspace_id: String,
    pub key_hash: Vec<u8>,
    pub expire_time_us: Option<i64>,
    pub last_used_time_us: Option<i64>,
    pub delete_time_us: Option<i64>,
    pub revision: i64,
    /// ValidateKey reports the key's name and scopes.
    pub name: String,
    pub disable_time_us: Option<i64>,
    pub scopes: String,
}

impl From<IndexTuple> for IndexRow {
    fn from(
        (
            id,
            workspace_id,
            key_hash,
            expire_time_us,
            last_used_time_us,
            delete_time_us,
            revision,
            name,
            disable_time_us,
            scopes,
        ): IndexTuple,
    ) -> Self {
        Self {
            id,
            workspace_id,
            key_hash,
            expire_time_us,
            last_used_time_us,
            delete_time_us,
            revision,
            name,
            disable_time_us,
            scopes,
        }
    }
}

impl From<&KeyRow> for IndexRow {
    fn from(row: &KeyRow) -> Self {
        Self {
            id: row.id.clone(),
            workspace_id: row.workspace_id.clone(),
            key_hash: row.key_hash.clone(),
            expire_time_us: row.expire_time_us,
            last_used_time_us: row.last_used_time_us,
            delete_time_us: row.delete_time_us,
            revision: row.revision,
            name: row.name.clone(),
            disable_time_us: row.disable_time_us,
            scopes: row.scopes.clone(),
        }
    }
}

/// A key to insert, already validated and hashed.
#[derive(Debug)]
pub struct NewKey<'a> {
    pub id: &'a KeyId,
    pub workspace: &'a str,
    pub name: String,
    pub hash: KeyHash,
    pub suffix: &'a str,
    pub created_by: &'a str,
    pub create_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    /// As stored: see [`crate::domain::Scopes::to_column`].
    pub scopes: String,
}

impl NewKey<'_> {
    fn into_model(self, revision: i64) -> ActiveModel {
        ActiveModel {
            id: Set(self.id.as_str().to_owned()),
            workspace_id: Set(self.workspace.to_owned()),
            name: Set(self.name),
            key_hash: Set(self.hash.as_bytes().to_vec()),
            key_suffix: Set(self.suffix.to_owned()),
            created_by: Set(self.created_by.to_owned()),
            create_time_us: Set(self.create_time.timestamp_micros()),
            expire_time_us: Set(self.expire_time.map(|t| t.timestamp_micros())),
            last_used_time_us: Set(None),
            delete_time_us: Set(None),
            revision: Set(revision),
            disable_time_us: Set(None),
            scopes: Set(self.scopes),
            rotated_to: Set(None),
        }
    }
}

/// What a change sets on an existing key; `None` leaves a column as it is.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub scopes: Option<String>,
    pub disable_time_us: Option<Option<i64>>,
    pub expire_time_us: Option<Option<i64>>,
    pub rotated_to: Option<String>,
}

/// A change to a key, decided from the key as stored: an update of its row and, for a
/// rotation, a key to insert with it.
#[derive(Debug)]
pub struct Change<'a> {
    pub update: KeyUpdate,
    pub insert: Option<NewKey<'a>>,
}

/// The outcome of [`Store::change`]: the key as now stored, and the key inserted with it.
#[derive(Debug)]
pub struct Changed {
    pub key: KeyRow,
    pub inserted: Option<KeyRow>,
    /// False when the decision was to change nothing.
    pub changed: bool,
}

/// The PostgreSQL channel on which every write announces its revision.
pub const CHANGES_CHANNEL: &str = "apikeys_changes";

/// Where a catch-up read stopped: the last `(revision, id)` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeCursor {
    pub revision: i64,
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    url: String,
}

impl Store {
    /// Connects (creating a SQLite file if the URL says `mode=rwc`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new(url);
        options
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            // Statements are logged by our own spans; sqlx's per-query lines are noise at info.
            .sqlx_logging_level(tracing::log::LevelFilter::Debug)
            // WAL lets readers proceed while a write commits; sqlx's default busy timeout
            // (5 s) makes concurrent writers wait their turn instead of failing.
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            });
        let db = Database::connect(options).await?;
        Ok(Self {
            db,
            url: url.to_owned(),
        })
    }

    /// Brings the schema up to date. Safe to run on every start and from many replicas.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await?;
        Ok(())
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Connections open in the pool, and how many of them are idle.
    pub fn pool_use(&self) -> (u32, usize) {
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
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.db.close().await?;
        Ok(())
    }

    pub async fn insert(&self, key: NewKey<'_>) -> Result<KeyRow, StoreError> {
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let row = Entity::insert(key.into_model(revision))
            .exec_with_returning(&txn)
            .await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(row)
    }

    /// A key of the workspace as stored, tombstone or not; `None` when the workspace has no
    /// key with that id.
    pub async fn get(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
    ) -> Result<Option<KeyRow>, StoreError> {
        Ok(Entity::find_by_id(id.as_str())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&self.db)
            .await?)
    }

    /// Changes a key of the workspace in one transaction: `decide` sees the key as stored
    /// (writers are serialised by the revision row, taken first, so nothing changes it
    /// between the read and the write) and answers what to change, nothing (`Ok(None)`), or
    /// an error, which rolls everything back. `Ok(None)` from here: no key with that id in
    /// the workspace.
    pub async fn change<'a, E: From<StoreError>>(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        decide: impl FnOnce(&KeyRow) -> Result<Option<Change<'a>>, E>,
    ) -> Result<Option<Changed>, E> {
        let txn = self.db.begin().await.map_err(StoreError::from)?;
        let revision = self.next_revision(&txn).await?;
        let Some(row) = Entity::find_by_id(id.as_str())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&txn)
            .await
            .map_err(StoreError::from)?
        else {
            return Ok(None);
        };
        let Some(change) = decide(&row)? else {
            // Dropping the transaction gives the revision back.
            return Ok(Some(Changed {
                key: row,
                inserted: None,
                changed: false,
            }));
        };
        let inserted = match change.insert {
            Some(key) => Some(
                Entity::insert(key.into_model(revision))
                    .exec_with_returning(&txn)
                    .await
                    .map_err(StoreError::from)?,
            ),
            None => None,
        };
        let KeyUpdate {
            name,
            scopes,
            disable_time_us,
            expire_time_us,
            rotated_to,
        } = change.update;
        let mut update = ActiveModel {
            id: sea_orm::ActiveValue::Unchanged(row.id.clone()),
            revision: Set(revision),
            ..Default::default()
        };
        if let Some(name) = name {
            update.name = Set(name);
        }
        if let Some(scopes) = scopes {
            update.scopes = Set(scopes);
        }
        if let Some(disable_time_us) = disable_time_us {
            update.disable_time_us = Set(disable_time_us);
        }
        if let Some(expire_time_us) = expire_time_us {
            update.expire_time_us = Set(expire_time_us);
        }
        if let Some(rotated_to) = rotated_to {
            update.rotated_to = Set(Some(rotated_to));
        }
        let key = Entity::update(update)
            .exec(&txn)
            .await
            .map_err(StoreError::from)?;
        self.announce(&txn, revision).await?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(Some(Changed {
            key,
            inserted,
            changed: true,
        }))
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

    /// Live keys of a workspace, newest first, after `cursor`; at most `limit`.
    pub async fn list(
        &self,
        workspace: &WorkspaceId,
        cursor: Option<&PageCursor>,
        limit: u64,
    ) -> Result<Vec<KeyRow>, StoreError> {
        let mut query = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null());
        if let Some(cursor) = cursor {
            // A row-value comparison, so both backends seek the index instead of scanning.
            query = query.filter(
                Expr::tuple([Expr::col(Column::CreateTimeUs), Expr::col(Column::Id)]).lt(
                    Expr::tuple([
                        Expr::val(cursor.create_time_us),
                        Expr::val(cursor.id.as_str()),
                    ]),
                ),
            );
        }
        Ok(query
            .order_by_desc(Column::CreateTimeUs)
            .order_by_desc(Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Tombstones a live key of the workspace and returns it as now stored; `None` when there
    /// is no such live key (nothing is changed then).
    pub async fn delete(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRow>, StoreError> {
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let result = Entity::update_many()
            .col_expr(Column::DeleteTimeUs, Expr::value(now.timestamp_micros()))
            .col_expr(Column::Revision, Expr::value(revision))
            .filter(Column::Id.eq(id.as_str()))
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null())
            .exec(&txn)
            .await?;
        if result.rows_affected != 1 {
            // Dropping the transaction rolls the revision back too.
            return Ok(None);
        }
        let row = Entity::find_by_id(id.as_str()).one(&txn).await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(row)
    }

    /// Rows changed after `cursor`, in `(revision, id)` order, at most `limit`: what a
    /// replica's index has not applied yet. From the default cursor, every row.
    /// With `within`, only rows whose revision lies in that range (a slice of a parallel load).
    pub async fn changes_since(
        &self,
        cursor: &ChangeCursor,
        within: Option<std::ops::RangeInclusive<i64>>,
        limit: u64,
    ) -> Result<Vec<IndexRow>, StoreError> {
        // Only the columns the index keeps, decoded by position: the start-up load reads every
        // row through here, and per-row decoding is most of its cost.
        let rows: Vec<IndexTuple> = Entity::find()
            .select_only()
            .columns([
                Column::Id,
                Column::WorkspaceId,
                Column::KeyHash,
                Column::ExpireTimeUs,
                Column::LastUsedTimeUs,
                Column::DeleteTimeUs,
                Column::Revision,
                Column::Name,
                Column::DisableTimeUs,
                Column::Scopes,
            ])
            .filter(
                Expr::tuple([Expr::col(Column::Revision), Expr::col(Column::Id)]).gt(Expr::tuple(
                    [Expr::val(cursor.revision), Expr::val(cursor.id.as_str())],
                )),
            )
            .apply_if(within, |query, within| {
                query.filter(Column::Revision.between(*within.start(), *within.end()))
            })
            .order_by_asc(Column::Revision)
            .order_by_asc(Column::Id)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(IndexRow::from).collect())
    }

    /// Writes a batch of `(key id, last used µs)`, a few hundred keys per statement, never
    /// moving a time backwards (replicas race). Not a revision: other replicas' indexes do
    /// not need it.
    pub async fn record_uses(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        const PER_STATEMENT: usize = 400;
        let backend = self.backend();
        // SQLite's two-argument max() is a scalar; PostgreSQL spells it GREATEST.
        let (greatest, cast) = match backend {
            DatabaseBackend::Postgres => ("GREATEST", "::bigint"),
            _ => ("MAX", ""),
        };
        for chunk in uses.chunks(PER_STATEMENT) {
            let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 3);
            let mut placeholder = {
                let mut n = 0;
                move || {
                    n += 1;
                    if backend == DatabaseBackend::Postgres {
                        format!("${n}")
                    } else {
                        "?".to_owned()
                    }
                }
            };
            let mut cases = String::new();
            for (id, at) in chunk {
                cases.push_str(&format!(
                    " WHEN {} THEN {}{cast}",
                    placeholder(),
                    placeholder()
                ));
                values.push(id.clone().into());
                values.push((*at).into());
            }
            let ids: Vec<String> = chunk
                .iter()
                .map(|(id, _)| {
                    values.push(id.clone().into());
                    placeholder()
                })
                .collect();
            let sql = format!(
                "UPDATE api_keys SET last_used_time_us = {greatest}(COALESCE(last_used_time_us, 0), CASE id{cases} END) \
                 WHERE id IN ({})",
                ids.join(", ")
            );
            self.db
                .execute_raw(Statement::from_sql_and_values(backend, sql, values))
                .await?;
        }
        Ok(())
    }

    /// The newest revision any row carries (0 for none).
    pub async fn max_revision(&self) -> Result<i64, StoreError> {
        let max: Option<Option<i64>> = Entity::find()
            .select_only()
            .column_as(Column::Revision.max(), "max")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(max.flatten().unwrap_or(0))
    }

    /// The file of a SQLite database, as SQLite itself names it; `None` for PostgreSQL and
    /// for an in-memory SQLite database.
    pub async fn sqlite_file(&self) -> Result<Option<PathBuf>, StoreError> {
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
    pub fn scan_sqlite_file(
        path: &std::path::Path,
        each: impl FnMut(IndexRow),
    ) -> Result<i64, StoreError> {
        sqlite_scan::scan(path, each).map_err(|err| {
            StoreError::Internal(DbErr::Custom(format!("reading {}: {err}", path.display())))
        })
    }

    /// How many keys are stored, tombstones included.
    pub async fn count(&self) -> Result<u64, StoreError> {
        Ok(Entity::find().count(&self.db).await?)
    }

    /// Every stored row, tombstones included; for operators' checks and tests.
    pub async fn all_rows(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(Entity::find().all(&self.db).await?)
    }
}
