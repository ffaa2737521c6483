//! The measurements: every throughput case once per round, with the servers' CPU per call, and
//! the latency sweep over concurrency; apart from the entry point, which only puts them in order.

use std::path::Path;

use anyhow::Result;

use super::{
    load::{grpc_args, http_args, load, load_on},
    overload,
    results::Measured,
    servers::{Server, metric},
    stack::{Case, Stack},
};

/// The concurrencies of the latency sweep.
pub(super) const SWEEP: [usize; 4] = [1, 8, 32, 128];

/// Every case once per round; also the TLS handshakes recommendations completed while only
/// the marketplace called it (the page runs).
pub(super) async fn run_rounds(
    loadgen: &Path,
    cases: &[Case<'_>],
    rounds: u32,
    rec_mtls: &Server,
) -> Result<(Vec<Measured>, f64)> {
    const HANDSHAKES: &str = "bookstore_tls_handshakes_total{result=\"completed\"}";
    // Every server on one CPU, the generator on the other: on shared CPUs the generator's own
    // cost per call, which differs between targets, moved the ratios (docs/performance.md).
    let mut servers: Vec<&Server> = cases.iter().flat_map(|c| c.3.iter().copied()).collect();
    servers.dedup_by_key(|s| s.pid());
    let cpus = overload::pin(&servers).await;
    let generator = cpus.map(|(_, generator)| generator);
    let mut handshakes = 0.0;
    let mut runs = Vec::new();
    for round in 0..rounds {
        for (case, server, args, cpu) in cases {
            eprintln!("round {} of {rounds}: {case}", round + 1);
            let before = if *case == "page" {
                Some(metric(rec_mtls, HANDSHAKES).await?)
            } else {
                None
            };
            let cpu_before = cpu_seconds(cpu);
            let (report, peaks) = load_on(generator, loadgen, args, server).await?;
            let server_cpu_us = cpu_seconds(cpu)
                .zip(cpu_before)
                .map(|(after, before)| (after - before) * 1e6 / (report.ok.max(1) as f64));
            if let Some(before) = before {
                handshakes += metric(rec_mtls, HANDSHAKES).await? - before;
            }
            runs.push(Measured {
                case: (*case).into(),
                round,
                report,
                peak_rss_kib: peaks.rss_kib,
                server_cpu_us,
            });
        }
    }
    overload::unpin(&servers).await;
    Ok((runs, handshakes))
}

/// User and system CPU seconds the processes have used so far (None if one is unreadable). The
/// load generator's warm-up second is inside the window; its calls are not counted, so a case's
/// CPU per call reads a little high, alike on both sides of a comparison.
fn cpu_seconds(servers: &[&Server]) -> Option<f64> {
    servers
        .iter()
        .map(|s| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid()?)).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: f64 =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            // USER_HZ, 100 on Linux.
            Some(ticks / 100.0)
        })
        .sum()
}

/// The page, its constant floor and Recommend at each concurrency of [`SWEEP`].
pub(super) async fn run_sweep(
    loadgen: &Path,
    stack: &Stack,
    certs: &Path,
    duration: f64,
) -> Result<Vec<Measured>> {
    let mut sweep = Vec::new();
    for concurrency in SWEEP {
        for (case, server, args) in [
            (
                "page",
                &stack.market,
                http_args(&stack.market, concurrency, duration),
            ),
            (
                "floor_page",
                &stack.floor_page,
                http_args(&stack.floor_page, concurrency, duration),
            ),
            (
                "recommend_mtls",
                &stack.rec_mtls,
                grpc_args(&stack.rec_mtls, Some(certs), concurrency, duration),
            ),
        ] {
            eprintln!("sweep: {case} at {concurrency}");
            let (report, peak_rss_kib) = load(loadgen, &args, server).await?;
            sweep.push(Measured {
                case: case.into(),
                round: 0,
                report,
                peak_rss_kib,
                server_cpu_us: None,
            });
        }
    }
    Ok(sweep)
}
