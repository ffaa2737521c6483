//! Client-side load balancing over every address of the recommendations service, and what
//! makes one bad address cost nothing.
//!
//! One HTTP/2 connection carries every call, so a single connection would pin all traffic to
//! one pod. Instead the host is resolved to all its addresses (a Kubernetes headless Service
//! gives one per pod), each address gets its own lazily connected channel, and the host is
//! resolved again periodically so new pods get traffic and removed ones are dropped.
//!
//! - **Balancing sees load and latency.** Each address keeps its calls in flight and a
//!   peak-EWMA of its latency (a slower answer raises it at once, faster ones bring it down
//!   over [`DECAY`]); a call in flight counts as at least as slow as it has been waiting. Its
//!   cost is that latency times (calls in flight + 1), as Linkerd's balancer weighs endpoints.
//!   Calls go round-robin, but an address loses its turn to another whose cost is less than
//!   half of its own: equals share the calls evenly, while a hung or slow address stops
//!   getting them within a few calls.
//! - **Outlier ejection.** [`EJECT_AFTER`] failures in a row (UNAVAILABLE, DEADLINE_EXCEEDED,
//!   a broken connection), or a failure rate of half its calls over a window while the others
//!   fail less than a tenth of theirs, take an address out of the rotation for a while that
//!   doubles each time it repeats (from [`EJECTION`] to [`MAX_EJECTION`]: a replica that comes
//!   back is probed, and rejoins, within a few seconds). At most half of the
//!   addresses are out at once, and a lone address never is. An ejected address rejoins only
//!   once a probe passes (a health check over its own connection).
//! - **Dead transports found in about two seconds**: an HTTP/2 PING every [`KEEPALIVE_INTERVAL`]
//!   when nothing has come in, answered within [`KEEPALIVE_TIMEOUT`], idle or busy.
//!
//! Hand-written rather than tower's `p2c` over `PeakEwma`: the balancer there hides which
//! address a call goes to, and here each address has its own call slots, ejection, probes and
//! per-address series; a pair chosen at random also splits calls unevenly between equals at
//! light load, where the round-robin turn keeps them even.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bookstore_common::{grpc_call::KnownMethod, metrics::Metrics, request_log::Sampling};
use bookstore_proto::recommendations_client::RecommendationsClient;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::call_layer::ClientCallLayer;

/// The methods the marketplace calls, as its client metrics name them.
pub const METHODS: &[KnownMethod] = &[KnownMethod {
    path: "/Recommendations/Recommend",
    kind: "unary",
}];

/// The client every call goes through: one connection, wrapped in the call layer.
pub type Client = RecommendationsClient<crate::call_layer::ClientCall<Channel>>;

/// Failures in a row that eject an address.
pub const EJECT_AFTER: u32 = 5;
/// The first ejection's length; each one in a row doubles it, up to [`MAX_EJECTION`].
pub const EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(4);
/// Healthy this long after rejoining, an address's next ejection starts from [`EJECTION`] again.
const FORGIVEN_AFTER: Duration = Duration::from_secs(60);
/// A probe of an ejected address must answer within this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The window over which failure rates are compared, and the calls an address needs in it.
const RATE_WINDOW: Duration = Duration::from_secs(10);
const RATE_MIN_CALLS: u64 = 20;

/// How often a connection with nothing coming in is pinged, and how long the answer may take:
/// a frozen or cut-off peer is found within about two seconds, idle or busy.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// How fast a latency estimate forgets (as Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// An address's latency estimate before its first answer.
const FIRST_ESTIMATE: Duration = Duration::from_millis(1);
/// An address loses its round-robin turn to one whose cost is below this share of its own.
const CHEAPER: f64 = 0.5;

/// An address's series (`addr` label) are still exported this long after it leaves the list, so
/// the last scrapes and `increase()` over a few minutes see its final counts; then they go, and
/// a deployment whose pods change address every day keeps no series for the old ones.
const GONE_SERIES_KEPT: Duration = Duration::from_secs(5 * 60);
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

/// A fixed list of addresses, in place of a lookup (`RECOMMENDATIONS_ADDRS`): replicas on
/// distinct loopback addresses in a test or a chaos run, or a deployment without DNS.
#[derive(Debug, Clone)]
pub struct StaticResolver(pub Vec<SocketAddr>);

#[async_trait]
impl Resolve for StaticResolver {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.clone())
    }

    fn target(&self) -> String {
        let addrs: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        addrs.join(",")
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
    /// Which calls get a log line of their own.
    pub lines: Sampling,
}

impl ChannelSettings {
    fn channel(&self, addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // SocketAddr's Display brackets IPv6 literals, as a URI needs.
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        // With a connector of our own, tonic bounds the whole handshake, TCP and TLS, by the
        // connect timeout; its own connector bounds only the TCP connect. A hung replica's
        // kernel still accepts, so a call waiting for that connection waited as long as the
        // replica stayed hung, holding its call slot, never failing, so never ejecting it.
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        Ok(endpoint.connect_with_connector_lazy(tcp))
    }
}

/// What a finished call says about its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (whatever the answer): the address works.
    Answered,
    /// UNAVAILABLE, DEADLINE_EXCEEDED or a broken connection: the address may not.
    Failed,
}

/// An address's load: calls in flight, how long they have been waiting, and its latency.
#[derive(Debug)]
struct Load {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// The start times of the calls in flight, summed, in µs after `epoch`.
    started_sum_us: AtomicU64,
    estimate: Mutex<PeakEwma>,
    /// The estimate as last sampled (f64 bits) and when (µs after `epoch`), for the balancer to
    /// read without the lock.
    estimate_bits: AtomicU64,
    estimate_at_us: AtomicU64,
}

/// A latency estimate that jumps up to a slower sample and decays toward faster ones.
#[derive(Debug, Clone, Copy)]
struct PeakEwma {
    seconds: f64,
    at: Instant,
    /// When this estimate started: calls sent before then say nothing about it.
    since: Instant,
}

impl PeakEwma {
    fn new(now: Instant) -> Self {
        PeakEwma {
            seconds: FIRST_ESTIMATE.as_secs_f64(),
            at: now,
            since: now,
        }
    }

    /// The estimate at `now`, decayed toward zero since the last sample: an address that has
    /// not answered for a while gets a chance again.
    fn at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.seconds * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// Takes in the latency of a call sent at `started` and answered at `now`, unless it was
    /// sent before this estimate started (a replica readmitted after a freeze still answers
    /// the calls it held, each as slow as the freeze was long).
    fn sample_call(&mut self, started: Instant, now: Instant) -> bool {
        if started < self.since {
            return false;
        }
        self.sample(now.saturating_duration_since(started), now);
        true
    }

    fn sample(&mut self, took: Duration, now: Instant) {
        let took = took.as_secs_f64();
        let current = self.at(now);
        self.seconds = if took > current {
            took
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            current * keep + took * (1.0 - keep)
        };
        self.at = now;
    }
}

impl Load {
    fn new(now: Instant) -> Self {
        Load {
            epoch: now,
            in_flight: AtomicUsize::new(0),
            started_sum_us: AtomicU64::new(0),
            estimate: Mutex::new(PeakEwma::new(now)),
            estimate_bits: AtomicU64::new(FIRST_ESTIMATE.as_secs_f64().to_bits()),
            estimate_at_us: AtomicU64::new(0),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// (latency estimate, calls in flight) now: the estimate is at least the mean time the calls
    /// in flight have been waiting, so an address that stopped answering costs more with every
    /// call sent to it.
    fn now(&self, now: Instant) -> (f64, usize) {
        let sampled = f64::from_bits(self.estimate_bits.load(Ordering::Relaxed));
        let since = self
            .micros(now)
            .saturating_sub(self.estimate_at_us.load(Ordering::Relaxed));
        let estimate = sampled * (-(since as f64 / 1e6) / DECAY.as_secs_f64()).exp();
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if in_flight == 0 {
            return (estimate, 0);
        }
        let started = self.started_sum_us.load(Ordering::Acquire) / in_flight as u64;
        let waiting = self.micros(now).saturating_sub(started) as f64 / 1e6;
        (estimate.max(waiting), in_flight)
    }

    fn cost(&self, now: Instant) -> f64 {
        let (estimate, in_flight) = self.now(now);
        estimate * (in_flight + 1) as f64
    }

    /// Makes `estimate` the one the balancer reads.
    fn publish(&self, estimate: &PeakEwma) {
        self.estimate_bits
            .store(estimate.seconds.to_bits(), Ordering::Relaxed);
        self.estimate_at_us
            .store(self.micros(estimate.at), Ordering::Relaxed);
    }
}

/// Where an address stands in the rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Standing {
    In,
    /// Out until the probe after `until` passes.
    Ejected {
        until: Instant,
    },
}

/// An address's health: its standing, its failures in a row and over the window.
#[derive(Debug)]
struct Health {
    standing: Standing,
    in_a_row: u32,
    /// Ejections in a row (each doubles the next one's length); forgotten after
    /// [`FORGIVEN_AFTER`] in the rotation.
    times: u32,
    rejoined: Option<Instant>,
    window_start: Instant,
    calls: u64,
    failures: u64,
    /// The last window's counts, for comparing failure rates.
    last_calls: u64,
    last_failures: u64,
}

impl Health {
    fn new(now: Instant) -> Self {
        Health {
            standing: Standing::In,
            in_a_row: 0,
            times: 0,
            rejoined: None,
            window_start: now,
            calls: 0,
            failures: 0,
            last_calls: 0,
            last_failures: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= RATE_WINDOW {
            (self.last_calls, self.last_failures) = (self.calls, self.failures);
            (self.calls, self.failures) = (0, 0);
            self.window_start = now;
        }
    }

    /// Failures over calls in the current and the last window, if there were enough calls.
    fn failure_rate(&self) -> Option<f64> {
        let calls = self.calls + self.last_calls;
        (calls >= RATE_MIN_CALLS)
            .then(|| (self.failures + self.last_failures) as f64 / calls as f64)
    }
}

/// One address and the connection to it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    client: Client,
    /// The same connection without the call layer, for probes.
    channel: Channel,
    slots: Arc<Semaphore>,
    load: Load,
    health: Mutex<Health>,
    /// Whether it is out of the rotation now (the health's standing, readable without the lock).
    out: AtomicBool,
    counters: AddressCounters,
}

/// The series of one address, in its own metrics scope labelled `addr` (dropped
/// [`GONE_SERIES_KEPT`] after the address leaves the list):
/// `bookstore_backend_{calls,ejections,readmissions}_total{addr}`: how calls spread over the
/// addresses, and each address leaving and rejoining the rotation;
/// `bookstore_backend_{in_flight,latency_estimate_seconds,ejected}{addr}`: what the balancer
/// weighs, and whether the address is out now.
#[derive(Debug, Clone)]
struct AddressCounters {
    calls: metrics::Counter,
    ejections: metrics::Counter,
    readmissions: metrics::Counter,
    in_flight: metrics::Gauge,
    estimate: metrics::Gauge,
    ejected: metrics::Gauge,
}

impl AddressCounters {
    /// The series in `scope`, the address's own.
    fn new(scope: &Metrics) -> Self {
        let counter = |name| scope.counter(name, &[]);
        let gauge = |name| scope.gauge(name, &[]);
        let counters = AddressCounters {
            calls: counter("bookstore_backend_calls_total"),
            ejections: counter("bookstore_backend_ejections_total"),
            readmissions: counter("bookstore_backend_readmissions_total"),
            in_flight: gauge("bookstore_backend_in_flight"),
            estimate: gauge("bookstore_backend_latency_estimate_seconds"),
            ejected: gauge("bookstore_backend_ejected"),
        };
        counters.estimate.set(FIRST_ESTIMATE.as_secs_f64());
        counters.ejected.set(0.0);
        counters.in_flight.set(0.0);
        counters
    }
}

/// A call in flight to a [`Backend`], counted in its load until [`Backend::finished`] (or
/// dropped, as a failure).
#[derive(Debug)]
pub struct InFlightCall {
    backend: Arc<Backend>,
    started: Instant,
    done: bool,
}

impl InFlightCall {
    /// Records the call's end: its latency (when answered) and what it says of the address.
    pub fn finished(mut self, outcome: Outcome) {
        self.done = true;
        self.backend.end_call(self.started, Some(outcome));
    }
}

impl Drop for InFlightCall {
    fn drop(&mut self) {
        if !self.done {
            self.backend.end_call(self.started, None);
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

    /// Counts a call to this address in `bookstore_backend_calls_total`.
    pub fn count_call(&self) {
        self.counters.calls.increment(1);
    }

    /// A client for one call; clones share the connection.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Counts a call as in flight from now.
    pub fn start_call(self: &Arc<Self>) -> InFlightCall {
        let now = Instant::now();
        self.load
            .started_sum_us
            .fetch_add(self.load.micros(now), Ordering::AcqRel);
        let in_flight = self.load.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.counters.in_flight.set(in_flight as f64);
        InFlightCall {
            backend: self.clone(),
            started: now,
            done: false,
        }
    }

    fn end_call(&self, started: Instant, outcome: Option<Outcome>) {
        let now = Instant::now();
        self.load
            .started_sum_us
            .fetch_sub(self.load.micros(started), Ordering::AcqRel);
        let in_flight = self.load.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        self.counters.in_flight.set(in_flight as f64);
        if outcome == Some(Outcome::Answered) {
            let mut estimate = self.load.estimate.lock().unwrap_or_else(|p| p.into_inner());
            if estimate.sample_call(started, now) {
                self.load.publish(&estimate);
                self.counters.estimate.set(estimate.seconds);
            }
        }
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.roll(now);
        health.calls += 1;
        match outcome {
            Some(Outcome::Answered) => health.in_a_row = 0,
            // A call given up by its page without an answer says nothing either way.
            None => health.calls -= 1,
            Some(Outcome::Failed) => {
                health.failures += 1;
                health.in_a_row += 1;
            }
        }
    }

    /// The balancer's weighing of this address now.
    fn cost(&self, now: Instant) -> f64 {
        self.load.cost(now)
    }

    /// Whether the address is in the rotation at `now`.
    fn is_in(&self) -> bool {
        !self.out.load(Ordering::Relaxed)
    }

    /// Whether this address has earned an ejection: failures in a row, or a failure rate of
    /// half its calls while `others_rate` (the other addresses') is below a tenth.
    fn should_eject(&self, others_rate: Option<f64>) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if health.standing != Standing::In {
            return false;
        }
        health.in_a_row >= EJECT_AFTER
            || health
                .failure_rate()
                .zip(others_rate)
                .is_some_and(|(own, others)| own >= 0.5 && others < 0.1)
    }

    /// Takes the address out; returns when it may be probed.
    fn eject(&self, now: Instant) -> Instant {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if health
            .rejoined
            .is_some_and(|at| now.saturating_duration_since(at) >= FORGIVEN_AFTER)
        {
            health.times = 0;
        }
        let length = EJECTION
            .saturating_mul(1 << health.times.min(8))
            .min(MAX_EJECTION);
        health.times += 1;
        let until = now + length;
        health.standing = Standing::Ejected { until };
        self.out.store(true, Ordering::Relaxed);
        health.in_a_row = 0;
        (
            health.calls,
            health.failures,
            health.last_calls,
            health.last_failures,
        ) = (0, 0, 0, 0);
        self.counters.ejections.increment(1);
        self.counters.ejected.set(1.0);
        until
    }

    /// Puts the address back in the rotation (its probe passed).
    fn rejoin(&self, now: Instant) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.standing = Standing::In;
        self.out.store(false, Ordering::Relaxed);
        health.rejoined = Some(now);
        self.counters.readmissions.increment(1);
        self.counters.ejected.set(0.0);
        // A fresh start: its old calls' latency says nothing about it now.
        let fresh = PeakEwma::new(now);
        *self.load.estimate.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.load.publish(&fresh);
        self.counters.estimate.set(fresh.seconds);
    }

    /// One health check over the address's own connection: SERVING within [`PROBE_TIMEOUT`].
    async fn probe(&self) -> bool {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, check).await,
            Ok(Ok(answer)) if answer.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    }
}

/// Every known address of the service, each with its connection.
pub struct Backends {
    resolver: Arc<dyn Resolve>,
    metrics: Metrics,
    settings: RwLock<ChannelSettings>,
    current: RwLock<Arc<[Arc<Backend>]>>,
    next: AtomicUsize,
    /// Cancelled at shutdown: the probes stop.
    stop: CancellationToken,
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
        metrics
            .gauge("bookstore_backend_call_slots", &[])
            .set(settings.max_calls as f64);
        Backends {
            resolver,
            metrics,
            settings: RwLock::new(settings),
            current: RwLock::new(Arc::from([])),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        }
    }

    fn current(&self) -> Arc<[Arc<Backend>]> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The address for the next call, other than `except` if there is another: the next in
    /// turn among those in the rotation, unless another in it costs less than half as much
    /// (with three or more, one other drawn at random). With every address out, still one of
    /// them. None when no address is known. Counted as a call to it: the caller sends one, or
    /// waits for a slot there.
    pub fn pick(&self, except: Option<SocketAddr>) -> Option<Arc<Backend>> {
        let picked = self.choose(except)?;
        picked.count_call();
        Some(picked)
    }

    /// As [`Backends::pick`], but only an address other than `except`, and not counted: for a
    /// hedge, which is sent (and then counted with [`Backend::count_call`]) only if a slot
    /// there is free and the retry budget allows it.
    pub fn pick_another(&self, except: SocketAddr) -> Option<Arc<Backend>> {
        self.choose(Some(except)).filter(|b| b.addr != except)
    }

    fn choose(&self, except: Option<SocketAddr>) -> Option<Arc<Backend>> {
        let current = self.current();
        let usable = |b: &Arc<Backend>| Some(b.addr) != except;
        // Those in the rotation (and not `except`); failing that, any but `except`; failing
        // that, any.
        let rotation = |b: &Arc<Backend>| usable(b) && b.is_in();
        let pool: &dyn Fn(&Arc<Backend>) -> bool = if current.iter().any(rotation) {
            &rotation
        } else if current.iter().any(usable) {
            &usable
        } else {
            &|_| true
        };
        let n = current.iter().filter(|b| pool(b)).count();
        let nth = |i: usize| current.iter().filter(|b| pool(b)).nth(i % n.max(1));
        let picked = match n {
            0 => return None,
            1 => nth(0)?,
            _ => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                let offset = if n == 2 {
                    1
                } else {
                    1 + rand::random_range(0..n - 1)
                };
                let (first, other) = (nth(turn)?, nth(turn + offset)?);
                let now = Instant::now();
                if other.cost(now) < CHEAPER * first.cost(now) {
                    other
                } else {
                    first
                }
            }
        };
        Some(picked.clone())
    }

    /// After a call to `backend` ended: ejects it if it has earned it and the rotation can
    /// spare it (at most half of the addresses out, never a lone one), and then probes it until
    /// it may rejoin.
    pub fn judge(self: &Arc<Self>, backend: &Arc<Backend>) {
        let current = self.current();
        let others_rate = {
            let (mut calls, mut failures) = (0, 0);
            for other in current.iter().filter(|b| b.addr != backend.addr) {
                let health = other.health.lock().unwrap_or_else(|p| p.into_inner());
                calls += health.calls + health.last_calls;
                failures += health.failures + health.last_failures;
            }
            (calls >= RATE_MIN_CALLS).then(|| failures as f64 / calls as f64)
        };
        if !backend.should_eject(others_rate) {
            return;
        }
        let out = current.iter().filter(|b| !b.is_in()).count();
        if current.len() < 2 || (out + 1) * 2 > current.len() {
            return;
        }
        let until = backend.eject(Instant::now());
        tracing::warn!(
            recommendations = %backend.addr,
            out_for_ms = until.saturating_duration_since(Instant::now()).as_millis(),
            "recommendations address taken out of the rotation: its calls fail"
        );
        tokio::spawn(self.clone().probe_until_back(backend.clone(), until));
    }

    /// Waits out an ejection, then probes the address until one probe passes (each failure
    /// ejects it again, for longer), unless it leaves the address list or the service stops.
    async fn probe_until_back(self: Arc<Self>, backend: Arc<Backend>, mut until: Instant) {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep_until(until.into()) => {}
            }
            if !self.current().iter().any(|b| Arc::ptr_eq(b, &backend)) {
                backend.counters.ejected.set(0.0);
                return;
            }
            if backend.probe().await {
                backend.rejoin(Instant::now());
                tracing::info!(recommendations = %backend.addr, "recommendations address back in the rotation: its probe passed");
                return;
            }
            until = backend.eject(Instant::now());
        }
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
        for gone in old.values().filter(|b| !found.contains(&b.addr)) {
            gone.counters.ejected.set(0.0);
            gone.counters.in_flight.set(0.0);
            self.metrics
                .retire("addr", &gone.addr.to_string(), GONE_SERIES_KEPT);
        }
        tracing::info!(recommendations = %self.resolver.target(), addrs = ?found, "recommendations addresses");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.into();
        Ok(())
    }

    /// New connections for every address with new settings (after a certificate rotation).
    /// Calls in flight finish on the old connections; each address starts afresh (in the
    /// rotation, its latency unknown).
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
                _ = stop.cancelled() => {
                    self.stop.cancel();
                    return;
                }
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
        let scope = self.metrics.scope("addr", &addr.to_string());
        let layer = ClientCallLayer::new(scope.clone(), METHODS, &addr.to_string(), settings.lines);
        let now = Instant::now();
        Ok(Arc::new(Backend {
            addr,
            client: RecommendationsClient::new(tower::Layer::layer(&layer, channel.clone())),
            channel,
            slots: Arc::new(Semaphore::new(settings.max_calls)),
            load: Load::new(now),
            health: Mutex::new(Health::new(now)),
            out: AtomicBool::new(false),
            counters: AddressCounters::new(&scope),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
            lines: Sampling::default(),
        };
        let b = Backends::new(fixed.clone(), settings, Metrics::new("t", "0"));
        (fixed, b)
    }

    fn series(b: &Backends, name: &str, a: SocketAddr) -> String {
        let line = format!("{name}{{addr=\"{a}\"}} ");
        let text = b.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_else(|| panic!("{line} missing from:\n{text}"))
    }

    #[tokio::test]
    async fn equal_addresses_share_calls_in_turn() {
        let (_, b) = backends(vec![addr(3), addr(1), addr(2)]);
        assert!(
            b.pick(None).is_none(),
            "nothing before the first resolution"
        );
        b.refresh().await.expect("refresh");
        let picks: Vec<_> = (0..6).map(|_| b.pick(None).expect("pick").addr).collect();
        for a in [addr(1), addr(2), addr(3)] {
            assert_eq!(picks.iter().filter(|p| **p == a).count(), 2, "{picks:?}");
        }
        // Another than the one already tried, when there is one.
        assert!((0..6).all(|_| b.pick(Some(addr(2))).expect("pick").addr != addr(2)));
        assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "2");
    }

    #[tokio::test]
    async fn a_hedge_gets_another_address_or_none_and_is_counted_only_when_sent() {
        let (fixed, b) = backends(vec![addr(1)]);
        b.refresh().await.expect("refresh");
        // One address: no other to hedge on, and nothing counted (a page waiting on its one
        // call is counted once, not once more for each hedge it could not send).
        assert!(b.pick_another(addr(1)).is_none());
        assert_eq!(series(&b, "bookstore_backend_calls_total", addr(1)), "0");
        *fixed.0.lock().expect("lock") = Ok(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        let other = b.pick_another(addr(1)).expect("another");
        assert_eq!(other.addr, addr(2));
        assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "0");
        other.count_call();
        assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "1");
    }

    #[tokio::test]
    async fn an_address_that_stops_answering_stops_getting_calls() {
        let (_, b) = backends(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        let hung = b.current_map()[&addr(1)].clone();
        // Three calls sent to it, none answered, for 20 ms: it costs at least 20 ms × 4, the
        // other 1 ms.
        let pending: Vec<_> = (0..3).map(|_| hung.start_call()).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!((0..10).all(|_| b.pick(None).expect("pick").addr == addr(2)));
        assert_eq!(series(&b, "bookstore_backend_in_flight", addr(1)), "3");
        drop(pending);
        assert_eq!(series(&b, "bookstore_backend_in_flight", addr(1)), "0");
    }

    #[tokio::test]
    async fn a_slow_address_stops_getting_calls_and_its_estimate_is_exported() {
        let (_, b) = backends(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        let slow = b.current_map()[&addr(1)].clone();
        let call = slow.start_call();
        tokio::time::sleep(Duration::from_millis(30)).await;
        call.finished(Outcome::Answered);
        assert!((0..10).all(|_| b.pick(None).expect("pick").addr == addr(2)));
        let estimate: f64 = series(&b, "bookstore_backend_latency_estimate_seconds", addr(1))
            .parse()
            .expect("a number");
        assert!(estimate >= 0.03, "{estimate}");
    }

    #[test]
    fn a_peak_ewma_jumps_to_a_slower_sample_and_decays_toward_faster_ones() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.sample(Duration::from_millis(200), t0);
        assert!((e.at(t0) - 0.2).abs() < 1e-9);
        // A second later, a fast sample brings it down by a tenth of the way (1 s of 10).
        let t1 = t0 + Duration::from_secs(1);
        e.sample(Duration::from_millis(1), t1);
        let after = e.at(t1);
        assert!(after > 0.15 && after < 0.19, "{after}");
        // With no samples it decays toward zero: an address that got no calls gets a chance.
        assert!(e.at(t1 + DECAY * 5) < 0.002);
    }

    #[tokio::test]
    async fn failures_in_a_row_eject_an_address_but_never_a_lone_one_or_more_than_half() {
        let (fixed, b) = backends(vec![addr(1)]);
        let b = Arc::new(b);
        b.refresh().await.expect("refresh");
        let lone = b.current_map()[&addr(1)].clone();
        for _ in 0..EJECT_AFTER {
            lone.start_call().finished(Outcome::Failed);
            b.judge(&lone);
        }
        assert!(lone.is_in(), "a lone address was ejected");

        // The lone one's failures stay counted: a second address of its own.
        *fixed.0.lock().expect("lock") = Ok(vec![addr(2), addr(3)]);
        b.refresh().await.expect("refresh");
        let (one, two) = (
            b.current_map()[&addr(2)].clone(),
            b.current_map()[&addr(3)].clone(),
        );
        // An answer in between resets the count.
        for _ in 0..EJECT_AFTER - 1 {
            one.start_call().finished(Outcome::Failed);
            b.judge(&one);
        }
        one.start_call().finished(Outcome::Answered);
        b.judge(&one);
        assert!(one.is_in());
        for _ in 0..EJECT_AFTER {
            one.start_call().finished(Outcome::Failed);
            b.judge(&one);
        }
        assert!(!one.is_in(), "five failures in a row");
        assert_eq!(
            series(&b, "bookstore_backend_ejections_total", addr(2)),
            "1"
        );
        assert_eq!(series(&b, "bookstore_backend_ejected", addr(2)), "1");
        assert!((0..6).all(|_| b.pick(None).expect("pick").addr == addr(3)));
        // The other fails too: half are out already, so it stays.
        for _ in 0..EJECT_AFTER {
            two.start_call().finished(Outcome::Failed);
            b.judge(&two);
        }
        assert!(two.is_in(), "more than half of the addresses ejected");
    }

    #[tokio::test]
    async fn each_ejection_in_a_row_lasts_twice_as_long_up_to_the_cap() {
        let (_, b) = backends(vec![addr(1)]);
        let backend = b
            .backend(addr(1), &b.settings.read().expect("lock"))
            .expect("backend");
        let t0 = Instant::now();
        let lengths: Vec<_> = (0..6)
            .map(|_| backend.eject(t0).saturating_duration_since(t0))
            .collect();
        assert_eq!(
            lengths,
            [1, 2, 4, 4, 4, 4].map(Duration::from_secs),
            "{lengths:?}"
        );
        // Back for long enough, it starts again from the first length.
        backend.rejoin(t0);
        let later = t0 + FORGIVEN_AFTER;
        assert_eq!(
            backend.eject(later).saturating_duration_since(later),
            EJECTION
        );
    }

    #[tokio::test]
    async fn a_readmitted_address_starts_afresh_and_its_held_calls_answering_late_change_nothing() {
        let (_, b) = backends(vec![addr(1), addr(2)]);
        b.refresh().await.expect("refresh");
        let frozen = b.current_map()[&addr(1)].clone();
        let estimate = || {
            series(&b, "bookstore_backend_latency_estimate_seconds", addr(1))
                .parse::<f64>()
                .expect("a number")
        };
        let held = frozen.start_call();
        let slow = frozen.start_call();
        tokio::time::sleep(Duration::from_millis(30)).await;
        slow.finished(Outcome::Answered);
        assert!(estimate() >= 0.03, "{}", estimate());
        frozen.eject(Instant::now());
        frozen.rejoin(Instant::now());
        assert_eq!(
            estimate(),
            FIRST_ESTIMATE.as_secs_f64(),
            "the exported estimate"
        );
        // A call sent before the readmission, answered after it, is as slow as the freeze was
        // long: it must not make the readmitted address look slow again.
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.finished(Outcome::Answered);
        assert_eq!(estimate(), FIRST_ESTIMATE.as_secs_f64());
        assert!(
            (0..2).any(|_| b.pick(None).expect("pick").addr == addr(1)),
            "no turn for the readmitted address"
        );
        // A call sent after it counts as usual.
        let fresh = frozen.start_call();
        tokio::time::sleep(Duration::from_millis(20)).await;
        fresh.finished(Outcome::Answered);
        assert!(estimate() >= 0.02, "{}", estimate());
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

    /// Every `addr` label value in a scrape.
    fn labelled_addrs(text: &str) -> BTreeSet<String> {
        text.split("addr=\"")
            .skip(1)
            .filter_map(|rest| rest.split_once('"').map(|(a, _)| a.to_owned()))
            .collect()
    }

    /// Pods come and go, each with a new address: after a hundred changes the scrape has the
    /// series of the addresses in use and of those gone in the last [`GONE_SERIES_KEPT`], no
    /// more, and an address back within that time keeps its counts.
    #[tokio::test(start_paused = true)]
    async fn series_of_addresses_gone_for_minutes_are_dropped() {
        let at = |port: u16| SocketAddr::from(([10, 0, 0, 1], 40_000 + port));
        let (fixed, b) = backends(vec![at(0), at(1)]);
        b.refresh().await.expect("refresh");
        let every = Duration::from_secs(10);
        for change in 1..=100 {
            *fixed.0.lock().expect("lock") = Ok(vec![at(change), at(change + 1)]);
            b.refresh().await.expect("refresh");
            b.current_map()[&at(change)].count_call();
            tokio::time::advance(every).await;
        }
        let text = b.metrics.render();
        let seen = labelled_addrs(&text);
        // In use: 100 and 101; gone within the last 300 s: those that left at 10 s steps.
        let kept = GONE_SERIES_KEPT.as_secs() / every.as_secs();
        assert!(seen.contains(&at(101).to_string()), "{seen:?}");
        assert!(
            seen.len() as u64 <= 2 + kept && seen.len() as u64 >= kept,
            "{} addresses: {seen:?}",
            seen.len()
        );
        assert!(!seen.contains(&at(50).to_string()), "{seen:?}");
        let recent = at(95);
        assert_eq!(series(&b, "bookstore_backend_calls_total", recent), "1");
        assert!(
            text.contains(&format!("grpc_client_started_total{{addr=\"{recent}\",")),
            "the client-side series are per address too: {text}"
        );

        // One of them comes back before its series go: its count goes on.
        *fixed.0.lock().expect("lock") = Ok(vec![at(100), at(101), recent]);
        b.refresh().await.expect("refresh");
        b.current_map()[&recent].count_call();
        tokio::time::advance(GONE_SERIES_KEPT + every).await;
        let seen = labelled_addrs(&b.metrics.render());
        let now_in_use: BTreeSet<String> = [at(100), at(101), recent]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(seen, now_in_use);
        assert_eq!(series(&b, "bookstore_backend_calls_total", recent), "2");
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
