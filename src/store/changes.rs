//! The change feed: every row changed after a cursor, in revision order, for the replicas'
//! indexes.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QuerySelect, Statement};

use super::{
    IndexRow, Store, StoreError,
    entity::key::{Column, Entity},
    index_row::INDEX_COLUMNS,
    sql::Placeholders,
};

/// Where a catch-up read stopped: the last `(revision, id)` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeCursor {
    pub revision: i64,
    pub id: String,
}

impl Store {
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
}
