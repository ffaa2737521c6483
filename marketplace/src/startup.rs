//! Building the app (a mutual-TLS channel per recommendations address, the router, the
//! listener) and running it until shutdown.

use std::{future::Future, sync::Arc};

use axum::Router;
use bookstore_common::{
    fd_limit,
    metrics::Metrics,
    shutdown::Drained,
    tls::{self, Role, TlsError, TlsMode},
    watch::{FileStamps, Refused, watch_files},
};
use bookstore_server::{
    http_server,
    service::{Ports, Service, ServiceArgs},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

use crate::{
    backends::{Backends, ChannelSettings, DnsResolver, Resolve, StaticResolver},
    config::Config,
    routes::{self, forwarded::TrustedProxies},
    series::SERIES,
    source::GrpcSource,
};

/// A bound, ready-to-run marketplace.
#[derive(Debug)]
pub struct Application {
    ports: Ports,
    router: Router,
    backends: Arc<Backends>,
    metrics: Metrics,
    config: Config,
    /// The state of the TLS files when they were loaded (None with `TLS_MODE=off`).
    tls_stamps: Option<FileStamps>,
}

/// How to connect to each recommendations address: the TLS files are read and checked here, so
/// a bad set is refused before anything uses it.
pub fn channel_settings(config: &Config) -> anyhow::Result<ChannelSettings> {
    let mode = config.service.tls.tls_mode;
    let tls = match mode {
        TlsMode::Off => None,
        TlsMode::Server | TlsMode::Mutual => {
            let files = config.service.tls.files(Role::Client);
            // Addresses are IPs; the certificate is checked against the service's name.
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(tls::load_ca(&files.ca)?)
                .domain_name(config.recommendations_tls_name());
            if mode == TlsMode::Mutual {
                tls = tls.identity(tls::load_identity(&files.cert, &files.key)?);
            }
            Some(tls)
        }
    };
    Ok(ChannelSettings {
        tls,
        connect_timeout: config.recommendations_timeout(),
        max_calls: usize::try_from(config.calls_per_backend).unwrap_or(usize::MAX),
        lines: config.service.log.sampling(),
    })
}

/// Sets the certificate expiry gauges from the files [`channel_settings`] loads.
fn record_expiry(config: &Config, metrics: &Metrics) {
    let mode = config.service.tls.tls_mode;
    if mode == TlsMode::Off {
        return;
    }
    let files = config.service.tls.files(Role::Client);
    let identity = (mode == TlsMode::Mutual).then_some(files.cert.as_path());
    tls::record_expiry(metrics, identity, Some(&files.ca));
}

impl Application {
    /// [`Service::build`] with addresses from `resolver` instead of the system's.
    pub async fn build_with_resolver(
        config: &Config,
        resolver: Arc<dyn Resolve>,
    ) -> anyhow::Result<Self> {
        config.check().map_err(anyhow::Error::msg)?;
        config.service.tls.tls_mode.warn_if_weak();
        fd_limit::raise_for(config.max_connections + config.service.admin_max_connections);
        let tls_stamps = (config.service.tls.tls_mode != TlsMode::Off)
            .then(|| FileStamps::of(&config.service.tls.files(Role::Client)));
        let metrics = Metrics::for_build(
            Self::NAME,
            env!("CARGO_PKG_VERSION"),
            env!("BOOKSTORE_REVISION"),
            SERIES,
        );
        let settings = channel_settings(config)?;
        record_expiry(config, &metrics);
        tracing::info!(
            recommendations = %resolver.target(),
            tls_mode = %config.service.tls.tls_mode,
            tls_name = config.recommendations_tls_name(),
            calls_per_backend = config.calls_per_backend,
            max_queued_calls = config.max_queued_calls,
            max_queue_wait_ms = config.max_queue_wait_ms,
            "recommendations endpoint"
        );
        let backends = Arc::new(Backends::new(resolver, settings, metrics.clone()));
        if let Err(e) = backends.refresh().await {
            tracing::warn!(error = %e, "recommendations not found yet; looking again every second");
        }
        let source = Arc::new(GrpcSource::new(
            backends.clone(),
            config.recommendations_timeout(),
            config.queue_bounds(),
            metrics.clone(),
        ));
        let proxies = TrustedProxies::new(&config.trusted_proxies);
        let router = routes::router_behind(
            source,
            metrics.clone(),
            config.max_requests_in_flight(),
            proxies,
            config.service.log.sampling(),
        );
        let ports = Ports::bind(config.listen_addr, &config.service).await?;
        Ok(Application {
            ports,
            router,
            backends,
            metrics,
            config: config.clone(),
            tls_stamps,
        })
    }
}

/// What a change of the TLS files does: new connections with the new identity (calls in flight
/// finish on the old ones). Files that fail the start-up checks leave the connections alone.
fn reload_channels(
    config: Config,
    backends: Arc<Backends>,
    metrics: Metrics,
) -> impl Fn() -> Result<(), Refused> + Send {
    move || {
        let settings = channel_settings(&config).map_err(|e| Refused {
            reason: format!("{e:#}"),
            early: e
                .chain()
                .any(|c| c.downcast_ref::<TlsError>().is_some_and(TlsError::is_early)),
        })?;
        backends.reconfigure(settings)?;
        record_expiry(&config, &metrics);
        Ok(())
    }
}

impl Service for Application {
    const NAME: &'static str = "marketplace";
    type Config = Config;

    fn service_args(config: &Config) -> &ServiceArgs {
        &config.service
    }

    /// Loads TLS material, resolves the recommendations service and binds the listener. Every
    /// problem is reported here, before anything is served; recommendations being down (or not
    /// yet in DNS) is not a problem: it is looked up again until it appears.
    async fn build(config: &Config) -> anyhow::Result<Self> {
        let resolver: Arc<dyn Resolve> = if config.recommendations_addrs.is_empty() {
            Arc::new(DnsResolver::new(
                config.recommendations_host.clone(),
                config.recommendations_port,
            ))
        } else {
            Arc::new(StaticResolver(config.recommendations_addrs.clone()))
        };
        Self::build_with_resolver(config, resolver).await
    }

    fn ports(&self) -> &Ports {
        &self.ports
    }

    /// Serves until `shutdown` completes, then stops accepting connections and gives in-flight
    /// requests the grace period to finish.
    async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<Drained> {
        tracing::info!(
            addr = %self.local_addr(),
            max_requests_in_flight = self.config.max_requests_in_flight,
            "marketplace listening"
        );
        let Application {
            ports,
            router,
            backends,
            metrics,
            config,
            tls_stamps,
        } = self;
        let (service, admin_metrics) = (config.service.clone(), metrics.clone());
        let serve = move |listener, stop: CancellationToken| {
            tokio::spawn(
                backends
                    .clone()
                    .keep_resolving(config.recommendations_resolve_interval(), stop.clone()),
            );
            if let Some(stamps) = tls_stamps {
                tokio::spawn(watch_files(
                    config.service.tls.reload_interval(),
                    stop.clone(),
                    stamps,
                    metrics.clone(),
                    reload_channels(config.clone(), backends, metrics.clone()),
                ));
            }
            let limits = config.http_limits();
            limits.log("http");
            async move {
                http_server::serve(listener, router, limits, stop, &metrics, "http").await;
                Ok::<(), std::convert::Infallible>(())
            }
        };
        Ok(ports
            .serve(&service, admin_metrics, shutdown, serve)
            .await?)
    }
}
