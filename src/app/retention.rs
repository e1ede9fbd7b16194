//! Prunes key events and hourly usage older than the retention, and rate-limit windows
//! that ended, in the background. Every replica may run it: deleting what is already gone
//! is harmless.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{clock::Clock, store::Store};

/// Prunes now and then every `every`, until `stop` turns true.
pub(super) async fn prune_loop(
    store: Store,
    clock: Arc<dyn Clock>,
    retention: Duration,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let retention_us = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        let cutoff_us = clock.now().timestamp_micros().saturating_sub(retention_us);
        match store.prune(cutoff_us).await {
            Ok((0, 0)) => {}
            Ok((events, key_hours)) => {
                tracing::info!(events, key_hours, ?retention, "pruned key events and usage")
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot prune key events and usage; will retry")
            }
        }
        // Rate-limit windows that ended: whatever the retention.
        match store.prune_windows(clock.now().timestamp_micros()).await {
            Ok(0) => {}
            Ok(windows) => tracing::debug!(windows, "pruned ended rate-limit windows"),
            Err(err) => {
                tracing::warn!(error = %err, "cannot prune rate-limit windows; will retry")
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
