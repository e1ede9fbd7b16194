use sea_orm_migration::{prelude::*, schema::*};

/// Credits. A key's row says whose balance it spends from (`credits`: a JSON object of the
/// account, the setting's generation and the refill; '' for unlimited); `key_credits` holds
/// each account's balance: what no replica has leased yet, for the period it belongs to,
/// with the refill that renews it. And the hourly count of USAGE_EXCEEDED answers.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(text(ApiKeys::Credits).default(""))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .add_column(big_integer(ApiKeyUsage::UsageExceeded).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(KeyCredits::Table)
                    .col(text(KeyCredits::AccountId).primary_key())
                    .col(big_integer(KeyCredits::Generation))
                    .col(big_integer(KeyCredits::Remaining))
                    .col(big_integer(KeyCredits::PeriodStartUs))
                    // Null: no refill. Interval: 'daily' or 'monthly'.
                    .col(big_integer_null(KeyCredits::RefillAmount))
                    .col(text(KeyCredits::RefillInterval).default(""))
                    .col(integer(KeyCredits::RefillDay).default(0))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(KeyCredits::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeyUsage::Table)
                    .drop_column(ApiKeyUsage::UsageExceeded)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(ApiKeys::Credits)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Credits,
}

#[derive(DeriveIden)]
enum ApiKeyUsage {
    Table,
    UsageExceeded,
}

#[derive(DeriveIden)]
enum KeyCredits {
    Table,
    AccountId,
    Generation,
    Remaining,
    PeriodStartUs,
    RefillAmount,
    RefillInterval,
    RefillDay,
}
