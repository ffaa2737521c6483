//! Helpers for the bookstore's tests: a throwaway PKI on disk, each service started in-process
//! on port 0 through its real `startup` path, and gRPC clients with chosen TLS identities.
//! `process` runs the real binaries and signals them, `raw` speaks HTTP over bare sockets and
//! reads `/metrics`, `json_log` checks JSON log lines as a log pipeline reads them, `wait` polls
//! until something has happened ([`eventually`]).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod json_log;
pub mod process;
pub mod raw;
pub mod wait;

pub use wait::{eventually, eventually_every};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use bookstore_certs::{DevPki, Issued};
use bookstore_common::{
    shutdown::Drained,
    tls::{TlsArgs, TlsMode},
};
use bookstore_proto::{
    BookCategory, RecommendationRequest, recommendations_client::RecommendationsClient,
};
use bookstore_server::service::{Service, ServiceArgs};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A development PKI written to a temporary directory, removed on drop.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::new().expect("PKI");
        pki.write(dir.path()).expect("write PKI");
        TestPki { dir, pki }
    }

    /// The directory, to use as `CERTS_DIR`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an extra certificate and key as `<stem>.pem` and `<stem>.key`; returns both paths.
    pub fn write(&self, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        bookstore_certs::write_issued(self.dir(), stem, issued).expect("write");
        (
            self.dir().join(format!("{stem}.pem")),
            self.dir().join(format!("{stem}.key")),
        )
    }

    /// The marketplace's identity: what a legitimate client presents.
    pub fn client_identity(&self) -> Identity {
        identity(&self.pki.client)
    }

    pub fn ca_certificate(&self) -> Certificate {
        Certificate::from_pem(&self.pki.ca.issued().cert_pem)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

pub fn identity(issued: &Issued) -> Identity {
    Identity::from_pem(&issued.cert_pem, &issued.key_pem)
}

/// The settings both services take, for tests: loopback admin port 0, a 5 s grace, mutual
/// TLS from `certs_dir`, its files looked at every second.
pub fn service_args(certs_dir: &Path) -> ServiceArgs {
    ServiceArgs {
        shutdown_grace_secs: 5,
        admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_max_connections: 64,
        log: Default::default(),
        tls: TlsArgs {
            tls_reload_secs: 1,
            ..TlsArgs::new(certs_dir, TlsMode::Mutual)
        },
        command: None,
    }
}

/// A recommendations config for tests: loopback, port 0, mutual TLS from `certs_dir`.
pub fn recommendations_config(certs_dir: &Path) -> recommendations::config::Config {
    recommendations::config::Config {
        listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        catalog_path: None,
        artificial_delay_ms: 0,
        failure_rate: Default::default(),
        allowed_clients: "marketplace".parse().expect("infallible"),
        catalog_max_bytes: 256 * 1024 * 1024,
        max_connections: 1024,
        max_handshakes: 128,
        tls_handshake_timeout_secs: 3,
        idle_timeout_secs: 300,
        max_calls_per_connection: 256,
        max_calls: 2048,
        service: service_args(certs_dir),
    }
}

/// A marketplace config for tests: loopback, port 0, mutual TLS to `recommendations`.
pub fn marketplace_config(
    certs_dir: &Path,
    recommendations: SocketAddr,
) -> marketplace::config::Config {
    marketplace::config::Config {
        listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        recommendations_host: recommendations.ip().to_string(),
        recommendations_port: recommendations.port(),
        recommendations_addrs: Vec::new(),
        recommendations_tls_name: Some("localhost".into()),
        recommendations_timeout_ms: 1000,
        recommendations_resolve_secs: 1,
        trusted_proxies: Vec::new(),
        max_connections: 2048,
        header_read_timeout_secs: 10,
        idle_timeout_secs: 60,
        max_head_bytes: 24 * 1024,
        max_head_bytes_total: 16 * 1024 * 1024,
        max_requests_in_flight: 1024,
        max_queued_calls: 2048,
        max_queue_wait_ms: 250,
        calls_per_backend: 192,
        service: service_args(certs_dir),
    }
}

/// A service running in this process; dropping it triggers its shutdown.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// The plaintext admin address (`/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Drained>,
}

impl Running {
    /// Sends the shutdown signal and waits for the drain to end.
    pub async fn stop(mut self) -> Drained {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task")
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the server to finish after [`Running::signal`].
    pub async fn finished(mut self) -> Drained {
        (&mut self.task).await.expect("server task")
    }
}

/// Runs a built app on a task; `run` is its `run_until_stopped`, handed the shutdown future that
/// [`Running::stop`] (or dropping the `Running`) completes.
fn spawn<F>(addr: SocketAddr, admin_addr: SocketAddr, run: impl FnOnce(Shutdown) -> F) -> Running
where
    F: std::future::Future<Output = anyhow::Result<Drained>> + Send + 'static,
{
    let (stop, rx) = oneshot::channel();
    let fut = run(Box::pin(async move {
        let _ = rx.await;
    }));
    let task = tokio::spawn(async move {
        match fut.await {
            Ok(drained) => drained,
            Err(e) => panic!("server failed: {e:#}"),
        }
    });
    Running {
        addr,
        admin_addr,
        stop: Some(stop),
        task,
    }
}

type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Starts recommendations through its real `Application::build` and `run_until_stopped`.
pub async fn spawn_recommendations(config: &recommendations::config::Config) -> Running {
    let app = recommendations::startup::Application::build(config)
        .await
        .expect("recommendations starts");
    spawn(app.local_addr(), app.admin_addr(), |shutdown| {
        app.run_until_stopped(shutdown)
    })
}

/// Starts the marketplace through its real `Application::build` and `run_until_stopped`.
pub async fn spawn_marketplace(config: &marketplace::config::Config) -> Running {
    let app = marketplace::startup::Application::build(config)
        .await
        .expect("marketplace starts");
    spawn(app.local_addr(), app.admin_addr(), |shutdown| {
        app.run_until_stopped(shutdown)
    })
}

/// Starts the marketplace with recommendations addresses from `resolver`.
pub async fn spawn_marketplace_resolving(
    config: &marketplace::config::Config,
    resolver: Arc<dyn marketplace::backends::Resolve>,
) -> Running {
    let app = marketplace::startup::Application::build_with_resolver(config, resolver)
        .await
        .expect("marketplace starts");
    spawn(app.local_addr(), app.admin_addr(), |shutdown| {
        app.run_until_stopped(shutdown)
    })
}

/// A gRPC client to `addr` over TLS, checking the server's certificate for `server_name` against
/// `ca`, presenting `identity` if given. It connects on first call.
pub fn grpc_client(
    addr: SocketAddr,
    ca: Certificate,
    identity: Option<Identity>,
    server_name: &str,
) -> RecommendationsClient<Channel> {
    RecommendationsClient::new(tls_channel(addr, ca, identity, server_name))
}

/// A channel to `addr` over TLS, for any gRPC client (health, reflection).
pub fn tls_channel(
    addr: SocketAddr,
    ca: Certificate,
    identity: Option<Identity>,
    server_name: &str,
) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name(server_name);
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
}

/// The marketplace's own client: the dev CA, the marketplace identity, name `localhost`.
pub fn trusted_client(addr: SocketAddr, pki: &TestPki) -> RecommendationsClient<Channel> {
    RecommendationsClient::new(trusted_channel(addr, pki))
}

/// A channel with the marketplace's TLS settings, for any gRPC client (health, reflection).
pub fn trusted_channel(addr: SocketAddr, pki: &TestPki) -> Channel {
    tls_channel(
        addr,
        pki.ca_certificate(),
        Some(pki.client_identity()),
        "localhost",
    )
}

/// A plaintext gRPC client (for `TLS_MODE=off`).
pub fn plaintext_client(addr: SocketAddr) -> RecommendationsClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    RecommendationsClient::new(channel)
}

/// A Recommend request for one mystery book for user 1: the call a test makes when what is
/// asked does not matter.
pub fn mystery() -> RecommendationRequest {
    RecommendationRequest {
        user_id: 1,
        category: BookCategory::Mystery as i32,
        max_results: 1,
    }
}
