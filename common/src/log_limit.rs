//! Rate-limiting a repeated warning, so a flood of bad connections cannot fill a disk: the first
//! few occurrences in a window are logged, the rest only counted, and the next line logged says
//! how many were left out. The exact totals are in the metrics.
//!
//! Hand-written because it is small (a window, a burst and a count carried into the next line)
//! and belongs to the warning, not to the subscriber: a limit in the logging layer would thin
//! every event of a call site alike, where only these refusal warnings need it, each with its
//! own budget.

use std::time::{Duration, Instant};

/// Admits at most `burst` log lines per window.
#[derive(Debug)]
pub struct LogLimit {
    window: Duration,
    burst: u32,
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines a minute.
    pub fn per_minute(burst: u32) -> Self {
        LogLimit::new(Duration::from_secs(60), burst)
    }

    pub fn new(window: Duration, burst: u32) -> Self {
        LogLimit {
            window,
            burst,
            started: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Some(number of occurrences left out since the last line logged) if this one may be
    /// logged; None if it is to be left out.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .is_none_or(|started| now.duration_since(started) >= self.window);
        if fresh {
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_counted_and_the_count_is_reported_next_window() {
        let mut limit = LogLimit::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..10).map(|_| limit.admit_at(t0)).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none), "{admitted:?}");
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(59)), None);
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(60)), Some(8));
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(61)), Some(0));
    }
}
