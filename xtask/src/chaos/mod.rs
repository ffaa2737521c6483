//! `cargo xtask chaos`: one recommendations replica misbehaves while the page is under steady
//! load, and what the site loses is measured.
//!
//! Two replicas, each behind a relay of this process on its own loopback address (127.0.0.2 and
//! 127.0.0.3, one port): the marketplace is given both addresses (`RECOMMENDATIONS_ADDRS`), as a
//! headless Service gives one per pod. The load generator drives the page open loop at a rate
//! one replica carries alone, timing every page from when it was due, in intervals of 250 ms.
//! Then, in turn, replica B is:
//!
//! - **killed** (SIGKILL), and stays dead;
//! - **frozen** (SIGSTOP) for a while, then thawed (SIGCONT);
//! - **slow**: its relay delays every byte each way by 200 ms (this machine's kernel has no
//!   `netem`; the relay gives the same path latency);
//! - **blackholed**: every packet to its address is dropped (`iptables`, which needs root; the
//!   scenario is skipped without it);
//! - **restarted** (SIGTERM, and started again on the same address).
//!
//! For each it prints pages/s before, during and after, the failed pages (all, and those after
//! the fault's first 2 s), the p50 and p99 of each phase (p50: the median of its intervals'; p99:
//! the worst of its intervals'), how long the page's p99 took to come back under three times
//! the healthy one, and, once B is back, how long until it had its share of calls again. It
//! writes the table and a plot of every run to `target/chaos/`.

mod faults;
mod plot;
mod processes;
mod run;
mod scenario;

use std::{
    collections::VecDeque,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::report::Report;
use tokio::process::Command;

use crate::workspace::root;
use faults::{DELAY, PASS, can_blackhole, iptables, relay};
use plot::plot;
use processes::{Market, Replica, free_port, scrape, start_marketplace};
use run::{HEADER, INTERVAL, Run};
use scenario::{Phases, SCENARIOS, Scenario};

/// What `cargo xtask chaos` takes.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Shorter phases (CI's run): 3 s before, 4 s of fault, 5 s after.
    #[arg(long)]
    quick: bool,
    /// Pages a second offered, open loop (one replica must carry it alone).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
}

pub async fn chaos(args: ChaosArgs) -> Result<()> {
    let phases = if args.quick {
        Phases {
            before: Duration::from_secs(3),
            fault: Duration::from_secs(4),
            after: Duration::from_secs(5),
        }
    } else {
        Phases {
            before: Duration::from_secs(5),
            fault: Duration::from_secs(10),
            after: Duration::from_secs(10),
        }
    };
    let bin = crate::release::build_release().await?;
    let out = root().join("target").join("chaos");
    std::fs::create_dir_all(&out)?;
    let certs = out.join("certs");
    bookstore_certs::generate(&certs, false)?;
    let port = free_port()?;
    let mut replicas = [
        Replica::new("A", Ipv4Addr::new(127, 0, 0, 2), port)?,
        Replica::new("B", Ipv4Addr::new(127, 0, 0, 3), port)?,
    ];
    for replica in &mut replicas {
        replica.start(&bin, &certs, &out).await?;
        tokio::spawn(relay(replica.public, replica.private, replica.mode.clone()));
    }
    let market = start_marketplace(&bin, &certs, &out, &replicas).await?;
    let blackhole = can_blackhole().await;
    let mut results = Vec::new();
    for scenario in SCENARIOS {
        if scenario == Scenario::Blackhole && !blackhole {
            eprintln!("chaos: blackhole skipped (iptables, as root, is needed to drop packets)");
            continue;
        }
        let [_, b] = &mut replicas;
        if b.child.is_none() {
            b.start(&bin, &certs, &out).await?;
        }
        // B is back in the rotation (a probe passed) and takes its share of calls again.
        settle(&bin, &market, b.public, args.rate).await?;
        eprintln!("chaos: {}", scenario.what());
        let run = run_scenario(scenario, &bin, &certs, &out, &market, b, args.rate, phases).await?;
        println!("{}", run.row());
        results.push(run);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Chaos check: two recommendations replicas, replica B misbehaving; {} pages/s offered \
         open loop; {:.0} s before, {:.0} s of fault, {:.0} s after.\n",
        args.rate,
        phases.before.as_secs_f64(),
        phases.fault.as_secs_f64(),
        phases.after.as_secs_f64()
    );
    md.push_str(HEADER);
    for run in &results {
        md.push_str(&run.row());
        md.push('\n');
    }
    std::fs::write(out.join("chaos.md"), &md)?;
    std::fs::write(out.join("chaos.svg"), plot(&results, phases))?;
    println!("\n{md}");
    println!(
        "written: {}, {}",
        out.join("chaos.md").display(),
        out.join("chaos.svg").display()
    );
    for replica in &mut replicas {
        replica.stop().await;
    }
    let mut market = market;
    let _ = bookstore_process::stop(&mut market.child, Duration::from_secs(10)).await;
    let broken: Vec<String> = results.iter().filter_map(Run::broken).collect();
    if !broken.is_empty() {
        bail!("chaos: {}", broken.join("; "));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_scenario(
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
async fn settle(bin: &Path, market: &Market, addr: SocketAddr, rate: f64) -> Result<()> {
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
