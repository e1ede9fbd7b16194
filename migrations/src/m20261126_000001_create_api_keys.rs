use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Times are integer microseconds since the Unix epoch: exact on every backend, and
        // keyset comparisons on them cannot be upset by text formats or time zones.
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .if_not_exists()
                    .col(string_len(ApiKeys::Id, 24).primary_key())
                    .col(string_len(ApiKeys::WorkspaceId, 64))
                    .col(string_len(ApiKeys::Name, 400))
                    .col(blob_uniq(ApiKeys::KeyHash))
                    .col(string_len(ApiKeys::KeySuffix, 4))
                    .col(string_len(ApiKeys::CreatedBy, 512))
                    .col(big_integer(ApiKeys::CreateTimeUs))
                    .col(big_integer_null(ApiKeys::ExpireTimeUs))
                    .col(big_integer_null(ApiKeys::LastUsedTimeUs))
                    .col(big_integer_null(ApiKeys::DeleteTimeUs))
                    .to_owned(),
            )
            .await?;
        // ListKeys: one workspace, newest first.
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_workspace_created")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::WorkspaceId)
                    .col(ApiKeys::CreateTimeUs)
                    .col(ApiKeys::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    WorkspaceId,
    Name,
    KeyHash,
    KeySuffix,
    CreatedBy,
    CreateTimeUs,
    ExpireTimeUs,
    LastUsedTimeUs,
    DeleteTimeUs,
}
