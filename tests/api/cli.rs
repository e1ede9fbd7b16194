//! The operator CLI: the real binary against a real server.

use std::io::Write;

use apikeys::{
    cli::{DELETE_WARNING, SHOWN_ONCE_WARNING},
    grpc::proto::ValidationResult,
};
use serde_json::Value;

use crate::{scan::remember, security::spawn_guarded, support::spawn_app};

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| panic!("{err}: {self:?}"))
    }
}

/// Runs `apikeys ARGS` with `stdin` and nothing from this process's environment but `env`.
/// `apikeys keys ARGS --addr ADDR`, with `stdin`.
async fn keys_at(addr: &str, args: &[&str], stdin: &str) -> Run {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend(["--addr", addr]);
    apikeys(&all, stdin, &[]).await
}

async fn apikeys(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_apikeys"))
            .args(&args)
            .env_clear()
            // Whose name the CLI acts in by default (`operator:$USER`); `env` may change it.
            .env("USER", "tester")
            .envs(env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run apikeys");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn create_list_validate_and_delete_through_the_cli() {
    let mut app = spawn_app().await;
    let addr = format!("http://{}", app.addr);
    fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all
    }
    let connection = ["--addr", addr.as_str(), "--actor-id", "ops_alice"];

    // JSON: the key and its secret.
    let mut args = with(&[
        "create",
        "--workspace",
        "acme",
        "--name",
        "Zapier integration",
    ]);
    args.extend(["--expires", "90d", "--scope", "orders:read", "--json"]);
    args.extend(connection);
    let created = apikeys(&args, "", &[]).await;
    assert_eq!(created.code, 0, "{created:?}");
    let created = created.json();
    let secret = created["secret"].as_str().unwrap().to_owned();
    remember(&secret);
    let key_id = created["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["key"]["createdBy"], "ops_alice");
    assert_eq!(created["key"]["status"], "KEY_STATUS_ACTIVE");
    assert_eq!(created["key"]["scopes"][0], "orders:read");
    assert!(created["key"]["expireTime"].is_string());
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    // Text: the secret alone on standard output, the warning beside it.
    let mut args = with(&["create", "--workspace", "acme", "--name", "script"]);
    args.extend(["--expires", "never"]);
    args.extend(connection);
    let text = apikeys(&args, "", &[("USER", "bob")]).await;
    assert_eq!(text.code, 0, "{text:?}");
    let second = text.stdout.trim_end().to_owned();
    remember(&second);
    assert_eq!(text.stdout, format!("{second}\n"));
    assert!(text.stderr.contains(SHOWN_ONCE_WARNING), "{text:?}");
    assert!(text.stderr.contains("expires Never"), "{text:?}");
    assert_eq!(
        app.validate(&second).await.result(),
        ValidationResult::Valid
    );

    // The list, as JSON and as the product's table; never a secret.
    let mut args = with(&["list", "--workspace", "acme", "--json"]);
    args.extend(connection);
    let listed = apikeys(&args, "", &[]).await;
    let keys = listed.json()["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == key_id.as_str())
    );
    let mut args = with(&["list", "--workspace", "acme"]);
    args.extend(connection);
    let table = apikeys(&args, "", &[]).await;
    assert_eq!(table.code, 0, "{table:?}");
    let header = table.stdout.lines().next().unwrap();
    for column in [
        "ID",
        "Name",
        "Key",
        "Created",
        "Expires",
        "Status",
        "Last used",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(table.stdout.contains("Zapier integration"));
    assert!(
        table
            .stdout
            .contains(&format!("clo_********{}", &secret[38..]))
    );
    assert!(table.stdout.contains("Active"));
    for output in [&listed.stdout, &table.stdout] {
        assert!(!output.contains(&secret) && !output.contains(&second));
    }

    // Validate reads the key from standard input; the exit code tells.
    let mut args = with(&["validate", "--json"]);
    args.extend(connection);
    let valid = apikeys(&args, &format!("{secret}\n"), &[]).await;
    assert_eq!(valid.code, 0, "{valid:?}");
    assert_eq!(valid.json()["result"], "VALIDATION_RESULT_VALID");
    assert_eq!(valid.json()["keyId"], key_id.as_str());
    let mut args = with(&["validate", "--require-scope", "refunds:write"]);
    args.extend(connection);
    let refused = apikeys(&args, &secret, &[]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stdout.starts_with("INSUFFICIENT_SCOPE"),
        "{refused:?}"
    );

    // Delete asks first, with the product's warning; only a yes deletes.
    let mut args = with(&["delete", "--workspace", "acme", key_id.as_str()]);
    args.extend(connection);
    let kept = apikeys(&args, "no\n", &[]).await;
    assert_eq!(kept.code, 1, "{kept:?}");
    assert!(kept.stderr.contains(DELETE_WARNING), "{kept:?}");
    assert!(kept.stderr.contains("Zapier integration"), "{kept:?}");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );
    let deleted = apikeys(&args, "delete\n", &[]).await;
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Deleted
    );

    let mut args = with(&["validate"]);
    args.extend(connection);
    let gone = apikeys(&args, &secret, &[]).await;
    assert_eq!(gone.code, 1);
    assert!(gone.stdout.starts_with("DELETED"), "{gone:?}");
}

#[tokio::test]
async fn cli_errors_say_what_went_wrong_and_exit_2() {
    let app = spawn_app().await;
    let addr = format!("http://{}", app.addr);

    let missing = apikeys(
        &[
            "keys",
            "delete",
            "--workspace",
            "acme",
            "key_00000000000000000000",
            "--yes",
            "--addr",
            &addr,
        ],
        "",
        &[],
    )
    .await;
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("KEY_NOT_FOUND"), "{missing:?}");

    let member = apikeys(
        &[
            "keys",
            "list",
            "--workspace",
            "acme",
            "--actor-role",
            "member",
            "--addr",
            &addr,
        ],
        "",
        &[],
    )
    .await;
    assert_eq!(member.code, 2, "{member:?}");
    assert!(member.stderr.contains("ROLE_NOT_ALLOWED"), "{member:?}");

    // Nothing listens on port 9 of loopback.
    let unreachable = apikeys(
        &[
            "keys",
            "list",
            "--workspace",
            "acme",
            "--addr",
            "http://127.0.0.1:9",
        ],
        "",
        &[],
    )
    .await;
    assert_eq!(unreachable.code, 2, "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("cannot reach"),
        "{unreachable:?}"
    );
}

#[tokio::test]
async fn the_cli_presents_a_caller_token_from_the_environment() {
    let guarded = spawn_guarded(|_| {}).await;
    let addr = format!("http://{}", guarded.app.addr);
    let args = [
        "keys",
        "create",
        "--workspace",
        "acme",
        "--name",
        "k",
        "--expires",
        "30d",
        "--addr",
        &addr,
    ];

    let refused = apikeys(&args, "", &[]).await;
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("CALLER_UNAUTHENTICATED"),
        "{refused:?}"
    );

    let gateway = apikeys(
        &args,
        "",
        &[("APIKEYS_CALLER_TOKEN", guarded.gateway.expose())],
    )
    .await;
    assert_eq!(gateway.code, 2, "{gateway:?}");
    assert!(
        gateway.stderr.contains("CALLER_ROLE_NOT_ALLOWED"),
        "{gateway:?}"
    );

    let admin = apikeys(
        &args,
        "",
        &[("APIKEYS_CALLER_TOKEN", guarded.admin.expose())],
    )
    .await;
    assert_eq!(admin.code, 0, "{admin:?}");
    remember(admin.stdout.trim());
    for output in [&admin.stdout, &admin.stderr, &gateway.stderr] {
        assert!(!output.contains(guarded.admin.expose()));
        assert!(!output.contains(guarded.gateway.expose()));
    }
}

#[tokio::test]
async fn get_disable_enable_and_rotate_through_the_cli() {
    let mut app = spawn_app().await;
    let addr = format!("http://{}", app.addr);
    let (key, secret) = app
        .create_key(
            "acme",
            "rolling",
            apikeys::grpc::proto::Expiration::Expiration30Days,
        )
        .await;
    let run = |verb: &'static str, extra: &'static [&'static str]| {
        let mut args = vec!["keys", verb, "--workspace", "acme"];
        args.push(key.id.as_str());
        args.extend_from_slice(extra);
        args.extend(["--addr", addr.as_str()]);
        args
    };

    let shown = apikeys(&run("get", &["--json"]), "", &[]).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    assert_eq!(shown.json()["name"], "rolling");
    assert_eq!(shown.json()["status"], "KEY_STATUS_ACTIVE");

    let disabled = apikeys(&run("disable", &[]), "", &[]).await;
    assert_eq!(disabled.code, 0, "{disabled:?}");
    assert!(disabled.stdout.contains("Disabled"), "{disabled:?}");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Disabled
    );

    let enabled = apikeys(&run("enable", &["--json"]), "", &[]).await;
    assert_eq!(enabled.json()["status"], "KEY_STATUS_ACTIVE");
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    // Text: the new secret alone on standard output, the warning and the old key's end beside.
    let rotated = apikeys(&run("rotate", &["--grace", "1h"]), "", &[]).await;
    assert_eq!(rotated.code, 0, "{rotated:?}");
    let new_secret = rotated.stdout.trim_end().to_owned();
    remember(&new_secret);
    assert_eq!(rotated.stdout, format!("{new_secret}\n"));
    assert!(rotated.stderr.contains(SHOWN_ONCE_WARNING), "{rotated:?}");
    assert_eq!(
        app.validate(&new_secret).await.result(),
        ValidationResult::Valid
    );
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Valid
    );

    // A second rotation of the same key is refused, with its reason.
    let again = apikeys(&run("rotate", &["--grace", "0s", "--json"]), "", &[]).await;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("KEY_ROTATED"), "{again:?}");
    let bad = apikeys(&run("rotate", &["--grace", "8d"]), "", &[]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("GRACE_PERIOD_INVALID"), "{bad:?}");

    // The audit trail and the usage, as the Logs page shows them.
    let logs = |verb: &'static str, extra: &[&str]| {
        let mut args = vec!["keys", verb, "--workspace", "acme", "--addr", addr.as_str()];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = logs("events", &["--key", key.id.as_str()]);
    let events = apikeys(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "",
        &[],
    )
    .await;
    assert_eq!(events.code, 0, "{events:?}");
    let words: Vec<&str> = events
        .stdout
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(words, ["rotated", "enabled", "disabled", "created"]);
    assert!(events.stdout.contains("replaced by key_"), "{events:?}");
    let args = logs("events", &["--limit", "1", "--json"]);
    let events = apikeys(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "",
        &[],
    )
    .await;
    assert_eq!(events.json()["events"].as_array().unwrap().len(), 1);
    assert_eq!(events.json()["events"][0]["type"], "KEY_EVENT_TYPE_ROTATED");
    let args = logs("usage", &[key.id.as_str(), "--json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let usage = loop {
        let usage = apikeys(&args, "", &[]).await;
        assert_eq!(usage.code, 0, "{usage:?}");
        // int64 counts are strings in the proto3 JSON mapping, and absent at 0.
        let count = |value: &Value| value.as_str().map_or(0, |n| n.parse::<i64>().unwrap());
        let buckets = usage.json()["buckets"].clone();
        let counted: i64 = buckets
            .as_array()
            .map(|buckets| {
                buckets
                    .iter()
                    .map(|hour| count(&hour["valid"]) + count(&hour["disabled"]))
                    .sum()
            })
            .unwrap_or(0);
        if counted == 3 || std::time::Instant::now() > deadline {
            break usage;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(usage.json()["buckets"][0]["valid"], "2", "{usage:?}");
    assert_eq!(usage.json()["buckets"][0]["disabled"], "1", "{usage:?}");
    let args = logs("usage", &[key.id.as_str()]);
    let table = apikeys(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "",
        &[],
    )
    .await;
    assert!(table.stdout.starts_with("Hour"), "{table:?}");
    assert!(table.stdout.contains("Last used: 20"), "{table:?}");

    app.clock.advance(chrono::TimeDelta::hours(1));
    assert_eq!(
        app.validate(&secret).await.result(),
        ValidationResult::Expired
    );
    assert_eq!(
        app.validate(&new_secret).await.result(),
        ValidationResult::Valid
    );
}

#[tokio::test]
async fn the_cli_updates_keys_takes_dates_and_bare_addresses_and_asks_before_it_assumes() {
    let app = spawn_app().await;
    // No scheme: http:// is meant.
    let addr = app.addr.to_string();
    let keys = |args: &[&str]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend(["--addr", addr.as_str()]);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>,
               stdin: &'static str,
               env: &'static [(&'static str, &'static str)]| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        apikeys(&args, stdin, env).await
    };

    // An expiry given as a date: midnight UTC that day.
    let created = run(
        keys(&[
            "create",
            "--workspace",
            "acme",
            "--name",
            "dated",
            "--expires",
            "2027-06-30",
            "--json",
        ]),
        "",
        &[],
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    remember(created.json()["secret"].as_str().unwrap());
    let key = created.json()["key"].clone();
    assert_eq!(key["expireTime"], "2027-06-30T00:00:00Z", "{created:?}");
    assert_eq!(key["createdBy"], "operator:tester");
    let id = key["id"].as_str().unwrap().to_owned();
    let bad_date = run(
        keys(&[
            "create",
            "--workspace",
            "acme",
            "--name",
            "x",
            "--expires",
            "June",
        ]),
        "",
        &[],
    )
    .await;
    assert_eq!(bad_date.code, 2, "{bad_date:?}");
    assert!(
        bad_date.stderr.contains("2027-06-30T00:00:00Z"),
        "{bad_date:?}"
    );

    // Update: the name and the scopes, each only when given.
    let renamed = run(
        keys(&[
            "update",
            "--workspace",
            "acme",
            &id,
            "--name",
            "renamed",
            "--scope",
            "a:read",
            "--json",
        ]),
        "",
        &[],
    )
    .await;
    assert_eq!(renamed.code, 0, "{renamed:?}");
    assert_eq!(renamed.json()["name"], "renamed");
    assert_eq!(renamed.json()["scopes"], serde_json::json!(["a:read"]));
    let cleared = run(
        keys(&[
            "update",
            "--workspace",
            "acme",
            &id,
            "--clear-scopes",
            "--json",
        ]),
        "",
        &[],
    )
    .await;
    assert_eq!(cleared.json()["name"], "renamed", "{cleared:?}");
    assert!(cleared.json().get("scopes").is_none(), "{cleared:?}");
    let nothing = run(keys(&["update", "--workspace", "acme", &id]), "", &[]).await;
    assert_eq!(nothing.code, 2, "{nothing:?}");
    assert!(nothing.stderr.contains("nothing to change"), "{nothing:?}");

    // Rotation needs its grace said out loud.
    let rotate = run(keys(&["rotate", "--workspace", "acme", &id]), "", &[]).await;
    assert_eq!(rotate.code, 2, "{rotate:?}");
    assert!(rotate.stderr.contains("--grace"), "{rotate:?}");

    // Deletion needs exactly `delete` or `yes`: `y` keeps the key.
    let kept = run(keys(&["delete", "--workspace", "acme", &id]), "y\n", &[]).await;
    assert_eq!(kept.code, 1, "{kept:?}");
    assert!(kept.stderr.contains("Not deleted"), "{kept:?}");

    // Without USER and without --actor-id, nobody is recorded as acting: refused.
    let anonymous = run(keys(&["list", "--workspace", "acme"]), "", &[("USER", "")]).await;
    assert_eq!(anonymous.code, 2, "{anonymous:?}");
    assert!(anonymous.stderr.contains("--actor-id"), "{anonymous:?}");

    let deleted = run(
        keys(&["delete", "--workspace", "acme", &id, "--json"]),
        "yes\n",
        &[],
    )
    .await;
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(deleted.json(), serde_json::json!({}));

    // Each subcommand's help shows its own flags, every one explained.
    let help = run(
        vec!["keys".into(), "delete".into(), "--help".into()],
        "",
        &[],
    )
    .await;
    assert_eq!(help.code, 0, "{help:?}");
    assert!(!help.stdout.contains("--listen"), "{}", help.stdout);
    assert!(!help.stdout.contains("--retention"), "{}", help.stdout);
    let words = help.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    for explained in [
        "<KEY_ID> The key's id",
        "--workspace <WORKSPACE> The workspace",
    ] {
        assert!(words.contains(explained), "{explained}: {}", help.stdout);
    }
}

#[tokio::test]
async fn the_cli_sets_owners_annotations_and_networks_and_respects_etags() {
    let app = spawn_app().await;
    let addr = app.addr.to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend(["--addr", addr.as_str()]);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            apikeys(&args, "", &[]).await
        }
    };
    let created = run(&[
        "create",
        "--workspace",
        "acme",
        "--name",
        "partner",
        "--expires",
        "never",
        "--owner",
        "partner_17",
        "--annotation",
        "plan=enterprise",
        "--annotation",
        "note=a=b",
        "--allow-cidr",
        "203.0.113.0/24",
        "--json",
    ])
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let secret = created.json()["secret"].as_str().unwrap().to_owned();
    remember(&secret);
    let key = created.json()["key"].clone();
    assert_eq!(key["ownerId"], "partner_17");
    assert_eq!(key["annotations"]["plan"], "enterprise");
    assert_eq!(key["annotations"]["note"], "a=b", "split at the first '='");
    assert_eq!(key["allowedCidrs"][0], "203.0.113.0/24");
    let (id, etag) = (
        key["id"].as_str().unwrap().to_owned(),
        key["etag"].as_str().unwrap().to_owned(),
    );

    // The table view of one key shows what the row leaves out.
    let shown = run(&["get", "--workspace", "acme", &id]).await;
    assert!(shown.stdout.contains("Owner: partner_17"), "{shown:?}");
    assert!(
        shown
            .stdout
            .contains("Annotations: note=a=b, plan=enterprise")
    );
    assert!(shown.stdout.contains("Allowed from: 203.0.113.0/24"));
    assert!(shown.stdout.contains(&format!("Etag: {etag}")));

    let validate = |ip: &'static str| {
        let args = [
            "keys",
            "validate",
            "--client-ip",
            ip,
            "--addr",
            addr.as_str(),
        ]
        .map(str::to_owned);
        let secret = secret.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            apikeys(&args, &secret, &[]).await
        }
    };
    let inside = validate("203.0.113.9").await;
    assert_eq!(inside.code, 0, "{inside:?}");
    let outside = validate("198.51.100.1").await;
    assert_eq!(outside.code, 1, "{outside:?}");
    assert!(outside.stdout.starts_with("IP_NOT_ALLOWED"), "{outside:?}");

    // Clear the networks with the current etag; the old etag then refuses a change.
    let cleared = run(&[
        "update",
        "--workspace",
        "acme",
        &id,
        "--clear-cidrs",
        "--owner",
        "partner_18",
        "--etag",
        &etag,
        "--json",
    ])
    .await;
    assert_eq!(cleared.code, 0, "{cleared:?}");
    assert!(cleared.json()["allowedCidrs"].is_null(), "{cleared:?}");
    assert_eq!(cleared.json()["ownerId"], "partner_18");
    assert_eq!(cleared.json()["annotations"]["plan"], "enterprise");
    assert_eq!(validate("198.51.100.1").await.code, 0);
    let stale = run(&["disable", "--workspace", "acme", &id, "--etag", &etag]).await;
    assert_eq!(stale.code, 2, "{stale:?}");
    assert!(stale.stderr.contains("ETAG_MISMATCH"), "{stale:?}");

    let by_owner = run(&[
        "list",
        "--workspace",
        "acme",
        "--owner",
        "partner_18",
        "--json",
    ])
    .await;
    assert_eq!(
        by_owner.json()["keys"][0]["id"],
        id.as_str(),
        "{by_owner:?}"
    );
    let other = run(&[
        "list",
        "--workspace",
        "acme",
        "--owner",
        "partner_17",
        "--json",
    ])
    .await;
    assert!(other.json()["keys"].is_null(), "{other:?}");
}

#[tokio::test]
async fn the_cli_sets_and_clears_rate_limits_and_spends_from_them() {
    let app = spawn_app().await;
    let addr = app.addr.to_string();
    let run = |args: &[&str], stdin: &str| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend(["--addr", addr.as_str()]);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        let stdin = stdin.to_owned();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            apikeys(&args, &stdin, &[]).await
        }
    };
    let created = run(
        &[
            "create",
            "--workspace",
            "acme",
            "--name",
            "metered",
            "--expires",
            "never",
            "--rate-limit",
            "requests=100/1h,auto",
            "--rate-limit",
            "exports=1/1d",
            "--json",
        ],
        "",
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let secret = created.json()["secret"].as_str().unwrap().to_owned();
    remember(&secret);
    let key = created.json()["key"].clone();
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(key["rateLimits"][0]["name"], "exports");
    assert_eq!(key["rateLimits"][0]["window"], "86400s");
    assert_eq!(key["rateLimits"][1]["limit"], "100");
    assert_eq!(key["rateLimits"][1]["autoApply"], true);
    let shown = run(&["get", "--workspace", "acme", &id], "").await;
    assert!(
        shown
            .stdout
            .contains("Rate limits: exports=1/86400s, requests=100/3600s,auto"),
        "{shown:?}"
    );

    let export = run(&["validate", "--rate-limit", "exports"], &secret).await;
    assert_eq!(export.code, 0, "{export:?}");
    assert!(
        export
            .stdout
            .contains("rate limit exports: 0 of 1 left until"),
        "{export:?}"
    );
    assert!(
        export
            .stdout
            .contains("rate limit requests: 99 of 100 left")
    );
    let again = run(&["validate", "--rate-limit", "exports=1"], &secret).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stdout.starts_with("RATE_LIMITED"), "{again:?}");
    assert!(again.stdout.contains("retry after "), "{again:?}");
    assert!(!again.stdout.contains(&secret) && !again.stderr.contains(&secret));

    for bad in [
        "requests=0/1h",
        "requests=5/0s",
        "Requests=5/1h",
        "requests=5",
    ] {
        let refused = run(
            &["update", "--workspace", "acme", &id, "--rate-limit", bad],
            "",
        )
        .await;
        assert_eq!(refused.code, 2, "{bad}: {refused:?}");
    }
    let cleared = run(
        &[
            "update",
            "--workspace",
            "acme",
            &id,
            "--clear-rate-limits",
            "--json",
        ],
        "",
    )
    .await;
    assert_eq!(cleared.code, 0, "{cleared:?}");
    assert!(cleared.json()["rateLimits"].is_null(), "{cleared:?}");
    let free = run(&["validate", "--rate-limit", "exports"], &secret).await;
    assert_eq!(free.code, 0, "{free:?}");
    assert!(!free.stdout.contains("rate limit"), "{free:?}");
}

#[tokio::test]
async fn the_cli_sets_refills_and_clears_credits_and_spends_them() {
    let app = spawn_app().await;
    let addr = app.addr.to_string();
    let created = keys_at(
        &addr,
        &[
            "create",
            "--workspace",
            "acme",
            "--name",
            "metered",
            "--expires",
            "never",
            "--credits",
            "10",
            "--refill",
            "500/monthly:15",
            "--json",
        ],
        "",
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let secret = created.json()["secret"].as_str().unwrap().to_owned();
    remember(&secret);
    let key = created.json()["key"].clone();
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(key["credits"]["remaining"], "10");
    assert_eq!(key["credits"]["refill"]["amount"], "500");
    assert_eq!(
        key["credits"]["refill"]["interval"],
        "REFILL_INTERVAL_MONTHLY"
    );
    assert_eq!(key["credits"]["refill"]["dayOfMonth"], 15);

    let spent = keys_at(&addr, &["validate", "--cost", "4"], &secret).await;
    assert_eq!(spent.code, 0, "{spent:?}");
    assert!(spent.stdout.contains("credits: 6 left"), "{spent:?}");
    let shown = keys_at(&addr, &["get", "--workspace", "acme", &id], "").await;
    assert!(
        shown
            .stdout
            .contains("Credits: 6 left, refilled to 500 on day 15 of each month"),
        "{shown:?}"
    );
    let refused = keys_at(&addr, &["validate", "--cost", "7", "--json"], &secret).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert_eq!(refused.json()["result"], "VALIDATION_RESULT_USAGE_EXCEEDED");
    assert_eq!(refused.json()["creditsRemaining"], "6");

    // A new balance, refilled daily; then none at all.
    let daily = keys_at(
        &addr,
        &[
            "update",
            "--workspace",
            "acme",
            &id,
            "--credits",
            "0",
            "--refill",
            "3/daily",
        ],
        "",
    )
    .await;
    assert_eq!(daily.code, 0, "{daily:?}");
    assert!(
        daily
            .stdout
            .contains("Credits: 0 left, refilled to 3 each day"),
        "{daily:?}"
    );
    let empty = keys_at(&addr, &["validate", "--cost", "0"], &secret).await;
    assert_eq!(empty.code, 1, "{empty:?}");
    assert!(empty.stdout.starts_with("USAGE_EXCEEDED"), "{empty:?}");
    for bad in [
        &["--credits", "-1"][..],
        &["--credits", "5", "--refill", "3/weekly"],
        &["--credits", "5", "--refill", "3/monthly:40"],
        &["--refill", "3/daily"],
        &["--credits", "5", "--clear-credits"],
    ] {
        let mut args = vec!["update", "--workspace", "acme", id.as_str()];
        args.extend_from_slice(bad);
        let refused = keys_at(&addr, &args, "").await;
        assert_eq!(refused.code, 2, "{bad:?}: {refused:?}");
    }
    let cleared = keys_at(
        &addr,
        &[
            "update",
            "--workspace",
            "acme",
            &id,
            "--clear-credits",
            "--json",
        ],
        "",
    )
    .await;
    assert_eq!(cleared.code, 0, "{cleared:?}");
    assert!(cleared.json().get("credits").is_none(), "{cleared:?}");
    let free = keys_at(&addr, &["validate", "--cost", "1000"], &secret).await;
    assert_eq!(free.code, 0, "{free:?}");
    assert!(!free.stdout.contains("credits:"), "{free:?}");
}
