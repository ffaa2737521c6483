//! Logging and tracing set-up for both services: the subscriber (text or JSON lines, the
//! `RUST_LOG` filter), optional OTLP trace export (feature `otel`), the per-request span macro
//! `server_span!`, and a panic hook that logs a panic as one event.

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use tracing_subscriber::EnvFilter;

use crate::request_log;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    Text,
    /// One JSON object per line, for log collectors (Kubernetes).
    Json,
}

/// The log settings both services take.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `recommendations=debug,tower=warn`.
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info")]
    pub filter: String,
    /// `text` for people, `json` for log collectors.
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
    /// OpenTelemetry collector to export traces to, e.g. `http://otel-collector:4317` (OTLP/gRPC)
    /// or `http://otel-collector:4318` (OTLP/HTTP, to which `/v1/traces` is added). Unset (and
    /// no traces endpoint): no export, and no cost. Needs a build with the `otel` feature (the
    /// images have it); other builds warn once and go on.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Where to send traces, used as given (for OTLP/HTTP the whole URL, e.g.
    /// `http://otel-collector:4318/v1/traces`); wins over `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(
        long = "otlp-traces-endpoint",
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )]
    pub otlp_traces_endpoint: Option<String>,
    /// How to talk to the collector: `grpc` or `http/protobuf`. The service name comes from
    /// `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`), else the
    /// service's own; `OTEL_TRACES_SAMPLER`, its argument and `OTEL_RESOURCE_ATTRIBUTES` are
    /// read by the OpenTelemetry SDK.
    #[arg(long = "otlp-protocol", env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum,
          default_value_t = OtlpProtocol::Grpc)]
    pub otlp_protocol: OtlpProtocol,
    /// The protocol for traces, if not the one above.
    #[arg(
        long = "otlp-traces-protocol",
        env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        value_enum
    )]
    pub otlp_traces_protocol: Option<OtlpProtocol>,
    /// A line for one in this many successful, fast requests and calls (the first included);
    /// every failed or slow one always gets its line. 1: a line for every one; 0: only the failed
    /// and slow ones.
    #[arg(long = "log-sample", env = "LOG_SAMPLE", default_value_t = request_log::DEFAULT_SAMPLE)]
    pub sample: u64,
    /// A request or call taking at least this many milliseconds is slow, and always logged.
    #[arg(long = "log-slow-ms", env = "LOG_SLOW_MS", default_value_t = request_log::DEFAULT_SLOW_MS)]
    pub slow_ms: u64,
}

/// The OTLP transports the exporter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collector port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (collector port 4318, path `/v1/traces`).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl Default for LogArgs {
    fn default() -> Self {
        LogArgs {
            filter: "info".into(),
            format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            otlp_traces_protocol: None,
            sample: request_log::DEFAULT_SAMPLE,
            slow_ms: request_log::DEFAULT_SLOW_MS,
        }
    }
}

impl LogArgs {
    /// Which requests and calls get a line of their own.
    pub fn sampling(&self) -> request_log::Sampling {
        request_log::Sampling {
            every: self.sample,
            slow: std::time::Duration::from_millis(self.slow_ms),
        }
    }

    /// Where traces go and how, as the OTLP exporter variables say: the traces endpoint as
    /// given, else the general endpoint (with `/v1/traces` added for OTLP/HTTP). None: no export.
    pub fn traces_target(&self) -> Option<(String, OtlpProtocol)> {
        let protocol = self.otlp_traces_protocol.unwrap_or(self.otlp_protocol);
        let url = match (&self.otlp_traces_endpoint, &self.otlp_endpoint) {
            (Some(traces), _) => traces.clone(),
            (None, Some(base)) if protocol == OtlpProtocol::HttpProtobuf => {
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, Some(base)) => base.clone(),
            (None, None) => return None,
        };
        Some((url, protocol))
    }
}

/// Whether spans are exported (the `otel` feature, an endpoint, and an exporter that started).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports trace spans. A span per request or call is worth its cost only
/// then: each costs the log formatter a few microseconds, about a tenth of Recommend's CPU, and
/// the lines that matter carry their request and trace ids themselves. So without export the
/// services make those spans at debug level only (`RUST_LOG=debug` brings them back, with the
/// ids on every line logged inside them).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The span of one request (`"http"`) or call (`"grpc"`) served: its `request_id`, a `trace_id`
/// and `span_id` to record, and the OpenTelemetry name and kind. Made at `info` when trace
/// export is on and at `debug` otherwise (see [`exporting`]).
#[macro_export]
macro_rules! server_span {
    ($name:literal, $request_id:expr, $otel_name:expr) => {
        if $crate::telemetry::exporting() {
            $crate::__server_span_at!(::tracing::Level::INFO, $name, $request_id, $otel_name)
        } else {
            $crate::__server_span_at!(::tracing::Level::DEBUG, $name, $request_id, $otel_name)
        }
    };
}

/// [`server_span!`]'s one list of fields, at a level fixed where it is written (a span's level
/// is part of its static call site, so the two levels need two call sites).
#[doc(hidden)]
#[macro_export]
macro_rules! __server_span_at {
    ($level:expr, $name:literal, $request_id:expr, $otel_name:expr) => {
        ::tracing::span!(
            $level,
            $name,
            request_id = %$request_id,
            trace_id = ::tracing::field::Empty,
            span_id = ::tracing::field::Empty,
            otel.name = %$otel_name,
            otel.kind = "server",
        )
    };
}

/// What must outlive the service for its telemetry to be complete: with trace export on, the
/// pipeline, flushed when this is dropped.
#[derive(Debug, Default)]
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends every finished span now.
    pub fn flush(&self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "cannot flush traces");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "cannot flush traces at exit");
        }
    }
}

/// The HTTP/2 library warns once for each frame or connection a peer gets wrong (an unsolicited
/// PING ACK, a burst of stream resets), so a peer decides how many lines are written: one h2c
/// connection wrote 70 MB of them a second. Unless the filter names `h2` itself (or is `off`),
/// only the library's errors are logged; the refusals that matter are counted in metrics.
fn quiet_peer_noise(filter: &str) -> String {
    let names_h2 = filter.split(',').any(|d| d.trim().starts_with("h2"));
    if names_h2 || filter.trim() == "off" {
        filter.to_owned()
    } else {
        format!("{filter},h2=error")
    }
}

/// Installs the global `tracing` subscriber, writing to standard error, and with the `otel`
/// feature and an endpoint, exporting spans as `service`.
///
/// An invalid filter directive falls back to `info` with a warning, rather than stopping the
/// service over a logging typo. Must run inside the Tokio runtime (the exporter lives on it).
pub fn init(args: &LogArgs, service: &'static str) -> Telemetry {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

    let (filter, bad) = match EnvFilter::try_new(quiet_peer_noise(&args.filter)) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(quiet_peer_noise("info")), Some(e)),
    };
    let target = args.traces_target();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match args.format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Named {
                service,
                json: tracing_subscriber::fmt::format().json().flatten_event(true),
            })
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    let (registry, telemetry, exporter_error) = {
        let (layer, provider, error) = match &target {
            Some((endpoint, protocol)) => match otel::provider(endpoint, *protocol, service) {
                Ok(provider) => {
                    use opentelemetry::trace::TracerProvider as _;
                    let layer =
                        tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
                    (Some(layer), Some(provider), None)
                }
                Err(e) => (None, None, Some(e)),
            },
            None => (None, None, None),
        };
        (registry.with(layer), Telemetry { provider }, error)
    };
    #[cfg(not(feature = "otel"))]
    let telemetry = {
        let _ = service;
        Telemetry::default()
    };
    // A second call (tests start several apps in one process) keeps the first subscriber.
    if registry.try_init().is_ok() {
        #[cfg(feature = "otel")]
        EXPORTING.store(telemetry.provider.is_some(), Ordering::Relaxed);
    }
    if args.format == LogFormat::Json {
        // The default hook writes a plain-text paragraph to standard error, which a collector
        // expecting one JSON object per line cannot read. (The catch-panic layers still answer
        // the request; this is only how the panic is reported.)
        std::panic::set_hook(Box::new(log_panic));
    }
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid RUST_LOG directive; logging at info");
    }
    #[cfg(not(feature = "otel"))]
    if let Some((endpoint, _)) = &target {
        tracing::warn!(
            %endpoint,
            "an OTLP endpoint is set, but this build has no trace export (cargo feature `otel`; \
             the images have it): no traces are sent"
        );
    }
    #[cfg(feature = "otel")]
    match (&target, exporter_error) {
        (Some((endpoint, protocol)), None) => tracing::info!(
            %endpoint,
            ?protocol,
            "exporting traces over OTLP"
        ),
        (Some((endpoint, _)), Some(e)) => {
            tracing::warn!(%endpoint, error = %e, "cannot export traces; going on without")
        }
        (None, _) => {}
    }
    telemetry
}

/// JSON lines that start with the service's name, `{"service":"marketplace",…`: a collector
/// gathering every pod's lines can tell the two services apart by the line alone.
struct Named<F> {
    service: &'static str,
    json: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Named<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.json.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match line.strip_prefix('{') {
            // The name is one of ours: letters only, nothing to escape.
            Some(rest) => write!(writer, "{{\"service\":\"{}\",{rest}", self.service),
            None => writer.write_str(&line),
        }
    }
}

/// A panic as one error event: inside a request's span it carries that request's id. With
/// `RUST_BACKTRACE` set, the backtrace goes in the same event, as the default hook would print it.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    use std::backtrace::{Backtrace, BacktraceStatus};

    let message = crate::panic::message(info.payload());
    let location = info.location().map(ToString::to_string).unwrap_or_default();
    let thread = std::thread::current();
    let backtrace = Backtrace::capture();
    let backtrace =
        (backtrace.status() == BacktraceStatus::Captured).then(|| backtrace.to_string());
    tracing::error!(
        panic = message,
        location,
        thread = thread.name().unwrap_or("unnamed"),
        backtrace = backtrace.as_deref(),
        "panicked"
    );
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::{
        Resource, runtime,
        trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
    };

    use super::OtlpProtocol;

    /// Spans batched and sent from a task on the service's own runtime: the exporter's clients
    /// need Tokio, which the SDK's default batch thread does not have.
    pub(super) fn provider(
        endpoint: &str,
        protocol: OtlpProtocol,
        service: &'static str,
    ) -> Result<SdkTracerProvider, String> {
        let exporter = match protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .build(),
        }
        .map_err(|e| e.to_string())?;
        let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource(service))
            .build())
    }

    /// The SDK's resource, read from `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`; the
    /// service's own name only where neither names it (the SDK would say `unknown_service`).
    fn resource(service: &'static str) -> Resource {
        let from_env = Resource::builder().build();
        let named = from_env
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
        if named {
            from_env
        } else {
            Resource::builder()
                .with_attribute(KeyValue::new("service.name", service))
                .build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LogArgs, OtlpProtocol, quiet_peer_noise};

    #[test]
    fn the_traces_endpoint_wins_and_is_used_as_given() {
        let args = |endpoint: Option<&str>, traces: Option<&str>, protocol, traces_protocol| {
            LogArgs {
                otlp_endpoint: endpoint.map(str::to_owned),
                otlp_traces_endpoint: traces.map(str::to_owned),
                otlp_protocol: protocol,
                otlp_traces_protocol: traces_protocol,
                ..LogArgs::default()
            }
            .traces_target()
        };
        let (grpc, http) = (OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf);
        assert_eq!(args(None, None, http, Some(http)), None);
        assert_eq!(
            args(Some("http://c:4317"), None, grpc, None),
            Some(("http://c:4317".into(), grpc))
        );
        assert_eq!(
            args(Some("http://c:4318/"), None, http, None),
            Some(("http://c:4318/v1/traces".into(), http))
        );
        assert_eq!(
            args(
                Some("http://c:4317"),
                Some("http://t:4318/in"),
                grpc,
                Some(http)
            ),
            Some(("http://t:4318/in".into(), http)),
            "the traces variables win, the URL as given"
        );
        assert_eq!(
            args(None, Some("http://t:4317"), grpc, None),
            Some(("http://t:4317".into(), grpc)),
            "the traces endpoint alone is enough"
        );
    }

    #[test]
    fn the_http2_librarys_warnings_are_off_unless_the_filter_asks_for_them() {
        assert_eq!(quiet_peer_noise("info"), "info,h2=error");
        assert_eq!(
            quiet_peer_noise("recommendations=debug,tower=warn"),
            "recommendations=debug,tower=warn,h2=error"
        );
        assert_eq!(quiet_peer_noise("info, h2=warn"), "info, h2=warn");
        assert_eq!(quiet_peer_noise("h2::proto=trace"), "h2::proto=trace");
        assert_eq!(quiet_peer_noise("off"), "off");
    }
}
