//! Shutdown on SIGTERM / Ctrl-C: the first asks for a graceful stop (in-flight steps finish, no new ones start),
//! the second aborts at once. Half-done steps are safe to abandon: every step is idempotent and the next run
//! converges.

use tokio::sync::watch;

/// Exit code of an aborted run (128 + SIGINT, as shells report it).
pub const EXIT_ABORTED: i32 = 130;

/// Starts listening for SIGTERM and SIGINT; the returned receiver turns `true` on the first one.
///
/// Must be called inside a tokio runtime.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let mut signals_seen = 0u32;
        loop {
            if wait_for_signal().await.is_err() {
                // Without signal handlers we cannot stop gracefully; run until killed.
                tracing::warn!("could not install signal handlers; graceful shutdown is unavailable");
                return;
            }
            signals_seen += 1;
            if signals_seen == 1 {
                tracing::info!("shutting down: finishing in-flight steps (signal again to abort)");
                sender.send_replace(true);
            } else {
                tracing::warn!("aborting");
                std::process::exit(EXIT_ABORTED);
            }
        }
    });
    receiver
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
