use sea_orm_migration::{prelude::*, schema::*};

/// Revisions let every replica's in-memory index catch up on changes made elsewhere.
///
/// Each write transaction takes the next value of the single `api_key_revision` row and stamps
/// it on the row it changes. The counter row is locked until commit, so revisions are
/// assigned in commit order: a reader that has seen revision N can never later find a
/// committed change below N (a sequence could not promise that).
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(big_integer(ApiKeys::Revision).default(0))
                    .to_owned(),
            )
            .await?;
        // Catch-up reads `(revision, id) > cursor` in order.
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_revision")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::Revision)
                    .col(ApiKeys::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ApiKeyRevision::Table)
                    .col(integer(ApiKeyRevision::Id).primary_key())
                    .col(big_integer(ApiKeyRevision::Value))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(ApiKeyRevision::Table)
                    .columns([ApiKeyRevision::Id, ApiKeyRevision::Value])
                    .values_panic([1.into(), 0.into()])
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKeyRevision::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("idx_api_keys_revision")
                    .table(ApiKeys::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(ApiKeys::Revision)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    Revision,
}

#[derive(DeriveIden)]
enum ApiKeyRevision {
    Table,
    Id,
    Value,
}
