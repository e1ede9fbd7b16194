//! Request bodies protobuf cannot decode, sent as raw bytes no generated client would produce:
//! the caller's error (INVALID_ARGUMENT, `REQUEST_UNDECODABLE`) on every RPC, never INTERNAL.

use apikeys::clock::ManualClock;
use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::support::{TestApp, TestDb, as_owner, assert_error, spawn_app, spawn_app_with};

const VALIDATE_KEY: &str = "/cloodot.apikeys.v1.ApiKeys/ValidateKey";
const CREATE_KEY: &str = "/cloodot.apikeys.v1.ApiKeys/CreateKey";
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Field 1, length-delimited, holding bytes that are not UTF-8 (a `string` in our requests, a
/// message in Envoy's).
const INVALID_UTF8: &[u8] = &[0x0a, 0x02, 0xff, 0xfe];
/// Field 1 as a varint that ends mid-number.
const TRUNCATED_VARINT: &[u8] = &[0x08, 0xff];
const GARBAGE: &[u8] = &[0xff; 16];

/// Sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One call to `path` with `body` as its message, as an owner (which only management RPCs
/// look at).
async fn send(channel: &Channel, path: &'static str, body: &[u8]) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|err| Status::unavailable(err.to_string()))?;
    let request: Request<Vec<u8>> = as_owner(body.to_vec());
    grpc.unary(request, PathAndQuery::from_static(path), Raw)
        .await
        .map(tonic::Response::into_inner)
}

async fn validates_normally(app: &mut TestApp) {
    let answer = app.validate("clo_not_a_key").await;
    assert!(!answer.valid);
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_on_every_rpc_and_the_server_carries_on() {
    let mut app = spawn_app().await;

    for path in [VALIDATE_KEY, CREATE_KEY, CHECK, HEALTH_CHECK, HEALTH_WATCH] {
        for body in [INVALID_UTF8, TRUNCATED_VARINT, GARBAGE] {
            let status = send(&app.channel, path, body).await.unwrap_err();
            assert_error(&status, Code::InvalidArgument, "REQUEST_UNDECODABLE");
        }
    }

    validates_normally(&mut app).await;
}

#[tokio::test]
async fn the_answer_to_an_undecodable_request_carries_nothing_of_it() {
    let app = spawn_app().await;
    // A key field that claims 64 bytes and holds 40: prost stops at the missing bytes.
    let presented = "clo_Qm9ndXNTZWNyZXRUaGF0TXVzdE5vdExlYWs1";
    let mut body = vec![0x0a, 64];
    body.extend_from_slice(presented.as_bytes());

    let status = send(&app.channel, VALIDATE_KEY, &body).await.unwrap_err();

    assert_error(&status, Code::InvalidArgument, "REQUEST_UNDECODABLE");
    let sent = [status.message().as_bytes(), status.details()].concat();
    let secret_part = &presented.as_bytes()[4..20];
    assert!(
        !sent.windows(secret_part.len()).any(|w| w == secret_part),
        "{status:?}"
    );
}

#[tokio::test]
async fn undecodable_requests_are_counted_as_invalid_argument_not_internal_and_apart() {
    let db = TestDb::new().await;
    let app = spawn_app_with(db, ManualClock::new(chrono::Utc::now()), |settings| {
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;

    for path in [VALIDATE_KEY, CHECK, CREATE_KEY] {
        send(&app.channel, path, GARBAGE).await.unwrap_err();
    }
    // A request that decodes but has a bad field is INVALID_ARGUMENT, not undecodable.
    let empty_name = [0x0a, 0x04, b'a', b'c', b'm', b'e'];
    let status = send(&app.channel, CREATE_KEY, &empty_name)
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "NAME_EMPTY");

    let text = scrape(app.metrics_addr.expect("metrics listen")).await;
    let count = |series: String| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{series} ")))
            .map_or(0.0, |value| value.trim().parse::<f64>().unwrap())
    };
    for (method, invalid) in [
        ("ValidateKey", 1.0),
        ("ext_authz.Check", 1.0),
        ("CreateKey", 2.0),
    ] {
        let rpcs = |code: &str| {
            count(format!(
                r#"apikeys_rpcs_total{{method="{method}",code="{code}"}}"#
            ))
        };
        assert_eq!(rpcs("INVALID_ARGUMENT"), invalid, "{method}\n{text}");
        assert_eq!(rpcs("INTERNAL"), 0.0, "{method}");
        let undecodable = format!(r#"apikeys_undecodable_requests_total{{method="{method}"}}"#);
        assert_eq!(count(undecodable), 1.0, "{method}\n{text}");
    }
}

#[tokio::test]
async fn a_check_request_over_64_kib_is_still_out_of_range() {
    let app = spawn_app().await;
    // Field 2 is not Envoy's: prost would skip it, were it not over the limit.
    let mut body = vec![0x12, 0x80, 0x80, 0x04];
    body.resize(body.len() + 64 * 1024, b'x');

    let status = send(&app.channel, CHECK, &body).await.unwrap_err();

    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

#[tokio::test]
async fn an_unknown_method_of_envoys_authorization_service_is_unimplemented() {
    let app = spawn_app().await;

    let status = send(
        &app.channel,
        "/envoy.service.auth.v3.Authorization/Nope",
        &[],
    )
    .await
    .unwrap_err();

    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

/// The Prometheus text, by one HTTP/1.1 GET.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Sends `framed` as the whole HTTP/2 body of a call to `path`, gRPC's message framing
/// included (or not), and returns the call's `grpc-status` and ErrorInfo reason.
async fn send_framed(channel: &Channel, path: &str, framed: &'static [u8]) -> (String, String) {
    use tower::ServiceExt;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(framed),
        )))
        .unwrap();
    let response = channel.clone().oneshot(request).await.unwrap();
    let status = Status::from_header_map(response.headers()).expect("a trailers-only answer");
    let reason = tonic_types::StatusExt::get_error_details(&status)
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default();
    (format!("{:?}", status.code()), reason)
}

#[tokio::test]
async fn a_body_without_a_whole_message_is_the_callers_error_too() {
    let app = spawn_app().await;
    for path in [VALIDATE_KEY, CHECK, HEALTH_CHECK] {
        for framed in [
            // No message at all.
            &b""[..],
            // A prefix cut short.
            b"\x00\x00\x00",
            // A message shorter than its prefix says.
            b"\x00\x00\x00\x00\x09\x0a\x02",
            // A compression flag that means nothing.
            b"\x07\x00\x00\x00\x00",
        ] {
            let (code, reason) = send_framed(&app.channel, path, framed).await;
            assert_eq!(
                (code.as_str(), reason.as_str()),
                ("InvalidArgument", "REQUEST_UNDECODABLE"),
                "{path} {framed:?}"
            );
        }
    }
}
