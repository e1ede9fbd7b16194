use apikeys::grpc::proto::{DeleteKeyRequest, Expiration, ListKeysRequest, ValidationResult};
use tonic::{Code, Request};

use crate::support::{as_actor, as_owner, assert_error, spawn_app};

fn delete(workspace: &str, key_id: &str) -> DeleteKeyRequest {
    DeleteKeyRequest {
        workspace_id: workspace.into(),
        key_id: key_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_deleted_key_is_rejected_on_the_very_next_call() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "doomed", Expiration::Never).await;
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    app.client
        .delete_key(as_owner(delete("acme", &key.id)))
        .await
        .unwrap();

    let response = app.validate(&secret).await;
    assert!(!response.valid);
    assert_eq!(response.result(), ValidationResult::Deleted);
    assert_eq!(response.key_id, key.id);
    let listed = app
        .client
        .list_keys(as_owner(ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.is_empty());
}

#[tokio::test]
async fn deleting_is_irreversible_and_not_repeatable() {
    let mut app = spawn_app().await;
    let (key, _) = app.create_key("acme", "once", Expiration::Never).await;
    app.client
        .delete_key(as_owner(delete("acme", &key.id)))
        .await
        .unwrap();
    let status = app
        .client
        .delete_key(as_owner(delete("acme", &key.id)))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "KEY_NOT_FOUND");
}

#[tokio::test]
async fn another_workspaces_key_cannot_be_deleted_and_is_indistinguishable_from_none() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "acme's", Expiration::Never).await;

    let foreign = app
        .client
        .delete_key(as_owner(delete("globex", &key.id)))
        .await
        .unwrap_err();
    let missing = app
        .client
        .delete_key(as_owner(delete("globex", "key_AAAAAAAAAAAAAAAAAAAA")))
        .await
        .unwrap_err();

    assert_error(&foreign, Code::NotFound, "KEY_NOT_FOUND");
    assert_eq!(foreign.message(), missing.message());
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn ill_formed_ids_and_workspaces_are_invalid_arguments() {
    let mut app = spawn_app().await;
    for id in ["", "nope", "key_short", "key_AAAAAAAAAAAAAAAAAAA/"] {
        let status = app
            .client
            .delete_key(as_owner(delete("acme", id)))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "KEY_ID_INVALID");
    }
    let status = app
        .client
        .delete_key(as_owner(delete("", "key_AAAAAAAAAAAAAAAAAAAA")))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "WORKSPACE_ID_INVALID");
}

#[tokio::test]
async fn deleting_requires_an_owner_or_admin() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "k", Expiration::Never).await;
    let status = app
        .client
        .delete_key(Request::new(delete("acme", &key.id)))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "ACTOR_MISSING");
    let status = app
        .client
        .delete_key(as_actor(delete("acme", &key.id), "u", "member"))
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "ROLE_NOT_ALLOWED");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}
