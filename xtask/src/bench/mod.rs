//! `cargo xtask bench`: the whole-process benchmark.
//!
//! Builds release binaries, starts every server on loopback, and measures each service next to
//! its floor (a minimal server answering the same bytes), interleaved A B A B so that drift on a
//! shared machine hits both alike. Figures are reported as ratios against those floors. Also
//! measured: time from exec to ready, idle and loaded RSS, binary sizes, latency against
//! concurrency, and a catalog of 1,000,000 books. Writes `bench/results/<date>.{json,md,svg}` and
//! `<date>-overload.svg`.
//!
//! Here: what to measure and the run itself. `servers` starts and probes the processes under
//! test, `load` drives them with the load generator, `report` writes the Markdown and the
//! picture, and `overload` runs the page past its peak.

mod load;
mod overload;
mod report;
mod servers;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Result, bail};
use loadgen::report::Report;
use serde::Serialize;
use tokio::process::Command;

use crate::root;
use load::{grpc_args, http_args, load};
use report::{markdown, svg};
use servers::{
    Server, http_body, metric, start_floor, start_original, start_service, write_catalog,
};

/// How much to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// A B rounds per comparison.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds per point of the concurrency sweep.
    #[arg(long, default_value_t = 3.0)]
    pub sweep_duration: f64,
    /// Books in the large catalog.
    #[arg(long, default_value_t = 1_000_000)]
    pub big_catalog: u32,
    /// Also measure the original Python stack (Flask + grpcio, installed into target/bench-venv
    /// from PyPI) the same way, as the page's baseline.
    #[arg(long)]
    pub original: bool,
    /// A smoke run: 1 s measurements, one round, a 10,000-book catalog; results go to
    /// target/bench instead of bench/results.
    #[arg(long)]
    pub quick: bool,
}

/// Callers for the throughput comparisons: gRPC over 4 HTTP/2 connections, pages over 32
/// keep-alive connections.
const GRPC_CONCURRENCY: usize = 64;
const GRPC_CONNECTIONS: usize = 4;
const HTTP_CONCURRENCY: usize = 32;
const SWEEP: [usize; 4] = [1, 8, 32, 128];

/// A load run and the peak RSS of the server under it.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    case: String,
    round: u32,
    report: Report,
    peak_rss_kib: Option<u64>,
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: String,
    args: String,
    binaries_bytes: BTreeMap<String, u64>,
    ready_ms: BTreeMap<String, f64>,
    idle_rss_kib: BTreeMap<String, u64>,
    /// TLS handshakes recommendations completed during the page runs, and the pages served
    /// meanwhile: no handshake per request.
    backend_handshakes: f64,
    pages: u64,
    runs: Vec<Measured>,
    sweep: Vec<Measured>,
    summary: Vec<Row>,
    overload: overload::Overload,
}

/// One line of the table: a case next to its floor.
#[derive(Debug, Clone, Serialize)]
struct Row {
    what: String,
    throughput: f64,
    floor_throughput: f64,
    /// The median over rounds of this round's throughput over the baseline's in the same round,
    /// and the lowest and highest of those ratios: how far the noise moved it.
    ratio: f64,
    ratio_low: f64,
    ratio_high: f64,
    p50_ms: f64,
    p99_ms: f64,
    floor_p99_ms: f64,
    errors: u64,
    target: String,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn summarize(runs: &[Measured], case: &str, floor: &str, what: &str, target: &str) -> Option<Row> {
    let pick = |name: &str| -> Vec<&Measured> { runs.iter().filter(|m| m.case == name).collect() };
    let (ours, base) = (pick(case), pick(floor));
    if ours.is_empty() || base.is_empty() {
        return None;
    }
    let med = |ms: &[&Measured], f: fn(&Report) -> f64| {
        let mut v: Vec<f64> = ms.iter().map(|m| f(&m.report)).collect();
        median(&mut v)
    };
    // Each round's pair was measured within the same round, a few runs apart at most, so its
    // ratio is freer of the machine's drift than a ratio of medians taken minutes apart.
    let mut ratios: Vec<f64> = ours
        .iter()
        .filter_map(|m| {
            let b = base.iter().find(|b| b.round == m.round)?;
            Some(m.report.throughput / b.report.throughput.max(1e-9))
        })
        .collect();
    let ratio = median(&mut ratios);
    Some(Row {
        what: what.into(),
        throughput: med(&ours, |r| r.throughput),
        floor_throughput: med(&base, |r| r.throughput),
        ratio,
        ratio_low: ratios.iter().copied().fold(ratio, f64::min),
        ratio_high: ratios.iter().copied().fold(ratio, f64::max),
        p50_ms: med(&ours, |r| r.latency_ms.p50),
        p99_ms: med(&ours, |r| r.latency_ms.p99),
        floor_p99_ms: med(&base, |r| r.latency_ms.p99),
        errors: ours.iter().map(|m| m.report.error_count()).sum(),
        target: target.into(),
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs ({model}), Linux, loopback")
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    let (duration, rounds, sweep_duration, big) = if args.quick {
        (1.0, 1, 1.0, 10_000)
    } else {
        (
            args.duration,
            args.rounds,
            args.sweep_duration,
            args.big_catalog,
        )
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "recommendations",
            "-p",
            "marketplace",
            "-p",
            "loadgen",
        ])
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let bin = root().join("target").join("release");
    let loadgen = bin.join("loadgen");
    let work = std::env::temp_dir().join(format!("bookstore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let certs = work.join("certs");
    bookstore_certs::generate(&certs, false)?;
    let catalog = work.join("catalog.json");
    write_catalog(&catalog, big)?;

    eprintln!("starting servers");
    let certs_env = ("CERTS_DIR", certs.display().to_string());
    let rec_mtls = start_service(
        "recommendations",
        &bin.join("recommendations"),
        std::slice::from_ref(&certs_env),
        &work,
    )
    .await?;
    let rec_plain = start_service(
        "recommendations (plaintext)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("TLS_MODE", "off".into())],
        &work,
    )
    .await?;
    let rec_text = start_service(
        "recommendations (text log)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("LOG_FORMAT", "text".into())],
        &work,
    )
    .await?;
    let rec_every_call = start_service(
        "recommendations (a line per call)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("LOG_SAMPLE", "1".into())],
        &work,
    )
    .await?;
    let rec_big = start_service(
        "recommendations (big catalog)",
        &bin.join("recommendations"),
        &[
            certs_env.clone(),
            ("CATALOG_PATH", catalog.display().to_string()),
        ],
        &work,
    )
    .await?;
    let market = start_service(
        "marketplace",
        &bin.join("marketplace"),
        &[
            certs_env.clone(),
            ("RECOMMENDATIONS_HOST", "127.0.0.1".into()),
            ("RECOMMENDATIONS_PORT", rec_mtls.addr.port().to_string()),
            ("RECOMMENDATIONS_TLS_NAME", "localhost".into()),
        ],
        &work,
    )
    .await?;
    let floor_mtls = start_floor(
        "floor-grpc (mTLS)",
        &loadgen,
        &[
            "floor-grpc".into(),
            "--certs".into(),
            certs.display().to_string(),
        ],
    )
    .await?;
    let floor_plain = start_floor("floor-grpc", &loadgen, &["floor-grpc".into()]).await?;
    let page = http_body(market.addr, "/").await?;
    let page_file = work.join("page.html");
    std::fs::write(&page_file, &page)?;
    let floor_page = start_floor(
        "floor-http",
        &loadgen,
        &[
            "floor-http".into(),
            "--body-file".into(),
            page_file.display().to_string(),
        ],
    )
    .await?;
    let floor_chain = start_floor(
        "floor-chain",
        &loadgen,
        &[
            "floor-chain".into(),
            "--backend".into(),
            floor_mtls.addr.to_string(),
            "--certs".into(),
            certs.display().to_string(),
            "--body-file".into(),
            page_file.display().to_string(),
        ],
    )
    .await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut idle_rss_kib = BTreeMap::new();
    let mut ready_ms = BTreeMap::new();
    for server in [&rec_mtls, &market, &rec_big, &floor_mtls, &floor_page] {
        if let Some(rss) = server.pid().and_then(bookstore_process::rss_kib) {
            idle_rss_kib.insert(server.name.clone(), rss);
        }
        if let Some(ready) = server.ready_after {
            ready_ms.insert(server.name.clone(), ready.as_secs_f64() * 1e3);
        }
    }

    // Each comparison's two cases run close together in each round: a floor runs once a round,
    // just before the first case compared with it (the text-log and line-per-call cases are the
    // third and fourth runs after it; the constant page is the second after the page, the
    // original's the third), so a drift of the machine between rounds touches both sides of a
    // ratio alike.
    let cases: Vec<(&str, &Server, Vec<String>)> = vec![
        (
            "floor_grpc_mtls",
            &floor_mtls,
            grpc_args(&floor_mtls, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls",
            &rec_mtls,
            grpc_args(&rec_mtls, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_big_catalog",
            &rec_big,
            grpc_args(&rec_big, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_text_log",
            &rec_text,
            grpc_args(&rec_text, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_every_call",
            &rec_every_call,
            grpc_args(&rec_every_call, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_plain",
            &rec_plain,
            grpc_args(&rec_plain, None, GRPC_CONCURRENCY, duration),
        ),
        (
            "floor_grpc_plain",
            &floor_plain,
            grpc_args(&floor_plain, None, GRPC_CONCURRENCY, duration),
        ),
        (
            "page",
            &market,
            http_args(&market, HTTP_CONCURRENCY, duration),
        ),
        (
            "floor_chain",
            &floor_chain,
            http_args(&floor_chain, HTTP_CONCURRENCY, duration),
        ),
        (
            "floor_page",
            &floor_page,
            http_args(&floor_page, HTTP_CONCURRENCY, duration),
        ),
    ];
    let original = if args.original {
        eprintln!("starting the original Python stack");
        Some(start_original(&certs, &work).await?)
    } else {
        None
    };
    let mut cases = cases;
    if let Some((_, flask)) = &original {
        cases.push((
            "original_page",
            flask,
            http_args(flask, HTTP_CONCURRENCY, duration),
        ));
    }
    const HANDSHAKES: &str = "bookstore_tls_handshakes_total{result=\"completed\"}";
    let mut handshakes = 0.0;
    let mut runs = Vec::new();
    for round in 0..rounds {
        for (case, server, args) in &cases {
            eprintln!("round {} of {rounds}: {case}", round + 1);
            // Handshakes recommendations completes while only the marketplace calls it.
            let before = if *case == "page" {
                Some(metric(&rec_mtls, HANDSHAKES).await?)
            } else {
                None
            };
            let (report, peak_rss_kib) = load(&loadgen, args, server).await?;
            if let Some(before) = before {
                handshakes += metric(&rec_mtls, HANDSHAKES).await? - before;
            }
            runs.push(Measured {
                case: (*case).into(),
                round,
                report,
                peak_rss_kib,
            });
        }
    }
    let pages: u64 = runs
        .iter()
        .filter(|m| m.case == "page")
        .map(|m| m.report.requests)
        .sum();
    let mut sweep = Vec::new();
    for concurrency in SWEEP {
        for (case, server, args) in [
            (
                "page",
                &market,
                http_args(&market, concurrency, sweep_duration),
            ),
            (
                "floor_page",
                &floor_page,
                http_args(&floor_page, concurrency, sweep_duration),
            ),
            (
                "recommend_mtls",
                &rec_mtls,
                grpc_args(&rec_mtls, Some(&certs), concurrency, sweep_duration),
            ),
        ] {
            eprintln!("sweep: {case} at {concurrency}");
            let (report, peak_rss_kib) = load(&loadgen, &args, server).await?;
            sweep.push(Measured {
                case: case.into(),
                round: 0,
                report,
                peak_rss_kib,
            });
        }
    }
    let overload = overload::run(
        &loadgen,
        [&market, &rec_mtls],
        duration,
        Duration::from_secs(if args.quick { 5 } else { 60 }),
    )
    .await?;
    for server in [
        rec_mtls,
        rec_plain,
        rec_text,
        rec_every_call,
        rec_big,
        market,
        floor_chain,
        floor_mtls,
        floor_plain,
        floor_page,
    ] {
        server.stop().await;
    }

    let mut summary = Vec::new();
    for (case, floor, what, target) in [
        (
            "recommend_mtls",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, as shipped (JSON log)",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_text_log",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, text log",
            "≥ 0.9× floor",
        ),
        (
            "recommend_plain",
            "floor_grpc_plain",
            "Recommend, plaintext",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_every_call",
            "floor_grpc_mtls",
            "Recommend with a line per call (LOG_SAMPLE=1)",
            "(its cost)",
        ),
        (
            "page",
            "floor_chain",
            "Page end to end vs its chain floor",
            "≥ 0.9× chain floor",
        ),
        (
            "page",
            "floor_page",
            "Page end to end (mTLS to the backend)",
            "p99 ≤ 5 ms at 32",
        ),
        (
            "page",
            "original_page",
            "Page end to end vs the original (Python)",
            "≥ 25×",
        ),
        (
            "recommend_mtls_big_catalog",
            "recommend_mtls",
            &format!("Recommend, {big} books vs 9"),
            "≥ 0.9×",
        ),
    ] {
        if let Some(row) = summarize(&runs, case, floor, what, target) {
            summary.push(row);
        }
    }
    let mut binaries_bytes = BTreeMap::new();
    for name in ["recommendations", "marketplace"] {
        if let Some(size) = file_size(&bin.join(name)) {
            binaries_bytes.insert(name.to_owned(), size);
        }
    }
    let date = today();
    let results = Results {
        date: date.clone(),
        machine: machine(),
        args: format!(
            "duration {duration} s, {rounds} rounds, sweep {sweep_duration} s, {big} books; gRPC {GRPC_CONCURRENCY} callers over {GRPC_CONNECTIONS} connections, HTTP {HTTP_CONCURRENCY} keep-alive connections; services as the images run them (JSON log, default level and sampling)"
        ),
        binaries_bytes,
        ready_ms,
        idle_rss_kib,
        backend_handshakes: handshakes,
        pages,
        runs,
        sweep,
        summary,
        overload,
    };
    let out = if args.quick {
        root().join("target").join("bench")
    } else {
        root().join("bench").join("results")
    };
    std::fs::create_dir_all(&out)?;
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(out.join(format!("{date}.json")), json)?;
    let markdown = markdown(&results);
    std::fs::write(out.join(format!("{date}.md")), &markdown)?;
    std::fs::write(out.join(format!("{date}.svg")), svg(&results))?;
    std::fs::write(
        out.join(format!("{date}-overload.svg")),
        overload::curve_svg(&results.overload, &date),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    println!("{markdown}");
    println!("written to {}", out.join(&date).display());
    let errors: u64 = results.summary.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} calls failed during the benchmark");
    }
    // A 503 is the marketplace shedding what it does not let in; anything else is a fault.
    let failed_pages: u64 = results.overload.runs.iter().map(|r| r.failed).sum();
    if failed_pages > 0 {
        bail!("{failed_pages} pages failed under overload other than by a 503");
    }
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD, without a date crate.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
