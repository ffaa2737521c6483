//! The gRPC listener and its connection limits, TLS or not ([`Incoming`]): a cap on open
//! connections (past it a new connection is closed on arrival), and for TLS a budget of its own
//! for handshakes in progress, with a timeout; an idle timeout (a connection on which nothing
//! moves either way, not even an HTTP/2 ping, for that long is closed); once the server stops,
//! a connection found with no call in flight at two checks 250 ms apart is closed.
//!
//! **Anonymous connections cannot lock out authenticated ones.** A connection still in its
//! handshake holds no place under the connection cap: it takes one only once its handshake is
//! done (with mutual TLS, once it has shown a certificate the CA signed). When the handshake
//! budget is full, a new connection is not refused: the oldest pending handshake gives way,
//! first among those that have not sent a byte (an idle TCP connection never does; a real
//! client sends its hello at once). A flood of connections that never finish their handshake
//! then only shortens each other's lives, and a real client's handshake, which takes a round
//! trip, completes between them. Each connection carries a
//! [`PeerInfo`] to the request handlers, with its own count of calls in flight for the
//! per-connection call limit.
//!
//! The TLS itself, reloadable, is [`crate::server_tls`]; here are its handshakes.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    os::fd::AsFd,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use metrics::Counter;
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinSet},
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use bookstore_common::metrics::Metrics;
use bookstore_server::conn_cap::{ACCEPT_ERROR_PAUSE, ConnectionCap, Slot};

use crate::server_tls::ServerTls;

/// The limits of the gRPC listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most; more are closed on arrival.
    pub max_connections: usize,
    /// TLS handshakes in progress at most; past it the oldest gives way to a new connection.
    pub max_handshakes: usize,
    /// A TLS handshake taking longer is dropped.
    pub handshake_timeout: Duration,
    /// A connection on which nothing moves either way for this long is closed.
    pub idle_timeout: Duration,
}

impl ConnLimits {
    /// Logs the limits, once, at start-up.
    pub fn log(&self) {
        tracing::info!(
            listener = "grpc",
            max_connections = self.max_connections,
            max_handshakes = self.max_handshakes,
            handshake_timeout_secs = self.handshake_timeout.as_secs_f64(),
            idle_timeout_secs = self.idle_timeout.as_secs_f64(),
            "connection limits"
        );
    }
}

/// What the request handlers learn about the connection a call came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, leaf first, when it presented one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Calls in flight on this connection (kept by the server's call limit).
    pub calls: Arc<AtomicUsize>,
}

/// One accepted connection: holds its slot under the connection cap, and closes itself when
/// nothing has moved either way for the idle timeout.
#[derive(Debug)]
pub struct Conn {
    tcp: TcpStream,
    remote_addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    /// Completes when the server stops: from then on a connection found with no call in flight
    /// at two checks in a row reads as closed, so a silent or half-open one cannot hold up the
    /// drain (one that finished its calls has had a check's time to write their answers).
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    /// After the stop: the next check, and whether the last one found no call in flight.
    closing: Option<(Pin<Box<Sleep>>, bool)>,
    /// Set at the first byte read from the peer (see [`PendingHandshake::silent`]).
    spoke: Arc<AtomicBool>,
    /// Its place under the connection cap; with TLS, taken once the handshake is done.
    _slot: Option<Slot>,
}

impl Conn {
    fn progress(&mut self) {
        let next = Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(next);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.progress();
                    if !this.spoke.load(Ordering::Relaxed) {
                        this.spoke.store(true, Ordering::Relaxed);
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if this.stopping.as_mut().poll(cx).is_ready() {
                    let (check, idle_before) = this
                        .closing
                        .get_or_insert_with(|| (Box::pin(tokio::time::sleep(CLOSE_CHECK)), false));
                    while check.as_mut().poll(cx).is_ready() {
                        let idle = this.calls.load(Ordering::Acquire) == 0;
                        if idle && *idle_before {
                            // Reads as closed by the peer: the connection ends quietly.
                            return Poll::Ready(Ok(()));
                        }
                        *idle_before = idle;
                        check.as_mut().reset(Instant::now() + CLOSE_CHECK);
                    }
                }
                match this.idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle for too long",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            // A long answer stream is not idle.
            self.progress();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.progress();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A connection as tonic serves it: plaintext (`TLS_MODE=off`) or after its handshake.
#[derive(Debug)]
pub enum ServerIo {
    Plain(Conn),
    Tls(Box<TlsStream<Conn>>),
}

impl Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (conn, certs) = match self {
            ServerIo::Plain(conn) => (conn, None),
            ServerIo::Tls(tls) => {
                let (conn, session) = tls.get_ref();
                let certs = session
                    .peer_certificates()
                    .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
                (conn, certs)
            }
        };
        PeerInfo {
            remote_addr: conn.remote_addr,
            certs,
            calls: conn.calls.clone(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(conn) => Pin::new(conn).poll_read(cx, buf),
            ServerIo::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(conn) => Pin::new(conn).poll_write(cx, buf),
            ServerIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(conn) => Pin::new(conn).poll_write_vectored(cx, bufs),
            ServerIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(conn) => conn.is_write_vectored(),
            ServerIo::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(conn) => Pin::new(conn).poll_flush(cx),
            ServerIo::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(conn) => Pin::new(conn).poll_shutdown(cx),
            ServerIo::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepted connections for `serve_with_incoming`, within the [`ConnLimits`]. With TLS,
/// handshakes run concurrently (a slow client cannot hold up others), each uses the
/// configuration current when its TCP connection arrived, and each takes its place under the
/// connection cap only once it is done. Dropping the stream closes the listening socket.
pub struct Incoming {
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: ConnLimits,
    cap: Arc<ConnectionCap>,
    counters: Counters,
    handshakes: JoinSet<Option<TlsStream<Conn>>>,
    /// The handshakes in progress, oldest first (finished ones are pruned when the budget is
    /// full).
    pending: VecDeque<PendingHandshake>,
    stop: CancellationToken,
    /// After an accept error (EMFILE…), accepting pauses briefly instead of spinning.
    paused: Option<Pin<Box<Sleep>>>,
    _closed: ListenerClosedLog,
}

/// A handshake in progress, as the budget sees it.
struct PendingHandshake {
    task: AbortHandle,
    /// Set once the handshake has read from the peer.
    spoke: Arc<AtomicBool>,
    /// The same socket (a second descriptor), to ask the kernel whether the peer has sent
    /// anything: the handshake task may not have run yet to read it.
    socket: Option<std::net::TcpStream>,
}

impl PendingHandshake {
    /// Whether the peer has sent nothing yet (or is gone): an idle TCP connection never sends,
    /// a real client sends its hello at once.
    fn silent(&self) -> bool {
        if self.spoke.load(Ordering::Relaxed) {
            return false;
        }
        let Some(socket) = &self.socket else {
            return true;
        };
        // The descriptor shares the original's non-blocking mode.
        !matches!(socket.peek(&mut [0u8; 1]), Ok(n) if n > 0)
    }
}

/// Logs "Stopped accepting new connections" when dropped. The listener keeps one beside its
/// listening socket, declared after it so the socket is already closed when the line appears:
/// the log then shows the moment new connections start being refused.
#[derive(Debug, Default)]
struct ListenerClosedLog;

impl Drop for ListenerClosedLog {
    fn drop(&mut self) {
        tracing::info!("Stopped accepting new connections");
    }
}

/// After the server stops, how often an open connection is checked for calls in flight.
const CLOSE_CHECK: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The listener's handshake counters, and its connection cap, whose rate limit its warnings
/// share.
#[derive(Clone)]
struct Counters {
    /// `bookstore_tls_handshakes_total{result}`: completed, refused, timed out, evicted (gave
    /// way to a newer connection with the budget full).
    completed: Counter,
    refused: Counter,
    timed_out: Counter,
    evicted: Counter,
    cap: Arc<ConnectionCap>,
}

impl Counters {
    fn new(metrics: &Metrics, cap: Arc<ConnectionCap>) -> Self {
        let handshakes =
            |result| metrics.counter("bookstore_tls_handshakes_total", &[("result", result)]);
        Counters {
            completed: handshakes("completed"),
            refused: handshakes("refused"),
            timed_out: handshakes("timed_out"),
            evicted: handshakes("evicted"),
            cap,
        }
    }

    /// Some(number left out since the last line) if a warning may be logged now.
    fn may_log(&self) -> Option<u64> {
        self.cap.may_log()
    }
}

impl Incoming {
    /// Connections on `listener`, with TLS when `tls` is set, counted in `metrics`. Once `stop`
    /// is cancelled, connections with no call in flight are closed.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<ServerTls>>,
        limits: ConnLimits,
        metrics: &Metrics,
        stop: CancellationToken,
    ) -> Self {
        let cap = Arc::new(ConnectionCap::new(
            metrics,
            "grpc",
            limits.max_connections,
            10,
        ));
        Incoming {
            listener,
            tls,
            cap: cap.clone(),
            limits,
            counters: Counters::new(metrics, cap),
            handshakes: JoinSet::new(),
            pending: VecDeque::new(),
            stop,
            paused: None,
            _closed: ListenerClosedLog,
        }
    }

    /// A new TCP connection, holding `slot` under the connection cap (None until its handshake
    /// is done).
    fn conn(&self, tcp: TcpStream, peer: SocketAddr, slot: Option<Slot>) -> Conn {
        let _ = tcp.set_nodelay(true);
        Conn {
            tcp,
            remote_addr: peer,
            calls: Arc::new(AtomicUsize::new(0)),
            idle_timeout: self.limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
            stopping: Box::pin(self.stop.clone().cancelled_owned()),
            closing: None,
            spoke: Arc::new(AtomicBool::new(false)),
            _slot: slot,
        }
    }

    /// Starts the handshake of `conn`. With the budget full, the oldest pending handshake whose
    /// peer has sent nothing gives way first, else the oldest of all.
    fn start_handshake(&mut self, tls: &ServerTls, conn: Conn) {
        if self.pending.len() >= self.limits.max_handshakes {
            let silent = self.pending.iter().position(PendingHandshake::silent);
            if let Some(oldest) = self.pending.remove(silent.unwrap_or(0)) {
                oldest.task.abort();
                self.counters.evicted.increment(1);
                if let Some(suppressed) = self.counters.may_log() {
                    tracing::warn!(
                        peer_addr = %conn.remote_addr,
                        max_handshakes = self.limits.max_handshakes,
                        suppressed,
                        "TLS handshakes at their limit: the oldest pending one gave way"
                    );
                }
            }
        }
        let spoke = conn.spoke.clone();
        let socket = conn
            .tcp
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::net::TcpStream::from);
        let task = self.handshakes.spawn(handshake(
            TlsAcceptor::from(tls.config()),
            conn,
            self.limits.handshake_timeout,
            self.counters.clone(),
        ));
        self.pending.push_back(PendingHandshake {
            task,
            spoke,
            socket,
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    conn: Conn,
    timeout: Duration,
    counters: Counters,
) -> Option<TlsStream<Conn>> {
    let peer = conn.remote_addr;
    match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
        Ok(Ok(tls)) => {
            counters.completed.increment(1);
            Some(tls)
        }
        Ok(Err(e)) => {
            counters.refused.increment(1);
            if let Some(suppressed) = counters.may_log() {
                tracing::warn!(peer_addr = %peer, reason = %e, suppressed, "TLS handshake refused");
            }
            None
        }
        Err(_) => {
            counters.timed_out.increment(1);
            if let Some(suppressed) = counters.may_log() {
                tracing::warn!(peer_addr = %peer, suppressed, "TLS handshake timed out");
            }
            None
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Finished handshakes first: under a flood of new connections the accept loop below
        // could use up the task's budget before they were ever handed on.
        if let Poll::Ready(Some(io)) = this.poll_handshakes(cx) {
            return Poll::Ready(Some(io));
        }
        loop {
            if let Some(pause) = &mut this.paused {
                match pause.as_mut().poll(cx) {
                    Poll::Ready(()) => this.paused = None,
                    Poll::Pending => return this.poll_handshakes(cx),
                }
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    let Some(tls) = this.tls.clone() else {
                        let Some(slot) = this.cap.admit(peer) else {
                            continue;
                        };
                        let conn = this.conn(tcp, peer, Some(slot));
                        return Poll::Ready(Some(Ok(ServerIo::Plain(conn))));
                    };
                    let conn = this.conn(tcp, peer, None);
                    this.start_handshake(&tls, conn);
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    // EMFILE, or a connection reset before accept.
                    this.cap.accept_failed(&e);
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    continue;
                }
                Poll::Pending => return this.poll_handshakes(cx),
            }
        }
    }
}

impl Incoming {
    /// The next finished handshake that finds a place under the connection cap, skipping
    /// refused ones (and those past the cap, closed and counted).
    fn poll_handshakes(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ServerIo>>> {
        loop {
            let (id, done) = match self.handshakes.poll_join_next_with_id(cx) {
                Poll::Ready(Some(Ok((id, done)))) => (id, done),
                Poll::Ready(Some(Err(e))) => (e.id(), None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            };
            // Its second descriptor goes with it, or the socket would outlive the connection.
            if let Some(at) = self.pending.iter().position(|p| p.task.id() == id) {
                self.pending.remove(at);
            }
            // A refused, timed out or evicted handshake (already counted), or a handshake task
            // that panicked.
            let Some(mut tls) = done else { continue };
            let conn = tls.get_mut().0;
            let Some(slot) = self.cap.admit(conn.remote_addr) else {
                continue;
            };
            conn._slot = Some(slot);
            return Poll::Ready(Some(Ok(ServerIo::Tls(Box::new(tls)))));
        }
    }
}
