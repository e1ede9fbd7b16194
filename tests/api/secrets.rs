//! The secret is shown once and never kept: not in logs at any level, not in the database.

use apikeys::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, Expiration, ListKeysRequest, ValidateKeyRequest,
};

use crate::support::{as_owner, captured_logs, spawn_app};

/// Runs every RPC, including failing ones, around one key and its rotation; returns both
/// secrets.
async fn exercise_every_rpc() -> (crate::support::TestApp, [String; 2]) {
    let mut app = spawn_app().await;
    let (key, secret) = app
        .create_key("acme", "log probe", Expiration::Expiration30Days)
        .await;
    app.validate(&secret).await;
    app.validate(&format!("{secret}x")).await;
    app.validate(&secret[..41]).await;
    let _ = app
        .client
        .validate_key(ValidateKeyRequest {
            key: format!("Bearer {secret}"),
            ..Default::default()
        })
        .await;
    // A confused client that pastes the secret where a name or id goes.
    let _ = app
        .client
        .create_key(as_owner(CreateKeyRequest {
            workspace_id: secret.clone(),
            name: secret.clone(),
            expiration: 1,
            ..Default::default()
        }))
        .await;
    let _ = app
        .client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: secret.clone(),
            ..Default::default()
        }))
        .await;
    app.client
        .list_keys(as_owner(ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    // The lifecycle RPCs, the secret pasted where a name, scope or id goes.
    app.try_get("acme", &key.id).await.unwrap();
    let _ = app.try_get("acme", &secret).await;
    let _ = app
        .try_update(
            ApiKey {
                name: secret.clone(),
                scopes: vec![secret.clone()],
                ..key.clone()
            },
            &["*"],
        )
        .await;
    app.validate_with(&secret, &["orders:read"]).await;
    let _ = app
        .client
        .validate_key(ValidateKeyRequest {
            key: secret.clone(),
            required_scopes: vec![secret.clone()],
            ..Default::default()
        })
        .await;
    app.try_disable("acme", &key.id).await.unwrap();
    app.validate(&secret).await;
    app.try_enable("acme", &key.id).await.unwrap();
    let rotated = app
        .try_rotate(
            "acme",
            &key.id,
            Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        )
        .await
        .unwrap();
    app.validate(&rotated.secret).await;
    app.client
        .delete_key(as_owner(DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.id,
            ..Default::default()
        }))
        .await
        .unwrap();
    app.validate(&secret).await;
    (app, [secret, rotated.secret])
}

#[tokio::test]
async fn no_secret_reaches_the_logs_at_any_level() {
    let (app, secrets) = exercise_every_rpc().await;
    drop(app);

    let logs = captured_logs();
    // The capture works: our own events are there, at trace level and below.
    assert!(logs.contains("key created"), "log capture is not working");
    assert!(logs.contains("key deleted"));
    assert!(logs.contains("key rotated"));
    for secret in secrets {
        assert!(!logs.contains(&secret), "the full key was logged");
        // Not even the random part, in case something printed it without its prefix.
        assert!(
            !logs.contains(&secret[4..36]),
            "the key's random part was logged"
        );
    }
}

#[tokio::test]
async fn no_secret_reaches_the_database() {
    let (app, secrets) = exercise_every_rpc().await;
    let rows = app.store().await.all_rows().await.unwrap();
    assert_eq!(rows.len(), 2);
    let dump = format!("{rows:?}");
    for secret in &secrets {
        assert!(
            !dump.contains(&secret[4..36]),
            "a stored column holds the secret"
        );
        // Only its hash.
        let hash = blake3::hash(secret.as_bytes()).as_bytes().to_vec();
        assert!(
            rows.iter()
                .any(|row| row.key_hash.as_bytes()[..] == hash[..])
        );
    }

    // For SQLite, the raw bytes of every file too: pages, WAL, free space.
    if let Some(dir) = app.db.sqlite_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for secret in &secrets {
                let found = bytes.windows(32).any(|w| w == &secret.as_bytes()[4..36]);
                assert!(!found, "the secret's bytes are in a database file");
            }
        }
    }
}
