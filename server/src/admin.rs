//! The plaintext admin port: liveness, readiness and Prometheus metrics for orchestrators and
//! scrapers, so the business ports can stay mutual-TLS only.
//!
//! Readiness is honest: the admin port is bound only once everything else is loaded and bound,
//! and `/readyz` turns to 503 the moment a shutdown signal arrives, while the admin port keeps
//! answering through the drain so the orchestrator sees it.
//!
//! Also here: the `healthcheck` subcommand a container's probe runs against the admin port.

use std::{
    future::Future,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use bookstore_common::metrics::Metrics;

use crate::http_server::{self, HttpLimits};

/// The admin port's limits: probes and scrapers make small, quick requests. Only the number of
/// connections is configurable (`ADMIN_MAX_CONNECTIONS`); a flood on the public port never
/// reaches these slots, so liveness keeps answering.
pub fn limits(max_connections: usize) -> HttpLimits {
    HttpLimits {
        max_connections,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        max_head_bytes: http_server::MIN_HEAD_BYTES,
        max_head_bytes_total: max_connections.saturating_mul(http_server::MIN_HEAD_BYTES),
        max_streams: 16,
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    draining: CancellationToken,
    metrics: Metrics,
}

/// The admin router. `draining` is cancelled when the service starts shutting down; until then
/// `/readyz` answers 200 and `bookstore_ready` is 1.
pub fn router(draining: CancellationToken, metrics: Metrics) -> Router {
    let ready = metrics.gauge("bookstore_ready", &[]);
    let now_draining = draining.clone();
    metrics.on_scrape(move || {
        ready.set(if now_draining.is_cancelled() {
            0.0
        } else {
            1.0
        })
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { draining, metrics })
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Serves the admin endpoints on `listener` while `run` runs, its drain included, and closes
/// them only after: readiness stays observable until the very end of the service's life.
pub async fn alongside<T>(
    listener: TcpListener,
    limits: HttpLimits,
    draining: CancellationToken,
    metrics: Metrics,
    run: impl Future<Output = T>,
) -> T {
    let admin = Admin::spawn(listener, limits, draining, metrics);
    let outcome = run.await;
    admin.stop().await;
    outcome
}

/// A running admin server.
#[derive(Debug)]
struct Admin {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Admin {
    /// Serves the admin endpoints on `listener` until [`Admin::stop`].
    fn spawn(
        listener: TcpListener,
        limits: HttpLimits,
        draining: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        limits.log("admin");
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(admin_addr = %addr, "admin endpoints up: /healthz, /readyz, /metrics");
        }
        let stop = CancellationToken::new();
        tokio::spawn(metrics.clone().upkeep(stop.clone()));
        let app = router(draining, metrics.clone());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { http_server::serve(listener, app, limits, stop, &metrics, "admin").await }
        });
        Admin { stop, task }
    }

    /// Stops the admin server (after the service's own drain). Probes and scrapes take
    /// milliseconds; a client still holding a request after a few seconds is cut off.
    async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        match tokio::time::timeout(ADMIN_DRAIN, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server task failed"),
            Err(_) => task.abort(),
        }
    }
}

/// The Prometheus text exposition format, version 0.0.4.
async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// How long the admin port's requests in flight get once the service has drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(3);

/// Subcommands both services take besides serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Exit 0 if this service's admin port answers `/readyz` with 200, 1 otherwise: a health
    /// check for images without a shell or curl.
    Healthcheck,
}

/// How long the health check waits for the whole exchange.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the admin port at `addr` (a wildcard address means this host) for `/readyz`.
pub fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let fail = |e: std::io::Error| format!("admin port {target}: {e}");
    let mut stream = TcpStream::connect_timeout(&target, HEALTHCHECK_TIMEOUT)
        .or_else(|e| {
            // A `[::]` listener also takes IPv4; a host without IPv6 loopback still reaches it so.
            if target.is_ipv6() {
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, target.port())),
                    HEALTHCHECK_TIMEOUT,
                )
            } else {
                Err(e)
            }
        })
        .map_err(fail)?;
    stream
        .set_read_timeout(Some(HEALTHCHECK_TIMEOUT))
        .map_err(fail)?;
    stream
        .set_write_timeout(Some(HEALTHCHECK_TIMEOUT))
        .map_err(fail)?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(fail)?;
    let mut answer = Vec::new();
    stream.take(4096).read_to_end(&mut answer).map_err(fail)?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("");
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("admin port {target}: not ready: {status:?}"))
    }
}

/// Runs the subcommand and returns the exit code.
pub fn run(command: Command, admin_addr: SocketAddr) -> std::process::ExitCode {
    match command {
        Command::Healthcheck => match healthcheck(admin_addr) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// Binds the admin address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on the admin address {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn status(app: &Router, path: &str) -> StatusCode {
        app.clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible")
            .status()
    }

    #[tokio::test]
    async fn the_healthcheck_follows_readiness() {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let draining = CancellationToken::new();
        let admin = Admin::spawn(
            listener,
            limits(8),
            draining.clone(),
            Metrics::new("test", "0"),
        );
        let wildcard = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
        let check = move || tokio::task::spawn_blocking(move || healthcheck(wildcard));
        assert_eq!(check().await.expect("join"), Ok(()));
        draining.cancel();
        let refused = check().await.expect("join").expect_err("draining");
        assert!(refused.contains("503"), "{refused}");
        admin.stop().await;
        let down = check().await.expect("join").expect_err("closed");
        assert!(down.contains(&addr.port().to_string()), "{down}");
    }

    #[tokio::test]
    async fn ready_until_draining_and_alive_throughout() {
        let draining = CancellationToken::new();
        let metrics = Metrics::new("test", "0");
        let app = router(draining.clone(), metrics.clone());
        assert_eq!(status(&app, "/healthz").await, StatusCode::OK);
        assert_eq!(status(&app, "/readyz").await, StatusCode::OK);
        assert!(metrics.render().contains("bookstore_ready 1\n"));
        draining.cancel();
        assert!(metrics.render().contains("bookstore_ready 0\n"));
        assert_eq!(
            status(&app, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(&app, "/healthz").await, StatusCode::OK);
        assert_eq!(status(&app, "/metrics").await, StatusCode::OK);
        assert_eq!(status(&app, "/other").await, StatusCode::NOT_FOUND);
    }
}
