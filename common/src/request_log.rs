//! Which requests and calls get a log line of their own.
//!
//! A line per request costs the request path its formatting and a write to standard error: at
//! tens of thousands of calls a second, about 15 % of what recommendations could serve in the
//! benchmark. So by default every failed or slow one is logged, and one in `LOG_SAMPLE` of the
//! rest (the first one included, so a log shows that traffic started). The counts and latencies
//! of all of them are in the metrics either way. `LOG_SAMPLE=1` logs every one; `0` only failed
//! and slow ones.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// The default for `LOG_SAMPLE`.
pub const DEFAULT_SAMPLE: u64 = 100;
/// The default for `LOG_SLOW_MS`.
pub const DEFAULT_SLOW_MS: u64 = 500;

/// A service's choice of lines (`LOG_SAMPLE`, `LOG_SLOW_MS`), from its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// One in this many of the fast successful ones; 0 for none.
    pub every: u64,
    /// At least this long is slow, and always logged.
    pub slow: Duration,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            every: DEFAULT_SAMPLE,
            slow: Duration::from_millis(DEFAULT_SLOW_MS),
        }
    }
}

/// How one kind of line (a service's HTTP requests, or its gRPC calls) is sampled: each kind
/// counts its own, so that one kind's count cannot step over the other's turn.
#[derive(Debug)]
pub struct RequestLog {
    /// One in this many of the fast successful ones; 0 for none.
    every: u64,
    /// At least this long is slow, and always logged.
    slow: Duration,
    /// Fast successful ones seen so far.
    seen: AtomicU64,
}

impl RequestLog {
    pub fn new(Sampling { every, slow }: Sampling) -> Self {
        RequestLog {
            every,
            slow,
            seen: AtomicU64::new(0),
        }
    }

    /// Whether a request that `failed` (or not) after `elapsed` gets its line.
    pub fn admit(&self, failed: bool, elapsed: Duration) -> bool {
        if failed || elapsed >= self.slow {
            return true;
        }
        match self.every {
            0 => false,
            1 => true,
            n => self.seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(1);

    fn sampling(every: u64) -> Sampling {
        Sampling {
            every,
            slow: Duration::from_millis(500),
        }
    }

    fn admitted(log: &RequestLog, n: usize) -> usize {
        (0..n).filter(|_| log.admit(false, FAST)).count()
    }

    #[test]
    fn one_in_n_fast_successes_is_logged_starting_with_the_first() {
        let log = RequestLog::new(sampling(100));
        assert!(
            log.admit(false, FAST),
            "the first one shows traffic started"
        );
        assert_eq!(admitted(&log, 999), 9);
        assert_eq!(admitted(&log, 1000), 10);
    }

    #[test]
    fn failed_and_slow_ones_are_always_logged() {
        let log = RequestLog::new(sampling(0));
        assert_eq!(admitted(&log, 1000), 0);
        assert!(log.admit(true, FAST));
        assert!(log.admit(false, Duration::from_millis(500)));
        assert!(!log.admit(false, Duration::from_millis(499)));
    }

    #[test]
    fn a_sample_of_one_logs_every_request() {
        let log = RequestLog::new(sampling(1));
        assert_eq!(admitted(&log, 1000), 1000);
    }
}
