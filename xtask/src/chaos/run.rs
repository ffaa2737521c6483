//! One scenario's run as recorded (its timeline in intervals) and what is read from it: each
//! phase's pages and latency, the failures, the recovery, and its row of the table.

use std::time::Duration;

use loadgen::report::{Interval, Report};

use super::scenario::Scenario;

/// The timeline's intervals.
pub(super) const INTERVAL: Duration = Duration::from_millis(250);

/// One scenario's run.
pub(super) struct Run {
    pub(super) scenario: Scenario,
    pub(super) timeline: Vec<Interval>,
    /// When the fault began and ended, after the run began.
    pub(super) fault_at: Duration,
    pub(super) fault_end: Duration,
    /// From B's return until it had its share of calls again; None if it never came back (or
    /// was not meant to).
    pub(super) regained: Option<Duration>,
    pub(super) report: Report,
}

struct Phase {
    pages_per_s: f64,
    failed: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Run {
    fn phase(&self, from: Duration, to: Duration) -> Phase {
        let inside: Vec<&Interval> = self
            .timeline
            .iter()
            .filter(|i| {
                let at = Duration::from_secs_f64(i.at_s);
                at >= from && at < to
            })
            .collect();
        let ok: u64 = inside.iter().map(|i| i.ok).sum();
        let failed = inside.iter().map(|i| i.failed).sum();
        let span = (inside.len() as f64 * INTERVAL.as_secs_f64()).max(1e-9);
        let mut p50s: Vec<f64> = inside.iter().map(|i| i.p50_ms).collect();
        p50s.sort_by(f64::total_cmp);
        Phase {
            pages_per_s: ok as f64 / span,
            failed,
            p50_ms: p50s.get(p50s.len() / 2).copied().unwrap_or(0.0),
            p99_ms: inside.iter().map(|i| i.p99_ms).fold(0.0, f64::max),
        }
    }

    fn end(&self) -> Duration {
        Duration::from_secs_f64(self.timeline.len() as f64 * INTERVAL.as_secs_f64())
    }

    /// Failed pages from the fault on, and those after its first 2 s.
    fn failed(&self) -> (u64, u64) {
        let all = self.phase(self.fault_at, self.end()).failed;
        let late = self
            .phase(self.fault_at + Duration::from_secs(2), self.end())
            .failed;
        (all, late)
    }

    /// From the fault's start until the p99 of every interval after is under three times the
    /// healthy one (None if it never is).
    fn recovered(&self) -> Option<Duration> {
        let healthy = self.phase(Duration::ZERO, self.fault_at).p99_ms.max(0.001);
        let start = (self.fault_at.as_secs_f64() / INTERVAL.as_secs_f64()) as usize;
        let after = self.timeline.get(start..)?;
        let last_bad = after
            .iter()
            .rposition(|i| i.p99_ms >= 3.0 * healthy || i.failed > 0);
        match last_bad {
            None => Some(Duration::ZERO),
            Some(at) if at + 1 < after.len() => Some(INTERVAL * u32::try_from(at + 1).ok()?),
            Some(_) => None,
        }
    }

    pub(super) fn row(&self) -> String {
        let before = self.phase(Duration::ZERO, self.fault_at);
        let during = self.phase(self.fault_at, self.fault_end);
        let after = self.phase(self.fault_end, self.end());
        let (failed, late) = self.failed();
        let offered = self.report.rate.unwrap_or(0.0) * self.report.duration_s;
        let share = |d: Option<Duration>| {
            d.map_or("–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        format!(
            "| {} | {:.0} | {:.0} ({:.2}×) | {:.0} | {} ({:.3} %) | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} |",
            self.scenario.what(),
            before.pages_per_s,
            during.pages_per_s,
            during.pages_per_s / before.pages_per_s.max(1e-9),
            after.pages_per_s,
            failed,
            100.0 * failed as f64 / offered.max(1.0),
            late,
            before.p50_ms,
            before.p99_ms,
            during.p50_ms,
            during.p99_ms,
            after.p50_ms,
            after.p99_ms,
            share(self.recovered()),
            share(self.regained),
        )
    }

    /// What the run broke of what must hold everywhere (CI checks it): no page fails when a
    /// replica is killed or restarted, and none after the first 2 s of any fault.
    pub(super) fn broken(&self) -> Option<String> {
        let (failed, late) = self.failed();
        match self.scenario {
            Scenario::Kill | Scenario::Restart if failed > 0 => {
                Some(format!("{}: {failed} pages failed", self.scenario.what()))
            }
            _ if late > 0 => Some(format!(
                "{}: {late} pages failed after the fault's first 2 s",
                self.scenario.what()
            )),
            _ => None,
        }
    }
}

pub(super) const HEADER: &str = "| Replica B | Pages/s before | during | after | Failed pages | after the first 2 s | p50 / p99 ms before | during | after | p99 under 3× healthy after | B's share back after |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
