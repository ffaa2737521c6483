//! The queue for call slots: a place in it, given back on drop, and how long the last call to
//! leave it waited, which decides whether newcomers are refused at once.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// How many calls may wait for a slot (`MAX_QUEUED_CALLS`), and for how long each
/// (`MAX_QUEUE_WAIT_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
    pub max_queued: usize,
    pub max_wait: Duration,
}

/// A place in the queue for call slots, given back when dropped (the page's request may be
/// abandoned while it waits).
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(super) fn join(queued: &'a AtomicUsize, max: usize) -> Option<Self> {
        if queued.fetch_add(1, Ordering::AcqRel) >= max {
            queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Waiting(queued))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long the last call to leave the queue waited, and when it left: a verdict that goes stale.
/// Under a standing overload calls leave all the time, each after the whole bound; once nobody
/// has left for the bound's length, the last wait says nothing about the next one.
pub(super) struct RecentWait {
    since: Instant,
    /// Both in µs; `left_at_us` from `since`.
    waited_us: AtomicU64,
    left_at_us: AtomicU64,
}

impl RecentWait {
    pub(super) fn new() -> Self {
        RecentWait {
            since: Instant::now(),
            waited_us: AtomicU64::new(0),
            left_at_us: AtomicU64::new(0),
        }
    }

    pub(super) fn left(&self, waited: Duration, now: Instant) {
        self.waited_us.store(micros(waited), Ordering::Relaxed);
        self.left_at_us.store(
            micros(now.saturating_duration_since(self.since)),
            Ordering::Relaxed,
        );
    }

    /// Whether the last call to leave, within `bound` of `now`, waited all of `bound`.
    pub(super) fn too_slow(&self, bound: Duration, now: Instant) -> bool {
        let bound = micros(bound);
        let now = micros(now.saturating_duration_since(self.since));
        self.waited_us.load(Ordering::Relaxed) >= bound
            && now.saturating_sub(self.left_at_us.load(Ordering::Relaxed)) < bound
    }
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
