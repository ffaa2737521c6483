//! An address's health: in the rotation or ejected, its failures in a row and its failure rate
//! over a window.

use std::time::{Duration, Instant};

/// The window over which failure rates are compared, and the calls an address needs in it.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(10);
pub(super) const RATE_MIN_CALLS: u64 = 20;

/// Where an address stands in the rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Standing {
    In,
    /// Out until the probe after `until` passes.
    Ejected {
        until: Instant,
    },
}

/// An address's health: its standing, its failures in a row and over the window.
#[derive(Debug)]
pub(super) struct Health {
    pub(super) standing: Standing,
    pub(super) in_a_row: u32,
    /// Ejections in a row (each doubles the next one's length); forgotten after
    /// `FORGIVEN_AFTER` in the rotation.
    pub(super) times: u32,
    pub(super) rejoined: Option<Instant>,
    pub(super) window_start: Instant,
    pub(super) calls: u64,
    pub(super) failures: u64,
    /// The last window's counts, for comparing failure rates.
    pub(super) last_calls: u64,
    pub(super) last_failures: u64,
}

impl Health {
    pub(super) fn new(now: Instant) -> Self {
        Health {
            standing: Standing::In,
            in_a_row: 0,
            times: 0,
            rejoined: None,
            window_start: now,
            calls: 0,
            failures: 0,
            last_calls: 0,
            last_failures: 0,
        }
    }

    pub(super) fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= RATE_WINDOW {
            (self.last_calls, self.last_failures) = (self.calls, self.failures);
            (self.calls, self.failures) = (0, 0);
            self.window_start = now;
        }
    }

    /// Failures over calls in the current and the last window, if there were enough calls.
    pub(super) fn failure_rate(&self) -> Option<f64> {
        let calls = self.calls + self.last_calls;
        (calls >= RATE_MIN_CALLS)
            .then(|| (self.failures + self.last_failures) as f64 / calls as f64)
    }
}
