//! A PostgreSQL outage under load: a PostgreSQL server of the test's own is stopped
//! (`pg_ctl stop -m immediate`, as a crash) and restarted while validators and writers keep
//! calling. No answer is ever a false VALID; validations are served from memory within the
//! staleness bound, then fail closed with UNAVAILABLE; no write is acknowledged while the
//! database is down, and every acknowledged write is there afterwards; the time to recover
//! is measured. PostgreSQL only (an embedded SQLite file cannot go away); it needs
//! PostgreSQL's server binaries, which a PostgreSQL run of the suite has.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apikeys::{
    clock::ManualClock,
    grpc::proto::{
        CreateKeyRequest, DeleteKeyRequest, Expiration, ValidateKeyRequest, ValidationResult,
    },
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{Client, backend, listed_ids, report, scale, validate_all};
use crate::support::{TestDb, as_owner, spawn_app_with};

const BOUND: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);
/// How far from the bound a replica may turn: its last sync started up to a poll interval
/// before the crash (later when this 2-core machine is busy), answers in flight finish, and
/// health is judged every 100 ms.
const SLACK: Duration = Duration::from_secs(1);
/// Longer than the pool's wait for a connection (5 s), so writes sent in it are refused
/// rather than held until the database is back.
const OUTAGE: Duration = Duration::from_secs(7);

/// A PostgreSQL server of this test's own, in a temporary directory, on a loopback port.
struct Cluster {
    bin: PathBuf,
    data: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn new() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .or_else(|| {
                let output = Command::new("pg_config").arg("--bindir").output().ok()?;
                Some(PathBuf::from(String::from_utf8(output.stdout).ok()?.trim()))
            })
            .expect("PostgreSQL's server binaries (initdb, pg_ctl)");
        // PostgreSQL refuses to run as root.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        let data = tempfile::tempdir().unwrap();
        if as_postgres {
            let owned = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(data.path())
                .status()
                .unwrap();
            assert!(owned.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            bin,
            data,
            port,
            as_postgres,
        };
        let pgdata = cluster.pgdata();
        cluster.run(
            "initdb",
            &["-D", &pgdata, "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        cluster.start();
        cluster
    }

    fn pgdata(&self) -> String {
        self.data.path().join("pgdata").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        let output = command.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start(&self) {
        let (pgdata, log) = (self.pgdata(), format!("{}/log", self.pgdata()));
        let options = format!("-p {} -c listen_addresses=127.0.0.1 -k {pgdata}", self.port);
        self.run(
            "pg_ctl",
            &["-D", &pgdata, "-l", &log, "-w", "-o", &options, "start"],
        );
    }

    /// Stops the server as a crash would: every connection cut, nothing shut down cleanly.
    fn crash(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.pgdata(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::path::Path::new(&self.pgdata())
            .join("postmaster.pid")
            .exists()
        {
            self.crash();
        }
    }
}

/// What a validator expects of a key.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Live,
    Deleted,
    Unknown,
}

/// One validation: what was asked, when it was sent and answered, and the answer.
type Answer = (Kind, Instant, Instant, Result<ValidationResult, Code>);

/// One write: sent, answered, its key (a delete's always, a create's once answered), and
/// its outcome.
#[derive(Debug)]
struct Write {
    sent: Instant,
    answered: Instant,
    create: bool,
    key: Option<(String, String)>,
    outcome: Result<(), Code>,
}

/// The keys the validators ask about; the writers add the keys they delete.
type Keys = Arc<Mutex<Vec<(Kind, String)>>>;

async fn validator(
    mut client: Client,
    keys: Keys,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Vec<Answer> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut answers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let (kind, secret) = {
            let keys = keys.lock().unwrap_or_else(PoisonError::into_inner);
            keys[rng.usize(..keys.len())].clone()
        };
        let sent = Instant::now();
        let request = ValidateKeyRequest {
            key: secret,
            ..Default::default()
        };
        let answer = client
            .validate_key(request)
            .await
            .map(|r| r.into_inner().result())
            .map_err(|status| status.code());
        answers.push((kind, sent, Instant::now(), answer));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    answers
}

/// Creates keys, and deletes every other one it created, until told to stop. A delete whose
/// answer is an error is in doubt (its commit may have landed) and is not tried again.
async fn writer(
    mut client: Client,
    writes: Arc<Mutex<Vec<Write>>>,
    keys: Keys,
    stop: Arc<AtomicBool>,
) {
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        let victim = if n.is_multiple_of(2) {
            mine.pop()
        } else {
            None
        };
        let (create, key, outcome) = match victim {
            Some((id, secret)) => {
                let request = DeleteKeyRequest {
                    workspace_id: "outage".into(),
                    key_id: id.clone(),
                    ..Default::default()
                };
                let outcome = client.delete_key(as_owner(request)).await;
                if outcome.is_ok() {
                    let mut keys = keys.lock().unwrap_or_else(PoisonError::into_inner);
                    keys.push((Kind::Deleted, secret.clone()));
                }
                (false, Some((id, secret)), outcome.map(|_| ()))
            }
            None => {
                let request = CreateKeyRequest {
                    workspace_id: "outage".into(),
                    name: format!("w{n}"),
                    expiration: Expiration::Never.into(),
                    ..Default::default()
                };
                match client.create_key(as_owner(request)).await {
                    Ok(created) => {
                        let created = created.into_inner();
                        let key = (created.key.unwrap().id, created.secret);
                        mine.push(key.clone());
                        (true, Some(key), Ok(()))
                    }
                    Err(status) => (true, None, Err(status)),
                }
            }
        };
        writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Write {
                sent,
                answered: Instant::now(),
                create,
                key,
                outcome: outcome.map_err(|status| status.code()),
            });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serving(health: &mut HealthClient<tonic::transport::Channel>) -> bool {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    health
        .check(request)
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_under_load_never_yields_a_false_valid_and_is_recovered_from() {
    if backend() != "postgresql" {
        return; // An embedded SQLite file cannot become unreachable.
    }
    let outages = scale(1, 5);
    let cluster = Cluster::new();
    let mut app = spawn_app_with(
        TestDb::sharing(&cluster.url()),
        ManualClock::new(chrono::Utc::now()),
        |s| {
            s.staleness_bound = BOUND;
            s.sync_poll_interval = POLL;
        },
    )
    .await;
    let mut keys = Vec::new();
    for i in 0..30 {
        let (key, secret) = app
            .create_key("outage", &format!("k{i}"), Expiration::Never)
            .await;
        if i % 3 == 0 {
            let request = DeleteKeyRequest {
                workspace_id: "outage".into(),
                key_id: key.id,
                ..Default::default()
            };
            app.client.delete_key(as_owner(request)).await.unwrap();
            keys.push((Kind::Deleted, secret));
        } else {
            keys.push((Kind::Live, secret));
        }
    }
    for _ in 0..5 {
        keys.push((
            Kind::Unknown,
            apikeys::domain::Secret::generate().expose().to_owned(),
        ));
    }
    let keys: Keys = Arc::new(Mutex::new(keys));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let validators: Vec<_> = (0..6)
        .map(|seed| {
            let (client, keys, stop) = (app.client.clone(), keys.clone(), stop.clone());
            tokio::spawn(validator(client, keys, stop, seed))
        })
        .collect();
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (client, writes) = (app.client.clone(), writes.clone());
            tokio::spawn(writer(client, writes, keys.clone(), stop.clone()))
        })
        .collect();
    let mut health = HealthClient::new(app.channel.clone());

    // (crash begun, crash done, restart begun, serving again)
    let mut timeline = Vec::new();
    let mut unhealthy = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..outages {
        let crashed = Instant::now();
        // The PostgreSQL tools block: off the runtime's threads, which the server shares.
        tokio::task::block_in_place(|| cluster.crash());
        let crash_done = Instant::now();
        // Health turns NOT_SERVING once the bound has passed, however long the sync waits.
        let mut not_serving = None;
        while crashed.elapsed() < OUTAGE {
            if not_serving.is_none() && !serving(&mut health).await {
                not_serving = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let not_serving = not_serving.expect("health never turned NOT_SERVING in the outage");
        assert!(
            not_serving > crashed + BOUND - SLACK && not_serving < crash_done + BOUND + SLACK,
            "NOT_SERVING {:?} into the outage",
            not_serving - crashed
        );
        unhealthy = unhealthy.max(not_serving - crashed);
        let restarted = Instant::now();
        tokio::task::block_in_place(|| cluster.start());
        while !serving(&mut health).await {
            assert!(
                restarted.elapsed() < Duration::from_secs(30),
                "not serving again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        timeline.push((crashed, crash_done, restarted, Instant::now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for validator in validators {
        answers.extend(validator.await.unwrap());
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let writes = std::mem::take(&mut *writes.lock().unwrap_or_else(PoisonError::into_inner));

    // No false VALID, ever (a deleted key, the writers' included, or one never issued); every
    // answer the key's, or UNAVAILABLE.
    for (kind, _, _, answer) in &answers {
        match (kind, answer) {
            (Kind::Live, Ok(ValidationResult::Valid))
            | (Kind::Deleted, Ok(ValidationResult::Deleted))
            | (Kind::Unknown, Ok(ValidationResult::NotFound))
            | (_, Err(Code::Unavailable)) => {}
            other => panic!("{other:?}"),
        }
    }
    let during = |at: Instant| timeline.iter().position(|(c, _, r, _)| at > *c && at < *r);
    let (mut served_for, mut refused) = (Duration::ZERO, 0);
    // Per outage: the first refusal after the crash, the first answer after the restart.
    let mut first_refusal = vec![Duration::MAX; timeline.len()];
    let mut first_answer = vec![Duration::MAX; timeline.len()];
    for (_, sent, answered, answer) in &answers {
        let Some(n) = during(*sent) else {
            // Outside an outage, a refusal only while the replica recovers.
            let recovering = timeline
                .iter()
                .position(|(_, _, r, s)| sent >= r && sent <= s);
            match (answer, recovering) {
                (Err(_), None) => panic!("UNAVAILABLE outside an outage"),
                (Ok(_), Some(n)) => {
                    let since = answered.duration_since(timeline[n].2);
                    first_answer[n] = first_answer[n].min(since);
                }
                _ => {}
            }
            continue;
        };
        let (crashed, crash_done, _, _) = timeline[n];
        match answer {
            // Served from memory: only within the bound of the last sync, which may have
            // succeeded until the crash was done.
            Ok(_) => {
                served_for = served_for.max(answered.duration_since(crashed));
                assert!(
                    *sent < crash_done + BOUND + SLACK,
                    "answered from memory {:?} into the outage",
                    sent.duration_since(crashed)
                );
            }
            // Refused: only once the bound has (nearly) run out; the last sync may have
            // started up to a poll interval before the crash, later under load.
            Err(_) => {
                refused += 1;
                assert!(
                    *sent > crashed + BOUND - SLACK,
                    "refused {:?} into the outage, well within the bound",
                    sent.duration_since(crashed)
                );
                first_refusal[n] = first_refusal[n].min(answered.duration_since(crashed));
            }
        }
    }
    assert!(refused > 0, "the index never failed closed");

    // Writes: none acknowledged while the database was down, none refused but UNAVAILABLE,
    // every acknowledged one there afterwards; a refused delete may have happened or not.
    let acked_in_outage = writes
        .iter()
        .filter(|w| w.outcome.is_ok())
        .filter(|w| {
            timeline
                .iter()
                .any(|(_, done, r, _)| w.sent > *done && w.answered < *r)
        })
        .count();
    assert_eq!(
        acked_in_outage, 0,
        "a write acknowledged while the database was down"
    );
    let failed: Vec<Code> = writes.iter().filter_map(|w| w.outcome.err()).collect();
    assert!(
        failed.iter().all(|code| *code == Code::Unavailable),
        "writes failed otherwise than UNAVAILABLE: {failed:?}"
    );
    let mut created: Vec<(String, String)> = Vec::new();
    let (mut deleted, mut in_doubt) = (Vec::new(), Vec::new());
    for write in &writes {
        match (&write.key, write.create, write.outcome) {
            (Some(key), true, Ok(())) => created.push(key.clone()),
            (Some((id, _)), false, Ok(())) => deleted.push(id.clone()),
            (Some((id, _)), false, Err(_)) => in_doubt.push(id.clone()),
            _ => {}
        }
    }
    let secrets: Vec<String> = created.iter().map(|(_, s)| s.clone()).collect();
    let results = validate_all(&app.client, &secrets).await;
    let listed = listed_ids(&mut app.client, "outage").await;
    for ((id, _), result) in created.iter().zip(&results) {
        let live = match result {
            _ if deleted.contains(id) => false,
            ValidationResult::Deleted if in_doubt.contains(id) => false,
            _ => true,
        };
        let want = if live {
            ValidationResult::Valid
        } else {
            ValidationResult::Deleted
        };
        assert_eq!(*result, want, "acknowledged write of {id}");
        assert_eq!(listed.contains(id), live, "{id} listed");
    }

    let recoveries: Vec<Duration> = timeline
        .iter()
        .map(|(_, _, r, s)| s.duration_since(*r))
        .collect();
    let max = |times: &[Duration]| times.iter().copied().filter(|t| *t != Duration::MAX).max();
    report(
        "PostgreSQL outage",
        format_args!(
            "{outages} crash(es) of PostgreSQL for {OUTAGE:?} each under load; {} validations, 0 false VALID \
             (of deleted keys: {} answers); served from memory up to {served_for:.2?} into an outage (bound {BOUND:?}), \
             first refusal (UNAVAILABLE) at most {:.2?} in, {refused} refused in all, \
             health NOT_SERVING at most {unhealthy:.2?} in; \
             {} writes, {} acknowledged (0 while the database was down, each one there afterwards), \
             {} refused UNAVAILABLE ({} of them deletes, found done or not); \
             after the restart was issued: answering again within {:.0?}, health SERVING within {:.0?}",
            answers.len(),
            answers.iter().filter(|a| a.0 == Kind::Deleted).count(),
            max(&first_refusal).unwrap_or_default(),
            writes.len(),
            created.len() + deleted.len(),
            failed.len(),
            in_doubt.len(),
            max(&first_answer).unwrap_or_default(),
            max(&recoveries).unwrap_or_default(),
        ),
    );
}
