//! The database: source of truth for keys. SQLite by default, PostgreSQL for many replicas.

mod columns;
mod entity;
mod event;
mod index_row;
mod sqlite_file;
mod sqlite_scan;

use std::{collections::HashMap, path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, RuntimeErr, Statement, TransactionTrait,
    sea_query::{Expr, ExprTrait},
};

use crate::{
    domain::{
        Actor, EventKind, Key, KeyEvent, KeyField, KeyHash, KeyId, KeyName, PageCursor, Scopes,
        WorkspaceId,
    },
    usage::{DistinctIps, HOUR_US, HourUsage, UsageCounts},
};

/// A row of `api_keys` as stored, for operators' checks and tests; the service works on
/// [`Key`].
pub use entity::Model as KeyRow;
use entity::{ActiveModel, Column, Entity};
use index_row::INDEX_COLUMNS;
pub use index_row::IndexRow;

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

/// A key to insert, already validated and hashed.
#[derive(Debug)]
pub struct NewKey<'a> {
    pub id: &'a KeyId,
    pub workspace: &'a WorkspaceId,
    pub name: KeyName,
    pub hash: KeyHash,
    pub suffix: &'a str,
    pub created_by: &'a str,
    pub create_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    pub scopes: Scopes,
}

impl NewKey<'_> {
    fn into_model(self, revision: i64) -> ActiveModel {
        ActiveModel {
            id: Set(self.id.clone()),
            workspace_id: Set(self.workspace.clone()),
            name: Set(self.name),
            key_hash: Set(self.hash),
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
            last_used_ip: Set(None),
        }
    }
}

/// An event to record with a change, in its transaction; the store adds the key, the
/// workspace and the id (the change's revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub actor_id: String,
    pub actor_role: &'static str,
    pub time_us: i64,
    pub new_key_id: Option<KeyId>,
    pub changed_fields: Vec<KeyField>,
}

impl NewEvent {
    pub fn new(kind: EventKind, actor: &Actor, time: DateTime<Utc>) -> Self {
        Self {
            kind,
            actor_id: actor.id().to_owned(),
            actor_role: actor.role().as_str(),
            time_us: time.timestamp_micros(),
            new_key_id: None,
            changed_fields: Vec::new(),
        }
    }
}

/// One key's answers in one hour, to add to what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHour {
    pub key_id: String,
    pub workspace_id: String,
    pub usage: HourUsage,
}

/// The usage table's count columns, each with its count: the one place they are named.
fn usage_columns(counts: &UsageCounts) -> [(&'static str, u64); 5] {
    let UsageCounts {
        valid,
        expired,
        disabled,
        deleted,
        insufficient_scope,
    } = *counts;
    [
        ("valid", valid),
        ("expired", expired),
        ("disabled", disabled),
        ("deleted", deleted),
        ("insufficient_scope", insufficient_scope),
    ]
}

/// The count columns' names.
fn usage_column_names() -> [&'static str; 5] {
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
    })
}

/// What a change sets on an existing key; `None` leaves a column as it is.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub name: Option<KeyName>,
    pub scopes: Option<Scopes>,
    pub disable_time: Option<Option<DateTime<Utc>>>,
    pub expire_time: Option<Option<DateTime<Utc>>>,
    pub rotated_to: Option<KeyId>,
}

/// A change to a key, decided from the key as stored: an update of its row and, for a
/// rotation, a key to insert with it; and the event that records it.
#[derive(Debug)]
pub struct Change<'a> {
    pub update: KeyUpdate,
    pub insert: Option<NewKey<'a>>,
    pub event: NewEvent,
}

/// The outcome of [`Store::change`]: the key as now stored, and the key inserted with it.
#[derive(Debug)]
pub struct Changed {
    pub key: Key,
    pub inserted: Option<Key>,
    /// False when the decision was to change nothing.
    pub changed: bool,
}

/// The PostgreSQL advisory lock every migration run holds (an arbitrary constant of ours:
/// "apikeys" in ASCII).
const MIGRATION_LOCK: i64 = 0x0061_7069_6b65_7973;

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
        // Before SQLite would create the database file readable by all (0644).
        sqlite_file::prepare(url)
            .map_err(|err| DbErr::Conn(RuntimeErr::Internal(err.to_string())))?;
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

    /// Inserts a key with its `created` event.
    pub async fn insert(&self, key: NewKey<'_>, event: NewEvent) -> Result<Key, StoreError> {
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let row = Entity::insert(key.into_model(revision))
            .exec_with_returning(&txn)
            .await?;
        record_event(&txn, revision, &row, event).await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(row.into())
    }

    /// A key of the workspace as stored, tombstone or not; `None` when the workspace has no
    /// key with that id.
    pub async fn get(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
    ) -> Result<Option<Key>, StoreError> {
        Ok(Entity::find_by_id(id.clone())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&self.db)
            .await?
            .map(Key::from))
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
        decide: impl FnOnce(&Key) -> Result<Option<Change<'a>>, E>,
    ) -> Result<Option<Changed>, E> {
        let txn = self.db.begin().await.map_err(StoreError::from)?;
        let revision = self.next_revision(&txn).await?;
        let Some(row) = Entity::find_by_id(id.clone())
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .one(&txn)
            .await
            .map_err(StoreError::from)?
        else {
            return Ok(None);
        };
        let stored = Key::from(row.clone());
        let Some(change) = decide(&stored)? else {
            // Dropping the transaction gives the revision back.
            return Ok(Some(Changed {
                key: stored,
                inserted: None,
                changed: false,
            }));
        };
        let inserted = match change.insert {
            Some(key) => Some(
                Entity::insert(key.into_model(revision))
                    .exec_with_returning(&txn)
                    .await
                    .map_err(StoreError::from)?
                    .into(),
            ),
            None => None,
        };
        let KeyUpdate {
            name,
            scopes,
            disable_time,
            expire_time,
            rotated_to,
        } = change.update;
        record_event(&txn, revision, &row, change.event)
            .await
            .map_err(StoreError::from)?;
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
        let micros = |at: DateTime<Utc>| at.timestamp_micros();
        if let Some(disable_time) = disable_time {
            update.disable_time_us = Set(disable_time.map(micros));
        }
        if let Some(expire_time) = expire_time {
            update.expire_time_us = Set(expire_time.map(micros));
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
            key: key.into(),
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
    ) -> Result<Vec<Key>, StoreError> {
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
            .await?
            .into_iter()
            .map(Key::from)
            .collect())
    }

    /// Tombstones a live key of the workspace, with its `deleted` event, and returns it as
    /// now stored; `None` when there is no such live key (nothing is changed then).
    pub async fn delete(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        event: NewEvent,
    ) -> Result<Option<Key>, StoreError> {
        let now = event.time_us;
        let txn = self.db.begin().await?;
        let revision = self.next_revision(&txn).await?;
        let result = Entity::update_many()
            .col_expr(Column::DeleteTimeUs, Expr::value(now))
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
        let Some(row) = Entity::find_by_id(id.clone()).one(&txn).await? else {
            return Ok(None);
        };
        record_event(&txn, revision, &row, event).await?;
        self.announce(&txn, revision).await?;
        txn.commit().await?;
        Ok(Some(row.into()))
    }

    /// A workspace's events (or one key's, the rotation that issued it included), newest
    /// first, older than the event `before`; at most `limit`.
    pub async fn events(
        &self,
        workspace: &WorkspaceId,
        key: Option<&KeyId>,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<KeyEvent>, StoreError> {
        use event::{Column as EventColumn, Entity as Events};
        Ok(Events::find()
            .filter(EventColumn::WorkspaceId.eq(workspace.as_str()))
            .apply_if(key, |query, key| {
                query.filter(
                    EventColumn::KeyId
                        .eq(key.as_str())
                        .or(EventColumn::NewKeyId.eq(key.as_str())),
                )
            })
            .apply_if(before, |query, before| {
                query.filter(EventColumn::Id.lt(before))
            })
            .order_by_desc(EventColumn::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(KeyEvent::from)
            .collect())
    }

    /// Adds each key's hour to what is stored, in one transaction: counts are summed and the
    /// client-IP sketches merged, so every replica and every flush adds its own share.
    pub async fn record_usage(&self, hours: &[KeyHour]) -> Result<(), StoreError> {
        const PER_STATEMENT: usize = 128;
        let backend = self.backend();
        let mut hours: Vec<&KeyHour> = hours.iter().collect();
        // One lock order for every replica: concurrent flushes wait, never deadlock.
        hours.sort_by(|a, b| {
            (&a.key_id, a.usage.start_time_us).cmp(&(&b.key_id, b.usage.start_time_us))
        });
        let txn = self.db.begin().await?;
        for chunk in binary_chunks(&hours, PER_STATEMENT) {
            let mut placeholders = Placeholders::new(backend);
            let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 9);
            let mut rows = Vec::with_capacity(chunk.len());
            for hour in chunk {
                let columns = (0..9).map(|_| placeholders.next()).collect::<Vec<_>>();
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
            for merged_rows in binary_chunks(&merged_rows, PER_STATEMENT) {
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
        }
        txn.commit().await?;
        Ok(())
    }

    /// A key's stored hours in `[from_us, to_us)`, oldest first.
    pub async fn usage(
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

    /// Deletes events older than `cutoff_us` and usage hours that ended before it; returns
    /// how many of each.
    pub async fn prune(&self, cutoff_us: i64) -> Result<(u64, u64), StoreError> {
        use event::{Column as EventColumn, Entity as Events};
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

    /// Rows changed after `cursor`, in `(revision, id)` order, at most `limit`: what a
    /// replica's index has not applied yet. From the default cursor, every row.
    /// With `within`, only rows whose revision lies in that range (a slice of a parallel load).
    pub async fn changes_since(
        &self,
        cursor: &ChangeCursor,
        within: Option<std::ops::RangeInclusive<i64>>,
        limit: u64,
    ) -> Result<Vec<IndexRow>, StoreError> {
        // Only the columns the index keeps: the start-up load reads every row through here.
        let backend = self.backend();
        let mut placeholders = Placeholders::new(backend);
        let mut values: Vec<sea_orm::Value> =
            vec![cursor.revision.into(), cursor.id.clone().into()];
        let mut sql = format!(
            "SELECT {} FROM api_keys WHERE (revision, id) > ({}, {})",
            INDEX_COLUMNS.join(", "),
            placeholders.next(),
            placeholders.next()
        );
        if let Some(within) = within {
            sql.push_str(&format!(
                " AND revision BETWEEN {} AND {}",
                placeholders.next(),
                placeholders.next()
            ));
            values.extend([(*within.start()).into(), (*within.end()).into()]);
        }
        sql.push_str(&format!(
            " ORDER BY revision, id LIMIT {}",
            placeholders.next()
        ));
        values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        Ok(rows
            .iter()
            .map(IndexRow::decode)
            .collect::<Result<_, _>>()?)
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

/// `items` in chunks of power-of-two lengths up to `max` (a power of two): whole chunks of
/// `max`, then the rest's binary digits. Batched statements then come in a few shapes
/// (`log2(max) + 1` per statement), which the driver's per-connection cache of prepared
/// statements keeps for good, instead of one shape per batch length, each prepared, cached
/// and evicted in turn: memory that grew for as long as the soak test ran.
fn binary_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    debug_assert!(max.is_power_of_two());
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(max.min(1 << rest.len().ilog2()));
        rest = tail;
        Some(chunk)
    })
}

/// Numbered statement parameters (`$1` for PostgreSQL, `?1` for SQLite), so one can be used
/// twice.
struct Placeholders {
    backend: DatabaseBackend,
    n: usize,
}

impl Placeholders {
    fn new(backend: DatabaseBackend) -> Self {
        Self { backend, n: 0 }
    }

    fn next(&mut self) -> String {
        self.n += 1;
        match self.backend {
            DatabaseBackend::Postgres => format!("${}", self.n),
            _ => format!("?{}", self.n),
        }
    }
}

/// Records a change's event, in the change's transaction, under the change's revision.
async fn record_event(
    txn: &DatabaseTransaction,
    revision: i64,
    key: &KeyRow,
    event: NewEvent,
) -> Result<(), DbErr> {
    let changed_fields: Vec<&str> = event.changed_fields.iter().map(|f| f.as_str()).collect();
    event::Entity::insert(event::ActiveModel {
        id: Set(revision),
        workspace_id: Set(key.workspace_id.clone()),
        key_id: Set(key.id.clone()),
        kind: Set(event.kind),
        actor_id: Set(event.actor_id),
        actor_role: Set(event.actor_role.to_owned()),
        create_time_us: Set(event.time_us),
        new_key_id: Set(event.new_key_id),
        changed_fields: Set(changed_fields.join(" ")),
    })
    .exec_without_returning(txn)
    .await?;
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

/// A stored time in microseconds, as a time; one out of chrono's range (never written) is
/// the epoch.
fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::binary_chunks;

    #[test]
    fn batches_are_cut_into_few_shapes_in_order() {
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..1_000usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = binary_chunks(&items, 128).collect();
            assert_eq!(chunks.concat(), items, "every item once, in order");
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= 128)
            );
            // Whole chunks of 128, then at most one chunk of each smaller power of two.
            assert!(chunks.len() <= n / 128 + 7, "{n}: {} chunks", chunks.len());
            shapes.extend(chunks.iter().map(|c| c.len()));
        }
        assert_eq!(shapes.len(), 8, "{shapes:?}");
    }
}
