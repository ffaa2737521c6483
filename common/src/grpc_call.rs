//! The gRPC interceptor both services use, as one tower layer: on the server around every
//! service, on the client around each connection. For every call it
//!
//! - counts it in the grpc-ecosystem series (`grpc_{server,client}_started_total`,
//!   `_handled_total{grpc_code}` and the `_handling_seconds` histogram), so existing dashboards
//!   work;
//! - writes one log line when it ends: method, status code, latency, peer, request id, trace id;
//! - enforces the deadline (`grpc-timeout`, capped on the server) and answers `DEADLINE_EXCEEDED`
//!   past it, where tonic on its own reports `CANCELLED` "Timeout expired";
//! - on the client, turns a transport failure into a clean `UNAVAILABLE` whose message is the
//!   error chain, logged once here.
//!
//! The status of a call is read where gRPC puts it: the response headers for a trailers-only
//! answer (every error), the trailers otherwise. A response body dropped before its trailers
//! means the caller went away: `CANCELLED`.

use std::{
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::{Counter, Histogram};
use tonic::{Code, Status, body::Body, codegen::BoxFuture, transport::server::TcpConnectInfo};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    context::{REQUEST_ID_HEADER, RequestId, TRACEPARENT_HEADER, TraceContext, continue_trace},
    metrics::Metrics,
    request_log::RequestLog,
    server_tls::PeerInfo,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and each of its causes, joined by `: `, with a cause left out when the text before
/// it already says it (hyper and tonic often repeat their source in their own message).
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The gRPC header carrying the caller's deadline.
const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The server answers `DEADLINE_EXCEEDED` this much before the caller's deadline, so that its
/// answer, not tonic's own timer (which says `CANCELLED`), is what the caller gets.
const SERVER_DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// A call abandoned this close to its deadline is counted as past it.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// Which end of a call this layer sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// A method the layer reports under its own name: its path (`/Service/Method`) and its
/// grpc-ecosystem type (`unary`, `server_stream`, `client_stream`, `bidi_stream`). Any other
/// path is reported as `unknown`, so a caller cannot create label values at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownMethod {
    pub path: &'static str,
    pub kind: &'static str,
}

/// The identity a server authorized a call under; an authorization layer puts it in the
/// response's extensions for the call's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// Counts, logs and bounds every gRPC call through it.
#[derive(Clone)]
pub struct CallLayer {
    shared: Arc<Shared>,
}

struct Shared {
    side: Side,
    metrics: Metrics,
    methods: &'static [KnownMethod],
    /// Registered handles, per method (the last slot for `unknown`), made on first use: a call
    /// then costs no registry lookup.
    handles: Vec<Handles>,
    /// Server: no call runs longer than this. Client: unused.
    max_duration: Option<Duration>,
    /// Client: the address this connection goes to.
    peer: Option<String>,
    /// Which calls get a line of their own.
    lines: RequestLog,
}

impl fmt::Debug for CallLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallLayer")
            .field("side", &self.shared.side)
            .finish_non_exhaustive()
    }
}

impl CallLayer {
    /// The server side: no call outlives `max_duration`, whatever deadline its caller sent.
    pub fn server(
        metrics: Metrics,
        methods: &'static [KnownMethod],
        max_duration: Duration,
    ) -> Self {
        Self::new(Shared {
            side: Side::Server,
            handles: Handles::for_methods(methods),
            metrics,
            methods,
            max_duration: Some(max_duration),
            peer: None,
            lines: RequestLog::from_settings(),
        })
    }

    /// The client side, for a connection to `peer`.
    pub fn client(metrics: Metrics, methods: &'static [KnownMethod], peer: String) -> Self {
        Self::new(Shared {
            side: Side::Client,
            handles: Handles::for_methods(methods),
            metrics,
            methods,
            max_duration: None,
            peer: Some(peer),
            lines: RequestLog::from_settings(),
        })
    }

    /// Every known method's `started_total` and its `handled_total` for each status code start
    /// at zero, as go-grpc-prometheus' initialisation does: the label values are known in
    /// advance, so an alert on `increase()` sees the first call of each kind.
    fn new(shared: Shared) -> Self {
        for slot in 0..shared.methods.len() {
            shared.started(slot).increment(0);
            for code in 0..CODES {
                let code = Code::from(i32::try_from(code).unwrap_or_default());
                shared.handled(slot, code).increment(0);
            }
        }
        CallLayer {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = Call<S>;

    fn layer(&self, inner: S) -> Call<S> {
        Call {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`CallLayer`] wraps.
#[derive(Clone)]
pub struct Call<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Call<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("side", &self.shared.side)
            .finish_non_exhaustive()
    }
}

impl<S> Service<http::Request<Body>> for Call<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let shared = self.shared.clone();
        let side = shared.side;
        let slot = shared.slot(request.uri().path());
        let (_, service, method) = shared.labels(slot);
        let headers = request.headers();
        let request_id = RequestId::from_header(header(headers, REQUEST_ID_HEADER));
        let parent = header(headers, TRACEPARENT_HEADER).and_then(TraceContext::parse);
        let timeout = parse_grpc_timeout(headers.get(GRPC_TIMEOUT_HEADER));
        let budget = match (side, timeout, shared.max_duration) {
            (Side::Server, t, Some(max)) => Some(
                t.map_or(max, |t| t.min(max))
                    .saturating_sub(SERVER_DEADLINE_MARGIN),
            ),
            (_, t, _) => t,
        };
        let peer_addr = match side {
            Side::Server => remote_addr(&request),
            Side::Client => None,
        };
        shared.started(slot).increment(1);
        let (span, trace) = match side {
            Side::Server => {
                // The call's own line carries its ids; the span is for trace export.
                let span =
                    crate::server_span!("grpc", request_id, format_args!("{service}/{method}"));
                let trace = continue_trace(&span, parent);
                // Formatted only when someone reads it.
                if !span.is_disabled() {
                    span.record("trace_id", trace.trace_id());
                }
                (span, Some(trace))
            }
            // The caller's own span (the HTTP request) already carries both.
            Side::Client => (tracing::Span::none(), parent),
        };
        let finish = Finish {
            shared,
            started,
            slot,
            request_id,
            trace,
            peer_addr,
        };
        // The inner service must be the one that was polled ready; leave a clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                // Recorded as CANCELLED if this future is dropped before an answer: the caller
                // went away, or an outer timer gave up first.
                let mut pending = Unanswered(Some(finish), budget);
                let call = inner.call(request);
                let outcome = match budget {
                    Some(budget) => tokio::time::timeout(budget, call).await.ok(),
                    None => Some(call.await),
                };
                let response = match outcome {
                    None => deadline_exceeded(budget),
                    Some(Ok(response)) => response,
                    Some(Err(error)) if side == Side::Client => {
                        let overdue = budget.is_some_and(|b| started.elapsed() >= b);
                        if overdue {
                            deadline_exceeded(budget)
                        } else {
                            let error: BoxError = error.into();
                            Status::unavailable(format!(
                                "cannot reach the service: {}",
                                cause_chain(error.as_ref())
                            ))
                            .into_http()
                        }
                    }
                    Some(Err(error)) => {
                        if let Some(finish) = pending.0.take() {
                            finish.done(&Status::unknown(error.to_string()), None);
                        }
                        return Err(error);
                    }
                };
                Ok(match pending.0.take() {
                    Some(finish) => finish.watch(response),
                    None => response,
                })
            }
            .instrument(span),
        )
    }
}

impl Shared {
    fn name(&self, suffix: &'static str) -> &'static str {
        match (self.side, suffix) {
            (Side::Server, "started_total") => "grpc_server_started_total",
            (Side::Server, "handled_total") => "grpc_server_handled_total",
            (Side::Server, _) => "grpc_server_handling_seconds",
            (Side::Client, "started_total") => "grpc_client_started_total",
            (Side::Client, "handled_total") => "grpc_client_handled_total",
            (Side::Client, _) => "grpc_client_handling_seconds",
        }
    }

    /// The handle slot of a request path: its known method, or the last slot (`unknown`).
    fn slot(&self, path: &str) -> usize {
        self.methods
            .iter()
            .position(|m| m.path == path)
            .unwrap_or(self.methods.len())
    }

    /// (type, service, method) labels of a slot.
    fn labels(&self, slot: usize) -> (&'static str, &'static str, &'static str) {
        self.methods
            .get(slot)
            .and_then(|m| {
                let (service, method) = m.path.trim_start_matches('/').split_once('/')?;
                Some((m.kind, service, method))
            })
            .unwrap_or(("unknown", "unknown", "unknown"))
    }

    fn method_labels(&self, slot: usize) -> [(&'static str, &'static str); 3] {
        let (kind, service, method) = self.labels(slot);
        [
            ("grpc_type", kind),
            ("grpc_service", service),
            ("grpc_method", method),
        ]
    }

    fn started(&self, slot: usize) -> &Counter {
        self.handles[slot].started.get_or_init(|| {
            self.metrics
                .counter(self.name("started_total"), &self.method_labels(slot))
        })
    }

    fn handling(&self, slot: usize) -> &Histogram {
        self.handles[slot].handling.get_or_init(|| {
            self.metrics
                .histogram(self.name("handling_seconds"), &self.method_labels(slot))
        })
    }

    fn handled(&self, slot: usize, code: Code) -> &Counter {
        let index = (code as usize).min(CODES - 1);
        self.handles[slot].handled[index].get_or_init(|| {
            let [kind, service, method] = self.method_labels(slot);
            self.metrics.counter(
                self.name("handled_total"),
                &[kind, service, method, ("grpc_code", code_name(code))],
            )
        })
    }
}

/// The number of gRPC status codes (0 to 16).
const CODES: usize = 17;

/// One method's metric handles.
#[derive(Default)]
struct Handles {
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    handled: [OnceLock<Counter>; CODES],
}

impl Handles {
    /// A slot per method, and one for `unknown`.
    fn for_methods(methods: &[KnownMethod]) -> Vec<Handles> {
        (0..=methods.len()).map(|_| Handles::default()).collect()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(HeaderValue::as_bytes)
}

fn remote_addr(request: &http::Request<Body>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<PeerInfo>()
        .map(|peer| peer.remote_addr)
        .or_else(|| extensions.get::<TcpConnectInfo>()?.remote_addr())
}

fn deadline_exceeded(budget: Option<Duration>) -> http::Response<Body> {
    let ms = budget.unwrap_or_default().as_millis();
    Status::deadline_exceeded(format!("deadline exceeded: no answer within {ms} ms")).into_http()
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit (H, M, S, m, u, n). Malformed means none,
/// as the spec leaves it.
pub fn parse_grpc_timeout(value: Option<&HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?;
    let unit_at = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The grpc-ecosystem (Go) name of a status code, as dashboards expect it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Codes that mean the service (not the caller) has a problem: logged as warnings.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// What is needed to record a call once its status is known.
struct Finish {
    shared: Arc<Shared>,
    started: Instant,
    /// Which method, as an index into the layer's handles.
    slot: usize,
    request_id: RequestId,
    trace: Option<TraceContext>,
    /// Server: the caller's address (the client side knows its peer from the layer).
    peer_addr: Option<SocketAddr>,
}

impl Finish {
    /// Records the call now if the status is in the headers; otherwise when the body ends.
    fn watch(self, mut response: http::Response<Body>) -> http::Response<Body> {
        let identity = response.extensions_mut().remove::<PeerIdentity>();
        let status = Status::from_header_map(response.headers()).or_else(|| {
            // No status now and no body to bring one later.
            HttpBody::is_end_stream(response.body())
                .then(|| Status::unknown("response without a grpc-status"))
        });
        match status {
            Some(status) => {
                self.done(&status, identity.as_ref());
                response
            }
            None => response.map(|body| {
                Body::new(WatchedBody {
                    inner: body,
                    finish: Some((self, identity)),
                })
            }),
        }
    }

    fn done(self, status: &Status, identity: Option<&PeerIdentity>) {
        let shared = &self.shared;
        let (_, service, method) = shared.labels(self.slot);
        let elapsed = self.started.elapsed();
        let code = code_name(status.code());
        shared.handled(self.slot, status.code()).increment(1);
        shared.handling(self.slot).record(elapsed.as_secs_f64());
        let side = match shared.side {
            Side::Server => "server",
            Side::Client => "client",
        };
        let peer = identity.map(|p| p.0.as_str()).unwrap_or("");
        // Displayed lazily: formatted only if the line is actually written.
        let peer_addr: &dyn fmt::Display = match (&self.peer_addr, &shared.peer) {
            (Some(addr), _) => addr,
            (None, Some(peer)) => peer,
            (None, None) => &"",
        };
        let trace_id: &dyn fmt::Display = match &self.trace {
            Some(trace) => &trace.trace_id_display(),
            None => &"",
        };
        let latency_ms = elapsed.as_secs_f64() * 1e3;
        macro_rules! call_line {
            ($level:ident) => {
                tracing::$level!(
                    target: "bookstore::grpc",
                    side,
                    method = %format_args!("{service}/{method}"),
                    code,
                    latency_ms,
                    peer,
                    peer_addr = %peer_addr,
                    request_id = %self.request_id,
                    trace_id = %trace_id,
                    // Not `message`: that key is the event's own text in JSON logs.
                    grpc_message = status.message(),
                    "gRPC call"
                )
            };
        }
        if is_server_fault(status.code()) {
            call_line!(warn);
        } else if !shared.lines.admit(status.code() != Code::Ok, elapsed) {
            // Counted and timed above; not every call needs a line of its own.
        } else if shared.side == Side::Server {
            call_line!(info);
        } else {
            // The marketplace's own HTTP line already says the page was served.
            call_line!(debug);
        }
    }
}

/// A call whose answer has not arrived yet, and its time budget.
struct Unanswered(Option<Finish>, Option<Duration>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(finish) = self.0.take() else { return };
        // The caller's clock started before ours, so a caller giving up at its deadline
        // reaches us just before our own timer: that is the deadline, not a change of mind.
        let at_deadline = self
            .1
            .is_some_and(|budget| finish.started.elapsed() + DEADLINE_SLACK >= budget);
        let status = if at_deadline {
            Status::deadline_exceeded("the caller gave up at its deadline")
        } else {
            Status::cancelled("the caller went away before the answer")
        };
        finish.done(&status, None);
    }
}

/// A response body that records its call when the trailers pass, or when it is dropped first.
struct WatchedBody {
    inner: Body,
    finish: Option<(Finish, Option<PeerIdentity>)>,
}

impl WatchedBody {
    fn finish(&mut self, status: Status) {
        if let Some((finish, identity)) = self.finish.take() {
            finish.done(&status, identity.as_ref());
        }
    }
}

impl HttpBody for WatchedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = Status::from_header_map(trailers)
                        .unwrap_or_else(|| Status::unknown("trailers without grpc-status"));
                    self.finish(status);
                }
            }
            Poll::Ready(Some(Err(error))) => {
                let status = Status::new(error.code(), error.message().to_owned());
                self.finish(status);
            }
            Poll::Ready(None) => self.finish(Status::unknown("response ended without a status")),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.finish(Status::cancelled(
            "the caller went away before the answer was complete",
        ));
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Layered(&'static str, Option<Box<Layered>>);

    impl std::fmt::Display for Layered {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layered {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_cause_chain_names_every_cause_once() {
        let error = Layered(
            "transport error",
            Some(Box::new(Layered(
                "tcp connect error: Connection refused (os error 111)",
                Some(Box::new(Layered("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            super::cause_chain(&error),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }

    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parse = |s: &'static str| parse_grpc_timeout(Some(&HeaderValue::from_static(s)));
        assert_eq!(parse("1000m"), Some(Duration::from_secs(1)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "100", "123456789m", "-1m", "1.5S", "10x", "+1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse_grpc_timeout(None), None);
    }

    #[test]
    fn codes_carry_the_go_names_dashboards_use() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::DeadlineExceeded), "DeadlineExceeded");
        assert_eq!(code_name(Code::Unavailable), "Unavailable");
    }

    #[test]
    fn unknown_paths_do_not_become_label_values() {
        const METHODS: &[KnownMethod] = &[KnownMethod {
            path: "/Recommendations/Recommend",
            kind: "unary",
        }];
        let layer = CallLayer::client(Metrics::new("t", "0"), METHODS, "peer".into());
        assert_eq!(
            layer
                .shared
                .labels(layer.shared.slot("/Recommendations/Recommend")),
            ("unary", "Recommendations", "Recommend")
        );
        assert_eq!(
            layer.shared.labels(layer.shared.slot("/Evil/\u{1b}[31m")),
            ("unknown", "unknown", "unknown")
        );
    }
}
