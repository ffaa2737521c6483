//! `cargo xtask bench`: the whole-process benchmark.
//!
//! Builds release binaries, starts every server on loopback, and measures each service next to
//! its floor (a minimal server answering the same bytes), interleaved A B A B so that drift on a
//! shared machine hits both alike. Figures are reported as ratios against those floors. Also
//! measured: time from exec to ready, idle and loaded RSS, binary sizes, latency against
//! concurrency, and a catalog of 1,000,000 books. Writes `bench/results/<date>.{json,md,svg}` and
//! `<date>-overload.svg`.
//!
//! Here: the command's flags and the run from start to end. `servers` starts and probes the
//! processes under test, `stack` starts every one the run measures and lists the throughput
//! cases, `load` drives them with the load generator, `measure` runs the rounds and the sweep,
//! `results` holds what is recorded and the summary table, `report` writes the Markdown and the
//! picture, and `overload` runs the page past its peak.

mod load;
mod measure;
mod overload;
mod report;
mod results;
mod servers;
mod stack;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Result, bail};

use crate::{release::build_release, workspace::root};
use load::{GRPC_CONCURRENCY, GRPC_CONNECTIONS, HTTP_CONCURRENCY, http_args};
use measure::{run_rounds, run_sweep};
use report::{markdown, svg};
use results::{Results, summary};
use servers::{start_original, write_catalog};
use stack::Stack;

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

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
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
    let plan = Plan::from(&args);
    let bin = build_release().await?;
    let loadgen = bin.join("loadgen");
    let work = std::env::temp_dir().join(format!("bookstore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let certs = work.join("certs");
    bookstore_certs::generate(&certs, false)?;
    let catalog = work.join("catalog.json");
    write_catalog(&catalog, plan.big)?;

    eprintln!("starting servers");
    let stack = Stack::start(&bin, &certs, &catalog, &work).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ready_ms, idle_rss_kib) = stack.at_rest();
    let original = if plan.original {
        eprintln!("starting the original Python stack");
        Some(start_original(&certs, &work).await?)
    } else {
        None
    };
    let mut cases = stack.cases(&certs, plan.duration);
    if let Some((grpcio, flask)) = &original {
        cases.push((
            "original_page",
            flask,
            http_args(flask, HTTP_CONCURRENCY, plan.duration),
            vec![flask, grpcio],
        ));
    }
    let (runs, handshakes) = run_rounds(&loadgen, &cases, plan.rounds, &stack.rec_mtls).await?;
    let pages: u64 = runs
        .iter()
        .filter(|m| m.case == "page")
        .map(|m| m.report.requests)
        .sum();
    let sweep = run_sweep(&loadgen, &stack, &certs, plan.sweep_duration).await?;
    let overload = overload::run(
        &loadgen,
        [&stack.market, &stack.rec_mtls],
        &stack.market_unlimited,
        plan.duration,
        Duration::from_secs(if plan.quick { 5 } else { 60 }),
    )
    .await?;
    stack.stop().await;

    let date = today();
    let results = Results {
        date: date.clone(),
        machine: machine(),
        args: plan.describe(),
        binaries_bytes: binary_sizes(&bin),
        ready_ms,
        idle_rss_kib,
        backend_handshakes: handshakes,
        pages,
        summary: summary(&runs, plan.big),
        runs,
        sweep,
        overload,
    };
    let (markdown, written) = write_results(&results, plan.quick)?;
    let _ = std::fs::remove_dir_all(&work);
    println!("{markdown}");
    println!("written to {}.*", written.display());
    judge(&results)
}

/// How much to measure, after `--quick`.
struct Plan {
    duration: f64,
    rounds: u32,
    sweep_duration: f64,
    big: u32,
    quick: bool,
    original: bool,
}

impl From<&BenchArgs> for Plan {
    fn from(args: &BenchArgs) -> Self {
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
        Plan {
            duration,
            rounds,
            sweep_duration,
            big,
            quick: args.quick,
            original: args.original,
        }
    }
}

impl Plan {
    /// The settings, as the results record them.
    fn describe(&self) -> String {
        let Plan {
            duration,
            rounds,
            sweep_duration,
            big,
            ..
        } = self;
        format!(
            "duration {duration} s, {rounds} rounds, sweep {sweep_duration} s, {big} books; gRPC {GRPC_CONCURRENCY} callers over {GRPC_CONNECTIONS} connections, HTTP {HTTP_CONCURRENCY} keep-alive connections; services as the images run them (JSON log, default level and sampling), every server on one CPU and the load generator on another when there are two"
        )
    }
}

fn binary_sizes(bin: &Path) -> BTreeMap<String, u64> {
    ["recommendations", "marketplace"]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), file_size(&bin.join(name))?)))
        .collect()
}

/// Writes the results as JSON, Markdown and the two pictures (to `bench/results`, or to
/// `target/bench` for a quick run); returns the Markdown and the files' path without extension.
fn write_results(results: &Results, quick: bool) -> Result<(String, std::path::PathBuf)> {
    let out = if quick {
        root().join("target").join("bench")
    } else {
        root().join("bench").join("results")
    };
    std::fs::create_dir_all(&out)?;
    let date = &results.date;
    // A day's second run is <date>-2, and so on: a committed run is never written over (a quick
    // run's folder is scratch).
    let stem = if quick {
        date.clone()
    } else {
        std::iter::once(date.clone())
            .chain((2..).map(|n| format!("{date}-{n}")))
            .find(|stem| !out.join(format!("{stem}.json")).exists())
            .unwrap_or_else(|| date.clone())
    };
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(out.join(format!("{stem}.json")), json)?;
    let markdown = markdown(results);
    std::fs::write(out.join(format!("{stem}.md")), &markdown)?;
    std::fs::write(out.join(format!("{stem}.svg")), svg(results))?;
    std::fs::write(
        out.join(format!("{stem}-overload.svg")),
        overload::curve_svg(&results.overload, date),
    )?;
    Ok((markdown, out.join(stem)))
}

/// Fails the run on any failed call, and on any page that failed under overload other than by
/// being shed with a 503.
fn judge(results: &Results) -> Result<()> {
    let errors: u64 = results.summary.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} calls failed during the benchmark");
    }
    let failed: Vec<String> = results
        .overload
        .runs
        .iter()
        .filter(|r| r.failed > 0)
        .map(|r| format!("{}: {:?}", r.what, r.failed_by_kind))
        .collect();
    if !failed.is_empty() {
        bail!(
            "pages failed under overload other than by a 503 ({})",
            failed.join("; ")
        );
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
