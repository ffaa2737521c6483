//! The overload part of `cargo xtask bench`: the page driven far past what the benchmark's
//! closed loops ask of it, over HTTP/1.1 with many connections and over a few h2c connections
//! with many streams each. For each: pages per second, failures and p99; the marketplace's peak
//! memory and open files, and what it logged; and its memory before, at its peak, and after a
//! pause, to show it comes back.
//!
//! Then the overload curve: an open loop (pages sent on a fixed schedule, whatever the answers
//! do, each timed from when it was due) from a quarter of the closed-loop peak to twice it. On a
//! machine of two or more CPUs the curve keeps the load generator on one CPU and both services on
//! another, and measures its own peak that way: sending twice the peak costs the generator
//! about as much CPU as the services spend, and on shared CPUs it would take that from them.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::{
    load::{http_args, load_on},
    servers::{Server, metric},
};

/// One overload run.
#[derive(Debug, Clone, Serialize)]
pub struct OverloadRun {
    pub what: String,
    pub pages_per_s: f64,
    /// The same load on a marketplace of the same build with MAX_REQUESTS_IN_FLIGHT out of the
    /// way (100,000), right after: the goodput the admission limit is judged against.
    #[serde(default)]
    pub unlimited_pages_per_s: Option<f64>,
    /// Pages answered 503, the marketplace's answer past MAX_REQUESTS_IN_FLIGHT or its queue.
    pub shed: u64,
    /// Pages that failed any other way.
    pub failed: u64,
    /// Those failures by kind (`http:transport`, `http:timeout`…).
    pub failed_by_kind: std::collections::BTreeMap<String, u64>,
    pub requests: u64,
    pub p99_ms: f64,
    pub peak_rss_kib: Option<u64>,
    pub peak_fds: Option<usize>,
    /// What the marketplace counted refusing meanwhile (its warm-up included).
    pub refused: Refusals,
    /// What it logged meanwhile (its warm-up included).
    pub logged: Logged,
}

/// Lines and bytes a service wrote to its log.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Logged {
    pub lines: u64,
    pub bytes: u64,
}

impl Logged {
    /// The log's length now (0 for a server without one).
    fn mark(server: &Server) -> u64 {
        server
            .log
            .as_ref()
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |m| m.len())
    }

    /// What was written after `mark` (only that part of the log is read).
    fn since(server: &Server, mark: u64) -> Self {
        use std::io::{Read, Seek, SeekFrom};
        let mut new = Vec::new();
        if let Some(mut file) = server
            .log
            .as_ref()
            .and_then(|p| std::fs::File::open(p).ok())
            && file.seek(SeekFrom::Start(mark)).is_ok()
        {
            let _ = file.read_to_end(&mut new);
        }
        Logged {
            lines: new.iter().filter(|b| **b == b'\n').count() as u64,
            bytes: new.len() as u64,
        }
    }

    fn cells(&self) -> String {
        format!("{} ({:.1} KiB)", self.lines, self.bytes as f64 / 1024.0)
    }
}

/// The marketplace's own refusal counters, as increases over a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Refusals {
    /// `bookstore_requests_shed_total`: past MAX_REQUESTS_IN_FLIGHT.
    pub in_flight: u64,
    /// `bookstore_client_queue_rejected_total`, every reason: the call queue full or too slow.
    pub call_queue: u64,
    /// `bookstore_connections_refused_total`: connections closed on arrival.
    pub connections: u64,
}

impl Refusals {
    /// The counters' totals now.
    async fn now(market: &Server) -> Result<[f64; 3]> {
        Ok([
            metric(market, "bookstore_requests_shed_total").await?,
            metric(market, "bookstore_client_queue_rejected_total").await?,
            metric(market, "bookstore_connections_refused_total").await?,
        ])
    }

    /// `load`, with what the marketplace refused during it.
    async fn around<T>(
        market: &Server,
        load: impl Future<Output = Result<T>>,
    ) -> Result<(T, Self)> {
        let before = Self::now(market).await?;
        let out = load.await?;
        let after = Self::now(market).await?;
        let increase = |i: usize| (after[i] - before[i]).max(0.0) as u64;
        Ok((
            out,
            Refusals {
                in_flight: increase(0),
                call_queue: increase(1),
                connections: increase(2),
            },
        ))
    }
}

/// One point of the open-loop curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Pages a second sent, as a fraction of the closed-loop peak.
    pub fraction: f64,
    pub offered_per_s: f64,
    /// Pages answered 200 a second.
    pub goodput_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
    pub requests: u64,
    /// Failures by kind (`http:503`, `http:transport`…).
    pub failed_by_kind: std::collections::BTreeMap<String, u64>,
    /// How long a failed page took to be refused.
    pub failed_p99_ms: f64,
    pub peak_rss_kib: Option<u64>,
    pub peak_fds: Option<usize>,
    /// What the marketplace counted refusing meanwhile (its warm-up included).
    pub refused: Refusals,
    /// What it logged meanwhile (its warm-up included).
    pub logged: Logged,
}

/// How the load generator names a 503 answer.
const SHED: &str = "http:503";

/// Offered load of the curve, as fractions of the closed-loop peak.
const CURVE: [f64; 8] = [0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0];

/// The whole overload section.
#[derive(Debug, Clone, Serialize)]
pub struct Overload {
    pub runs: Vec<OverloadRun>,
    /// The curve's closed-loop pages per second (32 HTTP/1.1 connections, CPUs as for the
    /// curve), which its rates are fractions of.
    pub peak_per_s: f64,
    /// Whether the curve ran with the load generator and the services on CPUs of their own.
    #[serde(default)]
    pub pinned: bool,
    pub curve: Vec<CurvePoint>,
    pub rss_before_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// After `settle_s` without load.
    pub rss_after_kib: Option<u64>,
    pub settle_s: f64,
}

/// The open loop's cap on pages outstanding at once, per 1,000 pages a second offered (the load
/// generator's `--concurrency` in open loop; at least 1,000 in all). Meant to be above what the
/// marketplace lets in (128 requests in flight, on at most 2,048 connections), so that the
/// marketplace refuses the excess, not the generator.
const OPEN_LOOP_CONNECTIONS_PER_1000: usize = 500;

/// Closed-loop connections for the curve's own peak (the benchmark's page figure).
const PEAK_CONNECTIONS: usize = 32;

/// The CPUs for the curve, (services, load generator), if this machine has two and `taskset`
/// can keep each process to its own: `services` (every thread of each) now, the generator when
/// it is started.
pub(super) async fn pin(services: &[&Server]) -> Option<(usize, usize)> {
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        return None;
    }
    for server in services {
        let pid = server.pid()?;
        let pinned = tokio::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .ok()?;
        if !pinned.success() {
            return None;
        }
    }
    Some((0, 1))
}

/// Gives `services` every CPU again.
pub(super) async fn unpin(services: &[&Server]) {
    let all = format!(
        "0-{}",
        std::thread::available_parallelism().map_or(1, usize::from) - 1
    );
    for pid in services.iter().filter_map(|s| s.pid()) {
        let _ = tokio::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &all, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .await;
    }
}

/// Drives `market` at 32, 256 and 1,000 HTTP/1.1 connections and 8 h2c connections × 200
/// streams, `duration` seconds each, then the open-loop curve (with `services`, the marketplace
/// and the recommendations behind it, pinned if it can be), then waits `settle` and measures
/// the marketplace's memory again.
pub async fn run(
    loadgen: &Path,
    services: [&Server; 2],
    unlimited: &Server,
    duration: f64,
    settle: Duration,
) -> Result<Overload> {
    let market = services[0];
    let rss = || market.pid().and_then(bookstore_process::rss_kib);
    let rss_before_kib = rss();
    let mut runs = Vec::new();
    type Args = fn(&Server, f64) -> Vec<String>;
    let cases: [(&str, Args); 5] = [
        ("HTTP/1.1, 32 connections", |m, d| http_args(m, 32, d)),
        ("HTTP/1.1, 256 connections", |m, d| http_args(m, 256, d)),
        ("HTTP/1.1, 1,000 connections", |m, d| http_args(m, 1000, d)),
        ("h2c, 8 connections × 50 streams", |m, d| {
            let mut args = http_args(m, 400, d);
            args.extend(["--h2c-connections".into(), "8".into()]);
            args
        }),
        ("h2c, 8 connections × 200 streams", |m, d| {
            let mut args = http_args(m, 1600, d);
            args.extend(["--h2c-connections".into(), "8".into()]);
            args
        }),
    ];
    // Services on one CPU, the generator on the other, as for the curve: what the marketplace
    // serves, not what the generator leaves it (docs/performance.md, the instruments).
    let mut all = services.to_vec();
    all.push(unlimited);
    let cpus = pin(&all).await;
    let generator_cpu = cpus.map(|(_, generator)| generator);
    for (what, args) in cases {
        eprintln!("overload: {what}");
        let mark = Logged::mark(market);
        let ((report, peaks), refused) = Refusals::around(
            market,
            load_on(generator_cpu, loadgen, &args(market, duration), market),
        )
        .await?;
        eprintln!("overload: {what}, with the limit out of the way");
        let (open, _) = load_on(
            generator_cpu,
            loadgen,
            &args(unlimited, duration),
            unlimited,
        )
        .await?;
        let shed = report.errors.get(SHED).copied().unwrap_or(0);
        runs.push(OverloadRun {
            what: what.into(),
            pages_per_s: report.throughput,
            unlimited_pages_per_s: Some(open.throughput),
            shed,
            failed: report.errors.values().sum::<u64>() - shed,
            failed_by_kind: report
                .errors
                .iter()
                .filter(|(kind, _)| kind.as_str() != SHED)
                .map(|(kind, n)| (kind.clone(), *n))
                .collect(),
            requests: report.requests,
            p99_ms: report.latency_ms.p99,
            peak_rss_kib: peaks.rss_kib,
            peak_fds: peaks.open_fds,
            refused,
            logged: Logged::since(market, mark),
        });
    }
    unpin(&[unlimited]).await;
    match cpus {
        Some((services, generator)) => eprintln!(
            "overload curve: services on CPU {services}, the load generator on CPU {generator}"
        ),
        None => eprintln!("overload curve: CPUs shared (fewer than two, or no taskset)"),
    }
    let peak_args = http_args(market, PEAK_CONNECTIONS, duration);
    let (peak, _) = load_on(generator_cpu, loadgen, &peak_args, market).await?;
    let peak_per_s = peak.throughput;
    let mut curve = Vec::new();
    for fraction in CURVE {
        let rate = (peak_per_s * fraction).round().max(1.0);
        eprintln!("overload curve: {rate:.0} pages/s offered ({fraction}× the peak)");
        let mut args = http_args(market, OPEN_LOOP_CONNECTIONS_PER_1000, duration);
        args.extend(["--rate".into(), rate.to_string()]);
        let mark = Logged::mark(market);
        let ((report, peaks), refused) =
            Refusals::around(market, load_on(generator_cpu, loadgen, &args, market)).await?;
        curve.push(CurvePoint {
            fraction,
            offered_per_s: rate,
            goodput_per_s: report.throughput,
            p50_ms: report.latency_ms.p50,
            p99_ms: report.latency_ms.p99,
            failed: report.errors.values().sum(),
            requests: report.requests,
            failed_by_kind: report.errors.clone(),
            failed_p99_ms: report.failed_latency_ms.p99,
            peak_rss_kib: peaks.rss_kib,
            peak_fds: peaks.open_fds,
            refused,
            logged: Logged::since(market, mark),
        });
    }
    unpin(&services).await;
    let rss_peak_kib = runs
        .iter()
        .filter_map(|r| r.peak_rss_kib)
        .chain(curve.iter().filter_map(|p| p.peak_rss_kib))
        .max();
    eprintln!("overload: waiting {settle:?} for memory to come back");
    tokio::time::sleep(settle).await;
    Ok(Overload {
        runs,
        peak_per_s,
        pinned: cpus.is_some(),
        curve,
        rss_before_kib,
        rss_peak_kib,
        rss_after_kib: rss(),
        settle_s: settle.as_secs_f64(),
    })
}

/// The columns of what the marketplace counted refusing.
const REFUSED_HEAD: &str = "Shed in flight | Refused by the call queue | Connections refused";

fn refused_cells(r: &Refusals) -> String {
    format!("{} | {} | {}", r.in_flight, r.call_queue, r.connections)
}

/// The section of the Markdown report.
pub fn markdown(md: &mut String, o: &Overload) {
    let mib = |k: Option<u64>| k.map_or("–".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    let fds = |n: Option<usize>| n.map_or("–".into(), |n| n.to_string());
    let _ = writeln!(
        md,
        "\nThe page under overload (closed loop, every caller sending its next request when \
         answered; the load generator on one CPU, the services on another), beside the same \
         build with MAX_REQUESTS_IN_FLIGHT out of the way (100,000):\n"
    );
    let _ = writeln!(
        md,
        "| Load | Pages/s | Limit out of the way | Ratio | Shed (503) | Failed otherwise | Of | p99 ms | Peak RSS (MiB) | Peak open files | {REFUSED_HEAD} | Logged: lines (size) |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &o.runs {
        let (open, ratio) = r
            .unlimited_pages_per_s
            .map_or(("–".into(), "–".into()), |u| {
                (
                    format!("{u:.0}"),
                    format!("{:.2}×", r.pages_per_s / u.max(1e-9)),
                )
            });
        let _ = writeln!(
            md,
            "| {} | {:.0} | {open} | {ratio} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
            r.what,
            r.pages_per_s,
            r.shed,
            r.failed,
            r.requests,
            r.p99_ms,
            mib(r.peak_rss_kib),
            fds(r.peak_fds),
            refused_cells(&r.refused),
            r.logged.cells()
        );
    }
    let cpus = if o.pinned {
        "the load generator on one CPU, both services on another"
    } else {
        "the load generator and the services sharing the CPUs"
    };
    let _ = writeln!(
        md,
        "\nThe overload curve (open loop over HTTP/1.1: pages sent on a schedule whatever the \
         answers do, latency from when each was due; {cpus}; the peak is a closed loop of \
         {PEAK_CONNECTIONS} connections in that setting, {:.0} pages/s):\n",
        o.peak_per_s
    );
    let _ = writeln!(
        md,
        "| Offered | Pages/s offered | Goodput (200/s) | Of the peak | p50 ms | p99 ms | Failed | Failed p99 ms | Failures | {REFUSED_HEAD} | Peak open files | Logged: lines (size) |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    for p in &o.curve {
        let kinds = p
            .failed_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "| {:.2}× | {:.0} | {:.0} | {:.0} % | {:.1} | {:.1} | {} | {:.1} | {} | {} | {} | {} |",
            p.fraction,
            p.offered_per_s,
            p.goodput_per_s,
            100.0 * p.goodput_per_s / o.peak_per_s.max(1e-9),
            p.p50_ms,
            p.p99_ms,
            p.failed,
            p.failed_p99_ms,
            kinds,
            refused_cells(&p.refused),
            fds(p.peak_fds),
            p.logged.cells()
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

/// The curve as a picture: pages answered and refused per second against the offered rate, and
/// beside it the latency of the answered ones.
pub fn curve_svg(o: &Overload, date: &str) -> String {
    let (w, h, top, panel_w, gap) = (940.0, 340.0, 50.0, 360.0, 110.0);
    let plot_h = h - top - 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">The page, open loop from a quarter of its peak ({:.0} pages/s) to twice it, {date}</text>",
        o.peak_per_s
    );
    let max_offered = o.curve.iter().map(|p| p.offered_per_s).fold(1.0, f64::max);
    let per_s = |p: &CurvePoint| p.failed as f64 / p.requests.max(1) as f64 * p.offered_per_s;
    let rates: [Series<'_>; 3] = [
        ("offered", "#bbbbbb", &|p| p.offered_per_s),
        ("answered 200", "#7a3b1d", &|p| p.goodput_per_s),
        ("failed", "#d08c2c", &per_s),
    ];
    panel(
        &mut s,
        (70.0, top, panel_w, plot_h),
        "pages/s",
        max_offered,
        max_offered,
        o,
        &rates,
    );
    let max_ms = o.curve.iter().map(|p| p.p99_ms).fold(1.0, f64::max);
    let latencies: [Series<'_>; 2] = [
        ("p50 of 200s", "#2f5d8a", &|p| p.p50_ms),
        ("p99 of 200s", "#7a3b1d", &|p| p.p99_ms),
    ];
    panel(
        &mut s,
        (70.0 + panel_w + gap, top, panel_w, plot_h),
        "ms",
        max_offered,
        max_ms,
        o,
        &latencies,
    );
    s.push_str("</svg>\n");
    s
}

type Series<'a> = (&'a str, &'a str, &'a dyn Fn(&CurvePoint) -> f64);

/// One chart: x the offered rate, y up to `max_y`, a line per series, the legend underneath.
fn panel(
    s: &mut String,
    (left, top, w, h): (f64, f64, f64, f64),
    unit: &str,
    max_x: f64,
    max_y: f64,
    o: &Overload,
    series: &[Series<'_>],
) {
    let x = |v: f64| left + v / max_x * w;
    let y = |v: f64| top + h - v / max_y * h;
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        top + h,
        left + w,
        top + h,
        top + h
    );
    for tick in [0.0, 0.5, 1.0] {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>",
            left - 6.0,
            y(tick * max_y) + 4.0,
            tick * max_y,
            x(tick * max_x),
            top + h + 16.0,
            tick * max_x
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">pages/s offered</text>\n<text x=\"{left}\" y=\"{}\">{unit}</text>",
        left + w / 2.0,
        top + h + 32.0,
        top - 8.0
    );
    if o.peak_per_s > 0.0 {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#999999\" stroke-dasharray=\"4 4\"/>",
            x(o.peak_per_s),
            top + h
        );
    }
    for (i, (name, colour, value)) in series.iter().enumerate() {
        let points: Vec<String> = o
            .curve
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.offered_per_s), y(value(p))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let lx = left + i as f64 * 120.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            top + h + 44.0,
            lx + 16.0,
            top + h + 50.0
        );
    }
}
