//! Crash consistency: the server is killed with SIGKILL at random moments under a load of
//! creates, deletes and validations, and restarted. After every restart each acknowledged
//! CreateKey validates, each acknowledged DeleteKey stays DELETED, and the list, the
//! validation index and the audit trail agree key for key (no torn state). A write whose
//! answer the kill swallowed may have happened or not; the check finds out which, and holds
//! the key to that from then on.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apikeys::grpc::proto::{
    CreateKeyRequest, DeleteKeyRequest, Expiration, KeyEventType, ValidateKeyRequest,
    ValidationResult,
};
use tonic::Status;

use super::{Client, connect, events, listed_ids, report, scale, server, validate_all};
use crate::{
    binary::start_command,
    support::{TestDb, as_owner},
};

const WORKSPACE: &str = "crash";
const WORKERS: u64 = 6;

/// What the load was told, and so what it may expect.
#[derive(Debug, Default)]
struct Ledger {
    /// Acknowledged creates, not deleted and no delete in flight: (id, secret).
    live: Vec<(String, String)>,
    /// Acknowledged deletes.
    deleted: Vec<(String, String)>,
    /// Deletes sent whose answer never came: either outcome is allowed.
    unanswered_deletes: Vec<(String, String)>,
    unanswered_creates: u64,
    acked_creates: u64,
    acked_deletes: u64,
    validations: u64,
    /// What the load saw that it must not have.
    violations: Vec<String>,
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Creates, deletes and validates until the server dies under it.
async fn load(mut client: Client, ledger: Arc<Mutex<Ledger>>, killed: Arc<AtomicBool>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    // An error is expected only once the kill is under way; before it, it is a finding.
    let failed = |status: Status, what: &str| {
        if !killed.load(Ordering::SeqCst) {
            lock(&ledger)
                .violations
                .push(format!("{what} failed before the kill: {status:?}"));
        }
    };
    loop {
        let roll = rng.u8(..100);
        if roll < 15 {
            let request = CreateKeyRequest {
                workspace_id: WORKSPACE.into(),
                name: format!("crash {}", rng.u32(..)),
                expiration: if rng.bool() {
                    Expiration::Never
                } else {
                    Expiration::Expiration30Days
                }
                .into(),
                ..Default::default()
            };
            match client.create_key(as_owner(request)).await {
                Ok(response) => {
                    let response = response.into_inner();
                    let mut ledger = lock(&ledger);
                    ledger.acked_creates += 1;
                    ledger
                        .live
                        .push((response.key.expect("created key").id, response.secret));
                }
                Err(status) => {
                    lock(&ledger).unanswered_creates += 1;
                    return failed(status, "CreateKey");
                }
            }
        } else if roll < 25 {
            let victim = {
                let mut ledger = lock(&ledger);
                if ledger.live.is_empty() {
                    continue;
                }
                let which = rng.usize(..ledger.live.len());
                ledger.live.swap_remove(which)
            };
            let request = DeleteKeyRequest {
                workspace_id: WORKSPACE.into(),
                key_id: victim.0.clone(),
                ..Default::default()
            };
            match client.delete_key(as_owner(request)).await {
                Ok(_) => {
                    let mut ledger = lock(&ledger);
                    ledger.acked_deletes += 1;
                    ledger.deleted.push(victim);
                }
                Err(status) => {
                    lock(&ledger).unanswered_deletes.push(victim);
                    return failed(status, "DeleteKey");
                }
            }
        } else {
            let (id, secret, expected) = {
                let ledger = lock(&ledger);
                let pick = if !ledger.deleted.is_empty() && rng.u8(..4) == 0 {
                    let (id, secret) = &ledger.deleted[rng.usize(..ledger.deleted.len())];
                    (id, secret, ValidationResult::Deleted)
                } else if !ledger.live.is_empty() {
                    let (id, secret) = &ledger.live[rng.usize(..ledger.live.len())];
                    (id, secret, ValidationResult::Valid)
                } else {
                    continue;
                };
                (pick.0.clone(), pick.1.clone(), pick.2)
            };
            let request = ValidateKeyRequest {
                key: secret,
                ..Default::default()
            };
            match client.validate_key(request).await {
                Ok(answer) => {
                    let result = answer.into_inner().result();
                    let mut ledger = lock(&ledger);
                    ledger.validations += 1;
                    // A live key another worker deleted meanwhile may be DELETED by now.
                    let deleted_meanwhile = result == ValidationResult::Deleted
                        && !ledger.live.iter().any(|(live, _)| *live == id);
                    if result != expected && !deleted_meanwhile {
                        ledger
                            .violations
                            .push(format!("{id}: {result:?}, expected {expected:?}"));
                    }
                }
                Err(status) => return failed(status, "ValidateKey"),
            }
        }
    }
}

/// What the checks after the restarts covered.
#[derive(Debug, Default)]
struct Checked {
    /// Acknowledged creates and deletes checked, summed over the restarts.
    acked_writes: usize,
    /// Unanswered deletes found done, and found not done.
    deletes_done: usize,
    deletes_not_done: usize,
    /// Keys listed that no acknowledged create returned: unanswered creates that committed.
    orphans: HashSet<String>,
}

/// After a restart: everything acknowledged is as it was acknowledged, and the list, the
/// index and the audit trail agree.
async fn check(client: &mut Client, ledger: &Mutex<Ledger>, checked: &mut Checked) {
    let unanswered = std::mem::take(&mut lock(ledger).unanswered_deletes);
    let secrets: Vec<String> = unanswered.iter().map(|(_, s)| s.clone()).collect();
    for (key, result) in unanswered
        .into_iter()
        .zip(validate_all(client, &secrets).await)
    {
        let mut ledger = lock(ledger);
        match result {
            ValidationResult::Valid => {
                checked.deletes_not_done += 1;
                ledger.live.push(key);
            }
            ValidationResult::Deleted => {
                checked.deletes_done += 1;
                ledger.deleted.push(key);
            }
            other => panic!("a delete cut short left {} {other:?}", key.0),
        }
    }
    let (live, deleted, unanswered_creates) = {
        let ledger = lock(ledger);
        (
            ledger.live.clone(),
            ledger.deleted.clone(),
            ledger.unanswered_creates,
        )
    };
    for (keys, expected) in [
        (&live, ValidationResult::Valid),
        (&deleted, ValidationResult::Deleted),
    ] {
        let secrets: Vec<String> = keys.iter().map(|(_, s)| s.clone()).collect();
        let wrong: Vec<_> = keys
            .iter()
            .zip(validate_all(client, &secrets).await)
            .filter(|(_, result)| *result != expected)
            .map(|((id, _), result)| (id.clone(), result))
            .collect();
        assert!(
            wrong.is_empty(),
            "acknowledged, expected {expected:?}: {wrong:?}"
        );
        checked.acked_writes += keys.len();
    }

    let listed: HashSet<String> = listed_ids(client, WORKSPACE).await.into_iter().collect();
    let live_ids: HashSet<&String> = live.iter().map(|(id, _)| id).collect();
    let deleted_ids: HashSet<&String> = deleted.iter().map(|(id, _)| id).collect();
    assert!(
        live_ids.iter().all(|id| listed.contains(*id)),
        "a live key is not listed"
    );
    assert!(
        !deleted_ids.iter().any(|id| listed.contains(*id)),
        "a deleted key is listed"
    );
    // Creates that committed unanswered stay: listed in every later check.
    assert!(
        checked.orphans.iter().all(|id| listed.contains(id)),
        "a key created unanswered is gone"
    );
    checked
        .orphans
        .extend(listed.iter().filter(|id| !live_ids.contains(id)).cloned());
    assert!(
        checked.orphans.len() as u64 <= unanswered_creates,
        "{} keys no create was sent for",
        checked.orphans.len()
    );

    // One CREATED event for every key there is, one DELETED event for every deleted key,
    // and no other event.
    let mut created = HashMap::<String, usize>::new();
    let mut deletions = HashMap::<String, usize>::new();
    for (id, kind, _) in events(client, WORKSPACE).await {
        match kind {
            KeyEventType::Created => *created.entry(id).or_default() += 1,
            KeyEventType::Deleted => *deletions.entry(id).or_default() += 1,
            other => panic!("{other:?} event for {id}: this load makes none"),
        }
    }
    let existing: HashSet<&String> = listed.iter().chain(deleted_ids.iter().copied()).collect();
    assert_eq!(
        created.keys().collect::<HashSet<_>>(),
        existing,
        "created events against keys"
    );
    assert_eq!(
        deletions.keys().collect::<HashSet<_>>(),
        deleted_ids,
        "deleted events against deleted keys"
    );
    assert!(
        created.values().chain(deletions.values()).all(|n| *n == 1),
        "a change has more than one event"
    );
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_moments() {
    super::quietly(async {
        let kills = scale(50, 100);
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let db = TestDb::new().await;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut checked = Checked::default();
        let mut starts = Vec::new();
        let began = Instant::now();
        for round in 0..=kills {
            let started = Instant::now();
            let (mut server, addr, _logs) = start_command(server(&db));
            starts.push(started.elapsed());
            let mut client = connect(&addr).await;
            check(&mut client, &ledger, &mut checked).await;
            if round == kills {
                break;
            }
            let killed = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..WORKERS)
                .map(|_| {
                    let (client, ledger, killed) = (client.clone(), ledger.clone(), killed.clone());
                    tokio::spawn(load(client, ledger, killed, rng.u64(..)))
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
            killed.store(true, Ordering::SeqCst);
            server.0.kill().expect("SIGKILL apikeys");
            server.0.wait().expect("reap apikeys");
            for worker in workers {
                worker.await.expect("load task");
            }
            let violations = std::mem::take(&mut lock(&ledger).violations);
            assert!(violations.is_empty(), "round {round}: {violations:#?}");
        }
        let ledger = lock(&ledger);
        starts.sort();
        report(
            "crash consistency",
            format_args!(
                "{kills} SIGKILLs survived in {:.0?} (seed {seed}); acknowledged: {} creates, {} deletes; \
             {} validations under load; {} acknowledged writes checked after restarts, all as acknowledged; \
             unanswered: {} creates ({} had committed), {} deletes ({} had committed); \
             restart to serving: median {:.0?}, max {:.0?}",
                began.elapsed(),
                ledger.acked_creates,
                ledger.acked_deletes,
                ledger.validations,
                checked.acked_writes,
                ledger.unanswered_creates,
                checked.orphans.len(),
                checked.deletes_done + checked.deletes_not_done,
                checked.deletes_done,
                starts[starts.len() / 2],
                starts[starts.len() - 1],
            ),
        );
        assert!(ledger.acked_creates > kills as u64, "the load barely ran");
    })
}

/// What one balance may lose to one SIGKILL: the slices the replica held (the one being spent
/// and the next, each at most `MAX_LEASE` beyond a request's cost of 1) and the spends whose
/// answers the kill swallowed (one per worker).
const LOST_PER_KILL: i64 = 2 * (apikeys::domain::MAX_LEASE + 1) + WORKERS as i64;

/// A key's balance as GetKey shows it, from a replica that has not spent from it.
async fn balance(client: &mut Client, id: &str) -> i64 {
    client
        .get_key(as_owner(apikeys::grpc::proto::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: id.into(),
        }))
        .await
        .expect("get the key")
        .into_inner()
        .credits
        .expect("the key has credits")
        .remaining
}

#[test]
fn acknowledged_spends_of_credits_are_never_given_back_by_a_sigkill() {
    super::quietly(async {
        let kills = scale(8, 30);
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let db = TestDb::new().await;
        const BALANCE: i64 = 1_000_000;
        let (mut process, addr, _logs) = start_command(server(&db));
        let mut client = connect(&addr).await;
        let created = client
            .create_key(as_owner(CreateKeyRequest {
                workspace_id: WORKSPACE.into(),
                name: "metered".into(),
                expiration: Expiration::Never.into(),
                credits: Some(apikeys::grpc::proto::Credits {
                    remaining: BALANCE,
                    refill: None,
                }),
                ..Default::default()
            }))
            .await
            .expect("create")
            .into_inner();
        let (id, secret) = (created.key.unwrap().id, created.secret);
        let (mut acked, mut lost, mut worst, mut before) = (0_i64, 0_i64, 0_i64, BALANCE);
        for round in 0..=kills {
            if round > 0 {
                let started = start_command(server(&db));
                (process, client) = (started.0, connect(&started.1).await);
            }
            // Fresh, this replica holds nothing: what it shows is what the database holds.
            let now = balance(&mut client, &id).await;
            assert!(
                now <= before,
                "round {round}: {now} left after {before}: acknowledged spends were given back"
            );
            assert!(
                before - now <= LOST_PER_KILL,
                "round {round}: {} lost to one kill, more than {LOST_PER_KILL}",
                before - now
            );
            lost += before - now;
            worst = worst.max(before - now);
            before = now;
            if round == kills {
                break;
            }
            let killed = Arc::new(AtomicBool::new(false));
            let spenders: Vec<_> = (0..WORKERS)
                .map(|_| {
                    let (mut client, killed, secret) =
                        (client.clone(), killed.clone(), secret.clone());
                    tokio::spawn(async move {
                        let mut acked = 0_i64;
                        loop {
                            let request = ValidateKeyRequest {
                                key: secret.clone(),
                                ..Default::default()
                            };
                            match client.validate_key(request).await {
                                Ok(answer) => {
                                    let answer = answer.into_inner();
                                    assert!(answer.valid, "{answer:?}");
                                    acked += 1;
                                }
                                Err(status) if killed.load(Ordering::SeqCst) => {
                                    let _ = status;
                                    return acked;
                                }
                                Err(status) => panic!("before the kill: {status:?}"),
                            }
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
            killed.store(true, Ordering::SeqCst);
            process.0.kill().expect("SIGKILL apikeys");
            process.0.wait().expect("reap apikeys");
            let mut spent = 0;
            for spender in spenders {
                spent += spender.await.expect("spender");
            }
            acked += spent;
            // What the next start must show at most: nothing acknowledged comes back.
            before -= spent;
        }
        // A graceful stop gives back what the replica held: nothing more is lost.
        let held_before = balance(&mut client, &id).await;
        let answer = client
            .validate_key(ValidateKeyRequest {
                key: secret.clone(),
                cost: Some(10),
                ..Default::default()
            })
            .await
            .expect("spend")
            .into_inner();
        assert!(answer.valid, "{answer:?}");
        crate::binary::terminate(process).await;
        let (process, addr, _logs) = start_command(server(&db));
        let mut client = connect(&addr).await;
        assert_eq!(balance(&mut client, &id).await, held_before - 10);
        drop(process);
        report(
            "credits under SIGKILL",
            format_args!(
                "{kills} SIGKILLs (seed {seed}): {acked} spends acknowledged, none given back; \
                 lost to the kills (leased and unspent, or spent unanswered) {lost} in all, at most \
                 {worst} to one kill (bound {LOST_PER_KILL}); a graceful stop lost none",
            ),
        );
    })
}
