//! The cap on a listener's open connections, shared by the HTTP listeners
//! ([`crate::http_server`]) and the gRPC one (the recommendations service's `listener`): a
//! semaphore of slots, the `bookstore_connections_refused_total{listener, reason}` counters and the
//! `bookstore_connections_open{listener}` gauge, and one rate limit for the listener's warnings.
//!
//! Hand-written: tower's concurrency limits bound requests, not connections, and neither
//! hyper-util's server nor tonic's caps the connections it accepts. A semaphore permit that
//! lives as long as the connection is the whole mechanism.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use metrics::{Counter, Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use bookstore_common::{log_limit::LogLimit, metrics::Metrics};

/// How long a listener pauses after an accept error such as EMFILE: the error would otherwise
/// come back at once and spin the accept loop.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A listener's connection slots and the counters of its refusals.
pub struct ConnectionCap {
    listener: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    at_cap: Counter,
    accept_errors: Counter,
    open: Gauge,
    log: Mutex<LogLimit>,
}

impl std::fmt::Debug for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCap")
            .field("listener", &self.listener)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// An open connection's slot: given back, and the connection counted closed, when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl ConnectionCap {
    /// `max` open connections on `listener`; at most `warnings_per_minute` warning lines a
    /// minute, refusals and whatever else the listener logs through [`ConnectionCap::may_log`].
    pub fn new(
        metrics: &Metrics,
        listener: &'static str,
        max: usize,
        warnings_per_minute: u32,
    ) -> Self {
        let refused = |reason| {
            metrics.counter(
                "bookstore_connections_refused_total",
                &[("listener", listener), ("reason", reason)],
            )
        };
        metrics
            .gauge("bookstore_connections_max", &[("listener", listener)])
            .set(max as f64);
        ConnectionCap {
            listener,
            max,
            slots: Arc::new(Semaphore::new(max)),
            at_cap: refused("max_connections"),
            accept_errors: refused("accept_error"),
            open: metrics.gauge("bookstore_connections_open", &[("listener", listener)]),
            log: Mutex::new(LogLimit::per_minute(warnings_per_minute)),
        }
    }

    /// A slot for a connection from `peer`, or None past the cap (counted, and warned about
    /// within the rate limit): the caller closes the connection.
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.at_cap.increment(1);
            if let Some(suppressed) = self.may_log() {
                tracing::warn!(
                    listener = self.listener,
                    peer_addr = %peer,
                    max_connections = self.max,
                    suppressed,
                    "connection refused: too many open connections"
                );
            }
            return None;
        };
        self.open.increment(1.0);
        Some(Slot {
            _permit: permit,
            open: self.open.clone(),
        })
    }

    /// Counts (and, within the rate limit, logs) a failed accept. The caller pauses accepting
    /// for [`ACCEPT_ERROR_PAUSE`].
    pub fn accept_failed(&self, error: &std::io::Error) {
        self.accept_errors.increment(1);
        if let Some(suppressed) = self.may_log() {
            tracing::warn!(listener = self.listener, %error, suppressed, "cannot accept a connection");
        }
    }

    /// Some(number of warnings left out since the last one) if a warning may be logged now.
    pub fn may_log(&self) -> Option<u64> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).admit()
    }
}
