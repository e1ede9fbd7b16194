use sea_orm_migration::{prelude::*, schema::*};

/// A key's rate limits (`rate_limits`: a JSON array of `{name, limit, window_ms,
/// auto_apply}`, '' for none), and the hourly count of RATE_LIMITED answers.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(text(ApiKeys::RateLimits).default(""))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .add_column(big_integer(ApiKeyUsage::RateLimited).default(0))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .drop_column(ApiKeyUsage::RateLimited)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(ApiKeys::RateLimits)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    RateLimits,
}

#[derive(DeriveIden)]
enum ApiKeyUsage {
    Table,
    RateLimited,
}
