//! Server-side TLS owned by the service rather than by the gRPC library, for two reasons:
//!
//! - **Rotation without restart.** The rustls configuration lives behind a lock and is rebuilt
//!   when the files change (see [`crate::watch`]); each new connection takes the configuration current at that moment,
//!   connections already open keep theirs. A file set that does not load (half-written, key of
//!   another certificate, expired…) is refused with a log line and the old one stays in use.
//! - **Refusals that say why.** Every failed handshake is logged with the peer address and the
//!   reason (no certificate, unknown CA, expired, wrong key usage, not TLS at all…).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use metrics::Counter;
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use tokio::{net::TcpListener, net::TcpStream, task::JoinSet};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    metrics::Metrics,
    shutdown::ListenerClosedLog,
    tls::{TlsError, TlsFiles, TlsMode, load_ca_ders, load_certified_key, provider},
};

/// A TLS handshake that takes longer than this is dropped, so idle sockets cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS configuration, reloadable from its files.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    mode: TlsMode,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads and checks the files. `mode` must be `Mutual` or `Server`.
    pub fn load(files: TlsFiles, mode: TlsMode) -> Result<Self, TlsError> {
        let config = build(&files, mode)?;
        Ok(ServerTls {
            files,
            mode,
            current: RwLock::new(config),
        })
    }

    /// The configuration new connections use now.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again; new connections use them from now on. On error the
    /// configuration in use stays (see [`crate::watch::watch_files`], which logs both outcomes).
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files, self.mode)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }
}

fn build(files: &TlsFiles, mode: TlsMode) -> Result<Arc<ServerConfig>, TlsError> {
    let identity = load_certified_key(&files.cert, &files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_config(files, e))?;
    let builder = if mode == TlsMode::Mutual {
        let mut roots = RootCertStore::empty();
        for ca in load_ca_ders(&files.ca)? {
            roots.add(ca).map_err(|e| TlsError::BadCertificate {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::BadCertificate {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| bad_config(files, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn bad_config(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    }
}

/// Accepted, handshaken TLS connections, for `serve_with_incoming`. Handshakes run concurrently
/// (a slow client cannot hold up others) and each uses the configuration current when its TCP
/// connection arrived. Dropping the stream closes the listening socket.
pub struct TlsIncoming {
    listener: TcpListener,
    tls: Arc<ServerTls>,
    /// `bookstore_tls_handshakes_total{result}`: completed, refused, timed out.
    outcomes: Handshakes,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    _closed: ListenerClosedLog,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Handshake counters, one per outcome.
#[derive(Clone)]
struct Handshakes {
    completed: Counter,
    refused: Counter,
    timed_out: Counter,
}

impl TlsIncoming {
    /// Handshakes are counted in `metrics` by outcome.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>, metrics: &Metrics) -> Self {
        let counter =
            |result| metrics.counter("bookstore_tls_handshakes_total", &[("result", result)]);
        TlsIncoming {
            listener,
            tls,
            outcomes: Handshakes {
                completed: counter("completed"),
                refused: counter("refused"),
                timed_out: counter("timed_out"),
            },
            handshakes: JoinSet::new(),
            _closed: ListenerClosedLog,
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    outcomes: Handshakes,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            outcomes.completed.increment(1);
            Some(tls)
        }
        Ok(Err(e)) => {
            outcomes.refused.increment(1);
            tracing::warn!(%peer, reason = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            outcomes.timed_out.increment(1);
            tracing::warn!(%peer, "TLS handshake timed out");
            None
        }
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    let _ = tcp.set_nodelay(true);
                    let acceptor = TlsAcceptor::from(this.tls.config());
                    let outcomes = this.outcomes.clone();
                    this.handshakes
                        .spawn(handshake(acceptor, tcp, peer, outcomes));
                    continue;
                }
                // Accept errors (EMFILE, a connection reset before accept) are per connection;
                // tonic logs and skips them.
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {}
            }
            return match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => Poll::Ready(Some(Ok(tls))),
                // A refused handshake (already logged) or a handshake task that panicked.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => Poll::Pending,
            };
        }
    }
}
