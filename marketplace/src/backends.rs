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
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bookstore_common::{grpc_call::KnownMethod, metrics::Metrics};
use bookstore_proto::recommendations_client::RecommendationsClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::call_layer::ClientCallLayer;

mod channel;
mod health;
mod load;
mod resolve;

pub use channel::{ChannelSettings, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use health::{Health, RATE_MIN_CALLS, Standing};
pub use load::DECAY;
use load::{FIRST_ESTIMATE, Load, PeakEwma};
pub use resolve::{DnsResolver, Resolve, StaticResolver};

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

/// An address loses its round-robin turn to one whose cost is below this share of its own.
const CHEAPER: f64 = 0.5;

/// An address's series (`addr` label) are still exported this long after it leaves the list, so
/// the last scrapes and `increase()` over a few minutes see its final counts; then they go, and
/// a deployment whose pods change address every day keeps no series for the old ones.
const GONE_SERIES_KEPT: Duration = Duration::from_secs(5 * 60);
/// While no address is known, resolution is retried this often.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// What a finished call says about its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (whatever the answer): the address works.
    Answered,
    /// UNAVAILABLE, DEADLINE_EXCEEDED or a broken connection: the address may not.
    Failed,
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
mod tests;
