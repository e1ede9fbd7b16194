//! What the validation index needs of a stored key, read one way by both of its readers:
//! the change feed (sqlx, either backend) and the SQLite start-up scan (rusqlite).

use sea_orm::{DbErr, QueryResult};

use crate::domain::Key;

/// What the validation index needs of a stored key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// As stored: see [`crate::domain::Scopes::to_column`].
    pub scopes: String,
    /// ValidateKey reports the owner and the annotations, and checks the CIDRs; each as
    /// stored (see [`crate::domain::Annotations::to_column`],
    /// [`crate::domain::AllowedCidrs::to_column`]).
    pub owner_id: String,
    pub annotations: String,
    pub allowed_cidrs: String,
    /// As stored: see [`crate::domain::RateLimits::to_column`].
    pub rate_limits: String,
    /// As stored: see [`crate::domain::KeyCredits::to_column`].
    pub credits: String,
}

/// The columns both readers select, in this order.
pub(super) const INDEX_COLUMNS: [&str; 15] = [
    "id",
    "workspace_id",
    "key_hash",
    "expire_time_us",
    "last_used_time_us",
    "delete_time_us",
    "revision",
    "name",
    "disable_time_us",
    "scopes",
    "owner_id",
    "annotations",
    "allowed_cidrs",
    "rate_limits",
    "credits",
];

/// Where `name` is in [`INDEX_COLUMNS`]; evaluated while compiling, so a name that is not
/// there does not build.
const fn at(name: &str) -> usize {
    let mut i = 0;
    while i < INDEX_COLUMNS.len() {
        if bytes_equal(INDEX_COLUMNS[i].as_bytes(), name.as_bytes()) {
            return i;
        }
        i += 1;
    }
    panic!("not one of INDEX_COLUMNS");
}

const fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A selected row of either driver, read by position.
pub(super) trait SelectedRow {
    type Error;
    fn text(&self, at: usize) -> Result<String, Self::Error>;
    fn bytes(&self, at: usize) -> Result<Vec<u8>, Self::Error>;
    fn int(&self, at: usize) -> Result<i64, Self::Error>;
    fn maybe_int(&self, at: usize) -> Result<Option<i64>, Self::Error>;
}

impl IndexRow {
    /// Decodes a row that selected [`INDEX_COLUMNS`], each column by its name.
    pub(super) fn decode<R: SelectedRow>(row: &R) -> Result<Self, R::Error> {
        Ok(Self {
            id: row.text(const { at("id") })?,
            workspace_id: row.text(const { at("workspace_id") })?,
            key_hash: row.bytes(const { at("key_hash") })?,
            expire_time_us: row.maybe_int(const { at("expire_time_us") })?,
            last_used_time_us: row.maybe_int(const { at("last_used_time_us") })?,
            delete_time_us: row.maybe_int(const { at("delete_time_us") })?,
            revision: row.int(const { at("revision") })?,
            name: row.text(const { at("name") })?,
            disable_time_us: row.maybe_int(const { at("disable_time_us") })?,
            scopes: row.text(const { at("scopes") })?,
            owner_id: row.text(const { at("owner_id") })?,
            annotations: row.text(const { at("annotations") })?,
            allowed_cidrs: row.text(const { at("allowed_cidrs") })?,
            rate_limits: row.text(const { at("rate_limits") })?,
            credits: row.text(const { at("credits") })?,
        })
    }
}

/// The change feed's rows, selected as [`INDEX_COLUMNS`] in order.
impl sea_orm::FromQueryResult for IndexRow {
    fn from_query_result(row: &QueryResult, _prefix: &str) -> Result<Self, DbErr> {
        Self::decode(row)
    }
}

impl SelectedRow for QueryResult {
    type Error = DbErr;
    fn text(&self, at: usize) -> Result<String, DbErr> {
        self.try_get_by_index(at)
    }
    fn bytes(&self, at: usize) -> Result<Vec<u8>, DbErr> {
        self.try_get_by_index(at)
    }
    fn int(&self, at: usize) -> Result<i64, DbErr> {
        self.try_get_by_index(at)
    }
    fn maybe_int(&self, at: usize) -> Result<Option<i64>, DbErr> {
        self.try_get_by_index(at)
    }
}

impl SelectedRow for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, at: usize) -> rusqlite::Result<String> {
        self.get(at)
    }
    fn bytes(&self, at: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(at)
    }
    fn int(&self, at: usize) -> rusqlite::Result<i64> {
        self.get(at)
    }
    fn maybe_int(&self, at: usize) -> rusqlite::Result<Option<i64>> {
        self.get(at)
    }
}

impl From<&Key> for IndexRow {
    fn from(key: &Key) -> Self {
        let micros = |at: chrono::DateTime<chrono::Utc>| at.timestamp_micros();
        Self {
            id: String::from(key.id.as_str()),
            workspace_id: String::from(key.workspace.as_str()),
            key_hash: key.hash.as_bytes().to_vec(),
            expire_time_us: key.expire_time.map(micros),
            last_used_time_us: key.last_used_time.map(micros),
            delete_time_us: key.delete_time.map(micros),
            revision: key.revision,
            name: String::from(key.name.as_str()),
            disable_time_us: key.disable_time.map(micros),
            scopes: key.scopes.to_column(),
            owner_id: String::from(key.owner_id.as_str()),
            annotations: key.annotations.to_column(),
            allowed_cidrs: key.allowed_cidrs.to_column(),
            rate_limits: key.rate_limits.to_column(),
            credits: key.credits.to_column(),
        }
    }
}
