//! Files read again without a restart (the TLS certificate, the callers file): on SIGHUP,
//! and on a timer that finds changed contents (how a Kubernetes Secret's update arrives).

use std::time::Duration;

use tokio::task::JoinHandle;

/// Calls `reload(force)` every `poll` (`force` false: reload only if the contents changed)
/// and on every SIGHUP (`force` true), until the task is aborted. The SIGHUP handler is
/// installed before this returns, so a SIGHUP sent once the server says it serves is never
/// met by the default action (which ends the process).
pub(crate) fn watch(
    poll: Duration,
    mut reload: impl FnMut(bool) + Send + 'static,
) -> JoinHandle<()> {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let force = tokio::select! {
                _ = ticks.tick() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            #[cfg(not(unix))]
            let force = {
                ticks.tick().await;
                false
            };
            reload(force);
        }
    })
}
