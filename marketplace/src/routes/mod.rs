//! The HTTP surface: the router and what every request goes through before its handler (in
//! `page` and `api`): request id and trace context, the request's span, metrics and log line
//! (`observe`), the security headers, the in-flight limit (`in_flight`), URI and header size
//! limits (414, 431), and a panic answered with the 500 page; plus the stylesheet.

mod api;
pub mod forwarded;
pub mod in_flight;
mod page;
pub mod query;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use bookstore_common::{
    context::{REQUEST_ID_HEADER, RequestId, TRACEPARENT_HEADER, TraceContext, continue_trace},
    metrics::Metrics,
    panic::log_panic,
    request_log::{RequestLog, Sampling},
};
use bookstore_server::http_server::Connection;
use metrics::{Counter, Histogram};
use tower::ServiceBuilder;
use tower_http::{catch_panic::CatchPanicLayer, set_header::SetResponseHeaderLayer};
use tracing::Instrument;

use crate::{
    error::{AppError, HtmlError},
    source::{RecommendationSource, RequestContext},
};
use forwarded::TrustedProxies;
use in_flight::InFlight;

/// Sent on answers to requests a trusted proxy says came over HTTPS: browsers keep to HTTPS
/// for this host for a year.
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// The longest request target accepted; ours are a path and three short parameters.
const MAX_URI_BYTES: usize = 2048;

/// The most header bytes (names and values) a request may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Sent with every response. The pages load nothing but their own stylesheet, so the policy can
/// forbid everything else, including framing.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub source: Arc<dyn RecommendationSource>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The whole app, with recommendations from `source`, counted in `metrics`, answering at most
/// `max_in_flight` requests at once. Tests call this with a fake source and drive it without a
/// socket.
pub fn router(
    source: Arc<dyn RecommendationSource>,
    metrics: Metrics,
    max_in_flight: usize,
) -> Router {
    router_behind(
        source,
        metrics,
        max_in_flight,
        TrustedProxies::default(),
        Sampling::default(),
    )
}

/// [`router`], believing the `X-Forwarded-*` headers of `proxies` (see [`forwarded`]), with
/// `lines` choosing which requests get a log line.
pub fn router_behind(
    source: Arc<dyn RecommendationSource>,
    metrics: Metrics,
    max_in_flight: usize,
    proxies: TrustedProxies,
    lines: Sampling,
) -> Router {
    let [a, b, c, d] = SECURITY_HEADERS.map(|(name, value)| {
        SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
    });
    // Every layer in one `Router::layer` call, outermost first. Each call wraps every route in
    // one more box, and axum clones a route's whole boxed stack for each request it routes, so
    // a call per layer costs each request a box per layer below it (measured as the
    // marketplace's CPU per page: about 1 µs of some 46 against the five calls this replaced).
    let edge = ServiceBuilder::new()
        .layer(middleware::from_fn_with_state(
            Arc::new(HttpMetrics::new(metrics.clone(), proxies, lines)),
            observe,
        ))
        // Inside the layers that count, identify and dress every answer, so a shed request is
        // all three too.
        .layer(a)
        .layer(b)
        .layer(c)
        .layer(d)
        .layer(middleware::from_fn_with_state(
            InFlight::new(max_in_flight, &metrics),
            in_flight::limit,
        ))
        .layer(middleware::from_fn(limit_request_size))
        .layer(CatchPanicLayer::custom(internal_error as PanicResponse));
    Router::new()
        .route("/", get(page::recommendations))
        .route("/api/recommendations", get(api::recommendations))
        .route("/style.css", get(stylesheet))
        .fallback(not_found)
        .with_state(AppState { source })
        .layer(edge)
}

type PanicResponse = fn(Box<dyn std::any::Any + Send>) -> Response;

/// The HTTP series, with each (method, route, status) handle registered once, and which
/// requests get a log line.
struct HttpMetrics {
    metrics: Metrics,
    handles: Mutex<HashMap<SeriesKey, (Counter, Histogram)>>,
    lines: RequestLog,
    /// Whose forwarded headers name the client in the request's line, and its scheme.
    proxies: TrustedProxies,
}

/// (method, route, status).
type SeriesKey = (&'static str, &'static str, u16);

impl HttpMetrics {
    fn new(metrics: Metrics, proxies: TrustedProxies, lines: Sampling) -> Self {
        // The series the objectives and their alerts divide by exist at zero from start-up: a
        // page error ratio has a numerator before the first error, and a dashboard shows 0, not
        // "no data".
        for route in ["/", "/api/recommendations"] {
            for status in ["200", "500", "503"] {
                let labels = [("method", "GET"), ("route", route), ("status", status)];
                metrics.counter("http_requests_total", &labels).increment(0);
            }
        }
        HttpMetrics {
            metrics,
            handles: Mutex::default(),
            lines: RequestLog::new(lines),
            proxies,
        }
    }

    fn record(&self, method: &'static str, route: &'static str, status: StatusCode, took: f64) {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let (count, latency) = handles
            .entry((method, route, status.as_u16()))
            .or_insert_with(|| {
                let labels = [
                    ("method", method),
                    ("route", route),
                    ("status", status.as_str()),
                ];
                (
                    self.metrics.counter("http_requests_total", &labels),
                    self.metrics
                        .histogram("http_request_duration_seconds", &labels),
                )
            });
        count.increment(1);
        latency.record(took);
    }
}

/// Every request: its request id and trace context (the caller's when well formed, else new),
/// a span carrying both around everything logged for it, the `x-request-id` response header,
/// HTTP metrics by route and status, and one log line when it is answered.
async fn observe(
    State(metrics): State<Arc<HttpMetrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let headers = request.headers();
    let request_id = RequestId::from_header(headers.get(REQUEST_ID_HEADER).map(|v| v.as_bytes()));
    let parent = headers
        .get(TRACEPARENT_HEADER)
        .and_then(|v| TraceContext::parse(v.as_bytes()));
    let method = method_label(request.method());
    let route = route_label(request.uri().path());
    // The request's own line carries its ids; the span is for trace export.
    let span = bookstore_common::server_span!("http", request_id, format_args!("{method} {route}"));
    // Our span in the caller's trace (or the first of a new one): the parent of our calls.
    let trace = continue_trace(&span, parent);
    trace.record_ids(&span);
    let peer = request
        .extensions()
        .get::<Connection>()
        .map(Connection::peer);
    let origin = metrics.proxies.origin(peer, request.headers());
    let context = RequestContext { request_id, trace };
    request.extensions_mut().insert(context.clone());
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(id) = HeaderValue::from_str(context.request_id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    if origin.https {
        // Only over HTTPS: a browser ignores the header on a plain-HTTP answer anyway.
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    let elapsed = started.elapsed();
    let status = response.status();
    metrics.record(method, route, status, elapsed.as_secs_f64());
    // Our own failures always get their line. A 4xx (a scanner's flood looks like that) and a
    // 503 (shedding an overload, or a backend outage, which error.rs reports a few times a
    // minute) are sampled like successes: a flood of them cannot fill a disk, and the metrics
    // count every one by status.
    let failed = status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE;
    if !metrics.lines.admit(failed, elapsed) {
        return response;
    }
    span.in_scope(|| {
        tracing::info!(
            target: "bookstore::http",
            method,
            route,
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1e3,
            request_id = %context.request_id,
            trace_id = %context.trace.trace_id_display(),
            span_id = %context.trace.span_id_display(),
            client_addr = origin.client.map(tracing::field::display),
            "HTTP request"
        )
    });
    response
}

/// The route a path belongs to; anything else is one label, so scanners cannot create series.
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/api/recommendations" => "/api/recommendations",
        "/style.css" => "/style.css",
        _ => "unmatched",
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        _ => "other",
    }
}

/// What a caller gets when a handler panics: the 500 page, no detail; the panic is logged.
fn internal_error(panic: Box<dyn std::any::Any + Send>) -> Response {
    log_panic(panic.as_ref());
    HtmlError(AppError::Internal).into_response()
}

/// Refuses over-long URIs (414) and header sets (431) before any handler sees them.
async fn limit_request_size(request: Request, next: Next) -> Response {
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return HtmlError(AppError::UriTooLong).into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return HtmlError(AppError::HeadersTooLarge).into_response();
    }
    next.run(request).await
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/style.css"),
    )
}

async fn not_found() -> HtmlError {
    HtmlError(AppError::NotFound)
}
