//! Soak: the `apikeys` binary under minutes of mixed load, as production sees it: gateways
//! validating (hits, unknown and malformed keys, scopes, client IPs) flat out, while an admin
//! backend keeps creating, listing, reading, renaming, disabling, enabling, rotating and
//! deleting keys and reading their events and usage. Every call must succeed, the process's
//! resident memory must level off (growth < 10 % from the end of the warm-up to the end), its
//! database connections and open files must stay within the pool's bounds, and it must still
//! stop cleanly on SIGTERM.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, Expiration,
    GetKeyRequest, GetKeyUsageRequest, ListKeyEventsRequest, ListKeysRequest, RotateKeyRequest,
    UpdateKeyRequest, ValidateKeyRequest, ValidationResult,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::{Response, Status};

use super::{Client, backend, connect, report, scale, server};
use crate::{
    binary::{start_command, terminate},
    support::{TestDb, as_owner},
};

const WORKSPACE: &str = "soak";
/// Keys kept alive at any moment.
const POPULATION: usize = 200;
/// The pool's connections (sqlx's default) and, on PostgreSQL, the change listener's.
const MAX_CONNECTIONS: i64 = 11;

/// Every failed call, by what was called.
#[derive(Debug, Default)]
struct Failures(Mutex<Vec<String>>);

impl Failures {
    fn check<T>(&self, what: &str, answer: Result<Response<T>, Status>) -> Option<T> {
        match answer {
            Ok(response) => Some(response.into_inner()),
            Err(status) => {
                let mut failures = self.0.lock().unwrap_or_else(PoisonError::into_inner);
                failures.push(format!("{what}: {:?} {}", status.code(), status.message()));
                None
            }
        }
    }

    fn wrong(&self, what: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }
}

/// One reading of the process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    open_files: usize,
    /// Connections to the database: server-side on PostgreSQL; on SQLite the descriptors
    /// open on the database's files (its file and WAL for each connection).
    db_connections: i64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc")
        .count()
}

/// Descriptors the process holds on the file `path` or its `-wal` and `-shm` companions.
fn open_on(pid: u32, path: &str) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(path))
        .count() as i64
}

async fn validator(
    mut client: Client,
    secrets: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    failures: Arc<Failures>,
    seed: u64,
) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut calls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        calls += 1;
        let roll = rng.u8(..100);
        let (key, expected) = if roll < 80 {
            let secrets = secrets.lock().unwrap_or_else(PoisonError::into_inner);
            (secrets[rng.usize(..secrets.len())].clone(), None)
        } else if roll < 90 {
            let unknown = apikeys::domain::Secret::generate().expose().to_owned();
            (unknown, Some(ValidationResult::NotFound))
        } else {
            (
                "clo_not-a-key".to_owned(),
                Some(ValidationResult::Malformed),
            )
        };
        let request = ValidateKeyRequest {
            key,
            rate_limits: Vec::new(),
            required_scopes: if rng.bool() {
                vec!["orders:read".into()]
            } else {
                Vec::new()
            },
            client_ip: format!("10.0.{}.{}", rng.u8(..4), rng.u8(1..255)),
            cost: None,
        };
        let Some(answer) = failures.check("ValidateKey", client.validate_key(request).await) else {
            continue;
        };
        // A key of the population may be rotated or deleted meanwhile; any answer for it
        // is a known key's. Unknown and malformed keys must be told apart exactly.
        let result = answer.result();
        let fine = match expected {
            Some(expected) => result == expected,
            None => !matches!(
                result,
                ValidationResult::NotFound | ValidationResult::Malformed
            ),
        };
        if !fine {
            failures.wrong(format!(
                "ValidateKey answered {result:?}, expected {expected:?}"
            ));
        }
        // A gateway's pace, not a busy loop: the two cores are shared with the server and,
        // in `cargo test`, with other tests.
        if calls.is_multiple_of(4) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    calls
}

/// The admin backend: a round of every management call, twice a second.
async fn manager(
    mut client: Client,
    secrets: Arc<Mutex<Vec<String>>>,
    mut keys: Vec<ApiKey>,
    stop: Arc<AtomicBool>,
    failures: Arc<Failures>,
) -> u64 {
    let (mut calls, mut round) = (0u64, 0u64);
    let ws = || WORKSPACE.to_owned();
    let now = chrono::Utc::now();
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        // Replace the oldest key with a new one, rotating every fourth instead.
        let oldest = keys.remove(0);
        let which = |secrets: &Vec<String>, masked: &str| {
            secrets
                .iter()
                .position(|s| s.ends_with(&masked[masked.len() - 4..]))
        };
        let fresh = if round % 4 == 0 {
            let request = RotateKeyRequest {
                workspace_id: ws(),
                key_id: oldest.id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            };
            calls += 1;
            failures
                .check("RotateKey", client.rotate_key(as_owner(request)).await)
                .map(|r| (r.key.unwrap(), r.secret))
        } else {
            let request = CreateKeyRequest {
                workspace_id: ws(),
                name: format!("soak {round}"),
                expiration: Expiration::Expiration30Days.into(),
                scopes: vec!["orders:read".into()],
                ..Default::default()
            };
            calls += 1;
            failures
                .check("CreateKey", client.create_key(as_owner(request)).await)
                .map(|r| (r.key.unwrap(), r.secret))
        };
        let request = DeleteKeyRequest {
            workspace_id: ws(),
            key_id: oldest.id.clone(),
            ..Default::default()
        };
        calls += 1;
        failures.check("DeleteKey", client.delete_key(as_owner(request)).await);
        {
            let mut secrets = secrets.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = which(&secrets, &oldest.masked_key) {
                secrets.swap_remove(at);
            }
            if let Some((key, secret)) = fresh {
                secrets.push(secret);
                keys.push(key);
            }
        }
        let Some(key) = keys.get(round as usize % keys.len()).cloned() else {
            continue;
        };
        let target = || (ws(), key.id.clone());
        let request = ListKeysRequest {
            workspace_id: ws(),
            page_size: 50,
            page_token: String::new(),
            ..Default::default()
        };
        failures.check("ListKeys", client.list_keys(as_owner(request)).await);
        let (workspace_id, key_id) = target();
        let request = GetKeyRequest {
            workspace_id,
            key_id,
        };
        failures.check("GetKey", client.get_key(as_owner(request)).await);
        let request = UpdateKeyRequest {
            key: Some(ApiKey {
                workspace_id: ws(),
                id: key.id.clone(),
                name: format!("renamed {round}"),
                ..Default::default()
            }),
            update_mask: None,
        };
        failures.check("UpdateKey", client.update_key(as_owner(request)).await);
        let (workspace_id, key_id) = target();
        let request = DisableKeyRequest {
            workspace_id,
            key_id,
            ..Default::default()
        };
        failures.check("DisableKey", client.disable_key(as_owner(request)).await);
        let (workspace_id, key_id) = target();
        let request = EnableKeyRequest {
            workspace_id,
            key_id,
            ..Default::default()
        };
        failures.check("EnableKey", client.enable_key(as_owner(request)).await);
        let request = ListKeyEventsRequest {
            workspace_id: ws(),
            page_size: 50,
            ..Default::default()
        };
        failures.check(
            "ListKeyEvents",
            client.list_key_events(as_owner(request)).await,
        );
        let request = GetKeyUsageRequest {
            workspace_id: ws(),
            key_id: key.id.clone(),
            start_time: Some(prost_types::Timestamp {
                seconds: (now - chrono::TimeDelta::hours(1)).timestamp(),
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: (now + chrono::TimeDelta::hours(2)).timestamp(),
                nanos: 0,
            }),
        };
        failures.check("GetKeyUsage", client.get_key_usage(as_owner(request)).await);
        calls += 8;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    calls
}

#[test]
fn minutes_of_mixed_load_fail_nothing_and_leak_nothing() {
    super::quietly(async {
        let length = scale(Duration::from_secs(60), Duration::from_secs(600));
        let warm_up = length / 5;
        let db = TestDb::new().await;
        let (server, addr, _logs) = start_command(server(&db));
        let pid = server.0.id();
        let mut client = connect(&addr).await;
        let observer = match backend() {
            "postgresql" => Some(Database::connect(db.url.as_str()).await.unwrap()),
            _ => None,
        };
        let sqlite_file = db
            .sqlite_dir()
            .map(|dir| dir.join("apikeys.db").display().to_string());

        let mut keys = Vec::new();
        let mut secrets = Vec::new();
        for i in 0..POPULATION {
            let request = CreateKeyRequest {
                workspace_id: WORKSPACE.into(),
                name: format!("soak {i}"),
                expiration: Expiration::Never.into(),
                scopes: if i % 2 == 0 {
                    vec!["orders:read".into()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            };
            let created = client
                .create_key(as_owner(request))
                .await
                .unwrap()
                .into_inner();
            keys.push(created.key.unwrap());
            secrets.push(created.secret);
        }
        let secrets = Arc::new(Mutex::new(secrets));
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Failures::default());
        let validators: Vec<_> = (0..4)
            .map(|seed| {
                let (client, secrets) = (client.clone(), secrets.clone());
                let (stop, failures) = (stop.clone(), failures.clone());
                tokio::spawn(validator(client, secrets, stop, failures, seed))
            })
            .collect();
        let manager = tokio::spawn(manager(
            client.clone(),
            secrets.clone(),
            keys,
            stop.clone(),
            failures.clone(),
        ));

        let started = Instant::now();
        let mut samples = Vec::new();
        while started.elapsed() < length {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let db_connections = match &observer {
                Some(observer) => {
                    let row = observer
                        .query_one_raw(Statement::from_string(
                            observer.get_database_backend(),
                            "SELECT count(*) AS n FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        ))
                        .await
                        .unwrap()
                        .unwrap();
                    row.try_get::<i64>("", "n").unwrap()
                }
                None => open_on(pid, sqlite_file.as_deref().unwrap()),
            };
            samples.push(Sample {
                at: started.elapsed(),
                rss_kib: rss_kib(pid),
                open_files: open_files(pid),
                db_connections,
            });
        }
        stop.store(true, Ordering::Relaxed);
        let mut validations = 0;
        for validator in validators {
            validations += validator.await.unwrap();
        }
        let management = manager.await.unwrap();
        drop(client);
        let status = terminate(server).await;
        assert!(status.success(), "apikeys exited {status:?} after the soak");

        let failures = failures.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(
            failures.is_empty(),
            "{} failed calls, the first: {:#?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        let settled: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm_up).collect();
        // RSS at the end of the warm-up and at the end: medians of five samples, not one.
        let median = |window: &[&Sample]| {
            let mut rss: Vec<u64> = window.iter().map(|s| s.rss_kib).collect();
            rss.sort_unstable();
            rss[rss.len() / 2]
        };
        let (first, last) = (median(&settled[..5]), median(&settled[settled.len() - 5..]));
        let peak = settled.iter().map(|s| s.rss_kib).max().unwrap();
        let growth = (last as f64 - first as f64) / first as f64;
        assert!(
            growth < 0.10,
            "RSS grew {:.1} % after the warm-up: {first} KiB → {last} KiB",
            growth * 100.0
        );
        let files: Vec<usize> = settled.iter().map(|s| s.open_files).collect();
        let (min_files, max_files) = (*files.iter().min().unwrap(), *files.iter().max().unwrap());
        // Descriptors: the listener, the database connections (SQLite: a file and its WAL and
        // shared memory per connection), the client's connection; none may pile up.
        assert!(
            max_files - min_files <= 3 * MAX_CONNECTIONS as usize,
            "open files went from {min_files} to {max_files}"
        );
        // Connections: within the pool's bound, and not growing: the pool opens one more under
        // a burst and closes it only after 10 idle minutes (sqlx's default, longer than this
        // run), so the second half may hold one more than the first ever did (seen on
        // PostgreSQL under the whole suite: 6 throughout the first half, 7 throughout the
        // second); a pool that leaked them would keep growing past that.
        let db_connections: Vec<i64> = settled.iter().map(|s| s.db_connections).collect();
        let (early, late) = db_connections.split_at(db_connections.len() / 2);
        let (min_db, max_db) = (
            *db_connections.iter().min().unwrap(),
            *db_connections.iter().max().unwrap(),
        );
        let per_connection = if observer.is_some() { 1 } else { 3 };
        assert!(
            max_db <= MAX_CONNECTIONS * per_connection,
            "{max_db} connections to the database, more than the pool holds"
        );
        assert!(
            late.iter().min().copied() <= early.iter().max().map(|most| most + 1),
            "database connections grew: {early:?} then {late:?}"
        );
        let trend = samples
            .iter()
            .step_by((samples.len() / 10).max(1))
            .map(|s| format!("{:.1}", s.rss_kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ");
        report(
            "soak",
            format_args!(
                "{length:?} of mixed load: {validations} validations ({:.0}/s) and {management} management calls, \
             0 failed; RSS {} KiB after the {warm_up:?} warm-up, {} KiB at the end ({:+.1} %, peak {peak} KiB); \
             RSS in MiB by tenths of the run: {trend}; open files {min_files}–{max_files}; \
             database connections {}; SIGTERM: exit 0",
                validations as f64 / length.as_secs_f64(),
                first,
                last,
                growth * 100.0,
                if observer.is_some() {
                    format!("{min_db}–{max_db} (PostgreSQL's count; a pool of 10 and the listener)")
                } else {
                    format!(
                        "{min_db}–{max_db} descriptors on the database's files (the file, its WAL and shared memory per connection)"
                    )
                },
            ),
        );
    })
}
