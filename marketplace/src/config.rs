//! Every setting of the marketplace, each a CLI flag and an environment variable.

use std::{net::SocketAddr, time::Duration};

use bookstore_common::{admin::Command, telemetry::LogArgs, tls::TlsArgs};
use clap::Parser;

/// The bookstore's web front end.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "marketplace", version, about)]
#[deny(missing_docs)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "[::]:5000")]
    pub listen_addr: SocketAddr,
    /// Host name or address of the recommendations service.
    #[arg(long, env = "RECOMMENDATIONS_HOST", default_value = "localhost")]
    pub recommendations_host: String,
    /// Port of the recommendations service.
    #[arg(long, env = "RECOMMENDATIONS_PORT", default_value_t = 50051)]
    pub recommendations_port: u16,
    /// Name to check in the recommendations certificate (default: the host).
    #[arg(long, env = "RECOMMENDATIONS_TLS_NAME")]
    pub recommendations_tls_name: Option<String>,
    /// Deadline for each call to recommendations, in milliseconds; past it the page says
    /// recommendations are unavailable.
    #[arg(long, env = "RECOMMENDATIONS_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recommendations_timeout_ms: u64,
    /// Seconds between lookups of RECOMMENDATIONS_HOST, so calls follow instances as they come
    /// and go (a headless Service name gives one address per pod).
    #[arg(long, env = "RECOMMENDATIONS_RESOLVE_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recommendations_resolve_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl+C before they are cancelled.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Plaintext admin address: `GET /healthz` (liveness), `GET /readyz` (readiness) and
    /// `GET /metrics` (Prometheus).
    #[arg(long, env = "ADMIN_ADDR", default_value = "[::]:9091")]
    pub admin_addr: SocketAddr,
    /// Logging.
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogArgs,
    /// TLS files and mode.
    #[command(flatten, next_help_heading = "TLS")]
    pub tls: TlsArgs,
    /// Instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Config {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn recommendations_resolve_interval(&self) -> Duration {
        Duration::from_secs(self.recommendations_resolve_secs)
    }

    pub fn recommendations_timeout(&self) -> Duration {
        Duration::from_millis(self.recommendations_timeout_ms)
    }

    /// The name the server certificate must carry.
    pub fn recommendations_tls_name(&self) -> &str {
        self.recommendations_tls_name
            .as_deref()
            .unwrap_or(&self.recommendations_host)
    }
}
