use sea_orm_migration::{prelude::*, schema::*};

/// Rate-limit windows shared by every replica: for each key's limit and window, how many
/// units of its budget (the limit) replicas have leased. A row is made by the window's
/// first lease and deleted by the prune task an hour after the window has ended.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RateLimitWindows::Table)
                    // `<key id>/<window ms>/<start µs>/<limit name>`.
                    .col(text(RateLimitWindows::WindowId).primary_key())
                    .col(big_integer(RateLimitWindows::EndsUs))
                    .col(big_integer(RateLimitWindows::Granted))
                    // The slice the last lease took, for the lease to return it.
                    .col(big_integer(RateLimitWindows::LastGrant))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_rate_limit_windows_ends_us")
                    .table(RateLimitWindows::Table)
                    .col(RateLimitWindows::EndsUs)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RateLimitWindows::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum RateLimitWindows {
    Table,
    WindowId,
    EndsUs,
    Granted,
    LastGrant,
}
