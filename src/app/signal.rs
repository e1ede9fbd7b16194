//! SIGTERM (Kubernetes, systemd, docker stop) and SIGINT (Ctrl-C) as one shutdown future.

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when this is called,
/// not when the future is first polled, so a signal sent once the server says it serves is
/// never met by the default action (which ends the process at once, without draining).
pub fn shutdown() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (terminate, interrupt) => {
                    let err = terminate.err().or(interrupt.err());
                    tracing::warn!(error = ?err, "cannot listen for SIGTERM and SIGINT; only Ctrl-C stops the server");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
