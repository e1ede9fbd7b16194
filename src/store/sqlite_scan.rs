//! The start-up read of every key from a SQLite file, through rusqlite on a read-only
//! connection of its own. sqlx-sqlite hands each row from its worker thread to the caller
//! through a channel; for the million rows of a large index that per-row cost made the load
//! take 5-6 s, where stepping the statement in place reads them in well under one.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::index_row::{INDEX_COLUMNS, IndexRow};

/// Reads every row of `api_keys` (tombstones included) in one read transaction, so what is
/// read is one consistent snapshot, and hands each to `each`. Returns the highest revision
/// read: every later commit has a higher one, as SQLite commits one writer at a time.
pub(super) fn scan(path: &Path, mut each: impl FnMut(IndexRow)) -> rusqlite::Result<i64> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Writers hold the lock only to commit; wait for one rather than fail the start-up.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
