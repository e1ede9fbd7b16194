use apikeys::grpc::proto::{Expiration, KeyStatus, ListKeysRequest};
use chrono::TimeDelta;
use tonic::{Code, Request};

use crate::support::{as_actor, as_owner, assert_error, spawn_app};

fn list(workspace: &str, page_size: i32, page_token: &str) -> ListKeysRequest {
    ListKeysRequest {
        workspace_id: workspace.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn keys_are_listed_newest_first_and_masked() {
    let mut app = spawn_app().await;
    let mut created = Vec::new();
    for name in ["first", "second", "third"] {
        created.push(app.create_key("acme", name, Expiration::Never).await);
        app.clock.advance(TimeDelta::seconds(1));
    }

    let response = app
        .client
        .list_keys(as_owner(list("acme", 0, "")))
        .await
        .unwrap()
        .into_inner();

    let names: Vec<_> = response.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["third", "second", "first"]);
    assert_eq!(response.next_page_token, "");
    for (key, (created_key, secret)) in response.keys.iter().rev().zip(&created) {
        assert_eq!(key, created_key);
        assert_eq!(key.masked_key, format!("clo_********{}", &secret[38..]));
        assert!(
            !format!("{key:?}").contains(&secret[4..36]),
            "a listed key carries its secret"
        );
    }
}

#[tokio::test]
async fn pagination_walks_every_key_once_across_several_pages() {
    let mut app = spawn_app().await;
    let mut expected = Vec::new();
    for i in 0..23 {
        let (key, _) = app
            .create_key("acme", &format!("key {i}"), Expiration::Never)
            .await;
        expected.push(key.id);
        // Several keys share a creation time: the id breaks the tie.
        if i % 3 == 0 {
            app.clock.advance(TimeDelta::milliseconds(5));
        }
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let response = app
            .client
            .list_keys(as_owner(list("acme", 5, &token)))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(response.keys.len() <= 5);
        seen.extend(
            response
                .keys
                .into_iter()
                .map(|k| (k.create_time.unwrap(), k.id)),
        );
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }

    assert_eq!(pages, 5);
    let mut ids: Vec<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected, "every key exactly once");
    let order: Vec<_> = seen
        .iter()
        .map(|(t, id)| ((t.seconds, t.nanos), id.clone()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(order, sorted, "newest first, then by id descending");
}

#[tokio::test]
async fn page_size_defaults_to_50_and_is_capped_at_1000() {
    let mut app = spawn_app().await;
    for i in 0..51 {
        app.create_key("acme", &format!("k{i}"), Expiration::Never)
            .await;
    }
    let default = app
        .client
        .list_keys(as_owner(list("acme", 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.keys.len(), 50);
    assert!(!default.next_page_token.is_empty());
    let huge = app
        .client
        .list_keys(as_owner(list("acme", 1_000_000, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(huge.keys.len(), 51);
    assert!(huge.next_page_token.is_empty());
}

#[tokio::test]
async fn bad_page_requests_are_invalid_arguments() {
    let mut app = spawn_app().await;
    for i in 0..3 {
        app.create_key("acme", &format!("k{i}"), Expiration::Never)
            .await;
        app.create_key("globex", &format!("k{i}"), Expiration::Never)
            .await;
    }
    let acme_token = app
        .client
        .list_keys(as_owner(list("acme", 1, "")))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;

    let status = app
        .client
        .list_keys(as_owner(list("acme", -1, "")))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "PAGE_SIZE_NEGATIVE");
    for token in ["garbage", "AAAA", &acme_token[1..]] {
        let status = app
            .client
            .list_keys(as_owner(list("acme", 1, token)))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "PAGE_TOKEN_INVALID");
    }
    // A token is bound to its workspace.
    let status = app
        .client
        .list_keys(as_owner(list("globex", 1, &acme_token)))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "PAGE_TOKEN_INVALID");
    let status = app
        .client
        .list_keys(as_owner(list("bad workspace", 1, "")))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "WORKSPACE_ID_INVALID");
}

#[tokio::test]
async fn a_workspace_sees_only_its_own_keys() {
    let mut app = spawn_app().await;
    let (acme_key, _) = app.create_key("acme", "acme key", Expiration::Never).await;
    app.create_key("globex", "globex key", Expiration::Never)
        .await;

    let acme = app
        .client
        .list_keys(as_owner(list("acme", 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.keys, vec![acme_key]);
    let empty = app
        .client
        .list_keys(as_owner(list("initech", 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.keys.is_empty());
}

#[tokio::test]
async fn expired_keys_are_listed_as_expired_and_deleted_keys_are_hidden() {
    let mut app = spawn_app().await;
    let (expiring, _) = app
        .create_key("acme", "expiring", Expiration::Expiration30Days)
        .await;
    let (deleted, _) = app.create_key("acme", "deleted", Expiration::Never).await;
    let (forever, _) = app.create_key("acme", "forever", Expiration::Never).await;
    app.client
        .delete_key(as_owner(apikeys::grpc::proto::DeleteKeyRequest {
            workspace_id: "acme".into(),
            key_id: deleted.id,
            ..Default::default()
        }))
        .await
        .unwrap();
    app.clock.advance(TimeDelta::days(30));

    let keys = app
        .client
        .list_keys(as_owner(list("acme", 0, "")))
        .await
        .unwrap()
        .into_inner()
        .keys;

    let by_id = |id: &str| keys.iter().find(|k| k.id == id).unwrap().clone();
    assert_eq!(keys.len(), 2);
    assert_eq!(by_id(&expiring.id).status(), KeyStatus::Expired);
    assert_eq!(by_id(&forever.id).status(), KeyStatus::Active);
}

#[tokio::test]
async fn listing_requires_an_owner_or_admin() {
    let mut app = spawn_app().await;
    let status = app
        .client
        .list_keys(Request::new(list("acme", 0, "")))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "ACTOR_MISSING");
    let status = app
        .client
        .list_keys(as_actor(list("acme", 0, ""), "u", "member"))
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "ROLE_NOT_ALLOWED");
}
