use sea_orm_migration::{prelude::*, schema::*};

/// What a key carries besides its identity: `owner_id` (the customer's id for the key's user
/// or service, '' for none), `annotations` (a JSON object of strings, '' for none) and
/// `allowed_cidrs` (canonical networks separated by single spaces, '' for any address); an
/// index for ListKeys' owner filter; and the hourly count of IP_NOT_ALLOWED answers.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters a table one change at a time.
        for column in [
            ApiKeys::OwnerId,
            ApiKeys::Annotations,
            ApiKeys::AllowedCidrs,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .add_column(text(column).default(""))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_owner")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::WorkspaceId)
                    .col(ApiKeys::OwnerId)
                    .col(ApiKeys::CreateTimeUs)
                    .col(ApiKeys::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .add_column(big_integer(ApiKeyUsage::IpNotAllowed).default(0))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .drop_column(ApiKeyUsage::IpNotAllowed)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("idx_api_keys_owner")
                    .table(ApiKeys::Table)
                    .to_owned(),
            )
            .await?;
        for column in [
            ApiKeys::AllowedCidrs,
            ApiKeys::Annotations,
            ApiKeys::OwnerId,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    WorkspaceId,
    CreateTimeUs,
    OwnerId,
    Annotations,
    AllowedCidrs,
}

#[derive(DeriveIden)]
enum ApiKeyUsage {
    Table,
    IpNotAllowed,
}
