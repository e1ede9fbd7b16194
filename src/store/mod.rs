//! The database: source of truth for keys. SQLite by default, PostgreSQL for many replicas.

mod entity;

use std::time::Duration;

use chrono::{DateTime, Utc};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectOptions, Database, DatabaseBackend,
    DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, RuntimeErr,
    sea_query::Expr,
};

use crate::domain::{KeyHash, KeyId, KeyName, PageCursor, WorkspaceId};

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

/// A key to insert, already validated and hashed.
#[derive(Debug)]
pub struct NewKey<'a> {
    pub id: &'a KeyId,
    pub workspace: &'a WorkspaceId,
    pub name: &'a KeyName,
    pub hash: KeyHash,
    pub suffix: &'a str,
    pub created_by: &'a str,
    pub create_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
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
        Ok(Self { db })
    }

    /// Brings the schema up to date. Safe to run on every start and from many replicas.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await?;
        Ok(())
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.db.close().await?;
        Ok(())
    }

    pub async fn insert(&self, key: NewKey<'_>) -> Result<KeyRow, StoreError> {
        let row = ActiveModel {
            id: Set(key.id.as_str().to_owned()),
            workspace_id: Set(key.workspace.as_str().to_owned()),
            name: Set(key.name.as_str().to_owned()),
            key_hash: Set(key.hash.as_bytes().to_vec()),
            key_suffix: Set(key.suffix.to_owned()),
            created_by: Set(key.created_by.to_owned()),
            create_time_us: Set(key.create_time.timestamp_micros()),
            expire_time_us: Set(key.expire_time.map(|t| t.timestamp_micros())),
            last_used_time_us: Set(None),
            delete_time_us: Set(None),
        };
        Ok(Entity::insert(row).exec_with_returning(&self.db).await?)
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
            query = query.filter(
                Condition::any()
                    .add(Column::CreateTimeUs.lt(cursor.create_time_us))
                    .add(
                        Condition::all()
                            .add(Column::CreateTimeUs.eq(cursor.create_time_us))
                            .add(Column::Id.lt(cursor.id.as_str())),
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

    /// Tombstones a live key of the workspace. `false` when there is none to delete.
    pub async fn delete(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let result = Entity::update_many()
            .col_expr(Column::DeleteTimeUs, Expr::value(now.timestamp_micros()))
            .filter(Column::Id.eq(id.as_str()))
            .filter(Column::WorkspaceId.eq(workspace.as_str()))
            .filter(Column::DeleteTimeUs.is_null())
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRow>, StoreError> {
        Ok(Entity::find()
            .filter(Column::KeyHash.eq(hash.as_bytes().to_vec()))
            .one(&self.db)
            .await?)
    }

    pub async fn record_use(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let at = at.timestamp_micros();
        Entity::update_many()
            .col_expr(Column::LastUsedTimeUs, Expr::value(at))
            .filter(Column::Id.eq(id))
            // Never move the time backwards when two replicas race.
            .filter(
                Condition::any()
                    .add(Column::LastUsedTimeUs.is_null())
                    .add(Column::LastUsedTimeUs.lt(at)),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Every stored row, tombstones included; for operators' checks and tests.
    pub async fn all_rows(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(Entity::find().all(&self.db).await?)
    }
}
