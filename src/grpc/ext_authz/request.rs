//! The part of Envoy's `CheckRequest` a decision reads, and nothing else.
//!
//! envoy-types' `CheckRequest` decodes every attribute Envoy sends (method, path, host, ids,
//! times, metadata, every header as a `String` in a `HashMap`) into a struct of over a
//! kilobyte that each future it passes through copies again; a decision reads four of
//! them. These messages declare only those four, with the field numbers of
//! `envoy/service/auth/v3/attribute_context.proto` and `envoy/config/core/v3/address.proto`:
//! protobuf skips the fields a message does not declare, so the same bytes decode. Values are
//! `Bytes` slices of the request itself, not copies, and only the ones read are checked for
//! UTF-8. A `map<string, string>` is on the wire a repeated `{ key = 1; value = 2; }`
//! message, read here as a list: the last entry for a key wins, as in a map.

use std::net::IpAddr;

use bytes::Bytes;

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub(crate) attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`: `source`, `request` and `context_extensions`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    request: Option<Request>,
    #[prost(message, repeated, tag = "10")]
    context_extensions: Vec<Entry>,
}

/// `AttributeContext.Peer`: its `address`.
#[derive(Clone, PartialEq, prost::Message)]
struct Peer {
    #[prost(message, optional, tag = "1")]
    address: Option<Address>,
}

/// `envoy.config.core.v3.Address`: the `socket_address` arm of its `address` oneof.
#[derive(Clone, PartialEq, prost::Message)]
struct Address {
    #[prost(message, optional, tag = "1")]
    socket_address: Option<SocketAddress>,
}

/// `envoy.config.core.v3.SocketAddress`: its `address`.
#[derive(Clone, PartialEq, prost::Message)]
struct SocketAddress {
    #[prost(bytes = "bytes", tag = "2")]
    address: Bytes,
}

/// `AttributeContext.Request`: its `http`.
#[derive(Clone, PartialEq, prost::Message)]
struct Request {
    #[prost(message, optional, tag = "2")]
    http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`: `headers`, or `header_map` when Envoy is told to send raw
/// header values.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpRequest {
    #[prost(message, repeated, tag = "3")]
    headers: Vec<Entry>,
    #[prost(message, optional, tag = "13")]
    header_map: Option<HeaderMap>,
}

/// An entry of a `map<string, string>`.
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`: `raw_value`, when set, instead of `value`. A
/// response's header mutations use it too, with `raw_value` empty (and so not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub(super) key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub(super) value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub(super) raw_value: Bytes,
}

impl AttributeContext {
    /// The raw value of request header `name` (lower case), from whichever form Envoy filled:
    /// `headers`, a map (the last entry for a name wins), or `header_map`, one entry per header
    /// line as the client sent it (the first line of that name, in any case, wins).
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        let http = self.request.as_ref()?.http.as_ref()?;
        if !http.headers.is_empty() {
            return last(&http.headers, name).map(|value| &value[..]);
        }
        let header = http
            .header_map
            .as_ref()?
            .headers
            .iter()
            .find(|header| header.key.eq_ignore_ascii_case(name.as_bytes()))?;
        Some(header.bytes())
    }

    /// Every value of request header `name` (lower case) in the order the lines came: from
    /// `headers`, the one value Envoy joined them into; from `header_map`, each line. A list
    /// header such as `x-forwarded-for` is these, joined with commas.
    pub(crate) fn header_lines(&self, name: &str) -> Vec<&[u8]> {
        let Some(http) = self
            .request
            .as_ref()
            .and_then(|request| request.http.as_ref())
        else {
            return Vec::new();
        };
        if !http.headers.is_empty() {
            return last(&http.headers, name)
                .map(|value| &value[..])
                .into_iter()
                .collect();
        }
        let Some(map) = http.header_map.as_ref() else {
            return Vec::new();
        };
        map.headers
            .iter()
            .filter(|header| header.key.eq_ignore_ascii_case(name.as_bytes()))
            .map(HeaderValue::bytes)
            .collect()
    }

    /// The route's `context_extensions` entry `name`; `Err` when it is not UTF-8.
    pub(crate) fn context_extension(&self, name: &str) -> Option<Result<&str, ()>> {
        last(&self.context_extensions, name).map(|value| std::str::from_utf8(value).map_err(drop))
    }

    /// The peer's IP, as Envoy saw it.
    pub(crate) fn client_ip(&self) -> Option<IpAddr> {
        let socket = self
            .source
            .as_ref()?
            .address
            .as_ref()?
            .socket_address
            .as_ref()?;
        std::str::from_utf8(&socket.address).ok()?.parse().ok()
    }
}

impl HeaderValue {
    /// The value as sent: `raw_value` when Envoy filled it, else `value`.
    fn bytes(&self) -> &[u8] {
        if self.raw_value.is_empty() {
            &self.value
        } else {
            &self.raw_value
        }
    }
}

fn last<'a>(entries: &'a [Entry], key: &str) -> Option<&'a Bytes> {
    entries
        .iter()
        .rev()
        .find(|entry| entry.key == key.as_bytes())
        .map(|entry| &entry.value)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::{self as core, address},
        service::auth::v3::{self as full, attribute_context},
    };
    use prost::Message;

    use super::*;

    fn full_request(http: attribute_context::HttpRequest) -> full::CheckRequest {
        full::CheckRequest {
            attributes: Some(full::AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(core::Address {
                        address: Some(address::Address::SocketAddress(core::SocketAddress {
                            address: "2001:db8::7".into(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                443,
                            )),
                            ..Default::default()
                        })),
                    }),
                    principal: "spiffe://cluster/ns/default/sa/gateway".into(),
                    ..Default::default()
                }),
                destination: Some(attribute_context::Peer {
                    address: Some(core::Address {
                        address: Some(address::Address::SocketAddress(core::SocketAddress {
                            address: "10.0.0.9".into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                context_extensions: [
                    ("required_scopes".to_owned(), "orders:read".to_owned()),
                    ("team".to_owned(), "billing".to_owned()),
                ]
                .into(),
                ..Default::default()
            }),
        }
    }

    fn decoded(request: &full::CheckRequest) -> AttributeContext {
        CheckRequest::decode(request.encode_to_vec().as_slice())
            .unwrap()
            .attributes
            .unwrap()
    }

    #[test]
    fn envoys_full_request_decodes_to_the_attributes_a_decision_reads() {
        let request = full_request(attribute_context::HttpRequest {
            method: "POST".into(),
            path: "/orders?id=7".into(),
            host: "api.example.com".into(),
            headers: [
                (":authority".to_owned(), "api.example.com".to_owned()),
                ("authorization".to_owned(), "Bearer clo_abc".to_owned()),
                ("x-api-key".to_owned(), "clo_def".to_owned()),
            ]
            .into(),
            body: "{}".into(),
            ..Default::default()
        });

        let attributes = decoded(&request);

        assert_eq!(
            attributes.header("authorization"),
            Some(&b"Bearer clo_abc"[..])
        );
        assert_eq!(attributes.header("x-api-key"), Some(&b"clo_def"[..]));
        assert_eq!(attributes.header("cookie"), None);
        assert_eq!(
            attributes.context_extension("required_scopes"),
            Some(Ok("orders:read"))
        );
        assert_eq!(attributes.context_extension("absent"), None);
        assert_eq!(attributes.client_ip(), Some("2001:db8::7".parse().unwrap()));
    }

    #[test]
    fn raw_header_values_are_read_from_the_header_map_ignoring_the_names_case() {
        let request = full_request(attribute_context::HttpRequest {
            header_map: Some(core::HeaderMap {
                headers: vec![
                    core::HeaderValue {
                        key: "Authorization".into(),
                        raw_value: b"Bearer clo_raw".to_vec(),
                        ..Default::default()
                    },
                    core::HeaderValue {
                        key: "x-api-key".into(),
                        value: "clo_plain".into(),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        });

        let attributes = decoded(&request);

        assert_eq!(
            attributes.header("authorization"),
            Some(&b"Bearer clo_raw"[..])
        );
        assert_eq!(attributes.header("x-api-key"), Some(&b"clo_plain"[..]));
    }

    #[test]
    fn a_raw_header_sent_twice_is_read_from_its_first_line() {
        let line = |key: &str, value: &[u8]| core::HeaderValue {
            key: key.into(),
            raw_value: value.to_vec(),
            ..Default::default()
        };
        let request = full_request(attribute_context::HttpRequest {
            header_map: Some(core::HeaderMap {
                headers: vec![
                    line("X-Api-Key", b"clo_first"),
                    line("x-api-key", b"clo_second"),
                ],
            }),
            ..Default::default()
        });

        assert_eq!(
            decoded(&request).header("x-api-key"),
            Some(&b"clo_first"[..])
        );
    }

    #[test]
    fn every_line_of_a_list_header_is_read_in_order() {
        let line = |key: &str, value: &[u8]| core::HeaderValue {
            key: key.into(),
            raw_value: value.to_vec(),
            ..Default::default()
        };
        let request = full_request(attribute_context::HttpRequest {
            header_map: Some(core::HeaderMap {
                headers: vec![
                    line("X-Forwarded-For", b"192.0.2.1"),
                    line("x-api-key", b"clo_key"),
                    line("x-forwarded-for", b"203.0.113.7, 10.0.0.1"),
                ],
            }),
            ..Default::default()
        });
        assert_eq!(
            decoded(&request).header_lines("x-forwarded-for"),
            [&b"192.0.2.1"[..], &b"203.0.113.7, 10.0.0.1"[..]]
        );
        let joined = full_request(attribute_context::HttpRequest {
            headers: [(
                "x-forwarded-for".to_owned(),
                "192.0.2.1,10.0.0.1".to_owned(),
            )]
            .into(),
            ..Default::default()
        });
        assert_eq!(
            decoded(&joined).header_lines("x-forwarded-for"),
            [&b"192.0.2.1,10.0.0.1"[..]]
        );
        assert!(decoded(&joined).header_lines("absent").is_empty());
    }

    #[test]
    fn a_key_sent_twice_is_read_as_a_map_reads_it_the_last_one() {
        let mut bytes = Vec::new();
        for value in ["first", "second"] {
            full::CheckRequest {
                attributes: Some(full::AttributeContext {
                    context_extensions: [("required_scopes".to_owned(), value.to_owned())].into(),
                    ..Default::default()
                }),
            }
            .encode(&mut bytes)
            .unwrap();
        }
        // Concatenated messages merge, as protobuf defines: envoy-types' own decoder agrees.
        let full = full::CheckRequest::decode(bytes.as_slice()).unwrap();
        let lean = CheckRequest::decode(bytes.as_slice()).unwrap();

        assert_eq!(
            full.attributes.unwrap().context_extensions["required_scopes"],
            "second"
        );
        assert_eq!(
            lean.attributes
                .unwrap()
                .context_extension("required_scopes"),
            Some(Ok("second"))
        );
    }

    #[test]
    fn values_that_are_not_utf8_are_not_read_as_text() {
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                context_extensions: vec![Entry {
                    key: Bytes::from_static(b"required_scopes"),
                    value: Bytes::from_static(&[0xff, 0xfe]),
                }],
                source: Some(Peer {
                    address: Some(Address {
                        socket_address: Some(SocketAddress {
                            address: Bytes::from_static(&[0xff]),
                        }),
                    }),
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        headers: Vec::new(),
                        header_map: None,
                    }),
                }),
            }),
        };
        let attributes = request.attributes.unwrap();

        assert_eq!(
            attributes.context_extension("required_scopes"),
            Some(Err(()))
        );
        assert_eq!(attributes.client_ip(), None);
    }
}
