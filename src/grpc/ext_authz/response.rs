//! The part of Envoy's `CheckResponse` a decision sets, and nothing else.
//!
//! envoy-types' `CheckResponse` makes every header name and value an owned `String` and
//! carries a dozen fields a decision never sets; on an allowed request that was most of
//! Check's allocations. These messages declare only what a decision sets, with the field
//! numbers of `envoy/service/auth/v3/external_auth.proto`, `envoy/config/core/v3/base.proto`,
//! `envoy/type/v3/http_status.proto` and `google/rpc/status.proto`: the same bytes on the
//! wire. Header names and values are `Bytes` (a `string` and `bytes` are encoded alike), so a
//! fixed name is never copied and a key's id and workspace are moved in, not copied.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use tonic::Code;

use super::request::HeaderValue;

/// `envoy.service.auth.v3.CheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CheckResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<RpcStatus>,
    #[prost(oneof = "HttpResponse", tags = "2, 3")]
    http_response: Option<HttpResponse>,
}

/// `CheckResponse.http_response`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum HttpResponse {
    #[prost(message, tag = "2")]
    Denied(DeniedHttpResponse),
    #[prost(message, tag = "3")]
    Ok(OkHttpResponse),
}

/// `google.rpc.Status`: its `code`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
}

/// `envoy.service.auth.v3.DeniedHttpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct DeniedHttpResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<HttpStatus>,
    #[prost(message, repeated, tag = "2")]
    headers: Vec<HeaderValueOption>,
    #[prost(string, tag = "3")]
    body: String,
}

/// `envoy.type.v3.HttpStatus`: the `StatusCode` enum, a varint like an `int32`.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpStatus {
    #[prost(int32, tag = "1")]
    code: i32,
}

/// `envoy.service.auth.v3.OkHttpResponse`: `headers`, `headers_to_remove` and
/// `response_headers_to_add` (set on the response the client gets).
#[derive(Clone, PartialEq, prost::Message)]
struct OkHttpResponse {
    #[prost(message, repeated, tag = "2")]
    headers: Vec<HeaderValueOption>,
    #[prost(bytes = "bytes", repeated, tag = "5")]
    headers_to_remove: Vec<Bytes>,
    #[prost(message, repeated, tag = "6")]
    response_headers_to_add: Vec<HeaderValueOption>,
}

/// `envoy.config.core.v3.HeaderValueOption`: `header` and `append_action`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    header: Option<HeaderValue>,
    #[prost(int32, tag = "3")]
    append_action: i32,
}

/// A header set on the request or the denial, replacing any the client sent.
pub(crate) fn header(key: &'static str, value: impl Into<Bytes>) -> HeaderValueOption {
    named_header(Bytes::from_static(key.as_bytes()), value)
}

/// [`header`], for a name made at start-up.
pub(crate) fn named_header(key: Bytes, value: impl Into<Bytes>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value: value.into(),
            raw_value: Bytes::new(),
        }),
        // A client's own value never reaches the backend.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
    }
}

impl CheckResponse {
    /// Let the request through with `headers` set and `remove` removed, and `downstream`
    /// set on the response its client gets.
    pub(crate) fn allowed(
        headers: Vec<HeaderValueOption>,
        remove: Vec<Bytes>,
        downstream: Vec<HeaderValueOption>,
    ) -> Self {
        Self {
            status: Some(RpcStatus {
                code: Code::Ok as i32,
            }),
            http_response: Some(HttpResponse::Ok(OkHttpResponse {
                headers,
                headers_to_remove: remove,
                response_headers_to_add: downstream,
            })),
        }
    }

    /// Adds `headers` to a denial's (an allowed request's headers are set when it is made).
    pub(crate) fn add_headers(&mut self, headers: Vec<HeaderValueOption>) {
        if let Some(HttpResponse::Denied(denied)) = &mut self.http_response {
            denied.headers.extend(headers);
        }
    }

    /// Answer the request with HTTP `http_status`, `headers` and `body`.
    pub(crate) fn denied(
        code: Code,
        http_status: i32,
        headers: Vec<HeaderValueOption>,
        body: String,
    ) -> Self {
        Self {
            status: Some(RpcStatus { code: code as i32 }),
            http_response: Some(HttpResponse::Denied(DeniedHttpResponse {
                status: Some(HttpStatus { code: http_status }),
                headers,
                body,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::auth::v3::{self as full, check_response};
    use prost::Message;

    use super::*;

    fn as_envoy_reads_it(response: &CheckResponse) -> full::CheckResponse {
        full::CheckResponse::decode(response.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn an_allowed_request_decodes_as_envoys_own_ok_response() {
        let response = CheckResponse::allowed(
            vec![header("x-cloodot-key-id", String::from("key_abc"))],
            vec![Bytes::from_static(b"authorization")],
            vec![header("ratelimit", "\"requests\";r=9;t=1")],
        );

        let full = as_envoy_reads_it(&response);

        assert_eq!(full.status.unwrap().code, Code::Ok as i32);
        let Some(check_response::HttpResponse::OkResponse(ok)) = full.http_response else {
            panic!("not an OK response");
        };
        let set = ok.headers[0].clone();
        assert_eq!(
            set.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let set = set.header.unwrap();
        assert_eq!(
            (set.key.as_str(), set.value.as_str()),
            ("x-cloodot-key-id", "key_abc")
        );
        assert_eq!(ok.headers_to_remove, ["authorization"]);
        let downstream = ok.response_headers_to_add[0].header.clone().unwrap();
        assert_eq!(
            (downstream.key.as_str(), downstream.value.as_str()),
            ("ratelimit", "\"requests\";r=9;t=1")
        );
    }

    #[test]
    fn a_denial_decodes_as_envoys_own_denied_response() {
        let response = CheckResponse::denied(
            Code::PermissionDenied,
            403,
            vec![header("content-type", "application/json")],
            r#"{"error":"insufficient_scope"}"#.to_owned(),
        );

        let full = as_envoy_reads_it(&response);

        assert_eq!(full.status.unwrap().code, Code::PermissionDenied as i32);
        let Some(check_response::HttpResponse::DeniedResponse(denied)) = full.http_response else {
            panic!("not a denial");
        };
        assert_eq!(denied.status.unwrap().code, 403);
        assert_eq!(
            denied.headers[0].header.as_ref().unwrap().key,
            "content-type"
        );
        assert_eq!(denied.body, r#"{"error":"insufficient_scope"}"#);
    }
}
