//! The README's grpcurl examples, performed with a tonic client: each request as written,
//! each response checked against the JSON the README shows.

use std::collections::HashMap;

use apikeys::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
    GetKeyRequest, GetKeyUsageRequest, ListKeyEventsRequest, ListKeysRequest, RotateKeyRequest,
    UpdateKeyRequest, ValidateKeyRequest, ValidateKeyResponse, ValidateKeysRequest,
};
use serde_json::{Map, Value, json};
use tonic::Request;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::spawn_app;

/// Values that differ on every run; the README shows an example of each.
const VARYING: [&str; 10] = [
    "id",
    "keyId",
    "newKeyId",
    "secret",
    "maskedKey",
    "createTime",
    "expireTime",
    "lastUsedTime",
    "startTime",
    "nextPageToken",
];

#[derive(Debug)]
struct Example {
    headers: Vec<(String, String)>,
    body: Value,
    method: String,
    expected: Value,
}

fn examples() -> Vec<Example> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in readme.lines() {
        match (line.strip_prefix("```"), current.take()) {
            (Some(lang), None) => current = Some((lang.to_owned(), String::new())),
            (Some(_), Some(block)) => blocks.push(block),
            (None, Some((lang, mut text))) => {
                text.push_str(line);
                text.push('\n');
                current = Some((lang, text));
            }
            (None, None) => {}
        }
    }
    let mut examples = Vec::new();
    for pair in blocks.windows(2) {
        let [(lang, command), (next_lang, output)] = pair else {
            unreachable!()
        };
        if lang != "sh" || !command.contains("grpcurl") {
            continue;
        }
        assert_eq!(
            next_lang, "json",
            "every grpcurl example is followed by its output"
        );
        examples.push(parse_command(command, json_messages(output)));
    }
    examples
}

/// One JSON message, or several one after another (a stream's, as grpcurl takes and prints
/// them) as an array.
fn json_messages(text: &str) -> Value {
    let mut messages: Vec<Value> = serde_json::Deserializer::from_str(text)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("README examples are JSON");
    match messages.len() {
        1 => messages.remove(0),
        _ => Value::Array(messages),
    }
}

/// Splits a shell command with single-quoted words, the only quoting the README uses.
fn parse_command(command: &str, expected: Value) -> Example {
    let joined = command.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut rest = joined.trim();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').expect("closed quote");
            words.push(quoted[..end].to_owned());
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            words.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    let mut example = Example {
        headers: vec![],
        body: json!({}),
        method: String::new(),
        expected,
    };
    let mut words = words.into_iter().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "-plaintext" => {}
            "-H" => {
                let header = words.next().unwrap();
                let (name, value) = header.split_once(':').unwrap();
                example
                    .headers
                    .push((name.trim().to_owned(), value.trim().to_owned()));
            }
            "-d" => example.body = json_messages(&words.next().unwrap()),
            other if other.contains('/') => example.method = other.to_owned(),
            _ => {} // the address
        }
    }
    example
}

fn request<T>(message: T, headers: &[(String, String)]) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in headers {
        let name: tonic::metadata::MetadataKey<_> = name.parse().unwrap();
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    request
}

fn text(body: &Value, field: &str) -> String {
    body[field].as_str().unwrap_or_default().to_owned()
}

fn texts(body: &Value, field: &str) -> Vec<String> {
    body[field]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<Value> {
    ts.map(|t| {
        let time = chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap();
        json!(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    })
}

/// A message as grpcurl prints it: lowerCamelCase names, enums by name, defaults omitted.
fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    let mut map = Map::new();
    for (name, value) in fields {
        match value {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::Bool(false)) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(value) => {
                map.insert(name.to_owned(), value);
            }
        }
    }
    Value::Object(map)
}

fn api_key(key: &ApiKey) -> Value {
    object(vec![
        ("id", Some(json!(key.id))),
        ("workspaceId", Some(json!(key.workspace_id))),
        ("name", Some(json!(key.name))),
        ("maskedKey", Some(json!(key.masked_key))),
        ("createTime", time(&key.create_time)),
        ("expireTime", time(&key.expire_time)),
        ("status", Some(json!(key.status().as_str_name()))),
        ("lastUsedTime", time(&key.last_used_time)),
        ("createdBy", Some(json!(key.created_by))),
        ("scopes", Some(json!(key.scopes))),
    ])
}

fn validate_request(body: &Value) -> ValidateKeyRequest {
    ValidateKeyRequest {
        key: text(body, "key"),
        required_scopes: texts(body, "required_scopes"),
        client_ip: text(body, "client_ip"),
    }
}

fn validate_response(r: &ValidateKeyResponse) -> Value {
    object(vec![
        ("valid", Some(json!(r.valid))),
        ("result", Some(json!(r.result().as_str_name()))),
        ("keyId", Some(json!(r.key_id))),
        ("workspaceId", Some(json!(r.workspace_id))),
        ("expireTime", time(&r.expire_time)),
        ("scopes", Some(json!(r.scopes))),
        ("name", Some(json!(r.name))),
    ])
}

fn assert_matches(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut ek: Vec<_> = e.keys().collect();
            let mut ak: Vec<_> = a.keys().collect();
            ek.sort();
            ak.sort();
            assert_eq!(ek, ak, "fields of {path}");
            for (k, v) in e {
                assert_matches(v, &a[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "length of {path}");
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                assert_matches(e, a, &format!("{path}[{i}]"));
            }
        }
        (Value::String(e), Value::String(a))
            if VARYING.iter().any(|v| path.ends_with(&format!(".{v}"))) =>
        {
            // Same shape: same length, same fixed prefix (random parts are base62, no '_' or '*').
            let prefix = |s: &str| s.rfind(['_', '*']).map(|i| s[..=i].to_owned());
            if path.ends_with("Time") {
                assert!(
                    chrono::DateTime::parse_from_rfc3339(a).is_ok(),
                    "{path}: {a}"
                );
            } else if path.ends_with("Token") {
                // Opaque: any base64 character may stand anywhere.
                assert_eq!(e.len(), a.len(), "{path}: {a} is not shaped like {e}");
            } else {
                assert_eq!(e.len(), a.len(), "{path}: {a} is not shaped like {e}");
                assert_eq!(prefix(e), prefix(a), "{path}: {a} is not shaped like {e}");
            }
        }
        _ => assert_eq!(expected, actual, "{path}"),
    }
}

#[tokio::test]
async fn the_readme_grpcurl_examples_do_what_the_readme_shows() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let mut health = HealthClient::new(app.channel.clone());
    let examples = examples();
    let methods: Vec<_> = examples
        .iter()
        .map(|e| e.method.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        methods,
        [
            "Check",
            "CreateKey",
            "ValidateKey",
            "ValidateKeys",
            "ListKeys",
            "DeleteKey",
            "ValidateKey",
            "CreateKey",
            "ValidateKey",
            "UpdateKey",
            "ValidateKey",
            "DisableKey",
            "ValidateKey",
            "EnableKey",
            "RotateKey",
            "GetKey",
            "ListKeyEvents",
            "GetKeyUsage",
        ]
    );

    // The README's example id and secret stand for the ones this run creates.
    let mut stand_ins: HashMap<String, String> = HashMap::new();
    for example in examples {
        let mut body = example.body.to_string();
        for (readme, real) in &stand_ins {
            body = body.replace(readme, real);
        }
        let body: Value = serde_json::from_str(&body).unwrap();
        let h = &example.headers;
        let actual = match example.method.rsplit('/').next().unwrap() {
            "Check" => {
                let r = health
                    .check(request(
                        HealthCheckRequest {
                            service: text(&body, "service"),
                        },
                        h,
                    ))
                    .await
                    .unwrap();
                object(vec![(
                    "status",
                    Some(json!(r.into_inner().status().as_str_name())),
                )])
            }
            "CreateKey" => {
                let expiration = Expiration::from_str_name(&text(&body, "expiration")).unwrap();
                let message = CreateKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    name: text(&body, "name"),
                    expiration: expiration.into(),
                    scopes: texts(&body, "scopes"),
                    ..Default::default()
                };
                let r = client
                    .create_key(request(message, h))
                    .await
                    .unwrap()
                    .into_inner();
                let key = r.key.unwrap();
                stand_ins.insert(text(&example.expected["key"], "id"), key.id.clone());
                stand_ins.insert(text(&example.expected, "secret"), r.secret.clone());
                object(vec![
                    ("key", Some(api_key(&key))),
                    ("secret", Some(json!(r.secret))),
                ])
            }
            "ValidateKey" => {
                let r = client
                    .validate_key(request(validate_request(&body), h))
                    .await
                    .unwrap();
                validate_response(r.get_ref())
            }
            "ValidateKeys" => {
                // uint64 travels as a JSON string, as grpcurl writes and reads it.
                let requests: Vec<ValidateKeysRequest> = body
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|message| ValidateKeysRequest {
                        request_id: text(message, "request_id").parse().unwrap(),
                        request: Some(validate_request(&message["request"])),
                    })
                    .collect();
                let mut answers = client
                    .validate_keys(request(tokio_stream::iter(requests), h))
                    .await
                    .unwrap()
                    .into_inner();
                let mut printed = Vec::new();
                while let Some(answer) = answers.message().await.unwrap() {
                    printed.push(object(vec![
                        ("requestId", Some(json!(answer.request_id.to_string()))),
                        (
                            "response",
                            Some(validate_response(&answer.response.unwrap_or_default())),
                        ),
                    ]));
                }
                Value::Array(printed)
            }
            "ListKeys" => {
                let message = ListKeysRequest {
                    workspace_id: text(&body, "workspace_id"),
                    page_size: body["page_size"].as_i64().unwrap_or_default() as i32,
                    page_token: text(&body, "page_token"),
                };
                let r = client
                    .list_keys(request(message, h))
                    .await
                    .unwrap()
                    .into_inner();
                object(vec![
                    (
                        "keys",
                        Some(Value::Array(r.keys.iter().map(api_key).collect())),
                    ),
                    ("nextPageToken", Some(json!(r.next_page_token))),
                ])
            }
            "DeleteKey" => {
                let message = DeleteKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                };
                client.delete_key(request(message, h)).await.unwrap();
                json!({})
            }
            "GetKey" => {
                let message = GetKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                };
                api_key(
                    &client
                        .get_key(request(message, h))
                        .await
                        .unwrap()
                        .into_inner(),
                )
            }
            "DisableKey" => {
                let message = DisableKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                };
                api_key(
                    &client
                        .disable_key(request(message, h))
                        .await
                        .unwrap()
                        .into_inner(),
                )
            }
            "EnableKey" => {
                let message = EnableKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                };
                api_key(
                    &client
                        .enable_key(request(message, h))
                        .await
                        .unwrap()
                        .into_inner(),
                )
            }
            "UpdateKey" => {
                let key = &body["key"];
                // A FieldMask in JSON is one string of comma-separated paths.
                let paths = text(&body, "update_mask")
                    .split(',')
                    .filter(|path| !path.is_empty())
                    .map(str::to_owned)
                    .collect();
                let message = UpdateKeyRequest {
                    key: Some(ApiKey {
                        workspace_id: text(key, "workspace_id"),
                        id: text(key, "id"),
                        name: text(key, "name"),
                        scopes: texts(key, "scopes"),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                };
                api_key(
                    &client
                        .update_key(request(message, h))
                        .await
                        .unwrap()
                        .into_inner(),
                )
            }
            "RotateKey" => {
                // A Duration in JSON is seconds with an `s`.
                let grace = text(&body, "grace_period");
                let seconds = grace.strip_suffix('s').unwrap().parse().unwrap();
                let message = RotateKeyRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                    grace_period: Some(prost_types::Duration { seconds, nanos: 0 }),
                };
                let r = client
                    .rotate_key(request(message, h))
                    .await
                    .unwrap()
                    .into_inner();
                object(vec![
                    ("key", r.key.as_ref().map(api_key)),
                    ("secret", Some(json!(r.secret))),
                    ("oldKey", r.old_key.as_ref().map(api_key)),
                ])
            }
            "ListKeyEvents" => {
                let message = ListKeyEventsRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                    page_size: body["page_size"].as_i64().unwrap_or_default() as i32,
                    page_token: text(&body, "page_token"),
                };
                let r = client
                    .list_key_events(request(message, h))
                    .await
                    .unwrap()
                    .into_inner();
                let events = r
                    .events
                    .iter()
                    .map(|e| {
                        object(vec![
                            ("id", Some(json!(e.id))),
                            ("workspaceId", Some(json!(e.workspace_id))),
                            ("keyId", Some(json!(e.key_id))),
                            ("type", Some(json!(e.r#type().as_str_name()))),
                            ("actorId", Some(json!(e.actor_id))),
                            ("actorRole", Some(json!(e.actor_role))),
                            ("createTime", time(&e.create_time)),
                            ("newKeyId", Some(json!(e.new_key_id))),
                            ("changedFields", Some(json!(e.changed_fields))),
                        ])
                    })
                    .collect();
                object(vec![
                    ("events", Some(Value::Array(events))),
                    ("nextPageToken", Some(json!(r.next_page_token))),
                ])
            }
            "GetKeyUsage" => {
                // The README's day stands for the day around this run's clock.
                let now = app.clock_now();
                let at = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: 0,
                };
                let message = GetKeyUsageRequest {
                    workspace_id: text(&body, "workspace_id"),
                    key_id: text(&body, "key_id"),
                    start_time: Some(at(now - chrono::TimeDelta::hours(12))),
                    end_time: Some(at(now + chrono::TimeDelta::hours(12))),
                };
                // Usage is written within the flush interval (2 s).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                let r = loop {
                    let r = client
                        .get_key_usage(request(message.clone(), h))
                        .await
                        .unwrap()
                        .into_inner();
                    if !r.buckets.is_empty() || std::time::Instant::now() > deadline {
                        break r;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                };
                // grpcurl prints int64 as a string, and omits zeros.
                let count = |n: i64| (n != 0).then(|| json!(n.to_string()));
                let buckets = r
                    .buckets
                    .iter()
                    .map(|b| {
                        object(vec![
                            ("startTime", time(&b.start_time)),
                            ("valid", count(b.valid)),
                            ("expired", count(b.expired)),
                            ("disabled", count(b.disabled)),
                            ("deleted", count(b.deleted)),
                            ("insufficientScope", count(b.insufficient_scope)),
                            ("distinctClientIps", count(b.distinct_client_ips)),
                        ])
                    })
                    .collect();
                object(vec![
                    ("buckets", Some(Value::Array(buckets))),
                    ("lastUsedTime", time(&r.last_used_time)),
                    ("lastUsedIp", Some(json!(r.last_used_ip))),
                ])
            }
            other => panic!("the README calls {other}, which this test does not know"),
        };
        assert_matches(&example.expected, &actual, &example.method);
    }
}
