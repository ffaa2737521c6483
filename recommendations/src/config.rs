//! Every setting of the recommendations service, each a CLI flag and an environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bookstore_common::{telemetry::LogArgs, tls::TlsArgs};
use clap::Parser;

/// The bookstore's recommendations gRPC service.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "recommendations", version, about)]
#[deny(missing_docs)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "[::]:50051")]
    pub listen_addr: SocketAddr,
    /// Seconds in-flight calls get to finish after SIGTERM or Ctrl+C before they are cancelled.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// JSON catalog to serve instead of the nine built-in books (format in the README).
    #[arg(long, env = "CATALOG_PATH")]
    pub catalog_path: Option<PathBuf>,
    /// Fault injection: delay every Recommend answer by this many milliseconds (0 = off).
    #[arg(long, env = "ARTIFICIAL_DELAY_MS", default_value_t = 0)]
    pub artificial_delay_ms: u64,
    /// Certificate identities allowed to call (comma-separated): URI SANs such as SPIFFE ids,
    /// DNS SANs, or the common name of a certificate without SANs. Applies with `TLS_MODE=mutual`.
    #[arg(
        long,
        env = "ALLOWED_CLIENTS",
        value_delimiter = ',',
        default_value = "marketplace"
    )]
    pub allowed_clients: Vec<String>,
    /// Plaintext admin address: `GET /healthz` (liveness) and `GET /readyz` (readiness).
    #[arg(long, env = "ADMIN_ADDR", default_value = "[::]:9090")]
    pub admin_addr: SocketAddr,
    /// Logging.
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogArgs,
    /// TLS files and mode.
    #[command(flatten, next_help_heading = "TLS")]
    pub tls: TlsArgs,
}

impl Config {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn artificial_delay(&self) -> Duration {
        Duration::from_millis(self.artificial_delay_ms)
    }
}
