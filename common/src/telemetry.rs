//! Log set-up for both services.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber, writing human-readable lines to standard error.
///
/// `filter` is an `EnvFilter` directive such as `info` or `recommendations=debug,tower=warn`; the
/// services take it from `RUST_LOG`. An invalid directive falls back to `info` with a warning,
/// rather than stopping the service over a logging typo.
pub fn init(filter: &str) {
    let (filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // A second call (tests start several apps in one process) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid RUST_LOG directive; logging at info");
    }
}
