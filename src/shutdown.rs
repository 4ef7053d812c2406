//! The shutdown signal. Library code takes shutdown as a future, so tests can trigger it;
//! binaries pass [`signal`].

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal as listen};
use tracing::{info, warn};

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is
/// called, not when the future is first polled, so a signal during start-up (a database that
/// does not answer, say) is not lost: call it before anything that can wait.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let terminate = listen(SignalKind::terminate());
    let interrupt = listen(SignalKind::interrupt());
    async move {
        let wait = |name: &'static str, listener: std::io::Result<tokio::signal::unix::Signal>| async move {
            match listener {
                Ok(mut listener) => {
                    listener.recv().await;
                    name
                }
                Err(error) => {
                    warn!(%error, signal = name, "cannot listen for the signal");
                    std::future::pending().await
                }
            }
        };
        let name = tokio::select! {
            name = wait("SIGTERM", terminate) => name,
            name = wait("SIGINT", interrupt) => name,
        };
        info!(signal = name, "signal received; shutting down");
    }
}
