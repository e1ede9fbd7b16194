//! gRPC health: readiness follows the index's freshness and turns NOT_SERVING for good once
//! the server drains; liveness stays SERVING for as long as the process serves.

use tokio::{sync::watch, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};

use super::SERVICE_NAME;

/// Every name health reports on for readiness: the whole server and the API. Both turn
/// NOT_SERVING when the index is stale and on shutdown.
const READINESS_NAMES: [&str; 2] = ["", SERVICE_NAME];

/// The health name for liveness probes: SERVING for as long as the process serves, through
/// database outages too (restarting would not bring the database back, and a replica
/// without one could not even start).
pub const LIVENESS_NAME: &str = "liveness";

/// Starts reporting: SERVING now, then readiness as `fresh` says, until `draining` turns
/// true, when readiness turns NOT_SERVING and stays so.
pub(super) async fn report(
    health: HealthReporter,
    mut fresh: watch::Receiver<bool>,
    mut draining: watch::Receiver<bool>,
) -> JoinHandle<()> {
    set_readiness(&health, ServingStatus::Serving).await;
    health
        .set_service_status(LIVENESS_NAME, ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                // It only ever turns true (or its sender is gone: stopping too).
                _ = draining.changed() => break,
                changed = fresh.changed() => {
                    if changed.is_err() {
                        // The sync loops ended: the server is stopping.
                        break;
                    }
                    let fresh_now = *fresh.borrow_and_update();
                    let status = if fresh_now {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    set_readiness(&health, status).await;
                }
            }
        }
        set_readiness(&health, ServingStatus::NotServing).await;
    })
}

async fn set_readiness(health: &HealthReporter, status: ServingStatus) {
    for name in READINESS_NAMES {
        health.set_service_status(name, status).await;
    }
}
