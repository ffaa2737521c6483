//! A bound on the requests being answered at once. Past it a request gets a 503 with
//! `Retry-After` before any work is done for it, so under an overload the excess costs a few
//! microseconds each and the requests let in keep their latency: without it every connection's
//! request is let in, and all of them share the CPU until each takes seconds.
//!
//! A place is for work: a request holds it while its handler runs, and gives it back when its
//! answer is ready. An answer that then waits for the client (one that stops reading, an HTTP/2
//! window left at zero) holds no place; the listener bounds those answers' bytes per connection
//! and in total, and closes a connection whose answers stop moving
//! ([`bookstore_common::http_server`]).
//!
//! Clients that ask again the moment they are refused would make a storm of refusals, each a
//! few microseconds of CPU taken from the pages let in. While refusals are most of what arrives,
//! and many a second, each refusal is answered only after [`STORM_DELAY`]: a client that waits
//! for its answer before asking again (an HTTP/1.1 connection, an HTTP/2 stream) is then
//! refused a few times a second instead of thousands.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bookstore_common::metrics::Metrics;
use metrics::Counter;
use tokio::sync::Semaphore;

use crate::error::{AppError, HtmlError, JsonError};

/// How long a refusal waits during a storm of them.
pub const STORM_DELAY: Duration = Duration::from_millis(100);

/// Requests being answered now, at most.
#[derive(Debug)]
pub struct InFlight {
    slots: Arc<Semaphore>,
    storm: StormWatch,
    /// `bookstore_requests_shed_total`.
    shed: Counter,
}

impl InFlight {
    pub fn new(max: usize, metrics: &Metrics) -> Arc<Self> {
        Arc::new(InFlight {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            storm: StormWatch::new(Instant::now()),
            shed: metrics.counter("bookstore_requests_shed_total", &[]),
        })
    }
}

/// Lets a request in if a slot is free (until its answer is ready), else answers 503: at once,
/// or after [`STORM_DELAY`] during a storm of refusals. JSON on the API, a page elsewhere.
pub async fn limit(
    State(in_flight): State<Arc<InFlight>>,
    request: Request,
    next: Next,
) -> Response {
    let arrived = Instant::now();
    let Ok(slot) = in_flight.slots.clone().try_acquire_owned() else {
        in_flight.shed.increment(1);
        if in_flight.storm.refused(arrived) {
            tokio::time::sleep(STORM_DELAY).await;
        }
        return if request.uri().path().starts_with("/api/") {
            JsonError(AppError::Busy).into_response()
        } else {
            HtmlError(AppError::Busy).into_response()
        };
    };
    in_flight.storm.let_in(arrived);
    let response = next.run(request).await;
    drop(slot);
    response
}

/// Counts, over windows of [`StormWatch::WINDOW`], the requests let in and refused, and tells
/// a storm of refusals: at least [`StormWatch::RATE`] a second, and ten or more for each
/// request let in. A storm, once seen, lasts [`StormWatch::HOLD`]: while refusals wait, the
/// clients that caused it ask less often and the counts no longer show it.
///
/// An open loop past the peak (arrivals that do not wait for answers) is no storm: at twice the
/// peak it is refused about as often as it is let in, and its refusals stay immediate.
#[derive(Debug)]
struct StormWatch {
    epoch: Instant,
    /// When the window began, in nanoseconds after `epoch`.
    window_start: AtomicU64,
    let_in: AtomicU64,
    refused: AtomicU64,
    /// Until when the last storm seen lasts, in nanoseconds after `epoch`.
    until: AtomicU64,
}

impl StormWatch {
    const WINDOW: Duration = Duration::from_millis(200);
    /// About a seventh of a CPU at some 14 µs a refusal (docs/performance.md).
    const RATE: u64 = 10_000;
    /// Far above an open loop's: at twice the peak, with the CPU slowed for a moment, one was
    /// seen refused four and a half times as often as let in.
    const RATIO: u64 = 10;
    const HOLD: Duration = Duration::from_secs(2);

    fn new(epoch: Instant) -> Self {
        StormWatch {
            epoch,
            window_start: AtomicU64::new(0),
            let_in: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            until: AtomicU64::new(0),
        }
    }

    fn let_in(&self, at: Instant) {
        self.let_in.fetch_add(1, Ordering::Relaxed);
        self.close_window(at);
    }

    /// Counts a refusal at `at`, and whether it falls in a storm.
    fn refused(&self, at: Instant) -> bool {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = self.close_window(at);
        now < self.until.load(Ordering::Acquire)
    }

    /// Ends the window if it has run its length (one caller does; the others go on), and tells
    /// from its counts whether a storm began. Returns `at` after `epoch`, in nanoseconds.
    fn close_window(&self, at: Instant) -> u64 {
        let now = nanos(at.saturating_duration_since(self.epoch));
        let start = self.window_start.load(Ordering::Acquire);
        let length = now.saturating_sub(start);
        if length >= nanos(Self::WINDOW)
            && self
                .window_start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let let_in = self.let_in.swap(0, Ordering::AcqRel);
            let refused = self.refused.swap(0, Ordering::AcqRel);
            let per_second = refused as f64 / Duration::from_nanos(length).as_secs_f64();
            if per_second >= Self::RATE as f64 && refused >= Self::RATIO * let_in {
                let was = self.until.swap(now + nanos(Self::HOLD), Ordering::AcqRel);
                if was <= now {
                    tracing::warn!(
                        refused_per_second = per_second.round(),
                        let_in,
                        refused,
                        "a storm of refusals: each now waits {} ms",
                        STORM_DELAY.as_millis()
                    );
                }
            }
        }
        now
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `watch` one window of `let_in` and `refused` requests spread evenly from `from`,
    /// and says whether the last refusal fell in a storm.
    fn window(watch: &StormWatch, from: Instant, let_in: u64, refused: u64) -> bool {
        let all = let_in + refused;
        let step = StormWatch::WINDOW / u32::try_from(all.max(1)).unwrap_or(u32::MAX);
        let mut stormy = false;
        for i in 0..all {
            let at = from + step * u32::try_from(i).unwrap_or(u32::MAX);
            if i < let_in {
                watch.let_in(at);
            } else {
                stormy = watch.refused(at);
            }
        }
        stormy
    }

    fn windows(watch: &StormWatch, epoch: Instant, first: u32, counts: &[(u64, u64)]) -> Vec<bool> {
        (first..)
            .zip(counts)
            .map(|(n, (let_in, refused))| {
                window(watch, epoch + StormWatch::WINDOW * n, *let_in, *refused)
            })
            .collect()
    }

    #[test]
    fn clients_asking_again_at_once_are_a_storm_and_it_outlasts_the_slowdown() {
        let epoch = Instant::now();
        let watch = StormWatch::new(epoch);
        // 200 pages and 12,000 refusals a window (60,000 a second): a storm, from the window
        // after the one that shows it; then, refusals slowed, a few hundred a window.
        let seen = windows(
            &watch,
            epoch,
            0,
            &[(200, 12_000), (200, 12_000), (1_800, 900)],
        );
        assert_eq!(seen, [false, true, true]);
        // Past the hold, with the clients back to asking at once only as often as before.
        let after = windows(&watch, epoch, 12, &[(1_800, 900), (1_800, 900)]);
        assert_eq!(after, [false, false]);
    }

    #[test]
    fn an_open_loop_past_the_peak_is_refused_at_once() {
        let epoch = Instant::now();
        let watch = StormWatch::new(epoch);
        // Twice the peak: as many refused as let in, thousands a second; then a moment when the
        // CPU served a third of that (as measured once at twice the peak).
        let counts = [(3_000, 3_000), (3_000, 3_000), (999, 4_483), (3_000, 3_000)];
        let seen = windows(&watch, epoch, 0, &counts);
        assert_eq!(seen, [false; 4]);
    }

    #[test]
    fn a_few_refusals_are_no_storm_even_alone() {
        let epoch = Instant::now();
        let watch = StormWatch::new(epoch);
        // Everything refused, but 900 a second.
        let seen = windows(&watch, epoch, 0, &[(0, 180); 5]);
        assert_eq!(seen, [false; 5]);
    }
}
