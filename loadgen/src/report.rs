//! What a run measured, for people (one block of text) and machines (JSON).

use std::{collections::BTreeMap, fmt, time::Duration};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The outcome of one load run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What was driven, e.g. `grpc+mtls://127.0.0.1:50051` or `http://127.0.0.1:5000/`.
    pub target: String,
    /// `closed` (fixed concurrency) or `open` (fixed rate).
    pub mode: String,
    pub concurrency: usize,
    /// Calls per second asked for (open loop only).
    pub rate: Option<f64>,
    pub connections: usize,
    pub duration_s: f64,
    /// Calls that completed, successfully or not.
    pub requests: u64,
    /// Calls answered OK (gRPC status OK, or HTTP 2xx).
    pub ok: u64,
    /// Failed calls by kind: `grpc:Unavailable`, `http:503`, `transport`, `overloaded`…
    pub errors: BTreeMap<String, u64>,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency of successful calls, in milliseconds.
    pub latency_ms: Latency,
    /// Latency of calls that were sent and failed: how fast a refusal came.
    #[serde(default)]
    pub failed_latency_ms: Latency,
    /// With `--timeline-ms`: the run cut into intervals of that length, each call counted in
    /// the interval it was sent (open loop: was due) in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Interval>,
}

/// One interval of a run's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// When it starts, in seconds after the run started.
    pub at_s: f64,
    pub ok: u64,
    pub failed: u64,
    /// Latency of its successful calls, in milliseconds (0 with none).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub(crate) fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_ms;
        writeln!(f, "target      {}", self.target)?;
        match self.rate {
            Some(rate) => writeln!(f, "load        open loop at {rate} calls/s")?,
            None => writeln!(
                f,
                "load        closed loop, {} concurrent",
                self.concurrency
            )?,
        }
        writeln!(
            f,
            "requests    {} in {:.1?} ({} ok, {} failed)",
            self.requests,
            self.duration(),
            self.ok,
            self.error_count()
        )?;
        writeln!(f, "throughput  {:.0} ok/s", self.throughput)?;
        writeln!(
            f,
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        for (kind, n) in &self.errors {
            writeln!(f, "error       {kind}: {n}")?;
        }
        let l = &self.failed_latency_ms;
        if l.max > 0.0 {
            writeln!(
                f,
                "failed ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.p50, l.p90, l.p99, l.p999, l.max
            )?;
        }
        Ok(())
    }
}
