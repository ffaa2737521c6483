//! Log set-up for both services.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g.
    /// `http://otel-collector:4317` (builds with the `otel` feature only; unset: no export).
    #[cfg(feature = "otel")]
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl Default for LogArgs {
    fn default() -> Self {
        LogArgs {
            filter: "info".into(),
            format: LogFormat::Text,
            #[cfg(feature = "otel")]
            otlp_endpoint: None,
        }
    }
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

/// Installs the global `tracing` subscriber, writing to standard error, and with the `otel`
/// feature and an endpoint, exporting spans as `service`.
///
/// An invalid filter directive falls back to `info` with a warning, rather than stopping the
/// service over a logging typo. Must run inside the Tokio runtime (the exporter lives on it).
pub fn init(args: &LogArgs, service: &'static str) -> Telemetry {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

    let (filter, bad) = match EnvFilter::try_new(&args.filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match args.format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    let (registry, telemetry, exporter_error) = {
        let (layer, provider, error) = match &args.otlp_endpoint {
            Some(endpoint) => match otel::provider(endpoint, service) {
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
    let _ = registry.try_init();
    if args.format == LogFormat::Json {
        // The default hook writes a plain-text paragraph to standard error, which a collector
        // expecting one JSON object per line cannot read. (The catch-panic layers still answer
        // the request; this is only how the panic is reported.)
        std::panic::set_hook(Box::new(log_panic));
    }
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid RUST_LOG directive; logging at info");
    }
    #[cfg(feature = "otel")]
    match (&args.otlp_endpoint, exporter_error) {
        (Some(endpoint), None) => tracing::info!(%endpoint, "exporting traces over OTLP"),
        (Some(endpoint), Some(e)) => {
            tracing::warn!(%endpoint, error = %e, "cannot export traces; going on without")
        }
        (None, _) => {}
    }
    telemetry
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
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::{
        Resource, runtime,
        trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
    };

    /// Spans batched and sent from a task on the service's own runtime: the exporter's gRPC
    /// client needs Tokio, which the SDK's default batch thread does not have.
    pub(super) fn provider(
        endpoint: &str,
        service: &'static str,
    ) -> Result<SdkTracerProvider, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build())
    }
}
