//! The index's reads of a SQLite file, through rusqlite on read-only connections of their
//! own: the start-up read of every key, and the change feed's catch-ups.
//!
//! The start-up read: sqlx-sqlite hands each row from its worker thread to the caller through
//! a channel; for the million rows of a large index that per-row cost made the load take
//! 5-6 s, where stepping the statement in place reads them in well under one.
//!
//! The catch-ups: sqlx serves a SQLite file through one connection, so a catch-up read would
//! queue behind every write (a usage flush, a change, each waiting on its fsync), and under a
//! busy disk that wait is what stretches the revocation bound of a second replica. A WAL
//! reader of its own never waits for a writer.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rusqlite::{Connection, OpenFlags};

use super::{
    ChangeCursor,
    index_row::{INDEX_COLUMNS, IndexRow},
};

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Writers hold the lock only to commit; wait for one rather than fail.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The change feed's reader of one SQLite file: one connection, opened on first use and
/// opened again after an error.
#[derive(Debug, Clone)]
pub(super) struct ChangeReader {
    path: PathBuf,
    conn: Arc<Mutex<Option<Connection>>>,
}

impl ChangeReader {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            conn: Arc::default(),
        }
    }

    /// Rows after `cursor` in `(revision, id)` order, at most `limit`. Blocking: run it off
    /// the async workers.
    pub(super) fn changes_since(
        &self,
        cursor: &ChangeCursor,
        limit: u64,
    ) -> rusqlite::Result<Vec<IndexRow>> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = match slot.take() {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let rows = read_changes(&conn, cursor, limit)?;
        // Kept only after a clean read: an error may mean the file was replaced.
        *slot = Some(conn);
        Ok(rows)
    }
}

/// A rusqlite error as the store classes it: the file busy, locked, unreadable or gone is
/// unavailable (the poll tries again); anything else (a schema or decoding problem) internal.
pub(super) fn store_error(err: rusqlite::Error) -> super::StoreError {
    use rusqlite::ErrorCode;
    let unavailable = err.sqlite_error_code().is_some_and(|code| {
        matches!(
            code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
        )
    });
    let err = sea_orm::DbErr::Custom(err.to_string());
    if unavailable {
        super::StoreError::Unavailable(err)
    } else {
        super::StoreError::Internal(err)
    }
}

impl ChangeReader {
    /// Closes the connection (a later read opens another).
    pub(super) fn close(&self) {
        drop(
            self.conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

fn read_changes(
    conn: &Connection,
    cursor: &ChangeCursor,
    limit: u64,
) -> rusqlite::Result<Vec<IndexRow>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {} FROM api_keys WHERE (revision, id) > (?1, ?2) ORDER BY revision, id LIMIT ?3",
        INDEX_COLUMNS.join(", ")
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = statement.query(rusqlite::params![cursor.revision, cursor.id, limit])?;
    let mut read = Vec::new();
    while let Some(row) = rows.next()? {
        read.push(IndexRow::decode(row)?);
    }
    Ok(read)
}

/// Reads every row of `api_keys` (tombstones included) in one read transaction, so what is
/// read is one consistent snapshot, and hands each to `each`. Returns the highest revision
/// read: every later commit has a higher one, as SQLite commits one writer at a time.
pub(super) fn scan(path: &Path, mut each: impl FnMut(IndexRow)) -> rusqlite::Result<i64> {
    let mut conn = open(path)?;
    let txn = conn.transaction()?;
    let mut statement = txn.prepare(&format!(
        "SELECT {} FROM api_keys",
        INDEX_COLUMNS.join(", ")
    ))?;
    let mut rows = statement.query([])?;
    let mut top = 0;
    while let Some(row) = rows.next()? {
        let row = IndexRow::decode(row)?;
        top = top.max(row.revision);
        each(row);
    }
    Ok(top)
}
