//! Prometheus metrics: one registry per running service, rendered on the admin port's
//! `GET /metrics`.
//!
//! Each service owns its registry instead of installing a process-wide recorder, so two
//! services in one test process never mix their counts. Exposition is done by
//! `metrics-exporter-prometheus`.

use std::{sync::Arc, time::Duration};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds. Our calls take well under a millisecond when healthy, so the
/// lower end is finer than Prometheus' defaults; the upper end reaches past the longest deadline.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory
/// stays bounded under load.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A service's metrics registry. Cloning shares it.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
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
    /// A registry whose `*_seconds` metrics are histograms, with `<service>_build_info` set.
    pub fn new(service: &'static str, version: &'static str) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            // Only fails for an empty bucket list.
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics {
            recorder: Arc::new(recorder),
            handle,
        };
        let key = Key::from_parts(
            "bookstore_build_info",
            vec![
                Label::new("service", service),
                Label::new("version", version),
            ],
        );
        metrics.recorder.register_gauge(&key, &METADATA).set(1.0);
        metrics
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

    /// Everything recorded, in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds histogram samples into buckets every few seconds until `stop`.
    pub async fn upkeep(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.handle.run_upkeep(),
            }
        }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_build_info_render_in_prometheus_text() {
        let metrics = Metrics::new("demo", "1.2.3");
        metrics
            .counter("demo_total", &[("code", "OK")])
            .increment(2);
        metrics
            .histogram("demo_seconds", &[("route", "/")])
            .record(0.003);
        let text = metrics.render();
        assert!(text.contains("demo_total{code=\"OK\"} 2"), "{text}");
        assert!(
            text.contains("demo_seconds_bucket{route=\"/\",le=\"0.005\"} 1"),
            "a histogram, not a summary: {text}"
        );
        assert!(
            text.contains("demo_seconds_bucket{route=\"/\",le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("bookstore_build_info{service=\"demo\",version=\"1.2.3\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn two_registries_do_not_share_counts() {
        let (a, b) = (Metrics::new("a", "0"), Metrics::new("b", "0"));
        a.counter("x_total", &[]).increment(1);
        assert!(a.render().contains("x_total 1"));
        assert!(!b.render().contains("x_total"));
    }
}
