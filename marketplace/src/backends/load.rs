//! An address's load as the balancer weighs it: calls in flight, how long they have waited,
//! and a peak-EWMA of its latency.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How fast a latency estimate forgets (as Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// An address's latency estimate before its first answer.
pub(super) const FIRST_ESTIMATE: Duration = Duration::from_millis(1);

/// An address's load: calls in flight, how long they have been waiting, and its latency.
#[derive(Debug)]
pub(super) struct Load {
    pub(super) epoch: Instant,
    pub(super) in_flight: AtomicUsize,
    /// The start times of the calls in flight, summed, in µs after `epoch`.
    pub(super) started_sum_us: AtomicU64,
    pub(super) estimate: Mutex<PeakEwma>,
    /// The estimate as last sampled (f64 bits) and when (µs after `epoch`), for the balancer to
    /// read without the lock.
    pub(super) estimate_bits: AtomicU64,
    pub(super) estimate_at_us: AtomicU64,
}

/// A latency estimate that jumps up to a slower sample and decays toward faster ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeakEwma {
    pub(super) seconds: f64,
    pub(super) at: Instant,
    /// When this estimate started: calls sent before then say nothing about it.
    pub(super) since: Instant,
}

impl PeakEwma {
    pub(super) fn new(now: Instant) -> Self {
        PeakEwma {
            seconds: FIRST_ESTIMATE.as_secs_f64(),
            at: now,
            since: now,
        }
    }

    /// The estimate at `now`, decayed toward zero since the last sample: an address that has
    /// not answered for a while gets a chance again.
    pub(super) fn at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.seconds * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// Takes in the latency of a call sent at `started` and answered at `now`, unless it was
    /// sent before this estimate started (a replica readmitted after a freeze still answers
    /// the calls it held, each as slow as the freeze was long).
    pub(super) fn sample_call(&mut self, started: Instant, now: Instant) -> bool {
        if started < self.since {
            return false;
        }
        self.sample(now.saturating_duration_since(started), now);
        true
    }

    pub(super) fn sample(&mut self, took: Duration, now: Instant) {
        let took = took.as_secs_f64();
        let current = self.at(now);
        self.seconds = if took > current {
            took
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            current * keep + took * (1.0 - keep)
        };
        self.at = now;
    }
}

impl Load {
    pub(super) fn new(now: Instant) -> Self {
        Load {
            epoch: now,
            in_flight: AtomicUsize::new(0),
            started_sum_us: AtomicU64::new(0),
            estimate: Mutex::new(PeakEwma::new(now)),
            estimate_bits: AtomicU64::new(FIRST_ESTIMATE.as_secs_f64().to_bits()),
            estimate_at_us: AtomicU64::new(0),
        }
    }

    pub(super) fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// (latency estimate, calls in flight) now: the estimate is at least the mean time the calls
    /// in flight have been waiting, so an address that stopped answering costs more with every
    /// call sent to it.
    pub(super) fn now(&self, now: Instant) -> (f64, usize) {
        let sampled = f64::from_bits(self.estimate_bits.load(Ordering::Relaxed));
        let since = self
            .micros(now)
            .saturating_sub(self.estimate_at_us.load(Ordering::Relaxed));
        let estimate = sampled * (-(since as f64 / 1e6) / DECAY.as_secs_f64()).exp();
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if in_flight == 0 {
            return (estimate, 0);
        }
        let started = self.started_sum_us.load(Ordering::Acquire) / in_flight as u64;
        let waiting = self.micros(now).saturating_sub(started) as f64 / 1e6;
        (estimate.max(waiting), in_flight)
    }

    pub(super) fn cost(&self, now: Instant) -> f64 {
        let (estimate, in_flight) = self.now(now);
        estimate * (in_flight + 1) as f64
    }

    /// Makes `estimate` the one the balancer reads.
    pub(super) fn publish(&self, estimate: &PeakEwma) {
        self.estimate_bits
            .store(estimate.seconds.to_bits(), Ordering::Relaxed);
        self.estimate_at_us
            .store(self.micros(estimate.at), Ordering::Relaxed);
    }
}
