//! What both ends of a gRPC call record about it, and how: the server's call layer
//! (recommendations) and the client's (marketplace) each build a [`CallRecord`] per call and
//! hand it the answer. A record
//!
//! - counts the call in the grpc-ecosystem series (`grpc_{server,client}_started_total`,
//!   `_handled_total{grpc_code}` and the `_handling_seconds` histogram), so existing dashboards
//!   work;
//! - writes one log line when the call ends: method, status code, latency, the peer's address
//!   and identity, request id, trace and span ids (every failure the service is to blame for; other calls as `LOG_SAMPLE` and
//!   `LOG_SLOW_MS` say, see [`crate::request_log`]).
//!
//! The status of a call is read where gRPC puts it: the response headers for a trailers-only
//! answer (every error), the trailers otherwise. A response body dropped before its trailers
//! means the caller went away: `CANCELLED`. The layers themselves (what each end enforces) live
//! in the service that uses them; the wire helpers they share are here too: the `grpc-timeout`
//! header read and written, and the `DEADLINE_EXCEEDED` answer.

use std::{
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::{Counter, Histogram};
use tonic::{Code, Status, body::Body};

use crate::{
    context::{RequestId, TraceContext},
    log_limit::LogLimit,
    metrics::Metrics,
    request_log::{RequestLog, Sampling},
};

/// The gRPC header carrying the caller's deadline.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// A call abandoned this close to its deadline is counted as past it.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// A method reported under its own name: its path (`/Service/Method`) and its grpc-ecosystem
/// type (`unary`, `server_stream`, `client_stream`, `bidi_stream`). Any other path is reported
/// as `unknown`, so a caller cannot create label values at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownMethod {
    pub path: &'static str,
    pub kind: &'static str,
}

/// The identity a server authorized a call under; an authorization layer puts it in the
/// response's extensions for the call's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// Which end of a call is recorded: the names its series and its log line carry.
#[derive(Debug)]
pub struct End {
    /// The log line's `side` field.
    side: &'static str,
    started_total: &'static str,
    handled_total: &'static str,
    handling_seconds: &'static str,
    /// Whether a successful call's line (when sampling admits one) is at info; else debug.
    ok_at_info: bool,
}

/// The server end: its successful calls' lines are at info.
pub const SERVER: End = End {
    side: "server",
    started_total: "grpc_server_started_total",
    handled_total: "grpc_server_handled_total",
    handling_seconds: "grpc_server_handling_seconds",
    ok_at_info: true,
};

/// The client end: its successful calls' lines are at debug, since the marketplace's own HTTP
/// line already says the page was served.
pub const CLIENT: End = End {
    side: "client",
    started_total: "grpc_client_started_total",
    handled_total: "grpc_client_handled_total",
    handling_seconds: "grpc_client_handling_seconds",
    ok_at_info: false,
};

/// One end's series for a fixed set of methods, and which calls get a log line.
pub struct CallSeries {
    end: &'static End,
    metrics: Metrics,
    methods: &'static [KnownMethod],
    /// Registered handles, per method (the last slot for `unknown`), made on first use: a call
    /// then costs no registry lookup.
    handles: Vec<Handles>,
    /// Which calls get a line of their own.
    lines: RequestLog,
    /// Calls shed (RESOURCE_EXHAUSTED) come in floods: a few lines a minute, the metrics count
    /// every one.
    shed_lines: Mutex<LogLimit>,
}

impl fmt::Debug for CallSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallSeries")
            .field("side", &self.end.side)
            .finish_non_exhaustive()
    }
}

impl CallSeries {
    /// Every known method's `started_total` and its `handled_total` for each status code start
    /// at zero, as go-grpc-prometheus' initialisation does: the label values are known in
    /// advance, so an alert on `increase()` sees the first call of each kind.
    pub fn new(
        end: &'static End,
        metrics: Metrics,
        methods: &'static [KnownMethod],
        lines: Sampling,
    ) -> Arc<Self> {
        let series = CallSeries {
            end,
            handles: (0..=methods.len()).map(|_| Handles::default()).collect(),
            metrics,
            methods,
            lines: RequestLog::new(lines),
            shed_lines: Mutex::new(LogLimit::per_minute(10)),
        };
        for slot in 0..methods.len() {
            series.started(slot).increment(0);
            for code in 0..CODES {
                let code = Code::from(i32::try_from(code).unwrap_or_default());
                series.handled(slot, code).increment(0);
            }
        }
        Arc::new(series)
    }

    /// The service and method names a call to `path` is reported under.
    pub fn labels_of(&self, path: &str) -> (&'static str, &'static str) {
        let (_, service, method) = self.labels(self.slot(path));
        (service, method)
    }

    /// Starts the record of a call to `path`: counted as started now.
    pub fn start(
        self: &Arc<Self>,
        path: &str,
        request_id: RequestId,
        trace: Option<TraceContext>,
        peer_addr: PeerAddr,
    ) -> CallRecord {
        let slot = self.slot(path);
        self.started(slot).increment(1);
        CallRecord {
            series: self.clone(),
            started: Instant::now(),
            slot,
            request_id,
            trace,
            peer_addr,
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
                .counter(self.end.started_total, &self.method_labels(slot))
        })
    }

    fn handling(&self, slot: usize) -> &Histogram {
        self.handles[slot].handling.get_or_init(|| {
            self.metrics
                .histogram(self.end.handling_seconds, &self.method_labels(slot))
        })
    }

    fn handled(&self, slot: usize, code: Code) -> &Counter {
        let index = (code as usize).min(CODES - 1);
        self.handles[slot].handled[index].get_or_init(|| {
            let [kind, service, method] = self.method_labels(slot);
            self.metrics.counter(
                self.end.handled_total,
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

/// A header's bytes, if present.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(HeaderValue::as_bytes)
}

/// The answer to a call that ran out of `budget`.
pub fn deadline_exceeded(budget: Option<Duration>) -> http::Response<Body> {
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

/// A duration as a `grpc-timeout` value, in the finest unit that fits the spec's 8 digits
/// (rounded down, as a deadline must not be stretched).
pub fn grpc_timeout_value(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let value = [
        (timeout.as_micros(), 'u'),
        (timeout.as_millis(), 'm'),
        (u128::from(timeout.as_secs()), 'S'),
        (u128::from(timeout.as_secs() / 60), 'M'),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .map_or_else(|| format!("{MAX}M"), |(n, unit)| format!("{n}{unit}"));
    HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("0u"))
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

/// Where a call's other end is, for its log line.
#[derive(Debug, Clone)]
pub enum PeerAddr {
    /// The caller's socket (server end).
    Socket(SocketAddr),
    /// The address a client connection goes to (client end).
    Named(Arc<str>),
    Unknown,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Socket(addr) => addr.fmt(f),
            PeerAddr::Named(name) => f.write_str(name),
            PeerAddr::Unknown => Ok(()),
        }
    }
}

/// One call being recorded: counted as started, and counted and logged once its status is
/// known ([`CallRecord::answered`], [`CallRecord::failed`]) or once it is given up
/// ([`Unanswered`]).
pub struct CallRecord {
    series: Arc<CallSeries>,
    started: Instant,
    /// Which method, as an index into the series' handles.
    slot: usize,
    request_id: RequestId,
    trace: Option<TraceContext>,
    peer_addr: PeerAddr,
}

impl fmt::Debug for CallRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallRecord")
            .field("side", &self.series.end.side)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl CallRecord {
    /// Records the call now if the status is in the headers; otherwise when the body ends.
    pub fn answered(self, mut response: http::Response<Body>) -> http::Response<Body> {
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
                    record: Some((self, identity)),
                })
            }),
        }
    }

    /// Records the call as ended with `status` and no answer.
    pub fn failed(self, status: &Status) {
        self.done(status, None);
    }

    fn done(self, status: &Status, identity: Option<&PeerIdentity>) {
        let series = &self.series;
        let (_, service, method) = series.labels(self.slot);
        let elapsed = self.started.elapsed();
        let code = code_name(status.code());
        series.handled(self.slot, status.code()).increment(1);
        series.handling(self.slot).record(elapsed.as_secs_f64());
        let side = series.end.side;
        let peer_identity = identity.map(|p| p.0.as_str()).unwrap_or("");
        // Displayed lazily: formatted only if the line is actually written.
        let peer_addr = &self.peer_addr;
        let (trace_id, span_id): (&dyn fmt::Display, &dyn fmt::Display) = match &self.trace {
            Some(trace) => (&trace.trace_id_display(), &trace.span_id_display()),
            None => (&"", &""),
        };
        let latency_ms = elapsed.as_secs_f64() * 1e3;
        macro_rules! call_line {
            ($level:ident $(, $extra:ident)*) => {
                tracing::$level!(
                    target: "bookstore::grpc",
                    side,
                    method = %format_args!("{service}/{method}"),
                    code,
                    latency_ms,
                    peer_identity,
                    peer_addr = %peer_addr,
                    request_id = %self.request_id,
                    trace_id = %trace_id,
                    span_id = %span_id,
                    // Not `message`: that key is the event's own text in JSON logs.
                    grpc_message = status.message(),
                    $($extra,)*
                    "gRPC call"
                )
            };
        }
        if status.code() == Code::ResourceExhausted {
            let admitted = series
                .shed_lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit();
            if let Some(suppressed) = admitted {
                call_line!(warn, suppressed);
            }
        } else if is_server_fault(status.code()) {
            call_line!(warn);
        } else if !series.lines.admit(status.code() != Code::Ok, elapsed) {
            // Counted and timed above; not every call needs a line of its own.
        } else if series.end.ok_at_info {
            call_line!(info);
        } else {
            call_line!(debug);
        }
    }
}

/// A call whose answer has not arrived yet, and its time budget: recorded as given up if
/// dropped before [`Unanswered::take`] (the caller went away, or a timer gave up first).
#[derive(Debug)]
pub struct Unanswered(Option<CallRecord>, Option<Duration>);

impl Unanswered {
    pub fn new(record: CallRecord, budget: Option<Duration>) -> Self {
        Unanswered(Some(record), budget)
    }

    /// The record back, to be given the answer.
    pub fn take(mut self) -> Option<CallRecord> {
        self.0.take()
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(record) = self.0.take() else { return };
        // The caller's clock started before ours, so a caller giving up at its deadline
        // reaches us just before our own timer: that is the deadline, not a change of mind.
        let at_deadline = self
            .1
            .is_some_and(|budget| record.started.elapsed() + DEADLINE_SLACK >= budget);
        let status = if at_deadline {
            Status::deadline_exceeded("the caller gave up at its deadline")
        } else {
            Status::cancelled("the caller went away before the answer")
        };
        record.done(&status, None);
    }
}

/// A response body that records its call when the trailers pass, or when it is dropped first.
struct WatchedBody {
    inner: Body,
    record: Option<(CallRecord, Option<PeerIdentity>)>,
}

impl WatchedBody {
    fn finish(&mut self, status: Status) {
        if let Some((record, identity)) = self.record.take() {
            record.done(&status, identity.as_ref());
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
mod tests;
