use sea_orm_migration::{prelude::*, schema::*};

/// The developer logs: `api_key_events`, one row per change to a key, keyed by the revision
/// the change took (so events are ordered as the changes committed); `api_key_usage`, one row
/// per key and hour with ValidateKey answers counted by result and a HyperLogLog sketch of the
/// client IPs; `api_keys.last_used_ip`, the client IP of the last valid use.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKeyEvents::Table)
                    .if_not_exists()
                    .col(big_integer(ApiKeyEvents::Id).primary_key())
                    .col(string_len(ApiKeyEvents::WorkspaceId, 64))
                    .col(string_len(ApiKeyEvents::KeyId, 24))
                    .col(string_len(ApiKeyEvents::Kind, 16))
                    .col(string_len(ApiKeyEvents::ActorId, 512))
                    .col(string_len(ApiKeyEvents::ActorRole, 16))
                    .col(big_integer(ApiKeyEvents::CreateTimeUs))
                    .col(string_len_null(ApiKeyEvents::NewKeyId, 24))
                    .col(text(ApiKeyEvents::ChangedFields).default(""))
                    .to_owned(),
            )
            .await?;
        // ListKeyEvents: one workspace (and maybe one key), newest first; retention: by time.
        for (name, columns) in [
            (
                "idx_api_key_events_workspace",
                vec![ApiKeyEvents::WorkspaceId, ApiKeyEvents::Id],
            ),
            (
                "idx_api_key_events_key",
                vec![ApiKeyEvents::KeyId, ApiKeyEvents::Id],
            ),
            ("idx_api_key_events_new_key", vec![ApiKeyEvents::NewKeyId]),
            ("idx_api_key_events_time", vec![ApiKeyEvents::CreateTimeUs]),
        ] {
            let mut index = Index::create();
            index.name(name).table(ApiKeyEvents::Table).if_not_exists();
            for column in columns {
                index.col(column);
            }
            manager.create_index(index.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(ApiKeyUsage::Table)
                    .if_not_exists()
                    .col(string_len(ApiKeyUsage::KeyId, 24))
                    .col(big_integer(ApiKeyUsage::StartTimeUs))
                    .col(string_len(ApiKeyUsage::WorkspaceId, 64))
                    .col(big_integer(ApiKeyUsage::Valid).default(0))
                    .col(big_integer(ApiKeyUsage::Expired).default(0))
                    .col(big_integer(ApiKeyUsage::Disabled).default(0))
                    .col(big_integer(ApiKeyUsage::Deleted).default(0))
                    .col(big_integer(ApiKeyUsage::InsufficientScope).default(0))
                    .col(blob_null(ApiKeyUsage::ClientIps))
                    .primary_key(
                        Index::create()
                            .col(ApiKeyUsage::KeyId)
                            .col(ApiKeyUsage::StartTimeUs),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_api_key_usage_time")
                    .table(ApiKeyUsage::Table)
                    .col(ApiKeyUsage::StartTimeUs)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(string_len_null(ApiKeys::LastUsedIp, 45))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(ApiKeys::LastUsedIp)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(ApiKeyUsage::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ApiKeyEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeyEvents {
    Table,
    Id,
    WorkspaceId,
    KeyId,
    Kind,
    ActorId,
    ActorRole,
    CreateTimeUs,
    NewKeyId,
    ChangedFields,
}

#[derive(DeriveIden)]
enum ApiKeyUsage {
    Table,
    KeyId,
    StartTimeUs,
    WorkspaceId,
    Valid,
    Expired,
    Disabled,
    Deleted,
    InsufficientScope,
    ClientIps,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    LastUsedIp,
}
