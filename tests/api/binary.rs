//! The `apikeys` binary as an operator runs it: migrate, serve, SIGTERM.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use apikeys::grpc::proto::{
    Expiration, ValidateKeyRequest, ValidationResult, api_keys_client::ApiKeysClient,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{TestDb, as_owner};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_apikeys");

pub(crate) fn command(db: &TestDb) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("APIKEYS_DATABASE_URL", &db.url)
        .env("APIKEYS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A running `apikeys`, killed if the test ends before it exits.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `apikeys` and returns it with the address it logged.
fn start(db: &TestDb) -> (Process, String, std::sync::mpsc::Receiver<String>) {
    start_command(command(db))
}

pub(crate) fn start_command(
    mut command: Command,
) -> (Process, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Process(command.spawn().expect("start apikeys"));
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // With the log scan on, the binary's logs are searched for secrets too.
    let mut scanned = crate::scan::scan_file("logs").map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the log file of the log scan")
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = &mut scanned {
                // One write per line, so lines of other writers never split it.
                let _ = file.write_all(format!("{line}\n").as_bytes());
            }
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("apikeys logs that it serves");
        if let Some(rest) = line.split("serving gRPC").nth(1) {
            let addr = rest
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            return (child, addr, rx);
        }
    }
}

/// Sends SIGTERM and waits for the exit.
pub(crate) async fn terminate(mut child: Process) -> std::process::ExitStatus {
    let signalled = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(20)))
        .await
        .unwrap()
}

/// Sends SIGHUP: reload the TLS files and the callers file.
fn hangup(child: &Process) {
    let status = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) fn wait(child: &mut Process, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "apikeys did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn migrate_runs_the_migrations_and_exits() {
    let db = TestDb::new().await;
    let status = command(&db).arg("migrate").status().unwrap();
    assert!(status.success());
    let store = apikeys::store::Store::connect(&db.url, 4).await.unwrap();
    assert!(
        store.all_rows().await.unwrap().is_empty(),
        "the api_keys table exists"
    );
}

#[tokio::test]
async fn the_binary_serves_and_stops_gracefully_on_sigterm() {
    let db = TestDb::new().await;
    let (mut child, addr, logs) = start(&db);

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.status(), ServingStatus::Serving);
    let mut client = ApiKeysClient::new(crate::scan::Recording(channel.clone()));
    let created = client
        .create_key(as_owner(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "cli".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
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

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // Health tells watchers before the server goes away.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    drop(watch);
    drop(client);
    drop(health);
    drop(channel);
    let status = tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let logged: Vec<String> = logs.try_iter().collect();
    assert!(logged.iter().any(|l| l.contains("stopped")), "{logged:?}");
    assert!(!logged.iter().any(|l| l.contains(&created.secret)));

    // And the key is still there for the next start.
    let (_child, addr, _logs) = start(&db);
    let mut client = ApiKeysClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let response = client
        .validate_key(ValidateKeyRequest {
            key: created.secret,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.result(), ValidationResult::Valid);
}

#[tokio::test]
async fn a_bad_database_url_fails_fast_with_a_message() {
    let mut command = Command::new(BIN);
    let output = command
        .args(["migrate", "--database-url", "nosuchdb://x"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open the database"), "{stderr}");
}

#[tokio::test]
async fn a_token_from_caller_token_new_admits_its_caller_in_its_role() {
    let output = Command::new(BIN)
        .args(["caller-token", "new", "edge-gateway", "--role", "gateway"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("only time it will be shown"), "{printed}");
    let lines: Vec<&str> = printed.lines().filter(|l| !l.starts_with('#')).collect();
    let [token, file_line] = lines[..] else {
        panic!("expected the token and the file line: {printed}")
    };
    crate::scan::remember(token);
    assert!(
        token.starts_with("cct_"),
        "the token is on a line of its own"
    );
    assert!(file_line.starts_with("edge-gateway gateway blake3:"));
    assert!(!file_line.contains(token));
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers");
    std::fs::write(&callers, format!("{file_line}\n")).unwrap();
    let db = TestDb::new().await;
    let mut command = command(&db);
    command.env("APIKEYS_CALLERS_FILE", &callers);
    let (_child, addr, _logs) = start_command(command);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ApiKeysClient::new(channel);
    let with_token = |mut request: tonic::Request<ValidateKeyRequest>| {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let key = || ValidateKeyRequest {
        key: "clo_x".into(),
        ..Default::default()
    };

    let anonymous = client.validate_key(key()).await.unwrap_err();
    let admitted = client
        .validate_key(with_token(tonic::Request::new(key())))
        .await
        .unwrap()
        .into_inner();
    let mut create = as_owner(apikeys::grpc::proto::CreateKeyRequest {
        workspace_id: "acme".into(),
        name: "k".into(),
        expiration: Expiration::Never.into(),
        ..Default::default()
    });
    create
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let denied = client.create_key(create).await.unwrap_err();

    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert_eq!(admitted.result(), ValidationResult::Malformed);
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

#[test]
fn caller_token_new_refuses_a_bad_name_or_role() {
    for args in [
        ["caller-token", "new", "Edge Gateway", "--role", "gateway"],
        ["caller-token", "new", "edge", "--role", "owner"],
    ] {
        let output = Command::new(BIN).args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert!(output.stdout.is_empty(), "no token is printed for {args:?}");
    }
}

#[tokio::test]
async fn sighup_reloads_the_tls_certificate_at_once() {
    use crate::tls::{Ca, TlsDir};
    let (old_ca, new_ca, tls) = (Ca::new("old ca"), Ca::new("new ca"), TlsDir::new());
    tls.write_server(&old_ca);
    let db = TestDb::new().await;
    let mut command = command(&db);
    command
        .env("APIKEYS_TLS_CERT", tls.path("server.pem"))
        .env("APIKEYS_TLS_KEY", tls.path("server.key"))
        // Only the signal can make it reload within this test.
        .env("APIKEYS_TLS_RELOAD_INTERVAL", "30m");
    let (mut child, addr, _logs) = start_command(command);
    let connect = |ca: &Ca| {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
            .domain_name("localhost");
        let endpoint = tonic::transport::Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        async move { endpoint.connect().await }
    };
    assert!(connect(&old_ca).await.is_ok());

    tls.write_server(&new_ca);
    hangup(&child);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while connect(&new_ca).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(child.0.try_wait(), Ok(None)),
        "SIGHUP must not stop the server"
    );
}

#[tokio::test]
async fn insecure_no_caller_auth_is_announced_with_a_warning_at_start() {
    let db = TestDb::new().await;
    let mut command = command(&db);
    command.env("APIKEYS_INSECURE_NO_CALLER_AUTH", "true");

    let mut child = Process(command.spawn().expect("start apikeys"));
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut before_serving = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let serving = line.contains("serving gRPC");
        before_serving.push(line);
        if serving {
            break;
        }
    }

    let warning = before_serving
        .iter()
        .find(|line| line.contains("insecure-no-caller-auth"))
        .unwrap_or_else(|| panic!("no warning names the flag: {before_serving:#?}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        before_serving
            .last()
            .is_some_and(|l| l.contains("serving gRPC")),
        "it still serves"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::new().await;
    let mut server = command(&db);
    server.env("APIKEYS_LOG_FORMAT", "json");
    let mut child = Process(server.spawn().expect("start apikeys"));
    let stderr = child.0.stderr.take().unwrap();
    let (tx, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = logs
            .recv_timeout(Duration::from_secs(30))
            .expect("a log line");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        lines.push(event.clone());
        if event["message"] == "serving gRPC" {
            break event["addr"].as_str().unwrap().to_owned();
        }
    };
    let mut client = ApiKeysClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .validate_key(ValidateKeyRequest {
            key: "clo_nothing".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(client);
    assert!(terminate(child).await.success());
    for line in logs.try_iter() {
        lines.push(
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")),
        );
    }
    for event in &lines {
        assert!(event["timestamp"].is_string(), "{event}");
        assert!(event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    assert!(
        lines
            .iter()
            .any(|e| e["message"] == "key index loaded" && e["keys"] == 0)
    );
    assert!(lines.iter().any(|e| e["message"] == "stopped"));
}

#[cfg(unix)]
#[tokio::test]
async fn a_fresh_sqlite_database_and_its_wal_and_shm_are_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new().await;
    let Some(dir) = db.sqlite_dir().map(std::path::Path::to_path_buf) else {
        return; // PostgreSQL keeps no files of ours.
    };
    // std cannot set a child's umask without unsafe code; a shell can, then becomes apikeys.
    let template = command(&db);
    let mut umasked = Command::new("sh");
    umasked
        .args(["-c", "umask 022 && exec \"$0\""])
        .arg(template.get_program())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in template.get_envs() {
        if let Some(value) = value {
            umasked.env(name, value);
        }
    }
    let (child, addr, _logs) = start_command(umasked);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ApiKeysClient::new(crate::scan::Recording(channel))
        .create_key(as_owner(apikeys::grpc::proto::CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "private".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        }))
        .await
        .unwrap();

    for file in ["apikeys.db", "apikeys.db-wal", "apikeys.db-shm"] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap_or_else(|err| panic!("{file}: {err}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} has mode {mode:o}");
    }
    assert!(terminate(child).await.success());
}

#[cfg(unix)]
#[tokio::test]
async fn a_callers_file_others_may_write_stops_the_binary_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers");
    let line = apikeys::auth::file_line(
        "billing-admin",
        apikeys::auth::CallerRole::Admin,
        &crate::scan::caller_token(),
    );
    std::fs::write(&callers, format!("{line}\n")).unwrap();
    std::fs::set_permissions(&callers, std::fs::Permissions::from_mode(0o666)).unwrap();
    let db = TestDb::new().await;

    let mut child = Process(
        command(&db)
            .env("APIKEYS_CALLERS_FILE", &callers)
            .spawn()
            .unwrap(),
    );
    let status = wait(&mut child, Duration::from_secs(30));

    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    let fix = format!("chmod go-w {}", callers.display());
    assert!(stderr.contains(&fix), "{stderr} should say {fix:?}");
}

#[tokio::test]
async fn sighup_reloads_the_callers_file_at_once() {
    use apikeys::auth::{CallerRole, CallerToken, file_line};
    let (first, second) = (CallerToken::generate(), CallerToken::generate());
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers");
    std::fs::write(
        &callers,
        format!("{}\n", file_line("first", CallerRole::Gateway, &first)),
    )
    .unwrap();
    let db = TestDb::new().await;
    let mut command = command(&db);
    command
        .env("APIKEYS_CALLERS_FILE", &callers)
        // Only the signal can make it reload within this test.
        .env("APIKEYS_CALLERS_RELOAD_INTERVAL", "30m");
    let (mut child, addr, _logs) = start_command(command);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let validate_as = |token: &CallerToken| {
        let mut client = ApiKeysClient::new(channel.clone());
        let mut request = tonic::Request::new(ValidateKeyRequest {
            key: "clo_x".into(),
            ..Default::default()
        });
        let bearer = format!("Bearer {}", token.expose());
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().unwrap());
        async move {
            client
                .validate_key(request)
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(validate_as(&first).await, Ok(()));
    assert_eq!(
        validate_as(&second).await,
        Err(tonic::Code::Unauthenticated)
    );

    std::fs::write(
        &callers,
        format!("{}\n", file_line("second", CallerRole::Gateway, &second)),
    )
    .unwrap();
    hangup(&child);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while validate_as(&second).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the callers file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(validate_as(&first).await, Err(tonic::Code::Unauthenticated));
    assert!(
        matches!(child.0.try_wait(), Ok(None)),
        "SIGHUP must not stop the server"
    );
}
