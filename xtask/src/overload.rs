//! The overload part of `cargo xtask bench`: the page driven far past what the benchmark's
//! closed loops ask of it, over HTTP/1.1 with many connections and over a few h2c connections
//! with many streams each. For each: pages per second, failures and p99; and the marketplace's
//! memory before, at its peak, and after a pause, to show it comes back.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;

use crate::bench::{Server, http_args, load, rss_kib};

/// One overload run.
#[derive(Debug, Clone, Serialize)]
pub struct OverloadRun {
    pub what: String,
    pub pages_per_s: f64,
    pub failed: u64,
    pub requests: u64,
    pub p99_ms: f64,
    pub peak_rss_kib: Option<u64>,
}

/// The whole overload section.
#[derive(Debug, Clone, Serialize)]
pub struct Overload {
    pub runs: Vec<OverloadRun>,
    pub rss_before_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// After `settle_s` without load.
    pub rss_after_kib: Option<u64>,
    pub settle_s: f64,
}

/// Drives `market` at 32, 256 and 1,000 HTTP/1.1 connections and 8 h2c connections × 200
/// streams, `duration` seconds each, then waits `settle` and measures its memory again.
pub async fn run(
    loadgen: &Path,
    market: &Server,
    duration: f64,
    settle: Duration,
) -> Result<Overload> {
    let rss = || market.pid().and_then(rss_kib);
    let rss_before_kib = rss();
    let mut runs = Vec::new();
    let cases: [(&str, Vec<String>); 4] = [
        ("HTTP/1.1, 32 connections", http_args(market, 32, duration)),
        (
            "HTTP/1.1, 256 connections",
            http_args(market, 256, duration),
        ),
        (
            "HTTP/1.1, 1,000 connections",
            http_args(market, 1000, duration),
        ),
        ("h2c, 8 connections × 200 streams", {
            let mut args = http_args(market, 1600, duration);
            args.extend(["--h2c-connections".into(), "8".into()]);
            args
        }),
    ];
    for (what, args) in cases {
        eprintln!("overload: {what}");
        let (report, peak_rss_kib) = load(loadgen, &args, market).await?;
        runs.push(OverloadRun {
            what: what.into(),
            pages_per_s: report.throughput,
            failed: report.errors.values().sum(),
            requests: report.requests,
            p99_ms: report.latency_ms.p99,
            peak_rss_kib,
        });
    }
    let rss_peak_kib = runs.iter().filter_map(|r| r.peak_rss_kib).max();
    eprintln!("overload: waiting {settle:?} for memory to come back");
    tokio::time::sleep(settle).await;
    Ok(Overload {
        runs,
        rss_before_kib,
        rss_peak_kib,
        rss_after_kib: rss(),
        settle_s: settle.as_secs_f64(),
    })
}

/// The section of the Markdown report.
pub fn markdown(md: &mut String, o: &Overload) {
    let mib = |k: Option<u64>| k.map_or("–".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    let _ = writeln!(
        md,
        "\nThe page under overload (closed loop, every caller sending its next request when \
         answered):\n"
    );
    let _ = writeln!(
        md,
        "| Load | Pages/s | Failed | Of | p99 ms | Peak RSS (MiB) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for r in &o.runs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {:.1} | {} |",
            r.what,
            r.pages_per_s,
            r.failed,
            r.requests,
            r.p99_ms,
            mib(r.peak_rss_kib)
        );
    }
    let _ = writeln!(
        md,
        "\nMarketplace RSS: {} MiB before, {} MiB at the peak, {} MiB {:.0} s after the last run.",
        mib(o.rss_before_kib),
        mib(o.rss_peak_kib),
        mib(o.rss_after_kib),
        o.settle_s
    );
}
