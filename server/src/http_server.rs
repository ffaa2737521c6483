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
//! - **a bound on unfinished heads in total**, HTTP/2 header blocks included
//!   ([`crate::head_budget`]): past it the connections holding unfinished heads longest give way;
//! - **an idle timeout**: a connection with no request in flight for that long is closed (HTTP/2
//!   gets a GOAWAY first);
//! - **answers that wait for the client hold no place of work, and are bounded**: a request
//!   counts as in flight (for the idle and shutdown rules) until its answer is delivered, but
//!   the handler's part ends when the answer is ready, so an admission limit in the router
//!   frees its place then. Answers ready but not yet handed to the connection's writer (a
//!   client that does not read, or an HTTP/2 window left at zero) are counted per connection
//!   and on the listener; while a connection has more than [`BACKLOG_PER_CONNECTION`] bytes of
//!   them, or the listener more than [`BACKLOG_TOTAL`] and the connection any, its next request
//!   waits before it reaches the router; and a connection that has had answers waiting for
//!   [`SEND_TIMEOUT`] without delivering one is closed, whatever streams it opens or resets
//!   meanwhile;
//! - **a shutdown that waits only for real work**: when `stop` fires every connection is told to
//!   go (GOAWAY, or no more keep-alive); those with no request in flight (idle, or still sending
//!   a head) are closed in about half a second; the others finish their requests and close. The
//!   caller bounds that wait ([`bookstore_common::shutdown::serve_until`]).
//!
//! Refusals are counted in `bookstore_connections_refused_total{listener, reason}`, connections
//! closed for their behaviour in `bookstore_connections_closed_total{listener, reason}`, and the
//! open connections in the gauge `bookstore_connections_open{listener}`.
//!
//! Each request carries a [`Connection`] in its extensions: the router's admission limit uses it
//! to keep one connection to a fair share of the places.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::Request, response::Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use metrics::Counter;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use bookstore_common::metrics::Metrics;

use crate::{
    conn_cap::{ACCEPT_ERROR_PAUSE, ConnectionCap},
    head_budget::{HeadBudget, Metered},
};

/// The hyper read buffer cannot be smaller than this (hyper panics below it).
pub const MIN_HEAD_BYTES: usize = 8192;

/// How often a connection told to go (an HTTP/2 GOAWAY, or the end of HTTP/1.1 keep-alive) is
/// checked; idle at two checks in a row, it is closed.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// A connection with answers ready but not delivered, and none delivered for this long, is
/// closed: pages take milliseconds, so this is a client that stopped reading (an HTTP/2 window
/// left at zero), whatever streams it opens or resets meanwhile.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of answers waiting for one client past which its next request waits for them to go.
pub const BACKLOG_PER_CONNECTION: usize = 256 * 1024;

/// Bytes of answers waiting on the whole listener past which a connection with any of its own
/// waiting holds its next request.
pub const BACKLOG_TOTAL: usize = 32 * 1024 * 1024;

/// The largest HTTP/2 frame a client may send (the protocol's smallest maximum, and hyper's
/// default), told to the head meter as well.
const MAX_FRAME_BYTES: u32 = 16_384;

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
    /// hyper's read buffer, which holds an unfinished request head (at least [`MIN_HEAD_BYTES`]);
    /// also the most an HTTP/2 header block may declare.
    pub max_head_bytes: usize,
    /// Bytes of unfinished heads on the whole listener at most ([`crate::head_budget`]).
    pub max_head_bytes_total: usize,
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
            max_head_bytes_total = self.max_head_bytes_total,
            max_streams = self.max_streams,
            send_timeout_secs = SEND_TIMEOUT.as_secs_f64(),
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
    let shared = Arc::new(Shared {
        heads: HeadBudget::new(limits.max_head_bytes_total, metrics, name),
        open: AtomicUsize::new(0),
        max_connections: limits.max_connections,
        backlog: AtomicUsize::new(0),
        send_stalled: metrics.counter(
            "bookstore_connections_closed_total",
            &[("listener", name), ("reason", "send_stalled")],
        ),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_frame_size(MAX_FRAME_BYTES)
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
        let shared = shared.clone();
        shared.open.fetch_add(1, Ordering::Relaxed);
        connections.spawn(async move {
            serve_connection(tcp, peer, router, &builder, limits, stop, shared.clone()).await;
            shared.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    // Stop accepting: the listening socket closes here.
    drop(listener);
    tracing::info!(listener = name, "Stopped accepting new connections");
    while connections.join_next().await.is_some() {}
}

/// What every connection of a listener shares.
#[derive(Debug)]
struct Shared {
    heads: Arc<HeadBudget>,
    /// Connections open now, and at most.
    open: AtomicUsize,
    max_connections: usize,
    /// Bytes of answers ready and not yet delivered, on every connection.
    backlog: AtomicUsize,
    /// `bookstore_connections_closed_total{reason="send_stalled"}`.
    send_stalled: Counter,
}

/// What one connection's requests share: how many are in flight, when one last started or
/// ended, and the answers waiting to be delivered.
#[derive(Debug)]
struct Activity {
    /// Requests from their head until their answer is delivered or dropped.
    in_flight: Arc<AtomicUsize>,
    /// Milliseconds since `opened` when a request last started or ended; `u64::MAX` until the
    /// first request.
    last_ms: AtomicU64,
    /// Answers ready and not yet delivered, and their bytes.
    waiting: AtomicUsize,
    waiting_bytes: AtomicUsize,
    /// Milliseconds since `opened` when answers started waiting, or one was last delivered.
    sent_ms: AtomicU64,
    /// Wakes a request held back by the backlog when an answer goes; `held` counts them, so an
    /// answer going with none held costs no lock.
    drained: Notify,
    held: AtomicUsize,
    /// The router's places held by this connection's requests (see [`Connection`]).
    places: AtomicUsize,
    opened: Instant,
    /// The address the connection came from.
    peer: SocketAddr,
    shared: Arc<Shared>,
}

/// Until its first request, a connection gets the header timeout rather than the idle timeout:
/// a connection that never sends a whole head (HTTP/1.1) or a first request (HTTP/2, where hyper
/// has no header timeout) is closed as soon as a half-sent head would be.
const BEFORE_FIRST_REQUEST: u64 = u64::MAX;

impl Activity {
    fn new(shared: Arc<Shared>, peer: SocketAddr) -> Self {
        Activity {
            in_flight: Arc::new(AtomicUsize::new(0)),
            last_ms: AtomicU64::new(BEFORE_FIRST_REQUEST),
            waiting: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            sent_ms: AtomicU64::new(0),
            drained: Notify::new(),
            held: AtomicUsize::new(0),
            places: AtomicUsize::new(0),
            opened: Instant::now(),
            peer,
            shared,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// When the connection must be closed if nothing happens meanwhile: `idle` after the last
    /// request ended, `first` after opening if no request came, `stalled` after the last request
    /// started or ended while requests are in flight, and [`SEND_TIMEOUT`] after answers began
    /// to wait or one was last delivered.
    fn deadline(&self, timeouts: &ConnTimeouts) -> Instant {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == BEFORE_FIRST_REQUEST {
            return self.opened + timeouts.first;
        }
        let since = self.opened + Duration::from_millis(last);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return since + timeouts.idle;
        }
        let stalled = since + timeouts.stalled;
        if self.waiting.load(Ordering::Acquire) == 0 {
            return stalled;
        }
        let sent = self.opened + Duration::from_millis(self.sent_ms.load(Ordering::Relaxed));
        stalled.min(sent + SEND_TIMEOUT)
    }

    /// Whether this connection's next request must wait for its answers to go first.
    fn backlogged(&self) -> bool {
        let own = self.waiting_bytes.load(Ordering::Relaxed);
        own > BACKLOG_PER_CONNECTION
            || (own > 0 && self.shared.backlog.load(Ordering::Relaxed) > BACKLOG_TOTAL)
    }

    /// An answer of `bytes` is ready; it waits until [`Activity::gone`].
    fn ready(&self, bytes: usize) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.sent_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        self.waiting_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.shared.backlog.fetch_add(bytes, Ordering::Relaxed);
    }

    /// An answer of `bytes` went: `delivered` whole, or dropped (the stream was reset, or the
    /// connection is closing).
    fn gone(&self, bytes: usize, delivered: bool) {
        self.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.backlog.fetch_sub(bytes, Ordering::Relaxed);
        let left = self.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        // With none left waiting the time does not matter: the next to wait sets it.
        if delivered && left > 0 {
            self.sent_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        if self.held.load(Ordering::Acquire) > 0 {
            self.drained.notify_waiters();
        }
    }
}

/// The connection a request came on, in the request's extensions: how many of the router's
/// places its requests hold, for a limit that keeps one connection to its share.
#[derive(Debug, Clone)]
pub struct Connection(Arc<Activity>);

impl Connection {
    /// Places held by this connection's requests; the router's admission keeps the count.
    pub fn places(&self) -> &AtomicUsize {
        &self.0.places
    }

    /// When the connection was accepted.
    pub fn opened(&self) -> Instant {
        self.0.opened
    }

    /// The address the connection came from (a proxy's, behind one).
    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    /// The listener's open connections now, as a share of its cap.
    pub fn listener_fill(&self) -> f64 {
        let shared = &self.0.shared;
        shared.open.load(Ordering::Relaxed) as f64 / shared.max_connections.max(1) as f64
    }
}

/// How long a connection may go without progress, by state.
#[derive(Debug, Clone, Copy)]
struct ConnTimeouts {
    first: Duration,
    idle: Duration,
    stalled: Duration,
}

/// A request still without its answer this long after the last request on its connection
/// started or ended is abandoned with its connection. Pages take milliseconds; the backend's
/// deadline is a second.
const STALLED_REQUEST: Duration = Duration::from_secs(30);

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: HttpLimits,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let timeouts = ConnTimeouts {
        first: limits.header_read_timeout,
        idle: limits.idle_timeout,
        stalled: STALLED_REQUEST,
    };
    let activity = Arc::new(Activity::new(shared.clone(), peer));
    let io = Metered::new(
        tcp,
        limits.max_head_bytes,
        shared.heads.clone(),
        activity.in_flight.clone(),
    );
    let give_way = io.give_way();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let guard = InFlight::start(activity.clone());
            let router = router.clone();
            async move {
                let activity = &guard.0;
                if activity.backlogged() {
                    activity.held.fetch_add(1, Ordering::AcqRel);
                    loop {
                        let drained = activity.drained.notified();
                        if !activity.backlogged() {
                            break;
                        }
                        drained.await;
                    }
                    activity.held.fetch_sub(1, Ordering::AcqRel);
                }
                let h2 = request.version() == axum::http::Version::HTTP_2;
                let mut request = request.map(Body::new);
                request
                    .extensions_mut()
                    .insert(Connection(activity.clone()));
                let response: Response = match tower::ServiceExt::oneshot(router, request).await {
                    Ok(response) => response,
                    Err(infallible) => match infallible {},
                };
                Ok::<_, Infallible>(response.map(|body| Body::new(Tracked::new(body, guard, h2))))
            }
        })
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    // A request starting or ending can move the deadline earlier (from `first` to `idle`), so
    // the timer also wakes at least every `step` to look again.
    let step = timeouts
        .first
        .min(timeouts.idle)
        .min(timeouts.stalled)
        .min(SEND_TIMEOUT);
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
            // Its unfinished head gave way to newer ones (counted by the budget).
            () = give_way.cancelled() => return,
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
                    // Answers that did not move for SEND_TIMEOUT, or requests that made no
                    // progress for STALLED_REQUEST.
                    if activity.waiting.load(Ordering::Acquire) > 0 {
                        shared.send_stalled.increment(1);
                    }
                    return;
                }
            }
        }
    }
}

/// A request counted as in flight from its head until its answer is delivered or dropped.
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

/// An answer's body, ready: it keeps its request in flight and counts as waiting until it is
/// delivered. Over HTTP/2 it says it has ended only when hyper asks for more after its last
/// bytes, which hyper does once h2 has taken them to write and the stream has window again;
/// over HTTP/1.1, once hyper has taken all of it.
struct Tracked {
    body: Body,
    guard: InFlight,
    h2: bool,
    /// Bytes counted as waiting; None once gone (or never counted: an empty body).
    waiting: Option<usize>,
    /// Every data frame has been handed to hyper.
    all_sent: bool,
}

impl Tracked {
    fn new(body: Body, guard: InFlight, h2: bool) -> Self {
        let empty = body.is_end_stream();
        let waiting = (!empty).then(|| {
            let hint = body.size_hint();
            let bytes = usize::try_from(hint.exact().unwrap_or(hint.lower())).unwrap_or(0);
            guard.0.ready(bytes);
            bytes
        });
        Tracked {
            body,
            guard,
            h2,
            waiting,
            all_sent: empty,
        }
    }

    fn gone(&mut self, delivered: bool) {
        if let Some(bytes) = self.waiting.take() {
            self.guard.0.gone(bytes, delivered);
        }
    }
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.all_sent {
            self.gone(true);
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() {
            self.all_sent = true;
            self.gone(true);
        } else if self.body.is_end_stream() {
            self.all_sent = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        if self.h2 {
            // Asked again after its last bytes: see the type's doc.
            self.waiting.is_none()
        } else {
            self.all_sent
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // HTTP/1.1 drops a body it has taken whole without asking for more.
        let delivered = self.all_sent && !self.h2;
        self.gone(delivered);
    }
}
