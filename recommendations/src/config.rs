//! Every setting of the recommendations service, each a CLI flag and an environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bookstore_common::tls::TlsMode;
use bookstore_server::service::ServiceArgs;
use clap::Parser;

use crate::listener::ConnLimits;

/// The bookstore's recommendations gRPC service.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "recommendations", version, about)]
#[command(mut_arg("admin_addr", |a| a.default_value("[::]:9090").required(false)))]
#[deny(missing_docs)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "[::]:50051")]
    pub listen_addr: SocketAddr,
    /// JSON catalog to serve instead of the nine built-in books (format in docs/services.md).
    #[arg(long, env = "CATALOG_PATH")]
    pub catalog_path: Option<PathBuf>,
    /// Fault injection: delay every Recommend answer by this many milliseconds (0 = off).
    #[arg(long, env = "ARTIFICIAL_DELAY_MS", default_value_t = 0)]
    pub artificial_delay_ms: u64,
    /// Fault injection: the fraction of Recommend calls answered UNAVAILABLE, from 0 (off) to 1.
    #[arg(long, env = "FAILURE_RATE", default_value = "0")]
    pub failure_rate: FailureRate,
    /// Certificate identities allowed to call (comma-separated): URI SANs such as SPIFFE ids,
    /// DNS SANs, or the common name of a certificate without SANs. Applies with `TLS_MODE=mutual`.
    #[arg(long, env = "ALLOWED_CLIENTS", default_value = "marketplace")]
    pub allowed_clients: AllowedClients,
    /// Bytes a catalog file may have at most; a larger file stops start-up.
    #[arg(long, env = "CATALOG_MAX_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub catalog_max_bytes: u64,
    /// Open connections to LISTEN_ADDR at most; past it new connections are closed on arrival
    /// (and counted) while the open ones keep being served.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// TLS handshakes in progress at most, apart from the open connections (a connection takes
    /// its place among MAX_CONNECTIONS once its handshake is done); past it the oldest pending
    /// handshake gives way to the new connection, first among those that have sent nothing.
    #[arg(long, env = "MAX_HANDSHAKES", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_handshakes: u64,
    /// Seconds a TLS handshake may take (one round trip and a signature or two: far less on
    /// any network a mutual-TLS client would use).
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub tls_handshake_timeout_secs: u64,
    /// Seconds a connection may go with nothing moving either way (not even an HTTP/2 ping)
    /// before it is closed.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_secs: u64,
    /// Calls in flight on one connection at most; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MAX_CALLS_PER_CONNECTION", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_calls_per_connection: u64,
    /// Calls in flight on the whole server at most; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MAX_CALLS", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_calls: u64,
    /// What every service takes: shutdown grace, admin port, logging, TLS, `healthcheck`.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    pub fn artificial_delay(&self) -> Duration {
        Duration::from_millis(self.artificial_delay_ms)
    }

    /// The limits of the gRPC listener.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: to_usize(self.max_connections),
            max_handshakes: to_usize(self.max_handshakes),
            handshake_timeout: Duration::from_secs(self.tls_handshake_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }

    /// Settings that are valid one by one but not together. Checked before anything is loaded
    /// or bound.
    pub fn check(&self) -> Result<(), String> {
        if self.service.tls.tls_mode == TlsMode::Mutual && self.allowed_clients.is_empty() {
            return Err("ALLOWED_CLIENTS is empty: no caller could ever be served".into());
        }
        Ok(())
    }
}

/// The ranges above fit a usize on every platform we build for.
pub fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The certificate identities allowed to call: the comma-separated list with each entry trimmed
/// and empty ones dropped (`a, ,b` allows `a` and `b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedClients(Vec<String>);

impl AllowedClients {
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for AllowedClients {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(AllowedClients(
            s.split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

/// A fraction of calls, from 0 to 1, kept in millionths so the settings stay comparable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureRate {
    millionths: u32,
}

impl FailureRate {
    const SCALE: u32 = 1_000_000;

    pub fn is_off(self) -> bool {
        self.millionths == 0
    }

    /// Whether this call should fail, given a uniform draw.
    pub fn strikes(self, rng: &mut impl rand::Rng) -> bool {
        !self.is_off() && rng.random_range(0..Self::SCALE) < self.millionths
    }
}

impl std::fmt::Display for FailureRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", f64::from(self.millionths) / f64::from(Self::SCALE))
    }
}

impl std::str::FromStr for FailureRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rate: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number; use a fraction such as 0.2"))?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!("{rate} is outside 0 to 1"));
        }
        // In range, so the product fits a u32 exactly enough.
        let millionths = (rate * f64::from(Self::SCALE)).round() as u32;
        Ok(FailureRate { millionths })
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn allowed_clients_are_trimmed_and_empty_entries_dropped() {
        let parse = |s: &str| s.parse::<AllowedClients>().expect("infallible");
        assert_eq!(
            parse(" marketplace , ,spiffe://bookstore/ns/x/sa/y,").as_slice(),
            ["marketplace", "spiffe://bookstore/ns/x/sa/y"]
        );
        assert!(parse(" , ").is_empty());
        let mut config = Config::parse_from(["recommendations", "--allowed-clients", ","]);
        config.service.tls.tls_mode = TlsMode::Mutual;
        assert_eq!(
            config.check(),
            Err("ALLOWED_CLIENTS is empty: no caller could ever be served".into())
        );
        config.service.tls.tls_mode = TlsMode::Server;
        assert_eq!(
            config.check(),
            Ok(()),
            "no client certificates, nothing to check"
        );
    }

    #[test]
    fn failure_rates_parse_only_between_zero_and_one() {
        assert!("0".parse::<FailureRate>().expect("0").is_off());
        assert_eq!(
            "0.25".parse::<FailureRate>().expect("0.25").to_string(),
            "0.25"
        );
        assert_eq!("1".parse::<FailureRate>().expect("1").to_string(), "1");
        for bad in ["-0.1", "1.5", "NaN", "half", ""] {
            assert!(bad.parse::<FailureRate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_failure_rate_strikes_about_that_often() {
        let mut rng = StdRng::seed_from_u64(7);
        let rate: FailureRate = "0.3".parse().expect("rate");
        let strikes = (0..10_000).filter(|_| rate.strikes(&mut rng)).count();
        assert!((2_700..3_300).contains(&strikes), "{strikes}");
        let never = FailureRate::default();
        assert!(!(0..1000).any(|_| never.strikes(&mut rng)));
        let always: FailureRate = "1".parse().expect("rate");
        assert!((0..1000).all(|_| always.strikes(&mut rng)));
    }
}
