//! The edges every ccq process (coordinator, worker) shares: how it learns to stop and
//! how it writes its log lines. They live in the one crate both binaries share that
//! already runs on tokio (`common` stays free of async code and networking), so there is
//! one copy instead of one per `main.rs` or one borrowed from the worker's library.

use tracing_subscriber::fmt::MakeWriter;

/// Completes on SIGINT or SIGTERM (Ctrl-C, `docker stop`, pod termination): the
/// shutdown signal both binaries hand to their library `run`.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            // No SIGTERM handler (should not happen on Unix): Ctrl-C still works.
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Installs the global log subscriber: lines filtered by `RUST_LOG` (else
/// `default_level`), as JSON objects when `format` is `json` and as text otherwise,
/// written through `writer` (stdout is for results and `--json` output, so callers pass
/// stderr or a writer that ends up there).
pub fn init_tracing<W>(format: &str, default_level: &str, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
