//! Rate limits shared by replicas: 2 and then 3 real replicas (the binary) on one database,
//! a round-robin client offering five times a key's limit, every window's admissions counted
//! by the answers' reset times; then one of the three SIGKILLed in the middle of a window.
//! Replicas lease slices of each window's budget from the database, so together they never
//! admit more than the limit (ε = 0); what one holds unspent when it is killed is lost only
//! until its windows end.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{CreateKeyRequest, Expiration, RateLimit, ValidateKeyRequest};

use super::{Client, connect, report, scale, server};
use crate::{
    binary::{Process, start_command},
    support::{TestDb, as_owner},
};

/// The key's limit, per one-second window.
const LIMIT: i64 = 200;
/// Requests offered per second in all: five times the limit.
const OFFERED: u64 = 5 * LIMIT as u64;
const WORKERS: u64 = 10;

/// Admissions per window (by its end, in whole seconds since the epoch), and the requests
/// that failed (sent to a replica that was killed).
#[derive(Debug, Default)]
struct Tally {
    admitted: BTreeMap<i64, i64>,
    failed: u64,
}

/// Offers `OFFERED` requests a second for `run`, round robin over `replicas` (`None`: a
/// replica that was killed, skipped); `kill` is run once, `kill_after` into the run.
async fn hammer(
    replicas: &[Client],
    secret: &str,
    run: Duration,
    kill: Option<(Duration, Box<dyn FnOnce() + Send>)>,
) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (replicas, secret) = (replicas.to_vec(), secret.to_string());
            let (tally, sent) = (tally.clone(), sent.clone());
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 * WORKERS / OFFERED));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while started.elapsed() < run {
                    tick.tick().await;
                    let n = sent.fetch_add(1, Ordering::Relaxed) as usize;
                    let mut client = replicas[n % replicas.len()].clone();
                    let request = ValidateKeyRequest {
                        key: secret.clone(),
                        ..Default::default()
                    };
                    let answer = match client.validate_key(request).await {
                        Ok(answer) => answer.into_inner(),
                        Err(_) => {
                            tally.lock().unwrap_or_else(PoisonError::into_inner).failed += 1;
                            continue;
                        }
                    };
                    if answer.valid {
                        let window = answer.rate_limits[0]
                            .reset_time
                            .as_ref()
                            .expect("a reset time")
                            .seconds;
                        *tally
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .admitted
                            .entry(window)
                            .or_default() += 1;
                    }
                }
            })
        })
        .collect();
    if let Some((after, kill)) = kill {
        tokio::time::sleep(after).await;
        kill();
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let mut tally = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
    // The first and last windows were offered load for part of their length only.
    tally.admitted.pop_first();
    tally.admitted.pop_last();
    tally
}

/// The smallest and largest admissions of the windows counted.
fn spread(tally: &Tally) -> (i64, i64) {
    let admitted = tally.admitted.values();
    (
        admitted.clone().copied().min().unwrap_or(0),
        admitted.copied().max().unwrap_or(0),
    )
}

fn windows(tally: &Tally) -> String {
    tally
        .admitted
        .values()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A replica on `db`, with a client once it knows the key.
async fn replica(db: &TestDb, secret: &str) -> (Process, Client) {
    let (process, addr, _logs) = start_command(server(db));
    let mut client = connect(&addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let check = ValidateKeyRequest {
            key: secret.into(),
            rate_limits: vec![apikeys::grpc::proto::RateLimitRequest {
                name: "requests".into(),
                cost: Some(0),
            }],
            ..Default::default()
        };
        if client
            .validate_key(check)
            .await
            .is_ok_and(|a| a.get_ref().valid)
        {
            return (process, client);
        }
        assert!(Instant::now() < deadline, "the key never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn replicas_sharing_a_limit_never_admit_more_than_it_per_window_even_through_sigkill() {
    super::quietly(async {
        let run = Duration::from_secs(scale(5, 30));
        let db = TestDb::new().await;
        let (first, addr, _logs) = start_command(server(&db));
        let mut admin = connect(&addr).await;
        let created = admin
            .create_key(as_owner(CreateKeyRequest {
                workspace_id: "shared".into(),
                name: "limited".into(),
                expiration: Expiration::Never.into(),
                rate_limits: vec![RateLimit {
                    name: "requests".into(),
                    limit: LIMIT,
                    window: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    auto_apply: true,
                }],
                ..Default::default()
            }))
            .await
            .expect("create")
            .into_inner();
        let secret = created.secret;
        let mut processes = vec![first];
        let mut clients = vec![admin];
        let mut figures = Vec::new();
        for replicas in [2, 3] {
            while clients.len() < replicas {
                let (process, client) = replica(&db, &secret).await;
                processes.push(process);
                clients.push(client);
            }
            let tally = hammer(&clients, &secret, run, None).await;
            let (least, most) = spread(&tally);
            assert!(tally.admitted.len() >= 2, "too few windows: {tally:?}");
            assert_eq!(tally.failed, 0, "{tally:?}");
            assert!(
                most <= LIMIT,
                "{replicas} replicas admitted {most} in a window of {LIMIT}: {tally:?}"
            );
            // What the others hold when a window runs out is missed; a slice is a sixteenth
            // of what was left, so little is.
            assert!(least >= LIMIT / 2, "{replicas} replicas: {tally:?}");
            figures.push(format!(
                "{replicas} replicas: {} windows, admitted {least}–{most} of {LIMIT} \
                 (ε = {:.3}; {})",
                tally.admitted.len(),
                most as f64 / LIMIT as f64 - 1.0,
                windows(&tally)
            ));
        }
        // One of the three is SIGKILLed mid-run: the others go on within the limit, and
        // what it held is missed only in the windows it had leased from.
        let mut victim = processes.pop().expect("a third replica");
        let kill: Box<dyn FnOnce() + Send> = Box::new(move || {
            victim.0.kill().expect("SIGKILL apikeys");
            victim.0.wait().expect("reap apikeys");
        });
        let half = run / 2 + Duration::from_millis(fastrand::u64(0..1_000));
        let killed_at = Arc::new(Mutex::new(0_i64));
        let stamp = killed_at.clone();
        let kill: Box<dyn FnOnce() + Send> = Box::new(move || {
            *stamp.lock().unwrap_or_else(PoisonError::into_inner) = chrono::Utc::now().timestamp();
            kill();
        });
        let tally = hammer(&clients, &secret, run, Some((half, kill))).await;
        let (least, most) = spread(&tally);
        assert!(most <= LIMIT, "after a SIGKILL: {tally:?}");
        assert!(tally.failed > 0, "the kill cut no request: {tally:?}");
        // Two windows after the kill (the one it held a slice of, and the next, whose first
        // slice it may have leased ahead), the two left admit the whole limit again, as two
        // replicas do (a tenth spared for a slow machine).
        let killed_at = *killed_at.lock().unwrap_or_else(PoisonError::into_inner);
        let after: Vec<i64> = tally
            .admitted
            .range(killed_at + 3..)
            .map(|(_, &admitted)| admitted)
            .collect();
        assert!(
            after.iter().all(|&admitted| admitted >= LIMIT * 9 / 10),
            "windows after the kill at {killed_at}: {tally:?}"
        );
        figures.push(format!(
            "3 replicas, one SIGKILLed about {:.1} s in: admitted {least}–{most} of {LIMIT} \
             ({}), {} requests to the killed one failed",
            half.as_secs_f64(),
            windows(&tally),
            tally.failed
        ));
        drop(processes);
        report(
            "rate limits shared by replicas",
            format_args!(
                "a round-robin client at {OFFERED} requests/s (5x the limit) over 1 s windows; {}",
                figures.join("; ")
            ),
        );
    })
}
