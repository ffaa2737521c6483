//! Log set-up for both services.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    Text,
    /// One JSON object per line, for log collectors (Kubernetes).
    Json,
}

/// The log settings both services take.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `recommendations=debug,tower=warn`.
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info")]
    pub filter: String,
    /// `text` for people, `json` for log collectors.
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

impl Default for LogArgs {
    fn default() -> Self {
        LogArgs {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Installs the global `tracing` subscriber, writing to standard error.
///
/// An invalid filter directive falls back to `info` with a warning, rather than stopping the
/// service over a logging typo.
pub fn init(args: &LogArgs) {
    let (filter, bad) = match EnvFilter::try_new(&args.filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests start several apps in one process) keeps the first subscriber.
    let _ = match args.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid RUST_LOG directive; logging at info");
    }
}
