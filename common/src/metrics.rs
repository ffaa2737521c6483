//! Prometheus metrics: one registry per running service, rendered on the admin port's
//! `GET /metrics`.
//!
//! Each service owns its registry instead of installing a process-wide recorder, so two
//! services in one test process never mix their counts. Exposition is done by
//! `metrics-exporter-prometheus`. The `# HELP` text of the series both services export is kept
//! here in one table; each service keeps the table of its own series beside its code.
//!
//! Series that belong to something that comes and goes (one recommendations address: pods are
//! replaced, and each new pod has a new address) live in a *scope*, a registry of their own
//! whose series all carry one label. A scope is rendered with its parent until it is retired
//! and some minutes have passed, then dropped whole, so a deployment that changes its addresses
//! every day does not keep every address it ever saw.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds. Our calls take well under a millisecond when healthy, so the
/// lower end is finer than Prometheus' defaults; the upper end reaches past the longest deadline.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// What kind of series a description is for.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A series' name, its kind and its `# HELP` text.
pub type Description = (&'static str, Kind, &'static str);

/// The series both services export, with their `# HELP` text; each service describes its own
/// ([`Metrics::for_build`]). The exporter writes the text only for series that exist; a series
/// described nowhere would go out without help, which the services' tests check for.
const SHARED: &[Description] = &[
    (
        "grpc_server_started_total",
        Kind::Counter,
        "gRPC calls received, by method.",
    ),
    (
        "grpc_server_handled_total",
        Kind::Counter,
        "gRPC calls finished, by method and status code.",
    ),
    (
        "grpc_server_handling_seconds",
        Kind::Histogram,
        "Time from receiving a gRPC call to its final status.",
    ),
    (
        "grpc_client_started_total",
        Kind::Counter,
        "gRPC calls sent, by method; each retry is a call.",
    ),
    (
        "grpc_client_handled_total",
        Kind::Counter,
        "gRPC calls finished, by method and status code.",
    ),
    (
        "grpc_client_handling_seconds",
        Kind::Histogram,
        "Time from sending a gRPC call to its final status.",
    ),
    (
        "bookstore_tls_reloads_total",
        Kind::Counter,
        "Reloads of the TLS files, by outcome: reloaded, refused (the files in use stay).",
    ),
    (
        "bookstore_tls_reload_refused",
        Kind::Gauge,
        "1 while the TLS files on disk are refused (the service keeps the certificates it loaded before and tries the files again at every check), else 0.",
    ),
    (
        "bookstore_tls_certificate_expiry_timestamp_seconds",
        Kind::Gauge,
        "When a certificate in use expires, in Unix seconds: identity (this service's own), trust (the last CA of the bundle).",
    ),
    (
        "bookstore_connections_refused_total",
        Kind::Counter,
        "Connections closed on arrival, by listener and reason.",
    ),
    (
        "bookstore_connections_closed_total",
        Kind::Counter,
        "Open connections closed for what their client did, by listener and reason: head_too_large (an HTTP/2 header block past MAX_HEAD_BYTES), head_budget (an unfinished head that gave way to newer ones past MAX_HEAD_BYTES_TOTAL), send_stalled (answers waiting SEND_TIMEOUT for a client that does not read them).",
    ),
    (
        "bookstore_connections_open",
        Kind::Gauge,
        "Connections open now, by listener.",
    ),
    (
        "bookstore_ready",
        Kind::Gauge,
        "1 while the service is ready (its /readyz answers 200); 0 once it drains.",
    ),
    (
        "bookstore_connections_max",
        Kind::Gauge,
        "The cap on open connections, by listener (MAX_CONNECTIONS, ADMIN_MAX_CONNECTIONS).",
    ),
    (
        "bookstore_build_info",
        Kind::Gauge,
        "Always 1: the service, its version and the commit it was built from (revision).",
    ),
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory
/// stays bounded under load.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Sets gauges from state kept elsewhere, just before a scrape renders them.
type Sampler = Box<dyn Fn() + Send + Sync>;

/// A service's metrics registry. Cloning shares it.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    samplers: Arc<Mutex<Vec<Sampler>>>,
    scopes: Arc<Mutex<Vec<Scope>>>,
    /// The service's own series' descriptions, for its scopes too.
    own: &'static [Description],
}

/// The series that carry one label value, in a registry of their own (see [`Metrics::scope`]).
struct Scope {
    label: (&'static str, String),
    metrics: Metrics,
    /// Since when it is retired, and for how long it is rendered from then.
    retired: Option<(Instant, Duration)>,
}

impl Scope {
    fn expired(&self, now: Instant) -> bool {
        self.retired
            .is_some_and(|(since, keep)| now.saturating_duration_since(since) >= keep)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Where the metrics were recorded, for the `metrics` crate's bookkeeping.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Metrics {
    /// A registry whose `*_seconds` metrics are histograms, with
    /// `bookstore_build_info{service,version}` set (its revision `unknown`).
    pub fn new(service: &'static str, version: &'static str) -> Self {
        Self::for_build(service, version, "unknown", &[])
    }

    /// As [`Metrics::new`], with the commit the binary was built from and the descriptions of
    /// the series only this service exports.
    pub fn for_build(
        service: &'static str,
        version: &'static str,
        revision: &'static str,
        own: &'static [Description],
    ) -> Self {
        let metrics = Self::with_builder(PrometheusBuilder::new(), own);
        let key = Key::from_parts(
            "bookstore_build_info",
            vec![
                Label::new("service", service),
                Label::new("version", version),
                Label::new("revision", revision),
            ],
        );
        metrics.recorder.register_gauge(&key, &METADATA).set(1.0);
        metrics
    }

    /// A registry built by `builder` with our buckets and every series' help text.
    fn with_builder(builder: PrometheusBuilder, own: &'static [Description]) -> Self {
        let recorder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            // Only fails for an empty bucket list.
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        for (name, kind, help) in SHARED.iter().chain(own) {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        Metrics {
            recorder: Arc::new(recorder),
            handle,
            samplers: Arc::default(),
            scopes: Arc::default(),
            own,
        }
    }

    /// The registry for series labelled `name="value"` (one backend address's): every series
    /// registered through it carries that label, and it is rendered with this registry. Asked
    /// again for the same label, it is the same registry, counts and all, even after
    /// [`Metrics::retire`] if it has not expired yet.
    pub fn scope(&self, name: &'static str, value: &str) -> Metrics {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(scope) = scopes
            .iter_mut()
            .find(|s| s.label.0 == name && s.label.1 == value)
        {
            scope.retired = None;
            return scope.metrics.clone();
        }
        let metrics = Self::with_builder(
            PrometheusBuilder::new().add_global_label(name, value),
            self.own,
        );
        scopes.push(Scope {
            label: (name, value.to_owned()),
            metrics: metrics.clone(),
            retired: None,
        });
        metrics
    }

    /// The scope `name="value"` is gone (its address left): its series are still rendered for
    /// `keep`, so the last scrapes see their final values, then dropped whole. A later
    /// [`Metrics::scope`] for it within `keep` takes it back.
    pub fn retire(&self, name: &'static str, value: &str, keep: Duration) {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        for scope in scopes
            .iter_mut()
            .filter(|s| s.label.0 == name && s.label.1 == value && s.retired.is_none())
        {
            scope.retired = Some((Instant::now(), keep));
        }
    }

    /// The scopes rendered now; expired ones are dropped first.
    fn live_scopes(&self) -> Vec<Metrics> {
        let now = Instant::now();
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        scopes.retain(|s| !s.expired(now));
        scopes.iter().map(|s| s.metrics.clone()).collect()
    }

    /// The counter `name` with these labels.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// The gauge `name` with these labels.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// The histogram `name` with these labels.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// Calls `sample` before each scrape renders: for a gauge read from an atomic the hot path
    /// keeps anyway (requests in flight, calls queued), so the hot path does not also keep the
    /// gauge.
    pub fn on_scrape(&self, sample: impl Fn() + Send + Sync + 'static) {
        self.samplers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(sample));
    }

    /// Everything recorded, in the Prometheus text format, then the process metrics.
    pub fn render(&self) -> String {
        let mut texts = Vec::new();
        self.render_scopes(&mut texts);
        let Some(own) = texts.first_mut() else {
            return String::new();
        };
        crate::process_metrics::render(own);
        if texts.len() == 1 {
            return texts.swap_remove(0);
        }
        merge_families(&texts)
    }

    /// This registry's text, then each live scope's.
    fn render_scopes(&self, texts: &mut Vec<String>) {
        for sample in self
            .samplers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            sample();
        }
        texts.push(self.handle.render());
        for scope in self.live_scopes() {
            scope.render_scopes(texts);
        }
    }

    /// Folds histogram samples into buckets every few seconds until `stop`.
    pub async fn upkeep(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.run_upkeep(),
            }
        }
    }

    fn run_upkeep(&self) {
        self.handle.run_upkeep();
        for scope in self.live_scopes() {
            scope.run_upkeep();
        }
    }
}

/// Several renderings as one: each family (its `# HELP` and `# TYPE` lines once, then every
/// sample of it from every text), in the order first seen. The text format wants each family
/// in one block; scopes render the same families as their parent, with their own label.
fn merge_families(texts: &[String]) -> String {
    #[derive(Default)]
    struct Family<'a> {
        comments: Vec<&'a str>,
        samples: Vec<&'a str>,
    }
    let mut order = Vec::new();
    let mut families: HashMap<&str, Family<'_>> = HashMap::new();
    for text in texts {
        // The families this text brought first: their comments are the ones kept.
        let mut introduced = HashSet::new();
        let mut current = "";
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix("# ") {
                // `# HELP name text` or `# TYPE name kind`
                current = comment.split(' ').nth(1).unwrap_or_default();
                if !families.contains_key(current) {
                    order.push(current);
                    introduced.insert(current);
                }
                let family = families.entry(current).or_default();
                if introduced.contains(current) {
                    family.comments.push(line);
                }
            } else {
                if !families.contains_key(current) {
                    order.push(current);
                }
                families.entry(current).or_default().samples.push(line);
            }
        }
    }
    let mut merged = String::with_capacity(texts.iter().map(String::len).sum());
    for name in order {
        let Some(family) = families.get(name) else {
            continue;
        };
        for line in family.comments.iter().chain(&family.samples) {
            merged.push_str(line);
            merged.push('\n');
        }
        merged.push('\n');
    }
    merged
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests;
