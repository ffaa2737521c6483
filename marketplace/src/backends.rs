//! Client-side load balancing over every address of the recommendations service.
//!
//! One HTTP/2 connection carries every call, so a single connection would pin all traffic to
//! one pod. Instead the host is resolved to all its addresses (a Kubernetes headless Service
//! gives one per pod), each address gets its own lazily connected channel, calls go round-robin,
//! and the host is resolved again periodically so new pods get traffic and removed ones are
//! dropped. An address whose call just failed as unreachable sits out briefly.
//!
//! Hand-written rather than tonic's balanced channel (tower's power-of-two-choices): that one
//! hides which address a call goes to, and here each address has its own call slots, ejection
//! and per-address counters.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bookstore_common::{grpc_call::KnownMethod, metrics::Metrics};
use bookstore_proto::recommendations_client::RecommendationsClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::call_layer::CallLayer;

/// The methods the marketplace calls, as its client metrics name them.
pub const METHODS: &[KnownMethod] = &[KnownMethod {
    path: "/Recommendations/Recommend",
    kind: "unary",
}];

/// The client every call goes through: one connection, wrapped in the call layer.
pub type Client = RecommendationsClient<crate::call_layer::Call<Channel>>;

/// How long an address that failed to answer is skipped while others are available.
const EJECTION: Duration = Duration::from_secs(2);

/// How often an idle connection is checked, so a dead peer is noticed before a request needs it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// While no address is known, resolution is retried this often.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// Finds the current addresses of the service.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>>;
    /// What is being resolved, for logs.
    fn target(&self) -> String;
}

/// The system resolver (DNS, /etc/hosts), as every other program on the host sees it.
#[derive(Debug, Clone)]
pub struct DnsResolver {
    host: String,
    port: u16,
}

impl DnsResolver {
    pub fn new(host: String, port: u16) -> Self {
        DnsResolver { host, port }
    }
}

#[async_trait]
impl Resolve for DnsResolver {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        Ok(tokio::net::lookup_host((host, self.port)).await?.collect())
    }

    fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How to open a channel to one address: TLS settings and timeouts, shared by every address.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// None for plaintext (`TLS_MODE=off`).
    pub tls: Option<ClientTlsConfig>,
    pub connect_timeout: Duration,
    /// Calls in flight to one address at most; more wait for a slot (see
    /// [`crate::source::GrpcSource`]). Kept below the server's per-connection limit, so a burst
    /// waits here instead of being shed there.
    pub max_calls: usize,
}

impl ChannelSettings {
    fn channel(&self, addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // SocketAddr's Display brackets IPv6 literals, as a URI needs.
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint.connect_lazy())
    }
}

/// One address and the connection to it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    client: Client,
    ejected_until: Mutex<Option<Instant>>,
    slots: Arc<Semaphore>,
    counters: AddressCounters,
}

/// `bookstore_backend_{calls,ejections,readmissions}_total{addr}`: how calls spread over the
/// addresses, and each address leaving and rejoining the rotation. Kept per address seen since
/// start (pods come and go: a restart forgets the old ones).
#[derive(Debug, Clone)]
struct AddressCounters {
    calls: metrics::Counter,
    ejections: metrics::Counter,
    readmissions: metrics::Counter,
}

impl AddressCounters {
    fn new(metrics: &Metrics, addr: SocketAddr) -> Self {
        let addr = addr.to_string();
        let counter = |name| metrics.counter(name, &[("addr", addr.as_str())]);
        AddressCounters {
            calls: counter("bookstore_backend_calls_total"),
            ejections: counter("bookstore_backend_ejections_total"),
            readmissions: counter("bookstore_backend_readmissions_total"),
        }
    }
}

impl Backend {
    /// A place for one call now, if one is free.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A place for one call, once one is free.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// A client for one call; clones share the connection.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Skips this address for a while: a call to it could not get through.
    pub fn eject(&self) {
        let mut until = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        if until.is_none() {
            self.counters.ejections.increment(1);
        }
        *until = Some(Instant::now() + EJECTION);
    }

    /// Whether the address sits out now; one whose time is up rejoins here.
    fn is_ejected(&self, now: Instant) -> bool {
        let mut until = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(end) if now < end => true,
            Some(_) => {
                *until = None;
                self.counters.readmissions.increment(1);
                false
            }
            None => false,
        }
    }
}

/// Every known address of the service, each with its connection.
pub struct Backends {
    resolver: Arc<dyn Resolve>,
    metrics: Metrics,
    settings: RwLock<ChannelSettings>,
    current: RwLock<Arc<[Arc<Backend>]>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("target", &self.resolver.target())
            .field("addrs", &self.addrs())
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// No addresses until the first [`Backends::refresh`].
    pub fn new(resolver: Arc<dyn Resolve>, settings: ChannelSettings, metrics: Metrics) -> Self {
        Backends {
            resolver,
            metrics,
            settings: RwLock::new(settings),
            current: RwLock::new(Arc::from([])),
            next: AtomicUsize::new(0),
        }
    }

    /// The next address in turn, skipping those sitting out unless all are. None when no
    /// address is known.
    pub fn pick(&self) -> Option<Arc<Backend>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let picked = (0..current.len())
            .map(|i| &current[(start + i) % current.len()])
            .find(|b| !b.is_ejected(now))
            .or_else(|| current.get(start % current.len()))
            .cloned();
        if let Some(backend) = &picked {
            backend.counters.calls.increment(1);
        }
        picked
    }

    /// The addresses in use.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.iter().map(|b| b.addr).collect()
    }

    /// Resolves again: new addresses get a connection, vanished ones are dropped (calls in
    /// flight on them finish first). A failed or empty lookup keeps what we have: a DNS hiccup
    /// must not take every backend away.
    pub async fn refresh(&self) -> Result<(), String> {
        let mut found = self
            .resolver
            .resolve()
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.resolver.target()))?;
        if found.is_empty() {
            return Err(format!("{} resolved to no address", self.resolver.target()));
        }
        found.sort();
        found.dedup();
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let old: BTreeMap<SocketAddr, Arc<Backend>> = self.current_map();
        if old.keys().eq(found.iter()) {
            return Ok(());
        }
        let next = found
            .iter()
            .map(|addr| match old.get(addr) {
                Some(kept) => Ok(kept.clone()),
                None => self.backend(*addr, &settings),
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(recommendations = %self.resolver.target(), addrs = ?found, "recommendations addresses");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.into();
        Ok(())
    }

    /// New connections for every address with new settings (after a certificate rotation).
    /// Calls in flight finish on the old connections.
    pub fn reconfigure(&self, settings: ChannelSettings) -> Result<(), String> {
        let next = self
            .current_map()
            .into_keys()
            .map(|addr| self.backend(addr, &settings))
            .collect::<Result<Vec<_>, _>>()?;
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.into();
        Ok(())
    }

    /// Resolves every `interval` (every second while nothing is known) until `stop`.
    pub async fn keep_resolving(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            let wait = if self.addrs().is_empty() {
                RESOLVE_RETRY.min(interval)
            } else {
                interval
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, kept = ?self.addrs(), "re-resolving recommendations failed");
            }
        }
    }

    fn current_map(&self) -> BTreeMap<SocketAddr, Arc<Backend>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.iter().map(|b| (b.addr, b.clone())).collect()
    }

    fn backend(
        &self,
        addr: SocketAddr,
        settings: &ChannelSettings,
    ) -> Result<Arc<Backend>, String> {
        let channel = settings
            .channel(addr)
            .map_err(|e| format!("cannot configure a channel to {addr}: {e}"))?;
        let layer = CallLayer::new(self.metrics.clone(), METHODS, &addr.to_string());
        Ok(Arc::new(Backend {
            addr,
            client: RecommendationsClient::new(tower::Layer::layer(&layer, channel)),
            ejected_until: Mutex::new(None),
            slots: Arc::new(Semaphore::new(settings.max_calls)),
            counters: AddressCounters::new(&self.metrics, addr),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses set by the test.
    struct Fixed(Mutex<std::io::Result<Vec<SocketAddr>>>);

    #[async_trait]
    impl Resolve for Fixed {
        async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
            match &*self.0.lock().expect("lock") {
                Ok(addrs) => Ok(addrs.clone()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            }
        }
        fn target(&self) -> String {
            "fixed".into()
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 50051))
    }

    fn backends(addrs: Vec<SocketAddr>) -> (Arc<Fixed>, Backends) {
        let fixed = Arc::new(Fixed(Mutex::new(Ok(addrs))));
        let settings = ChannelSettings {
            tls: None,
            connect_timeout: Duration::from_secs(1),
            max_calls: 4,
        };
        let b = Backends::new(fixed.clone(), settings, Metrics::new("t", "0"));
        (fixed, b)
    }

    #[tokio::test]
    async fn calls_go_round_robin_and_skip_ejected_addresses() {
        let (_, b) = backends(vec![addr(3), addr(1), addr(2)]);
        assert!(b.pick().is_none(), "nothing before the first resolution");
        b.refresh().await.expect("refresh");
        let picks: Vec<_> = (0..6).map(|_| b.pick().expect("pick").addr).collect();
        for a in [addr(1), addr(2), addr(3)] {
            assert_eq!(picks.iter().filter(|p| **p == a).count(), 2, "{picks:?}");
        }
        let second = b.pick().expect("pick");
        second.eject();
        assert!((0..6).all(|_| b.pick().expect("pick").addr != second.addr));
        for backend in [addr(1), addr(2), addr(3)] {
            b.current_map()[&backend].eject();
        }
        assert!(
            b.pick().is_some(),
            "with everything ejected, still try something"
        );
    }

    #[tokio::test]
    async fn each_address_counts_its_calls_ejections_and_readmissions() {
        let (_, b) = backends(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        for _ in 0..4 {
            b.pick().expect("pick");
        }
        let first = b.current_map()[&addr(1)].clone();
        first.eject();
        first.eject(); // still out: one ejection
        for _ in 0..2 {
            assert_eq!(b.pick().expect("pick").addr, addr(2));
        }
        let series = |name: &str, a: SocketAddr| -> String {
            let line = format!("{name}{{addr=\"{a}\"}} ");
            let text = b.metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
                .unwrap_or_else(|| panic!("{line} missing from:\n{text}"))
        };
        assert_eq!(series("bookstore_backend_calls_total", addr(1)), "2");
        assert_eq!(series("bookstore_backend_calls_total", addr(2)), "4");
        assert_eq!(series("bookstore_backend_ejections_total", addr(1)), "1");
        assert_eq!(series("bookstore_backend_readmissions_total", addr(1)), "0");
        // Once its time is up, the address takes calls again, and that is counted.
        let deadline = Instant::now() + EJECTION + Duration::from_secs(3);
        while series("bookstore_backend_readmissions_total", addr(1)) == "0" {
            assert!(Instant::now() < deadline, "never re-admitted");
            b.pick().expect("pick");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(series("bookstore_backend_ejections_total", addr(2)), "0");
    }

    #[tokio::test]
    async fn re_resolving_adds_new_keeps_existing_and_drops_vanished_addresses() {
        let (fixed, b) = backends(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        let kept = b.current_map()[&addr(2)].clone();
        *fixed.0.lock().expect("lock") = Ok(vec![addr(2), addr(3)]);
        b.refresh().await.expect("refresh");
        assert_eq!(b.addrs(), vec![addr(2), addr(3)]);
        assert!(
            Arc::ptr_eq(&kept, &b.current_map()[&addr(2)]),
            "connection kept"
        );
        *fixed.0.lock().expect("lock") = Err(std::io::ErrorKind::NotFound.into());
        assert!(b.refresh().await.is_err());
        *fixed.0.lock().expect("lock") = Ok(vec![]);
        assert!(b.refresh().await.is_err());
        assert_eq!(
            b.addrs(),
            vec![addr(2), addr(3)],
            "kept through failed lookups"
        );
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost() {
        let found = DnsResolver::new("localhost".into(), 7)
            .resolve()
            .await
            .expect("resolve");
        assert!(
            found.iter().all(|a| a.ip().is_loopback() && a.port() == 7),
            "{found:?}"
        );
        assert!(!found.is_empty());
        let literal = DnsResolver::new("[::1]".into(), 7)
            .resolve()
            .await
            .expect("literal");
        assert_eq!(
            literal,
            vec![SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7))]
        );
    }
}
