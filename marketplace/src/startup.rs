//! Building the app (gRPC channel, router, listener) and running it until shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::Router;
use bookstore_common::{
    admin,
    shutdown::{Drained, ListenerClosedLog, serve_until},
    tls::{self, Role, TlsMode},
    watch::{FileStamps, watch_files},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{config::Config, routes, source::GrpcSource};

/// How often an idle connection to recommendations is checked, so a dead peer is noticed
/// before a request needs it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound, ready-to-run marketplace.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    source: Arc<GrpcSource>,
    config: Config,
    /// The state of the TLS files when they were loaded (None with `TLS_MODE=off`).
    tls_stamps: Option<FileStamps>,
    /// Bound last, so being reachable there means everything else is loaded and bound.
    admin: TcpListener,
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    grace: Duration,
}

/// The one channel to recommendations, shared by every request. It connects on first use, so
/// the marketplace starts even while recommendations is still down, and reconnects by itself.
pub fn recommendations_channel(config: &Config) -> anyhow::Result<Channel> {
    let mode = config.tls.tls_mode;
    let scheme = if mode == TlsMode::Off {
        "http"
    } else {
        "https"
    };
    let host = &config.recommendations_host;
    let host = if host.contains(':') {
        format!("[{host}]") // an IPv6 literal
    } else {
        host.clone()
    };
    let uri = format!("{scheme}://{host}:{}", config.recommendations_port);
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid recommendations address {uri}"))?
        .connect_timeout(config.recommendations_timeout())
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    if mode != TlsMode::Off {
        let files = config.tls.files(Role::Client);
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(tls::load_ca(&files.ca)?)
            .domain_name(config.recommendations_tls_name());
        if mode == TlsMode::Mutual {
            tls = tls.identity(tls::load_identity(&files.cert, &files.key)?);
        }
        endpoint = endpoint.tls_config(tls).context("cannot configure TLS")?;
    }
    tracing::info!(%uri, tls_mode = %mode, tls_name = config.recommendations_tls_name(), "recommendations endpoint");
    Ok(endpoint.connect_lazy())
}

impl Application {
    /// Loads TLS material, prepares the channel and binds the listener. Every problem is
    /// reported here, before anything is served.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        config.tls.tls_mode.warn_if_weak();
        let tls_stamps = (config.tls.tls_mode != TlsMode::Off)
            .then(|| FileStamps::of(&config.tls.files(Role::Client)));
        let channel = recommendations_channel(config)?;
        let source = Arc::new(GrpcSource::new(channel, config.recommendations_timeout()));
        let router = routes::router(source.clone());
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
        let admin = admin::bind(config.admin_addr)
            .await
            .map_err(anyhow::Error::msg)?;
        let local_addr = listener
            .local_addr()
            .context("bound listener has no address")?;
        let admin_addr = admin
            .local_addr()
            .context("bound admin listener has no address")?;
        Ok(Application {
            listener,
            router,
            source,
            config: config.clone(),
            tls_stamps,
            admin,
            local_addr,
            admin_addr,
            grace: config.shutdown_grace(),
        })
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting connections and gives in-flight
    /// requests the grace period to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<Drained> {
        tracing::info!(addr = %self.local_addr(), "marketplace listening");
        let stop = CancellationToken::new();
        if let Some(stamps) = self.tls_stamps {
            // New files mean a new channel with the new identity; calls in flight finish on
            // the old one. Files that fail the start-up checks leave the current channel alone.
            let (config, source) = (self.config.clone(), self.source.clone());
            tokio::spawn(watch_files(
                config.tls.reload_interval(),
                stop.clone(),
                stamps,
                move || {
                    recommendations_channel(&config)
                        .map(|channel| source.replace_channel(channel))
                        .map_err(|e| format!("{e:#}"))
                },
            ));
        }
        let listener = Listener {
            inner: self.listener,
            _closed: ListenerClosedLog,
        };
        let serve = axum::serve(listener, self.router)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future();
        let drained = serve_until(serve, stop.clone(), shutdown, self.grace);
        admin::alongside(self.admin, stop, drained)
            .await
            .context("HTTP server failed")
    }
}

/// The listening socket as axum consumes it, logging when axum drops it at shutdown.
struct Listener {
    inner: TcpListener,
    _closed: ListenerClosedLog,
}

impl axum::serve::Listener for Listener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop for a TcpListener: it retries transient errors such as EMFILE.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Pages are small request/response pairs; Nagle would only add latency.
        let _ = io.set_nodelay(true);
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
