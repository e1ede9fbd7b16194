//! ValidateKeys: the bidirectional stream for gateways that keep a connection, judged as
//! ValidateKey judges, each answer matched to its request by id.

use std::{collections::HashMap, time::Duration};

use apikeys::grpc::proto::{
    Expiration, ValidateKeyRequest, ValidateKeysRequest, ValidateKeysResponse, ValidationResult,
    api_keys_client::ApiKeysClient,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Code, Request, Streaming, transport::Channel};
use tonic_types::StatusExt as _;

use crate::replicas::delete;
use crate::support::{TestApp, TestDb, as_owner, assert_error, spawn_app, spawn_app_with};

/// An open stream: requests go in by `send`, answers come out of `answers`.
struct Stream {
    requests: mpsc::Sender<ValidateKeysRequest>,
    answers: Streaming<ValidateKeysResponse>,
}

impl Stream {
    async fn open(channel: &Channel) -> Self {
        Self::open_as(channel, None).await
    }

    async fn open_as(channel: &Channel, token: Option<&str>) -> Self {
        let (requests, rx) = mpsc::channel(1024);
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let answers = ApiKeysClient::new(channel.clone())
            .validate_keys(request)
            .await
            .expect("the stream opens")
            .into_inner();
        Self { requests, answers }
    }

    async fn send(&self, request_id: u64, key: &str, client_ip: &str) {
        self.requests
            .send(ValidateKeysRequest {
                request_id,
                request: Some(ValidateKeyRequest {
                    key: key.into(),
                    client_ip: client_ip.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("the stream takes requests");
    }

    /// The next answer, within a few seconds.
    async fn next(&mut self) -> Result<ValidateKeysResponse, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.answers.next())
            .await
            .expect("an answer in time")
            .expect("the stream is still open")
    }

    /// The result of the next answer, which must be for `request_id`.
    async fn result_of(&mut self, request_id: u64) -> ValidationResult {
        let answer = self.next().await.expect("an answer, not an error");
        assert_eq!(answer.request_id, request_id);
        answer.response.expect("a response").result()
    }
}

#[tokio::test]
async fn every_request_is_answered_once_under_its_own_id_as_validate_key_answers_it() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    let (gone, gone_secret) = app.create_key("acme", "old", Expiration::Never).await;
    delete(&mut app, "acme", &gone.id).await;
    let unknown = apikeys::domain::Secret::generate().expose().to_owned();
    let inputs = [
        secret.as_str(),
        gone_secret.as_str(),
        unknown.as_str(),
        "clo_not-a-key",
        "",
    ];
    let mut stream = Stream::open(&app.channel).await;
    // Ids the client chose: not in order, not dense, the extremes included.
    let mut sent = HashMap::new();
    for i in 0..300u64 {
        let id = match i {
            0 => 0,
            1 => u64::MAX,
            _ => i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let input = inputs[i as usize % inputs.len()];
        stream.send(id, input, "203.0.113.7").await;
        sent.insert(id, input);
    }
    drop(stream.requests);

    let mut answered = HashMap::new();
    while let Some(answer) = stream.answers.next().await {
        let answer = answer.expect("no error");
        let response = answer.response.expect("a response");
        assert!(
            answered.insert(answer.request_id, response).is_none(),
            "request {} answered twice",
            answer.request_id
        );
    }
    assert_eq!(answered.len(), sent.len(), "every request answered");
    for (id, input) in sent {
        let streamed = &answered[&id];
        let unary = app.validate(input).await;
        assert_eq!(streamed.result(), unary.result(), "{input:.12}");
        assert_eq!(streamed.key_id, unary.key_id);
        assert_eq!(streamed.workspace_id, unary.workspace_id);
        assert_eq!(streamed.name, unary.name);
        assert_eq!(streamed.valid, streamed.result() == ValidationResult::Valid);
    }
    assert_eq!(answered[&0].key_id, key.id);
}

#[tokio::test]
async fn a_key_deleted_between_two_requests_is_deleted_in_the_second_answer() {
    let mut app = spawn_app().await;
    let (key, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    let mut stream = Stream::open(&app.channel).await;
    stream.send(1, &secret, "").await;
    assert_eq!(stream.result_of(1).await, ValidationResult::Valid);

    delete(&mut app, "acme", &key.id).await;
    stream.send(2, &secret, "").await;

    assert_eq!(stream.result_of(2).await, ValidationResult::Deleted);
}

#[tokio::test]
async fn a_bad_request_ends_the_stream_naming_its_id_after_the_answers_before_it() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    for (bad, reason) in [
        (
            ValidateKeysRequest {
                request_id: 42,
                request: Some(ValidateKeyRequest {
                    key: secret.clone(),
                    client_ip: "not-an-ip".into(),
                    ..Default::default()
                }),
            },
            "CLIENT_IP_INVALID",
        ),
        (
            ValidateKeysRequest {
                request_id: 42,
                request: None,
            },
            "REQUEST_MISSING",
        ),
        (
            ValidateKeysRequest {
                request_id: 42,
                request: Some(ValidateKeyRequest {
                    key: "x".repeat(17 * 1024),
                    ..Default::default()
                }),
            },
            "REQUEST_TOO_LARGE",
        ),
    ] {
        let mut stream = Stream::open(&app.channel).await;
        stream.send(7, &secret, "").await;
        stream.requests.send(bad).await.unwrap();
        stream.send(8, &secret, "").await;

        assert_eq!(stream.result_of(7).await, ValidationResult::Valid);
        let status = stream
            .next()
            .await
            .expect_err("the bad request ends the stream");
        let code = if reason == "REQUEST_TOO_LARGE" {
            Code::OutOfRange
        } else {
            Code::InvalidArgument
        };
        assert_error(&status, code, reason);
        assert!(
            status.message().contains("request_id 42"),
            "{}",
            status.message()
        );
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata["request_id"], "42");
        assert!(
            !status.message().contains(&secret) && !format!("{info:?}").contains(&secret),
            "no secret in the error"
        );
        let ended = tokio::time::timeout(Duration::from_secs(10), stream.answers.next())
            .await
            .expect("the stream ends");
        assert!(ended.is_none(), "nothing after the error: {ended:?}");
    }
    // The server is none the worse.
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn cancelled_streams_give_their_places_back() {
    let mut app = spawn_app_with(
        TestDb::new().await,
        apikeys::clock::ManualClock::new(chrono::Utc::now()),
        |settings| settings.max_in_flight_per_caller = 3,
    )
    .await;
    let (_, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = Stream::open(&app.channel).await;
        stream.send(1, &secret, "").await;
        assert_eq!(stream.result_of(1).await, ValidationResult::Valid);
        streams.push(stream);
    }
    // Each open stream holds one of this client's three places.
    let status = app
        .client
        .validate_key(ValidateKeyRequest {
            key: secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Unavailable, "CALLER_OVERLOADED");

    // The client goes away without closing its side: a cancellation (RST_STREAM).
    drop(streams);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = app
            .client
            .validate_key(ValidateKeyRequest {
                key: secret.clone(),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(answer) => {
                assert_eq!(answer.into_inner().result(), ValidationResult::Valid);
                break;
            }
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_error(&status, Code::Unavailable, "CALLER_OVERLOADED");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("the places were never given back: {status:?}"),
        }
    }
}

#[tokio::test]
async fn a_gateway_may_stream_and_every_answer_is_counted() {
    let guarded = crate::security::spawn_guarded(|settings| {
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut app = guarded.app;
    let secret = {
        let mut request = as_owner(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "edge".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", guarded.admin.expose())
                .parse()
                .unwrap(),
        );
        app.client
            .create_key(request)
            .await
            .unwrap()
            .into_inner()
            .secret
    };
    let metrics = app.metrics_addr.unwrap();
    let valid = r#"apikeys_validations_total{result="VALIDATION_RESULT_VALID"}"#;
    let before = crate::metrics::sample(&crate::metrics::scrape(metrics).await, valid);

    let mut stream = Stream::open_as(&app.channel, Some(guarded.gateway.expose())).await;
    for id in 0..25 {
        stream.send(id, &secret, "198.51.100.1").await;
        assert_eq!(stream.result_of(id).await, ValidationResult::Valid);
    }
    drop(stream.requests);
    assert!(stream.answers.next().await.is_none(), "ended with OK");

    let text = crate::metrics::scrape(metrics).await;
    assert_eq!(crate::metrics::sample(&text, valid) - before, 25.0);
    assert_eq!(
        crate::metrics::sample(
            &text,
            r#"apikeys_rpcs_total{method="ValidateKeys",code="OK"}"#
        ),
        1.0
    );
    // Without a token the stream is refused, as ValidateKey is.
    let status = ApiKeysClient::new(app.channel.clone())
        .validate_keys(tokio_stream::iter(Vec::<ValidateKeysRequest>::new()))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");
}

/// A raw HTTP/2 ValidateKeys stream on a connection of its own, to send without reading.
async fn raw_stream(app: &TestApp) -> (h2::SendStream<Bytes>, h2::client::ResponseFuture) {
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/cloodot.apikeys.v1.ApiKeys/ValidateKeys",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, stream) = send.send_request(request, false).unwrap();
    (stream, response)
}

fn framed(request: &ValidateKeysRequest) -> Vec<u8> {
    let message = prost::Message::encode_to_vec(request);
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

#[tokio::test]
async fn a_client_that_stops_reading_is_stopped_by_flow_control_and_then_answered_in_full() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    let (mut tx, response) = raw_stream(&app).await;
    let batch: Vec<u8> = (0..1000u64)
        .flat_map(|id| {
            framed(&ValidateKeysRequest {
                request_id: id,
                request: Some(ValidateKeyRequest {
                    key: secret.clone(),
                    ..Default::default()
                }),
            })
        })
        .collect();
    // Send batch after batch, never reading an answer, until the server stops granting
    // flow-control window for a while: what it has taken is what it holds.
    let mut batches = 0u64;
    loop {
        tx.reserve_capacity(batch.len());
        let granted = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(n)) if n >= batch.len() => return,
                    Some(Ok(_)) => continue,
                    other => panic!("the stream failed: {other:?}"),
                }
            }
        })
        .await;
        if granted.is_err() {
            break;
        }
        tx.send_data(Bytes::from(batch.clone()), false).unwrap();
        batches += 1;
        assert!(
            batches < 2_000,
            "the server took {} MB from a client that reads nothing",
            batches * batch.len() as u64 / 1_000_000
        );
    }
    let taken = batches * batch.len() as u64;
    assert!(batches > 0, "the server read nothing");
    assert!(
        taken < 8 * 1024 * 1024,
        "the server took {taken} bytes from a client that reads nothing"
    );

    // Once the client reads, every request it sent is answered, in full.
    tx.send_data(Bytes::new(), true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    let mut answers: HashMap<u64, u64> = HashMap::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let answer: ValidateKeysResponse = prost::Message::decode(&rest[5..5 + len]).unwrap();
        assert_eq!(answer.response.unwrap().result(), ValidationResult::Valid);
        *answers.entry(answer.request_id).or_default() += 1;
        rest = &rest[5 + len..];
    }
    assert_eq!(answers.len(), 1000);
    assert!(
        answers.values().all(|&n| n == batches),
        "each of the {batches} batches answered in full"
    );
}

#[tokio::test]
async fn a_draining_server_ends_its_streams_at_once_so_gateways_reconnect() {
    let mut app = spawn_app().await;
    let (_, secret) = app.create_key("acme", "edge", Expiration::Never).await;
    let mut stream = Stream::open(&app.channel).await;
    stream.send(1, &secret, "").await;
    assert_eq!(stream.result_of(1).await, ValidationResult::Valid);

    let started = std::time::Instant::now();
    let stopped = tokio::spawn(app.stop());
    let status = stream.next().await.expect_err("the stream ends");

    assert_error(&status, Code::Unavailable, "SHUTTING_DOWN");
    stopped.await.expect("the server stops");
    // Well within the 10 s grace an open stream would otherwise hold the drain for.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
