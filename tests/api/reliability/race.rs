//! Revocation race: validators hammer two replicas of one database while keys are deleted,
//! disabled and rotated (grace 0) through one replica or the other. Once a change is
//! acknowledged, the replica that made it never answers VALID for the key again, and the
//! other stops within the revocation bound; the test measures how long it actually took.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apikeys::{
    clock::ManualClock,
    grpc::proto::{
        DeleteKeyRequest, DisableKeyRequest, Expiration, RotateKeyRequest, ValidateKeyRequest,
        ValidationResult,
    },
};

use super::{Client, report, scale};
use crate::support::{TestApp, TestDb, as_owner, spawn_app_with};

/// The bound promised for other replicas (README, "Revocation").
const BOUND: Duration = Duration::from_secs(1);
const VALIDATORS_PER_REPLICA: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Revocation {
    Delete,
    Disable,
    Rotate,
}

impl Revocation {
    /// What ValidateKey answers once it knows.
    fn result(self) -> ValidationResult {
        match self {
            Self::Delete => ValidationResult::Deleted,
            Self::Disable => ValidationResult::Disabled,
            Self::Rotate => ValidationResult::Expired,
        }
    }
}

/// A change: its kind, the replica that made it, when it was sent and acknowledged.
type Revoked = (Revocation, usize, Instant, Instant);

/// One answer: key, replica, when the request was sent and answered, the result.
type Answer = (usize, usize, Instant, Instant, ValidationResult);

/// How far behind the key being changed the validators look: 100 changes, 1.5–3 s, well
/// past the bound.
const LOOK_BACK: usize = 100;

async fn revoke(client: &mut Client, id: &str, how: Revocation) -> Option<String> {
    let (workspace_id, key_id) = ("race".to_owned(), id.to_owned());
    match how {
        Revocation::Delete => {
            let request = DeleteKeyRequest {
                workspace_id,
                key_id,
                ..Default::default()
            };
            client.delete_key(as_owner(request)).await.expect("delete");
            None
        }
        Revocation::Disable => {
            let request = DisableKeyRequest {
                workspace_id,
                key_id,
                ..Default::default()
            };
            client
                .disable_key(as_owner(request))
                .await
                .expect("disable");
            None
        }
        Revocation::Rotate => {
            let request = RotateKeyRequest {
                workspace_id,
                key_id,
                grace_period: None,
                ..Default::default()
            };
            let rotated = client.rotate_key(as_owner(request)).await.expect("rotate");
            Some(rotated.into_inner().secret)
        }
    }
}

async fn validate(client: &mut Client, secret: &str) -> ValidationResult {
    let request = ValidateKeyRequest {
        key: secret.to_owned(),
        ..Default::default()
    };
    client
        .validate_key(request)
        .await
        .expect("validate")
        .into_inner()
        .result()
}

#[test]
fn no_valid_answer_once_a_revocation_is_acknowledged_plus_the_bound() {
    super::quietly(async {
        let count = scale(90, 900);
        // One clock for both, as NTP gives replicas: a rotated key expires at the same instant.
        let clock = ManualClock::new(chrono::Utc::now());
        let mut a = spawn_app_with(TestDb::new().await, clock.clone(), |_| {}).await;
        let b = spawn_app_with(TestDb::sharing(&a.db.url), clock.clone(), |_| {}).await;
        let mut keys = Vec::new();
        for i in 0..count {
            keys.push(
                a.create_key("race", &format!("k{i}"), Expiration::Never)
                    .await,
            );
        }
        let secrets: Arc<Vec<String>> = Arc::new(keys.iter().map(|(_, s)| s.clone()).collect());
        // Both replicas know every key before the race starts.
        let mut on_b = b.client.clone();
        for secret in secrets.iter() {
            while validate(&mut on_b, secret).await != ValidationResult::Valid {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let revoked: Arc<Vec<OnceLock<Revoked>>> =
            Arc::new((0..count).map(|_| OnceLock::new()).collect());
        // The validators probe the keys around the one being revoked, and half the time one
        // changed up to LOOK_BACK changes ago.
        let current = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let replicas: [&TestApp; 2] = [&a, &b];
        let mut validators = Vec::new();
        for (replica, app) in replicas.iter().enumerate() {
            for v in 0..VALIDATORS_PER_REPLICA {
                let (mut client, secrets) = (app.client.clone(), secrets.clone());
                let (current, stop) = (current.clone(), stop.clone());
                let mut rng = fastrand::Rng::with_seed((replica * 100 + v) as u64);
                validators.push(tokio::spawn(async move {
                    let mut answers: Vec<Answer> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = current.load(Ordering::Relaxed);
                        let back = if rng.bool() { 3 } else { LOOK_BACK };
                        let key = rng.usize(at.saturating_sub(back)..(at + 2).min(secrets.len()));
                        let sent = Instant::now();
                        let result = validate(&mut client, &secrets[key]).await;
                        answers.push((key, replica, sent, Instant::now(), result));
                    }
                    answers
                }));
            }
        }

        let mut successors = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let kinds = [Revocation::Delete, Revocation::Disable, Revocation::Rotate];
        for (key, (row, _)) in keys.iter().enumerate() {
            current.store(key, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(rng.u64(5..25))).await;
            let (how, replica) = (kinds[key % 3], key % 2);
            let mut client = replicas[replica].client.clone();
            let sent = Instant::now();
            let successor = revoke(&mut client, &row.id, how).await;
            revoked[key]
                .set((how, replica, sent, Instant::now()))
                .unwrap();
            if let Some(successor) = successor {
                // The new key works at once where it was issued.
                assert_eq!(
                    validate(&mut client, &successor).await,
                    ValidationResult::Valid
                );
                successors.push(successor);
            }
        }
        current.store(count, Ordering::Relaxed);
        tokio::time::sleep(BOUND + Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let mut answers = Vec::new();
        for validator in validators {
            answers.extend(validator.await.unwrap());
        }

        // VALID answers to requests sent after the acknowledgement: none from the replica that
        // made the change, none past the bound from the other.
        let (mut same_replica, mut past_bound, mut after_ack) = (Vec::new(), Vec::new(), 0);
        let mut windows = vec![Duration::ZERO; count];
        let mut wrong = Vec::new();
        for &(key, replica, sent, answered, result) in &answers {
            let &(how, by, changing, acked) = revoked[key].get().expect("every key is changed");
            if answered < changing {
                assert_eq!(
                    result,
                    ValidationResult::Valid,
                    "key {key} before its change"
                );
            }
            let Some(since) = sent.checked_duration_since(acked) else {
                continue;
            };
            after_ack += 1;
            if result == ValidationResult::Valid {
                if replica == by {
                    same_replica.push((key, how, since));
                } else if since > BOUND {
                    past_bound.push((key, how, since));
                }
                windows[key] = windows[key].max(since);
            } else if result != how.result() {
                wrong.push((key, how, result));
            }
        }
        assert!(
            same_replica.is_empty(),
            "VALID from the replica that acknowledged the change: {same_replica:?}"
        );
        assert!(
            past_bound.is_empty(),
            "VALID from the other replica past the bound: {past_bound:?}"
        );
        assert!(wrong.is_empty(), "wrong answers after a change: {wrong:?}");
        // Past the bound, every key on both replicas answers its change, every successor VALID.
        for app in replicas {
            let mut client = app.client.clone();
            for (key, secret) in secrets.iter().enumerate() {
                let (how, ..) = *revoked[key].get().unwrap();
                assert_eq!(
                    validate(&mut client, secret).await,
                    how.result(),
                    "key {key}"
                );
            }
            for successor in &successors {
                assert_eq!(
                    validate(&mut client, successor).await,
                    ValidationResult::Valid
                );
            }
        }
        assert!(
            after_ack > count,
            "too few answers after the changes to tell"
        );
        windows.sort();
        report(
            "revocation race",
            format_args!(
                "{count} revocations ({} deletes, {} disables, {} rotations with grace 0, half through each replica) \
             under {} validators on 2 replicas; {} answers, {after_ack} of them after a change was acknowledged; \
             VALID after the acknowledgement: 0 on the acknowledging replica, 0 past the {BOUND:?} bound on the other; \
             the other replica still said VALID after the acknowledgement for {} keys, for at most {:.1?}; \
             {} successors valid at once; past the bound every key on both replicas answers its change",
                count.div_ceil(3),
                (count + 1) / 3,
                count / 3,
                2 * VALIDATORS_PER_REPLICA,
                answers.len(),
                windows.iter().filter(|w| !w.is_zero()).count(),
                windows[count - 1],
                successors.len(),
            ),
        );
    })
}
