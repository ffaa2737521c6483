//! Serving an axum router over plain HTTP (HTTP/1.1 and h2c) with the connection limits a
//! public listener needs, which `axum::serve` does not expose:
//!
//! - **a cap on open connections**: past it a new connection is closed at once, before anything
//!   is read or allocated for it, and counted; connections already open keep being served;
//! - **a header-read timeout** (hyper's, which needs a timer): a request head must arrive in
//!   full within it. hyper also runs it while a kept-alive HTTP/1.1 connection waits for its
//!   next request; and a connection whose first request has not arrived within it (HTTP/2
//!   included, or nothing at all sent) is closed;
//! - **a bound on the bytes buffered for a request head** (hyper's read buffer), so an endless
//!   header costs a few kilobytes, not hundreds;
//! - **an idle timeout**: a connection with no request in flight for that long is closed (HTTP/2
//!   gets a GOAWAY first); and one whose answers stop moving for 30 s (a client that stops
//!   reading) is dropped;
//! - **a shutdown that waits only for real work**: when `stop` fires every connection is told to
//!   go (GOAWAY, or no more keep-alive); those with no request in flight (idle, or still sending
//!   a head) are closed in about half a second; the others finish their requests and close. The
//!   caller bounds that wait ([`crate::shutdown::serve_until`]).
//!
//! Refusals are counted in `bookstore_connections_refused_total{listener, reason}`, and the
//! open connections in the gauge `bookstore_connections_open{listener}`.

use std::{
    convert::Infallible,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::Request, response::Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    conn_cap::{ACCEPT_ERROR_PAUSE, ConnectionCap},
    metrics::Metrics,
};

/// The hyper read buffer cannot be smaller than this (hyper panics below it).
pub const MIN_HEAD_BYTES: usize = 8192;

/// How often a connection told to go (an HTTP/2 GOAWAY, or the end of HTTP/1.1 keep-alive) is
/// checked; idle at two checks in a row, it is closed.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections at most; more are closed on arrival.
    pub max_connections: usize,
    /// A request head must arrive within this; also how long a kept-alive HTTP/1.1 connection
    /// may wait for its next request.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// hyper's read buffer, which holds an unfinished request head (at least [`MIN_HEAD_BYTES`]).
    pub max_head_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams: u32,
}

impl HttpLimits {
    /// Logs the limits, once, at start-up.
    pub fn log(&self, listener: &'static str) {
        tracing::info!(
            listener,
            max_connections = self.max_connections,
            header_read_timeout_secs = self.header_read_timeout.as_secs_f64(),
            idle_timeout_secs = self.idle_timeout.as_secs_f64(),
            max_head_bytes = self.max_head_bytes,
            max_streams = self.max_streams,
            "connection limits"
        );
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then closes idle connections (in
/// about half a second) and returns when the requests in flight have finished. `name` labels the metrics.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: CancellationToken,
    metrics: &Metrics,
    name: &'static str,
) {
    let cap = ConnectionCap::new(metrics, name, limits.max_connections, 5);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                cap.accept_failed(&e);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(slot) = cap.admit(peer) else {
            continue;
        };
        // Pages are small request/response pairs; Nagle would only add latency.
        let _ = tcp.set_nodelay(true);
        let (builder, router, stop) = (builder.clone(), router.clone(), stop.clone());
        connections.spawn(async move {
            serve_connection(tcp, router, &builder, limits, stop).await;
            drop(slot);
        });
    }
    // Stop accepting: the listening socket closes here.
    drop(listener);
    tracing::info!(listener = name, "Stopped accepting new connections");
    while connections.join_next().await.is_some() {}
}

/// What one connection's requests share: how many are in flight, and when one last started or
/// ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `opened` when a request last started or ended; `u64::MAX` until the
    /// first request.
    last_ms: AtomicU64,
    opened: Instant,
}

/// Until its first request, a connection gets the header timeout rather than the idle timeout:
/// a connection that never sends a whole head (HTTP/1.1) or a first request (HTTP/2, where hyper
/// has no header timeout) is closed as soon as a half-sent head would be.
const BEFORE_FIRST_REQUEST: u64 = u64::MAX;

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection must be closed if nothing happens meanwhile: `idle` after the last
    /// request ended, `first` after opening if no request came, `stalled` after the last request
    /// started or ended while requests are in flight (a client that stops reading its answers).
    fn deadline(&self, timeouts: &ConnTimeouts) -> Instant {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == BEFORE_FIRST_REQUEST {
            return self.opened + timeouts.first;
        }
        let since = self.opened + Duration::from_millis(last);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            since + timeouts.idle
        } else {
            since + timeouts.stalled
        }
    }
}

/// How long a connection may go without progress, by state.
#[derive(Debug, Clone, Copy)]
struct ConnTimeouts {
    first: Duration,
    idle: Duration,
    stalled: Duration,
}

/// A response not fully written this long after the last request on its connection started or
/// ended is abandoned with its connection: a client that stops reading (an HTTP/2 window of 0)
/// cannot hold a slot and a rendered page for good. Pages take milliseconds; the backend's
/// deadline is a second.
const STALLED_RESPONSE: Duration = Duration::from_secs(30);

async fn serve_connection(
    tcp: TcpStream,
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let timeouts = ConnTimeouts {
        first: limits.header_read_timeout,
        idle: limits.idle_timeout,
        stalled: STALLED_RESPONSE,
    };
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(BEFORE_FIRST_REQUEST),
        opened: Instant::now(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let guard = InFlight::start(activity.clone());
            let call = tower::ServiceExt::oneshot(router.clone(), request.map(Body::new));
            async move {
                let response: Response = match call.await {
                    Ok(response) => response,
                    Err(infallible) => match infallible {},
                };
                // Still in flight until the whole body has been handed to hyper.
                Ok::<_, Infallible>(response.map(|body| Body::new(Tracked { body, guard })))
            }
        })
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(tcp), service));
    // A request starting or ending can move the deadline earlier (from `first` to `idle`), so
    // the timer also wakes at least every `step` to look again.
    let step = timeouts.first.min(timeouts.idle).min(timeouts.stalled);
    let mut timer = pin!(tokio::time::sleep_until((Instant::now() + step).into()));
    // Told to go (GOAWAY for HTTP/2, no more keep-alive for HTTP/1.1): from then on a
    // connection found idle at two checks in a row is closed (hyper closes one that finishes
    // its requests by itself; this is for those that never do, and the second check gives an
    // answer handed over just before the first one time to be written).
    let (mut closing, mut idle_before) = (false, false);
    loop {
        tokio::select! {
            // Errors here are the peer's doing (reset, timeout, malformed head): nothing to log.
            _ = conn.as_mut() => return,
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                timer.as_mut().reset((Instant::now() + CLOSE_GRACE).into());
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                let idle = activity.in_flight.load(Ordering::Acquire) == 0;
                if closing {
                    if idle && idle_before {
                        return;
                    }
                    idle_before = idle;
                    timer.as_mut().reset((now + CLOSE_GRACE).into());
                    continue;
                }
                let deadline = activity.deadline(&timeouts);
                if deadline > now {
                    timer.as_mut().reset(deadline.min(now + step).into());
                } else if idle {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset((now + CLOSE_GRACE).into());
                } else {
                    // Requests in flight that made no progress for `stalled`.
                    return;
                }
            }
        }
    }
}

/// A request counted as in flight from its head to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is written or dropped.
struct Tracked {
    body: Body,
    #[allow(dead_code)] // held for its Drop
    guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
