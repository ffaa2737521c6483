//! OpenTelemetry trace export (cargo feature `otel`): both services' spans reach a real OTLP/gRPC
//! endpoint and join into one trace under the caller's `traceparent`.
//!
//! The collector is a small OTLP trace service in this test, built from the protocol's own
//! generated code; both services run in this process, so they share one exporter.
//!   cargo test -p marketplace --features otel --test otel
#![cfg(feature = "otel")]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bookstore_common::telemetry::{self, LogArgs};
use bookstore_testkit::{
    TestPki, eventually, marketplace_config, recommendations_config, spawn_marketplace,
    spawn_recommendations,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().expect("lock").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> (Collector, SocketAddr) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (collector, addr)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_spans_join_the_callers_trace_in_the_collector() {
    let (collector, collector_addr) = start_collector().await;
    let telemetry = telemetry::init(
        &LogArgs {
            otlp_endpoint: Some(format!("http://{collector_addr}")),
            ..LogArgs::default()
        },
        "bookstore-test",
    );

    let pki = TestPki::new();
    let recommendations = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), recommendations.addr)).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .get(format!("http://{}/", marketplace.addr))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .send()
        .await
        .expect("page");
    assert_eq!(response.status(), 200);

    // Spans end as the answer is written; flush until both have arrived.
    let telemetry = Arc::new(telemetry);
    let (http, grpc) = eventually("both spans", Duration::from_secs(10), async || {
        let flusher = telemetry.clone();
        tokio::task::spawn_blocking(move || flusher.flush())
            .await
            .expect("flush");
        let spans = collector.spans.lock().expect("lock").clone();
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name && hex(&s.trace_id) == trace)
                .cloned()
        };
        if let (Some(http), Some(grpc)) = (find("GET /"), find("Recommendations/Recommend")) {
            return Ok((http, grpc));
        }
        let names: Vec<_> = spans.iter().map(|s| s.name.clone()).collect();
        Err(format!("spans never arrived; got {names:?}"))
    })
    .await;
    assert_eq!(
        hex(&http.parent_span_id),
        caller_span,
        "the page continues the caller's span"
    );
    assert_eq!(
        hex(&grpc.parent_span_id),
        hex(&http.span_id),
        "the gRPC call is a child of the page"
    );
    assert!(grpc.end_time_unix_nano >= grpc.start_time_unix_nano);
}

/// Export requests arriving over OTLP/HTTP at `path`, decoded, and the collector's address.
async fn http_collector(path: &str) -> (Arc<Mutex<Vec<ExportTraceServiceRequest>>>, SocketAddr) {
    use prost::Message;

    let requests = Arc::new(Mutex::new(Vec::<ExportTraceServiceRequest>::new()));
    let app = axum::Router::new().route(
        path,
        axum::routing::post({
            let requests = requests.clone();
            move |body: axum::body::Bytes| async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        requests.lock().expect("lock").push(request);
                        axum::http::StatusCode::OK
                    }
                    Err(_) => axum::http::StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (requests, collector)
}

/// The trace ids of the page spans (`GET /`) received so far.
fn page_traces(requests: &Mutex<Vec<ExportTraceServiceRequest>>) -> Vec<String> {
    requests
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .filter(|s| s.name == "GET /")
        .map(|s| hex(&s.trace_id))
        .collect()
}

/// Only the traces variables set, and a sampler from the environment: spans go to the traces
/// URL as given, and the sampler decides which. With `parentbased_traceidratio` at 0, a page
/// with no caller's trace is not sampled and a page whose caller sampled its trace is.
#[tokio::test]
async fn the_traces_endpoint_alone_is_enough_and_the_sampler_is_the_environments() {
    let (requests, collector) = http_collector("/collector/traces").await;
    let pki = TestPki::new();
    let backend = bookstore_testkit::process::unused_address();
    let (_web, web) = bookstore_testkit::process::start_marketplace(
        pki.dir(),
        backend,
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://{collector}/collector/traces"),
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "http/protobuf".to_owned(),
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
            ("OTEL_TRACES_SAMPLER_ARG", "0".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let page = |traceparent: Option<String>| {
        let mut request = client.get(format!("http://{web}/"));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };
    page(None).await.expect("a page with no trace");
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    page(Some(format!("00-{sampled}-b7ad6b7169203331-01")))
        .await
        .expect("a page in a sampled trace");

    // Spans leave in the order they end: once the second page's has arrived, the first's
    // would have too.
    eventually(
        "the sampled page's span at the traces URL",
        Duration::from_secs(15),
        async || page_traces(&requests).contains(&sampled.to_owned()),
    )
    .await;
    assert_eq!(page_traces(&requests), vec![sampled.to_owned()]);
}

/// The real binary, configured only by the standard OpenTelemetry variables: OTLP over HTTP to a
/// collector that decodes what it gets, with the service name and resource attributes taken
/// from the environment.
#[tokio::test]
async fn the_binary_exports_over_otlp_http_under_the_name_the_environment_gives() {
    let (requests, collector) = http_collector("/v1/traces").await;

    let pki = TestPki::new();
    // No backend there: the page is a 503, and its span is exported all the same.
    let backend = bookstore_testkit::process::unused_address();
    let (_web, web) = bookstore_testkit::process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
            ("OTEL_SERVICE_NAME", "shop-frontend".to_owned()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test".to_owned(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ],
    )
    .await;
    let status = reqwest::get(format!("http://{web}/"))
        .await
        .expect("page")
        .status();
    assert_eq!(status, 503);

    let resource = eventually(
        "a page span over OTLP/HTTP",
        Duration::from_secs(15),
        async || {
            requests.lock().expect("lock").iter().find_map(|request| {
                request.resource_spans.iter().find_map(|r| {
                    let page = r
                        .scope_spans
                        .iter()
                        .flat_map(|s| &s.spans)
                        .any(|s| s.name == "GET /");
                    page.then(|| r.resource.clone())
                })
            })
        },
    )
    .await
    .expect("a resource");
    let attribute = |key: &str| {
        resource
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone()?.value)
            .map(|v| format!("{v:?}"))
            .unwrap_or_default()
    };
    assert!(
        attribute("service.name").contains("shop-frontend"),
        "{resource:?}"
    );
    assert!(
        attribute("deployment.environment").contains("test"),
        "{resource:?}"
    );
}
