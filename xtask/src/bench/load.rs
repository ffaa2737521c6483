//! Driving a server with the load generator, and the arguments for each kind of target.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};
use loadgen::report::Report;
use tokio::process::Command;

use super::servers::Server;

/// Callers for the throughput comparisons: gRPC over 4 HTTP/2 connections, pages over 32
/// keep-alive connections.
pub(super) const GRPC_CONCURRENCY: usize = 64;
pub(super) const GRPC_CONNECTIONS: usize = 4;
pub(super) const HTTP_CONCURRENCY: usize = 32;

/// Runs loadgen with `args` (its report as JSON), sampling `server`'s RSS meanwhile.
pub(crate) async fn load(
    loadgen: &Path,
    args: &[String],
    server: &Server,
) -> Result<(Report, Option<u64>)> {
    let (report, peaks) = load_on(None, loadgen, args, server).await?;
    Ok((report, peaks.rss_kib))
}

/// The most a server held at once during a run, sampled every 100 ms.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Peaks {
    pub rss_kib: Option<u64>,
    pub open_fds: Option<usize>,
}

/// [`load`], with the load generator kept to CPU `cpu` if given (through `taskset`).
pub(crate) async fn load_on(
    cpu: Option<usize>,
    loadgen: &Path,
    args: &[String],
    server: &Server,
) -> Result<(Report, Peaks)> {
    let mut command = match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpu.to_string()]).arg(loadgen);
            taskset
        }
        None => Command::new(loadgen),
    };
    let run = command
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let pid = server.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let done = done.clone();
        async move {
            let mut peaks = Peaks::default();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peaks.rss_kib = peaks.rss_kib.max(pid.and_then(bookstore_process::rss_kib));
                peaks.open_fds = peaks
                    .open_fds
                    .max(pid.and_then(bookstore_process::open_fds));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peaks
        }
    });
    let output = run.await?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peaks = sampler.await.unwrap_or_default();
    if !output.status.success() {
        bail!("loadgen {args:?} failed");
    }
    let report: Report = serde_json::from_slice(&output.stdout).context("loadgen's JSON")?;
    Ok((report, peaks))
}

pub(super) fn grpc_args(
    server: &Server,
    certs: Option<&Path>,
    concurrency: usize,
    duration: f64,
) -> Vec<String> {
    let mut args = vec![
        "grpc".into(),
        "--addr".into(),
        server.addr.to_string(),
        "--connections".into(),
        GRPC_CONNECTIONS.to_string(),
        "-c".into(),
        concurrency.to_string(),
        "-d".into(),
        duration.to_string(),
    ];
    if let Some(certs) = certs {
        args.extend(["--certs".into(), certs.display().to_string()]);
    }
    args
}

pub(crate) fn http_args(server: &Server, concurrency: usize, duration: f64) -> Vec<String> {
    vec![
        "http".into(),
        "--url".into(),
        format!("http://{}/", server.addr),
        "-c".into(),
        concurrency.to_string(),
        "-d".into(),
        duration.to_string(),
    ]
}
