//! Driving a target: closed loop (N callers back to back) or open loop (calls started on a
//! fixed schedule, each timed from when it was due).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::{
    outcome::Outcome,
    report::{Interval, Latency, Report},
    target::Target,
};

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

/// How load is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// This many callers, each sending its next call when the last one is answered.
    Closed { concurrency: usize },
    /// This many calls a second, whatever the answers do; at most `max_outstanding` at once
    /// (past it a call is counted as `overloaded` and not sent).
    Open { rate: f64, max_outstanding: usize },
}

/// Latencies from 1 µs to 60 s, 3 significant figures.
fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
    })
}

/// The timeline's latencies: 2 significant figures keep an interval's histogram small.
fn interval_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).unwrap_or_else(|_| {
        Histogram::new(2).unwrap_or_else(|_| unreachable!("2 significant figures is valid"))
    })
}

/// A run's timeline: intervals of `every`, from `start`.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    every: Duration,
    intervals: Vec<(u64, u64, Histogram<u64>)>,
}

impl Timeline {
    pub fn new(start: Instant, every: Duration) -> Self {
        Timeline {
            start,
            every: every.max(Duration::from_millis(1)),
            intervals: Vec::new(),
        }
    }

    fn record(&mut self, sent: Instant, ok: bool, micros: u64) {
        let index = (sent.saturating_duration_since(self.start).as_nanos() / self.every.as_nanos())
            as usize;
        while self.intervals.len() <= index {
            self.intervals.push((0, 0, interval_histogram()));
        }
        let (oks, failed, latency) = &mut self.intervals[index];
        if ok {
            *oks += 1;
            latency.saturating_record(micros);
        } else {
            *failed += 1;
        }
    }

    fn merge(&mut self, other: &Timeline) {
        while self.intervals.len() < other.intervals.len() {
            self.intervals.push((0, 0, interval_histogram()));
        }
        for (mine, theirs) in self.intervals.iter_mut().zip(&other.intervals) {
            mine.0 += theirs.0;
            mine.1 += theirs.1;
            let _ = mine.2.add(&theirs.2);
        }
    }

    fn report(&self) -> Vec<Interval> {
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        self.intervals
            .iter()
            .enumerate()
            .map(|(i, (ok, failed, latency))| Interval {
                at_s: self.every.as_secs_f64() * i as f64,
                ok: *ok,
                failed: *failed,
                p50_ms: ms(latency, 0.5),
                p99_ms: ms(latency, 0.99),
            })
            .collect()
    }
}

/// What each caller collects.
struct Tally {
    latency: Histogram<u64>,
    /// Of calls that were sent and failed: how fast the refusal came.
    failed_latency: Histogram<u64>,
    requests: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    timeline: Option<Timeline>,
}

impl Tally {
    fn new(timeline: Option<&Timeline>) -> Self {
        Tally {
            latency: histogram(),
            failed_latency: histogram(),
            requests: 0,
            ok: 0,
            errors: BTreeMap::new(),
            timeline: timeline.cloned(),
        }
    }

    /// Records a call sent (or due) at `sent`.
    fn record_at(&mut self, outcome: Outcome, took: Duration, sent: Instant) {
        if let Some(timeline) = &mut self.timeline {
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
            timeline.record(sent, matches!(outcome, Outcome::Ok), micros);
        }
        self.record(outcome, took);
    }

    fn record(&mut self, outcome: Outcome, took: Duration) {
        self.requests += 1;
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.latency.saturating_record(micros);
            }
            Outcome::Failed(kind) => {
                // A call never sent (the open loop's own cap) has no latency to speak of.
                if !took.is_zero() {
                    self.failed_latency.saturating_record(micros);
                }
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.failed_latency.add(&other.failed_latency);
        self.requests += other.requests;
        self.ok += other.ok;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.timeline, &other.timeline) {
            mine.merge(theirs);
        }
    }
}

/// Runs `load` against `target` until `stop`; `progress` draws a bar on a terminal; with
/// `timeline`, the report also has the run cut into intervals of that length.
pub async fn run(
    target: Arc<Target>,
    load: Load,
    stop: Stop,
    progress: bool,
    timeline: Option<Duration>,
) -> Report {
    let started = Instant::now();
    let timeline = timeline.map(|every| Timeline::new(started, every));
    let timeline = timeline.as_ref();
    let done = Arc::new(AtomicU64::new(0));
    let bar = (progress && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(draw_progress(started, stop, done.clone())));
    let tally = match load {
        Load::Closed { concurrency } => closed(&target, concurrency, stop, &done, timeline).await,
        Load::Open {
            rate,
            max_outstanding,
        } => open(&target, rate, max_outstanding, stop, &done, timeline).await,
    };
    let elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.abort();
        eprintln!();
    }
    let (concurrency, rate) = match load {
        Load::Closed { concurrency } => (concurrency, None),
        Load::Open {
            rate,
            max_outstanding,
        } => (max_outstanding, Some(rate)),
    };
    Report {
        target: target.label().to_owned(),
        mode: if rate.is_some() { "open" } else { "closed" }.into(),
        concurrency,
        rate,
        connections: target.connections(concurrency),
        duration_s: elapsed.as_secs_f64(),
        requests: tally.requests,
        ok: tally.ok,
        throughput: tally.ok as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: Latency::from_micros(&tally.latency),
        failed_latency_ms: Latency::from_micros(&tally.failed_latency),
        timeline: tally.timeline.map(|t| t.report()).unwrap_or_default(),
        errors: tally.errors,
    }
}

async fn closed(
    target: &Arc<Target>,
    concurrency: usize,
    stop: Stop,
    done: &Arc<AtomicU64>,
    timeline: Option<&Timeline>,
) -> Tally {
    let deadline = match stop {
        Stop::After(d) => Some(Instant::now() + d),
        Stop::Requests(_) => None,
    };
    let tickets = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|worker| {
            let (target, tickets, done) = (target.clone(), tickets.clone(), done.clone());
            let timeline = timeline.cloned();
            tokio::spawn(async move {
                let mut tally = Tally::new(timeline.as_ref());
                loop {
                    match (stop, deadline) {
                        (_, Some(deadline)) if Instant::now() >= deadline => break,
                        (Stop::Requests(n), _) if tickets.fetch_add(1, Ordering::Relaxed) >= n => {
                            break;
                        }
                        _ => {}
                    }
                    let sent = Instant::now();
                    let outcome = target.call(worker).await;
                    tally.record_at(outcome, sent.elapsed(), sent);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::new(timeline);
    for worker in workers {
        if let Ok(tally) = worker.await {
            total.merge(tally);
        }
    }
    total
}

async fn open(
    target: &Arc<Target>,
    rate: f64,
    max_outstanding: usize,
    stop: Stop,
    done: &Arc<AtomicU64>,
    timeline: Option<&Timeline>,
) -> Tally {
    let start = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Outcome, Duration, Instant)>();
    let outstanding = Arc::new(AtomicU64::new(0));
    let mut tally = Tally::new(timeline);
    let mut issued: u64 = 0;
    let total = match stop {
        Stop::Requests(n) => n,
        Stop::After(d) => (d.as_secs_f64() * rate).round() as u64,
    };
    while issued < total {
        // Every call that is due by now, each timed from its own due moment.
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while issued < due {
            let scheduled = start + Duration::from_secs_f64(issued as f64 / rate);
            if outstanding.load(Ordering::Relaxed) >= max_outstanding as u64 {
                tally.record_at(
                    Outcome::Failed("overloaded".into()),
                    Duration::ZERO,
                    scheduled,
                );
            } else {
                outstanding.fetch_add(1, Ordering::Relaxed);
                let (target, tx, outstanding, done) = (
                    target.clone(),
                    tx.clone(),
                    outstanding.clone(),
                    done.clone(),
                );
                let worker = issued as usize;
                tokio::spawn(async move {
                    let outcome = target.call(worker).await;
                    let _ = tx.send((outcome, scheduled.elapsed(), scheduled));
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            issued += 1;
        }
        while let Ok((outcome, took, scheduled)) = rx.try_recv() {
            tally.record_at(outcome, took, scheduled);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(tx);
    while let Some((outcome, took, scheduled)) = rx.recv().await {
        tally.record_at(outcome, took, scheduled);
    }
    tally
}

async fn draw_progress(started: Instant, stop: Stop, done: Arc<AtomicU64>) {
    const WIDTH: usize = 30;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let count = done.load(Ordering::Relaxed);
        let fraction = match stop {
            Stop::After(d) => started.elapsed().as_secs_f64() / d.as_secs_f64(),
            Stop::Requests(n) => count as f64 / n.max(1) as f64,
        }
        .clamp(0.0, 1.0);
        let filled = (fraction * WIDTH as f64) as usize;
        let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-9);
        eprint!(
            "\r[{}{}] {:>3.0}%  {count} calls  {rate:.0}/s ",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            fraction * 100.0
        );
        let _ = std::io::stderr().flush();
    }
}
