//! The change feed: every row changed after a cursor, in revision order, for the replicas'
//! indexes.

use sea_orm::{
    ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    sea_query::{Expr, ExprTrait},
};

use super::{
    IndexRow, Store, StoreError,
    entity::key::{Column, Entity},
    index_row::INDEX_COLUMNS,
};

/// Where a catch-up read stopped: the last `(revision, id)` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ChangeCursor {
    pub revision: i64,
    pub id: String,
}

impl Store {
    /// Rows changed after `cursor`, in `(revision, id)` order, at most `limit`: what a
    /// replica's index has not applied yet. From the default cursor, every row.
    /// With `within`, only rows whose revision lies in that range (a slice of a parallel load).
    pub(crate) async fn changes_since(
        &self,
        cursor: &ChangeCursor,
        within: Option<std::ops::RangeInclusive<i64>>,
        limit: u64,
    ) -> Result<Vec<IndexRow>, StoreError> {
        if within.is_none()
            && let Some(reader) = self.change_reader().await?
        {
            let cursor = cursor.clone();
            return tokio::task::spawn_blocking(move || reader.changes_since(&cursor, limit))
                .await
                .map_err(|err| StoreError::Internal(DbErr::Custom(err.to_string())))?
                .map_err(super::sqlite_scan::store_error);
        }
        // Only the columns the index keeps: the start-up load reads every row through here.
        Ok(Entity::find()
            .select_only()
            .exprs(INDEX_COLUMNS.map(Expr::col))
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
            .into_model::<IndexRow>()
            .all(&self.db)
            .await?)
    }

    /// The newest revision any row carries (0 for none).
    pub(crate) async fn max_revision(&self) -> Result<i64, StoreError> {
        let max: Option<Option<i64>> = Entity::find()
            .select_only()
            .column_as(Column::Revision.max(), "max")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(max.flatten().unwrap_or(0))
    }
}
