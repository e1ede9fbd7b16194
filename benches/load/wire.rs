//! The generator's gRPC client: HTTP/2 straight from `h2`, requests encoded once before a run
//! and sent as bytes, answers read as bytes. Per call it builds the request head (one header
//! map) and polls one future; it decodes no answer in the timed loop but the sampled ones,
//! which are kept as bytes and checked after the round.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, header};

/// One HTTP/2 connection to `addr`, driven by a task of its own.
pub(crate) async fn connect(addr: &str) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let (send, connection) = h2::client::Builder::new()
        // As tonic's client (hyper's defaults): a slow reader of answers is never the limit.
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .handshake(tcp)
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send.ready().await.expect("connection ready")
}

/// `message` as one gRPC frame: uncompressed, with its big-endian length.
pub(crate) fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut buf).expect("room for the message");
    buf.freeze()
}

/// What every call of a scenario sends but its body: the method's URI and the metadata.
#[derive(Clone)]
pub(crate) struct Head {
    uri: Uri,
    authorization: Option<HeaderValue>,
}

impl Head {
    pub(crate) fn new(addr: &str, path: &str, token: Option<&str>) -> Self {
        Self {
            uri: format!("http://{addr}{path}").parse().expect("a URI"),
            authorization: token.map(|token| {
                HeaderValue::from_str(&format!("Bearer {token}")).expect("a header value")
            }),
        }
    }

    fn request(&self) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        if let Some(authorization) = &self.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        request
    }
}

/// A call that did not end in `grpc-status: 0`.
#[derive(Debug)]
pub(crate) struct Failed(pub(crate) String);

fn status_of(headers: &HeaderMap) -> Option<Result<(), Failed>> {
    let status = headers.get("grpc-status")?;
    Some(if status == "0" {
        Ok(())
    } else {
        let message = headers
            .get("grpc-message")
            .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
            .unwrap_or_default();
        Err(Failed(format!(
            "grpc-status {} {message}",
            String::from_utf8_lossy(status.as_bytes())
        )))
    })
}

fn failed(err: h2::Error) -> Failed {
    Failed(err.to_string())
}

/// One unary call: when it was sent and answered, and the answer's message bytes when `keep`.
pub(crate) async fn unary(
    send: SendRequest<Bytes>,
    head: &Head,
    body: Bytes,
    keep: bool,
) -> Result<(Instant, Instant, Option<Bytes>), Failed> {
    let sent = Instant::now();
    let mut send = send.ready().await.map_err(failed)?;
    let (response, mut stream) = send.send_request(head.request(), false).map_err(failed)?;
    stream.send_data(body, true).map_err(failed)?;
    let response = response.await.map_err(failed)?;
    if response.status() != 200 {
        return Err(Failed(format!("HTTP status {}", response.status())));
    }
    // A trailers-only answer (every error) carries its status in the headers.
    if let Some(status) = status_of(response.headers()) {
        status?;
        return Ok((sent, Instant::now(), None));
    }
    let mut body = response.into_body();
    let mut kept = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(failed)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if keep {
            kept.extend_from_slice(&chunk);
        }
    }
    let trailers = body.trailers().await.map_err(failed)?.unwrap_or_default();
    status_of(&trailers).unwrap_or_else(|| Err(Failed("no grpc-status".into())))?;
    let answered = Instant::now();
    let message = keep.then(|| {
        let mut framed = kept.freeze();
        framed.advance(5.min(framed.len()));
        framed
    });
    Ok((sent, answered, message))
}

/// One bidirectional stream: the request side and the answers.
pub(crate) struct Stream {
    pub(crate) tx: h2::SendStream<Bytes>,
    pub(crate) rx: h2::RecvStream,
}

/// Opens a streaming call; fails if the server refuses it before answering its headers.
pub(crate) async fn open_stream(send: SendRequest<Bytes>, head: &Head) -> Result<Stream, Failed> {
    let mut send = send.ready().await.map_err(failed)?;
    let (response, tx) = send.send_request(head.request(), false).map_err(failed)?;
    let response = response.await.map_err(failed)?;
    if let Some(status) = status_of(response.headers()) {
        status?;
        return Err(Failed("the stream ended at once".into()));
    }
    Ok(Stream {
        tx,
        rx: response.into_body(),
    })
}

/// Whole gRPC messages out of a stream's DATA chunks, which may split and join them.
#[derive(Default)]
pub(crate) struct Deframer {
    buf: BytesMut,
}

impl Deframer {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, if one has arrived.
    pub(crate) fn next_message(&mut self) -> Option<Bytes> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        self.buf.advance(5);
        Some(self.buf.split_to(len).freeze())
    }
}

/// The `request_id` of a ValidateKeysResponse (field 1, a varint, which prost writes first),
/// read without decoding the rest.
pub(crate) fn request_id(message: &[u8]) -> Option<u64> {
    let mut rest = message;
    if rest.first() != Some(&0x08) {
        // An id of 0 is not written at all.
        return Some(0);
    }
    rest = &rest[1..];
    prost::encoding::decode_varint(&mut rest).ok()
}
