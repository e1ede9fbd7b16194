use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::support::spawn_app;

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_service() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "cloodot.apikeys.v1.ApiKeys", "liveness"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn health_turns_not_serving_when_shutdown_begins() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let stopping = tokio::spawn(app.stop());

    let next = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    drop(watch);
    stopping.await.unwrap();
}

/// What `grpcurl list` and `grpcurl describe` ask.
async fn reflect(app: &crate::support::TestApp, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

#[tokio::test]
async fn reflection_lists_every_service_and_describes_the_api() {
    let app = spawn_app().await;

    let MessageResponse::ListServicesResponse(list) =
        reflect(&app, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cloodot.apikeys.v1.ApiKeys",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]
    );

    for symbol in [
        "cloodot.apikeys.v1.ApiKeys",
        "cloodot.apikeys.v1.CreateKeyRequest",
        "grpc.health.v1.Health",
        // What error details carry, so grpcurl prints a refusal's reason and retry delay.
        "google.rpc.ErrorInfo",
        "google.rpc.RetryInfo",
        "google.rpc.BadRequest",
    ] {
        let response = reflect(&app, MessageRequest::FileContainingSymbol(symbol.into())).await;
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("no descriptor for {symbol}: {response:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    // The import the contract needs is served too, so grpcurl can decode timestamps.
    let response = reflect(
        &app,
        MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
    )
    .await;
    assert!(
        matches!(response, MessageResponse::FileDescriptorResponse(_)),
        "{response:?}"
    );
}

#[tokio::test]
async fn the_older_v1alpha_reflection_answers_too() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "cloodot.apikeys.v1.ApiKeys")
    );
}

#[tokio::test]
async fn tests_run_on_the_backend_they_were_asked_for() {
    let app = spawn_app().await;
    let expected = match std::env::var(crate::support::POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => sea_orm::DatabaseBackend::Postgres,
        _ => sea_orm::DatabaseBackend::Sqlite,
    };
    assert_eq!(app.store().await.backend(), expected);
}
