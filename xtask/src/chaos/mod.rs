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
//!
//! Here: the flags and the scenarios in order. `processes` starts and probes the replicas and the
//! marketplace, `faults` holds the relay and the blackhole, `scenario` what each scenario does,
//! `load` drives the page through one, `run` reads its timeline, and `plot` draws every run.

mod faults;
mod load;
mod plot;
mod processes;
mod run;
mod scenario;

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Result, bail};

use crate::workspace::root;
use faults::{can_blackhole, relay};
use load::{run_scenario, settle};
use plot::plot;
use processes::{Replica, free_port, start_marketplace};
use run::{HEADER, Run};
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
