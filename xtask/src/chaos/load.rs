//! The page under load through one scenario: the open-loop load generator, the fault applied
//! and lifted on schedule, and the probes of how the marketplace spreads its calls.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::report::Report;
use tokio::process::Command;

use super::{
    faults::{DELAY, PASS, iptables},
    processes::{Market, Replica, scrape},
    run::{INTERVAL, Run},
    scenario::{Phases, Scenario},
};

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_scenario(
    scenario: Scenario,
    bin: &Path,
    certs: &Path,
    out: &Path,
    market: &Market,
    b: &mut Replica,
    rate: f64,
    phases: Phases,
) -> Result<Run> {
    let total = phases.before + phases.fault + phases.after;
    let load = open_loop(bin, market, rate, total, Duration::from_secs(1))
        .args(["--timeline-ms", &INTERVAL.as_millis().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the load generator")?;
    // The generator's one-second warm-up, then the run's own clock.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    tokio::time::sleep(phases.before).await;
    let fault_at = started.elapsed();
    match scenario {
        Scenario::Kill => b.signal(bookstore_process::Signal::KILL, true)?,
        Scenario::Freeze => b.signal(bookstore_process::Signal::STOP, false)?,
        Scenario::Slow => b.mode.store(DELAY, Ordering::Relaxed),
        Scenario::Blackhole => iptables("-A", b.public).await?,
        Scenario::Restart => b.stop().await,
    }
    if scenario == Scenario::Restart {
        // Started again at once: its address is back within the fault phase.
        b.start(bin, certs, out).await?;
    }
    tokio::time::sleep(phases.fault.saturating_sub(started.elapsed() - fault_at)).await;
    let fault_end = started.elapsed();
    match scenario {
        Scenario::Kill | Scenario::Restart => {}
        Scenario::Freeze => b.signal(bookstore_process::Signal::CONT, false)?,
        Scenario::Slow => b.mode.store(PASS, Ordering::Relaxed),
        Scenario::Blackhole => iptables("-D", b.public).await?,
    }
    let regained = if scenario == Scenario::Kill {
        None
    } else {
        share_back(market, b.public, fault_end, started, total).await
    };
    let output = load.wait_with_output().await?;
    let report: Report =
        serde_json::from_slice(&output.stdout).context("the load generator's report")?;
    Ok(Run {
        scenario,
        timeline: report.timeline.clone(),
        fault_at,
        fault_end,
        regained,
        report,
    })
}

/// The load generator driving the page open loop at `rate` for `secs` after a `warmup`, its
/// report as JSON.
fn open_loop(bin: &Path, market: &Market, rate: f64, secs: Duration, warmup: Duration) -> Command {
    let mut command = Command::new(bin.join("loadgen"));
    command.args([
        "http",
        "--url",
        &format!("http://{}/", market.addr),
        "--rate",
        &rate.to_string(),
        "-d",
        &secs.as_secs_f64().to_string(),
        "--warmup",
        &warmup.as_secs_f64().to_string(),
        "--json",
    ]);
    command
}

/// The marketplace's calls to `addr`, and to the other addresses, so far.
async fn calls(market: &Market, addr: SocketAddr) -> (f64, f64) {
    let text = scrape(market.admin).await.unwrap_or_default();
    let sum = |mine: bool| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("bookstore_backend_calls_total{"))
            .filter(|l| l.contains(&format!("addr=\"{addr}\"")) == mine)
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (sum(true), sum(false))
}

/// Drives the page a second at a time until `addr` takes at least a third of the calls (an
/// address ejected by the last scenario rejoins once its probe passes), for 40 s at most.
pub(super) async fn settle(bin: &Path, market: &Market, addr: SocketAddr, rate: f64) -> Result<()> {
    let started = Instant::now();
    loop {
        let before = calls(market, addr).await;
        let status = open_loop(bin, market, rate, Duration::from_secs(1), Duration::ZERO)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("the load generator failed");
        }
        let after = calls(market, addr).await;
        let (mine, others) = (after.0 - before.0, after.1 - before.1);
        if mine > 0.0 && mine * 3.0 >= mine + others {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(40) {
            bail!("{addr} took {mine} of {} calls after 40 s", mine + others);
        }
    }
}

/// Watches the marketplace's calls per address from `from` (after `started`) until the run's
/// end: how long until `addr` took at least a third of a second's calls.
async fn share_back(
    market: &Market,
    addr: SocketAddr,
    from: Duration,
    started: Instant,
    total: Duration,
) -> Option<Duration> {
    let mut samples: VecDeque<(f64, f64)> = VecDeque::new();
    while started.elapsed() < total {
        samples.push_back(calls(market, addr).await);
        if samples.len() > 4 {
            samples.pop_front();
        }
        if let (Some(first), Some(last)) = (samples.front(), samples.back())
            && samples.len() == 4
        {
            let (mine, others) = (last.0 - first.0, last.1 - first.1);
            if mine > 0.0 && mine * 3.0 >= mine + others {
                return Some(started.elapsed().saturating_sub(from));
            }
        }
        tokio::time::sleep(INTERVAL).await;
    }
    None
}
