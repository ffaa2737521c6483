//! Project automation, run as `cargo xtask <command>`.
//!
//! - `up`: builds both services, creates the development PKI if absent, runs the stack with
//!   mutual TLS and stops it gracefully on Ctrl+C.
//! - `certs`: creates the development PKI in `certs/dev`.
//! - `bench`: the whole-process benchmark against floor servers (see `bench/mod.rs`).
//! - `chaos`: one recommendations replica misbehaving under load (see `chaos/mod.rs`).
#![allow(clippy::print_stdout)] // a command-line tool talks to its user on stdout

mod bench;
mod chaos;
mod release;
mod workspace;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bookstore_certs::{Generated, generate};
use bookstore_process::Stopped;
use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use workspace::root;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Bookstore project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build and run the whole stack locally with mutual TLS; Ctrl+C stops it gracefully.
    Up {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Port the marketplace serves the site on.
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// Port the recommendations service listens on.
        #[arg(long, default_value_t = 50051)]
        grpc_port: u16,
    },
    /// Benchmark the services against floor servers on loopback; writes bench/results/.
    Bench(bench::BenchArgs),
    /// One recommendations replica killed, frozen, slowed, blackholed and restarted under steady
    /// page load; what the site loses. Writes target/chaos/.
    Chaos(chaos::ChaosArgs),
    /// Create the development PKI (CA, server and client certificates) in certs/dev.
    Certs {
        /// Replace an existing PKI.
        #[arg(long)]
        force: bool,
    },
}

fn certs_dir() -> PathBuf {
    root().join("certs").join("dev")
}

fn make_certs(force: bool) -> Result<()> {
    let dir = certs_dir();
    match generate(&dir, force)? {
        Generated::Created => println!("Created a development PKI in {}", dir.display()),
        Generated::AlreadyPresent => println!("Using the development PKI in {}", dir.display()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Certs { force } => make_certs(force),
        Task::Bench(args) => bench::bench(args).await,
        Task::Chaos(args) => chaos::chaos(args).await,
        Task::Up {
            release,
            port,
            grpc_port,
        } => up(release, port, grpc_port).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(release: bool, port: u16, grpc_port: u16) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .current_dir(root())
        .args(["build", "--bin", "recommendations", "--bin", "marketplace"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().await.context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    make_certs(false)?;

    let bin_dir = root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    let certs = certs_dir();
    let mut recommendations = start(
        "recommendations",
        Command::new(bin_dir.join("recommendations"))
            .env("LISTEN_ADDR", format!("[::]:{grpc_port}"))
            .env("CERTS_DIR", &certs),
    )?;
    let mut marketplace = start(
        "marketplace",
        Command::new(bin_dir.join("marketplace"))
            .env("LISTEN_ADDR", format!("[::]:{port}"))
            .env("RECOMMENDATIONS_HOST", "localhost")
            .env("RECOMMENDATIONS_PORT", grpc_port.to_string())
            .env("CERTS_DIR", &certs),
    )?;

    let stopped = tokio::select! {
        ready = wait_until_listening(port) => {
            ready?;
            println!("\n  Bookstore is up: http://localhost:{port}   (Ctrl+C stops it)\n");
            tokio::select! {
                () = bookstore_common::shutdown::signal() => None,
                status = recommendations.wait() => Some(("recommendations", status)),
                status = marketplace.wait() => Some(("marketplace", status)),
            }
        }
        () = bookstore_common::shutdown::signal() => None,
        status = recommendations.wait() => Some(("recommendations", status)),
        status = marketplace.wait() => Some(("marketplace", status)),
    };
    // A service exits 0 only after a shutdown signal (a terminal's Ctrl+C reaches it too), so
    // only a failing exit is unexpected.
    let failed = match &stopped {
        Some((name, Ok(status))) if status.success() => {
            eprintln!("{name} stopped; stopping the rest of the stack");
            false
        }
        Some((name, status)) => {
            eprintln!("{name} exited unexpectedly ({status:?}); stopping the stack");
            true
        }
        None => false,
    };
    // A terminal's Ctrl+C already reached both children (same process group); SIGTERM covers
    // `kill` of this process and the unexpected-exit case. A second signal is harmless.
    let mut clean = true;
    for (name, child) in [
        ("marketplace", &mut marketplace),
        ("recommendations", &mut recommendations),
    ] {
        clean &= stop(name, child).await;
    }
    if failed || !clean {
        bail!("the stack did not run or stop cleanly");
    }
    println!("Bookstore stopped.");
    Ok(())
}

/// Starts a service with its log lines prefixed by its name, as `docker compose` does.
fn start(name: &'static str, command: &mut Command) -> Result<Child> {
    let mut child = bookstore_process::start(command, Stdio::piped())
        .with_context(|| format!("cannot start {name}"))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{name:>15} | {line}");
            }
        });
    }
    Ok(child)
}

/// Waits until the marketplace accepts connections (the first build can take a while).
async fn wait_until_listening(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("the marketplace did not start listening on {addr} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Sends SIGTERM (if still running) and waits for a clean exit.
async fn stop(name: &str, child: &mut Child) -> bool {
    match bookstore_process::stop(child, Duration::from_secs(40)).await {
        Stopped::Exited(status) if status.success() => true,
        Stopped::Exited(status) => {
            eprintln!("{name} exited with {status}");
            false
        }
        Stopped::Lost(e) => {
            eprintln!("cannot wait for {name}: {e}");
            false
        }
        Stopped::Killed => {
            eprintln!("{name} did not stop within 40 s; killed it");
            false
        }
    }
}
