//! The `loadgen` command line: its subcommands (drive a target, serve a floor) and their
//! flags, over the library's load loops and floor servers.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use loadgen::{
    drive::{self, Load, Stop},
    floor,
    target::{GrpcTls, Target},
};

/// Load generator for the bookstore, and the floor servers its benchmark compares against.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Call Recommend over gRPC (mutual TLS with --certs, else plaintext).
    Grpc {
        /// host:port of the service.
        #[arg(long, default_value = "localhost:50051")]
        addr: String,
        /// Folder with ca.pem, client.pem and client.key; without it, plaintext.
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Name the server certificate must carry.
        #[arg(long, default_value = "localhost")]
        tls_name: String,
        /// HTTP/2 connections to spread calls over.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Books asked for in each call.
        #[arg(long, default_value_t = 3)]
        max_results: i32,
        #[command(flatten)]
        run: RunArgs,
    },
    /// GET a URL over HTTP/1.1 with keep-alive (one connection per concurrent caller), or over
    /// HTTP/2 without TLS (h2c) with --h2c-connections.
    Http {
        #[arg(long, default_value = "http://localhost:5000/")]
        url: String,
        /// Use this many HTTP/2 (h2c) connections, shared by all callers, instead of HTTP/1.1.
        #[arg(long)]
        h2c_connections: Option<usize>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Serve a constant Recommend answer (the gRPC floor).
    FloorGrpc {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Folder with ca.pem, server.pem, server.key for mutual TLS; without it, plaintext.
        #[arg(long)]
        certs: Option<PathBuf>,
    },
    /// Serve a constant page from a file (the HTTP floor).
    FloorHttp {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        body_file: PathBuf,
    },
    /// Serve the chain floor: each page is one Recommend call to --backend (mutual TLS with
    /// --certs) with the titles put into the page read from --body-file.
    FloorChain {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// host:port of a gRPC server answering Recommend (the gRPC floor).
        #[arg(long)]
        backend: String,
        /// Folder with ca.pem, client.pem and client.key; without it, plaintext.
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Name the server certificate must carry.
        #[arg(long, default_value = "localhost")]
        tls_name: String,
        /// The marketplace's page, whose list of books is replaced by the titles.
        #[arg(long)]
        body_file: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Closed loop: callers, each sending its next call when answered (over HTTP/1.1, each on
    /// a connection of its own).
    #[arg(long, short = 'c', default_value_t = 32)]
    concurrency: usize,
    /// Open loop: calls per second instead of a closed loop (at most --concurrency outstanding
    /// per 1000/s, and never fewer than 1000).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to run (default 10) ...
    #[arg(long, short = 'd', conflicts_with = "requests")]
    duration: Option<f64>,
    /// ... or a number of calls.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Seconds of load before measuring, not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Exit 1 if any call failed.
    #[arg(long)]
    fail_on_error: bool,
    /// Also report the run cut into intervals of this many milliseconds (JSON `timeline`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    timeline_ms: Option<u64>,
}

impl RunArgs {
    fn load(&self) -> Load {
        match self.rate {
            Some(rate) => Load::Open {
                rate,
                max_outstanding: ((rate / 1000.0).ceil() as usize * self.concurrency).max(1000),
            },
            None => Load::Closed {
                concurrency: self.concurrency,
            },
        }
    }

    fn stop(&self) -> Stop {
        match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, d) => Stop::After(Duration::from_secs_f64(d.unwrap_or(10.0))),
        }
    }
}

async fn drive(target: Target, args: RunArgs) -> anyhow::Result<ExitCode> {
    let target = Arc::new(target);
    if args.warmup > 0.0 {
        let warmup = Stop::After(Duration::from_secs_f64(args.warmup));
        drive::run(target.clone(), args.load(), warmup, false, None).await;
    }
    let timeline = args.timeline_ms.map(Duration::from_millis);
    let report = drive::run(target, args.load(), args.stop(), !args.json, timeline).await;
    if args.json {
        #[allow(clippy::print_stdout)] // the JSON report is the program's output
        {
            println!("{}", serde_json::to_string(&report)?);
        }
    } else {
        eprint!("{report}");
    }
    Ok(if args.fail_on_error && report.error_count() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Mutual TLS as the marketplace's client, from a folder with `ca.pem`, `client.pem` and
/// `client.key`; none means plaintext.
fn grpc_tls(certs: Option<PathBuf>, server_name: String) -> Option<GrpcTls> {
    certs.map(|dir| GrpcTls {
        ca: dir.join("ca.pem"),
        identity: Some((dir.join("client.pem"), dir.join("client.key"))),
        server_name,
    })
}

async fn main_inner(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Grpc {
            addr,
            certs,
            tls_name,
            connections,
            max_results,
            run,
        } => {
            let target =
                Target::grpc(&addr, grpc_tls(certs, tls_name), connections, max_results).await?;
            drive(target, run).await
        }
        Command::Http {
            url,
            h2c_connections,
            run,
        } => {
            let target = match (h2c_connections, run.rate) {
                (Some(n), _) => Target::h2c(&url, n)?,
                (None, Some(_)) => Target::http_crowd(&url, run.concurrency)?,
                (None, None) => Target::http(&url, run.concurrency)?,
            };
            drive(target, run).await
        }
        Command::FloorGrpc { listen, certs } => {
            floor::grpc(listen, certs.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::FloorHttp { listen, body_file } => {
            let body = std::fs::read(&body_file)?;
            floor::http(listen, body).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::FloorChain {
            listen,
            backend,
            certs,
            tls_name,
            body_file,
        } => {
            let page = std::fs::read_to_string(&body_file)?;
            floor::chain(listen, &backend, grpc_tls(certs, tls_name), &page).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Every connection it opens is a file descriptor: a thousand of them need more than the
    // soft limit of 1024 that many shells start with.
    bookstore_common::fd_limit::raise();
    match main_inner(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
