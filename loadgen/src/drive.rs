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
    report::{Latency, Report},
    target::{Outcome, Target},
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

/// What each caller collects.
struct Tally {
    latency: Histogram<u64>,
    /// Of calls that were sent and failed: how fast the refusal came.
    failed_latency: Histogram<u64>,
    requests: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency: histogram(),
            failed_latency: histogram(),
            requests: 0,
            ok: 0,
            errors: BTreeMap::new(),
        }
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
    }
}

/// Runs `load` against `target` until `stop`; `progress` draws a bar on a terminal.
pub async fn run(target: Arc<Target>, load: Load, stop: Stop, progress: bool) -> Report {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let bar = (progress && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(draw_progress(started, stop, done.clone())));
    let tally = match load {
        Load::Closed { concurrency } => closed(&target, concurrency, stop, &done).await,
        Load::Open {
            rate,
            max_outstanding,
        } => open(&target, rate, max_outstanding, stop, &done).await,
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
        errors: tally.errors,
    }
}

async fn closed(
    target: &Arc<Target>,
    concurrency: usize,
    stop: Stop,
    done: &Arc<AtomicU64>,
) -> Tally {
    let deadline = match stop {
        Stop::After(d) => Some(Instant::now() + d),
        Stop::Requests(_) => None,
    };
    let tickets = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|worker| {
            let (target, tickets, done) = (target.clone(), tickets.clone(), done.clone());
            tokio::spawn(async move {
                let mut tally = Tally::new();
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
                    tally.record(outcome, sent.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::new();
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
) -> Tally {
    let start = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Outcome, Duration)>();
    let outstanding = Arc::new(AtomicU64::new(0));
    let mut tally = Tally::new();
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
                tally.record(Outcome::Failed("overloaded".into()), Duration::ZERO);
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
                    let _ = tx.send((outcome, scheduled.elapsed()));
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            issued += 1;
        }
        while let Ok((outcome, took)) = rx.try_recv() {
            tally.record(outcome, took);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(tx);
    while let Some((outcome, took)) = rx.recv().await {
        tally.record(outcome, took);
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
