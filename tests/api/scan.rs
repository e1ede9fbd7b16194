//! The suite's record of every secret it is handed (API keys in CreateKey responses, caller
//! tokens it makes), so that the logs of the whole run can be searched for them.
//!
//! With `APIKEYS_TEST_SCAN_DIR` set, each secret is appended to `secrets` there and every
//! captured log line to `logs`; `.ci/run` runs the suite so with `RUST_LOG=trace`, then
//! `tests/log_scan.rs` searches the one for the others.

use std::{
    future::Future,
    io::Write,
    path::PathBuf,
    pin::Pin,
    sync::{Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
};

use apikeys::auth::CallerToken;
use http_body_util::BodyExt;
use tonic::{body::Body, transport::Channel};
use tower::Service;

pub(crate) const SCAN_DIR_ENV: &str = "APIKEYS_TEST_SCAN_DIR";

pub(crate) fn scan_file(name: &str) -> Option<PathBuf> {
    std::env::var_os(SCAN_DIR_ENV).map(|dir| PathBuf::from(dir).join(name))
}

fn secrets_file() -> &'static Option<Mutex<std::fs::File>> {
    static FILE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = scan_file("secrets")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the secrets file of the log scan");
        Some(Mutex::new(file))
    })
}

/// Notes a secret the suite was handed.
pub(crate) fn remember(secret: &str) {
    if let Some(file) = secrets_file() {
        let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
        writeln!(file, "{secret}").expect("write the secrets file");
    }
}

/// A new caller token, remembered.
pub(crate) fn caller_token() -> CallerToken {
    let token = CallerToken::generate();
    remember(token.expose());
    token
}

/// Every well-formed API key in `bytes` (a response body).
fn keys_in(bytes: &[u8]) -> impl Iterator<Item = &str> {
    let len = apikeys::domain::KEY_LEN;
    let prefix = apikeys::domain::KEY_PREFIX.as_bytes();
    (0..bytes.len().saturating_sub(len - 1)).filter_map(move |at| {
        let candidate = &bytes[at..at + len];
        (candidate.starts_with(prefix)
            && candidate[prefix.len()..]
                .iter()
                .all(u8::is_ascii_alphanumeric))
        .then(|| std::str::from_utf8(candidate).ok())
        .flatten()
    })
}

/// A channel that remembers every API key in the responses it carries. Unary calls only: it
/// reads each response whole before handing it on.
#[derive(Debug, Clone)]
pub(crate) struct Recording(pub(crate) Channel);

impl Service<http::Request<Body>> for Recording {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let (parts, body) = response.await?.into_parts();
            let frames = match body.collect().await {
                Ok(collected) => {
                    let trailers = collected.trailers().cloned();
                    let data = collected.to_bytes();
                    keys_in(&data).for_each(remember);
                    let mut frames = vec![Ok(http_body::Frame::data(data))];
                    frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
                    frames
                }
                Err(status) => vec![Err(status)],
            };
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

#[test]
fn keys_are_found_in_a_response_body() {
    let key = apikeys::domain::Secret::generate();
    let body = [
        b"\x0a\x2a".as_slice(),
        key.expose().as_bytes(),
        b"\x12\x03abc",
    ]
    .concat();
    assert_eq!(keys_in(&body).collect::<Vec<_>>(), [key.expose()]);
    assert_eq!(keys_in(b"clo_short").count(), 0);
}
