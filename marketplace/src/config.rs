//! Every setting of the marketplace, each a CLI flag and an environment variable.

use std::{net::SocketAddr, time::Duration};

use bookstore_server::{http_server::HttpLimits, service::ServiceArgs};
use clap::Parser;

use crate::{routes::forwarded::IpRange, source::QueueBounds};

/// HTTP/2 streams one client connection may have open at once (browsers open far fewer).
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The ranges above fit a usize on every platform we build for.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The bookstore's web front end.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "marketplace", version, about)]
#[command(mut_arg("admin_addr", |a| a.default_value("[::]:9091").required(false)))]
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
    /// Addresses of the recommendations service (`ip:port`, comma-separated), used as given
    /// instead of resolving RECOMMENDATIONS_HOST, which still names the certificate to expect
    /// (unless RECOMMENDATIONS_TLS_NAME does): replicas on fixed addresses, or a test's.
    #[arg(long, env = "RECOMMENDATIONS_ADDRS", value_delimiter = ',')]
    pub recommendations_addrs: Vec<SocketAddr>,
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
    /// Proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed (addresses or
    /// ranges, comma-separated, e.g. `10.0.0.0/8`): the client's address in the logs comes from
    /// them, and a request they say came over HTTPS is answered with HSTS. Unset: none, and
    /// those headers are ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpRange>,
    /// Open connections to LISTEN_ADDR at most; past it new connections are closed on arrival
    /// (and counted) while the open ones keep being served.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Seconds a client has to send a whole request head, and a new connection its first
    /// request (HTTP/2 included); also how long a kept-alive HTTP/1.1 connection may wait for
    /// its next request.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_secs: u64,
    /// Bytes buffered for one unfinished request head at most (8192 or more); a longer head
    /// gets 431. Heads over 16 KiB of headers or 2 KiB of target are refused by the app anyway.
    #[arg(long, env = "MAX_HEAD_BYTES", default_value_t = 24 * 1024,
          value_parser = clap::value_parser!(u64).range(8192..=1024 * 1024))]
    pub max_head_bytes: u64,
    /// Bytes of unfinished request heads on LISTEN_ADDR at most, over every connection (HTTP/2
    /// header blocks included); past it the connections that have held theirs longest are
    /// closed. At least MAX_HEAD_BYTES.
    #[arg(long, env = "MAX_HEAD_BYTES_TOTAL", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(8192..=1 << 34))]
    pub max_head_bytes_total: u64,
    /// Requests on LISTEN_ADDR being worked on at once at most (about a hundredth of a second
    /// of pages at one core's peak); past it a request gets a 503 with Retry-After at once, or,
    /// once clients are found to ask again at once, after waiting up to 250 ms for a place.
    /// Pages a second cannot exceed it over the backend's latency.
    #[arg(long, env = "MAX_REQUESTS_IN_FLIGHT", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_requests_in_flight: u64,
    /// Page requests waiting for a free call slot at most (each recommendations address takes
    /// CALLS_PER_BACKEND calls at once); past it a page gets a fast 503 with Retry-After.
    #[arg(long, env = "MAX_QUEUED_CALLS", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_queued_calls: u64,
    /// Milliseconds a page request may wait for a free call slot at most; past it the page gets
    /// a 503 with Retry-After, and while the queue takes that long new arrivals get it at once.
    #[arg(long, env = "MAX_QUEUE_WAIT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub max_queue_wait_ms: u64,
    /// Calls in flight to one recommendations address at most (its server sheds past 256 on
    /// one connection).
    #[arg(long, env = "CALLS_PER_BACKEND", default_value_t = 192,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub calls_per_backend: u64,
    /// What every service takes: shutdown grace, admin port, logging, TLS, `healthcheck`.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    /// Settings that are valid one by one but not together. Checked before anything is loaded
    /// or bound.
    pub fn check(&self) -> Result<(), String> {
        if self.max_head_bytes_total < self.max_head_bytes {
            return Err(format!(
                "MAX_HEAD_BYTES_TOTAL ({}) is below MAX_HEAD_BYTES ({}): not even one whole head \
                 would fit",
                self.max_head_bytes_total, self.max_head_bytes
            ));
        }
        Ok(())
    }

    pub fn recommendations_resolve_interval(&self) -> Duration {
        Duration::from_secs(self.recommendations_resolve_secs)
    }

    pub fn recommendations_timeout(&self) -> Duration {
        Duration::from_millis(self.recommendations_timeout_ms)
    }

    pub fn max_requests_in_flight(&self) -> usize {
        to_usize(self.max_requests_in_flight)
    }

    /// How many calls may wait for a call slot, and for how long each.
    pub fn queue_bounds(&self) -> QueueBounds {
        QueueBounds {
            max_queued: to_usize(self.max_queued_calls),
            max_wait: Duration::from_millis(self.max_queue_wait_ms),
        }
    }

    /// The limits of the public HTTP listener.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: to_usize(self.max_connections),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_head_bytes: to_usize(self.max_head_bytes),
            max_head_bytes_total: to_usize(self.max_head_bytes_total),
            max_streams: MAX_STREAMS_PER_CONNECTION,
        }
    }

    /// The name the server certificate must carry.
    pub fn recommendations_tls_name(&self) -> &str {
        self.recommendations_tls_name
            .as_deref()
            .unwrap_or(&self.recommendations_host)
    }
}
