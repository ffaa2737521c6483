//! The skeleton both services share: the settings every service takes, the life of its
//! process (settings, logging, build, serve until a signal, drain, exit code), and its two
//! ports, bound in the order that makes readiness honest.
//!
//! A service implements [`Service`]; its `main` is [`main`]. What differs between the services
//! (what they load, how they serve their business port) stays in each one's `startup.rs`.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use bookstore_common::{
    metrics::Metrics,
    shutdown::{self, Drained},
    telemetry::{self, LogArgs},
    tls::TlsArgs,
};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, Command},
    http_server::HttpLimits,
};

/// The settings every service takes, flattened into each one's `Config`. Each service gives
/// `ADMIN_ADDR` its own default port (`mut_arg` on its `Config`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[deny(missing_docs)]
pub struct ServiceArgs {
    /// Seconds the requests and calls in flight get to finish after SIGTERM or Ctrl+C before
    /// they are cancelled.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Plaintext admin address: `GET /healthz` (liveness), `GET /readyz` (readiness) and
    /// `GET /metrics` (Prometheus).
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// Open connections to ADMIN_ADDR at most (probes and scrapers).
    #[arg(long, env = "ADMIN_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub admin_max_connections: u64,
    /// Logging.
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogArgs,
    /// TLS files and mode.
    #[command(flatten, next_help_heading = "TLS")]
    pub tls: TlsArgs,
    /// Instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl ServiceArgs {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The limits of the admin listener.
    pub fn admin_limits(&self) -> HttpLimits {
        admin::limits(usize::try_from(self.admin_max_connections).unwrap_or(usize::MAX))
    }
}

/// A service the skeleton can run.
pub trait Service: Sized {
    /// The service's name, in its logs and metrics.
    const NAME: &'static str;
    /// All its settings, [`ServiceArgs`] among them.
    type Config: Parser;

    /// The settings every service takes, within `config`.
    fn service_args(config: &Self::Config) -> &ServiceArgs;

    /// Loads and checks everything and binds both ports: every problem is reported here,
    /// before anything is served.
    fn build(config: &Self::Config) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// Its two ports, bound.
    fn ports(&self) -> &Ports;

    /// The business address actually bound (useful with port 0).
    fn local_addr(&self) -> SocketAddr {
        self.ports().local_addr()
    }

    /// The admin address actually bound.
    fn admin_addr(&self) -> SocketAddr {
        self.ports().admin_addr()
    }

    /// Serves until `shutdown` completes, then drains within the grace period.
    fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = anyhow::Result<Drained>> + Send;
}

/// A service's whole process: settings from flags and the environment (or the `healthcheck`
/// subcommand, which needs no runtime), logging, then the service until SIGTERM or Ctrl+C.
/// Fails when the settings, the start-up or the server do.
pub fn main<S: Service>() -> ExitCode {
    let config = S::Config::parse();
    let args = S::service_args(&config);
    if let Some(command) = args.command {
        return admin::run(command, args.admin_addr);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = telemetry::init(&args.log, S::NAME);
        let outcome = match S::build(&config).await {
            Ok(service) => service.run_until_stopped(shutdown::signal()).await,
            Err(e) => Err(e.context("cannot start")),
        };
        // Sends the last spans before the process ends.
        drop(telemetry);
        match outcome {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// A service's business listener and its admin listener, bound, with the addresses actually
/// bound (useful with port 0).
#[derive(Debug)]
pub struct Ports {
    listener: TcpListener,
    /// Bound last, so being reachable there means everything else is loaded and bound.
    admin: TcpListener,
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Ports {
    /// Binds `listen`, then the admin address last: answering on the admin port then means
    /// everything else is loaded and bound. Errors name the address.
    pub async fn bind(listen: SocketAddr, args: &ServiceArgs) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let admin = admin::bind(args.admin_addr)
            .await
            .map_err(anyhow::Error::msg)?;
        let local_addr = listener
            .local_addr()
            .context("bound listener has no address")?;
        let admin_addr = admin
            .local_addr()
            .context("bound admin listener has no address")?;
        Ok(Ports {
            listener,
            admin,
            local_addr,
            admin_addr,
        })
    }

    /// The business address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves the business port with `serve` until `shutdown` completes, then cancels the
    /// token `serve` was given and waits for it within the grace period. The admin port answers
    /// from the start to the end of the drain, its readiness turning 503 at the signal.
    pub async fn serve<F, E>(
        self,
        args: &ServiceArgs,
        metrics: Metrics,
        shutdown: impl Future<Output = ()>,
        serve: impl FnOnce(TcpListener, CancellationToken) -> F,
    ) -> Result<Drained, E>
    where
        F: Future<Output = Result<(), E>>,
    {
        let stop = CancellationToken::new();
        let serving = serve(self.listener, stop.clone());
        let drained = shutdown::serve_until(serving, stop.clone(), shutdown, args.shutdown_grace());
        admin::alongside(self.admin, args.admin_limits(), stop, metrics, drained).await
    }
}
