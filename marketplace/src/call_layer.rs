//! The client's call layer, around each connection to the recommendations service: each call
//! is counted and logged ([`bookstore_common::grpc_call`]), carries its page's request id,
//! trace context and deadline to the server, and a transport failure becomes a clean
//! `UNAVAILABLE` whose message is the error chain, logged once here.
//!
//! The caller ([`crate::source`]) owns the call's context: it puts a [`CallContext`] in the
//! request's extensions and times the whole call; this layer reads the context once, writes it
//! as headers, and sets no timer of its own. (tonic's channel, below this layer, also gives up
//! at the `grpc-timeout` it is handed, up to the answer's headers; that error becomes
//! `DEADLINE_EXCEEDED` here.)

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bookstore_common::{
    context::{REQUEST_ID_HEADER, RequestId, TRACEPARENT_HEADER, TraceContext},
    grpc_call::{
        self, CallSeries, GRPC_TIMEOUT_HEADER, KnownMethod, PeerAddr, Unanswered,
        deadline_exceeded, grpc_timeout_value,
    },
    metrics::Metrics,
    request_log::Sampling,
};
use tonic::{
    Status,
    body::Body,
    codegen::{
        BoxFuture,
        http::{self, HeaderName, HeaderValue},
    },
};
use tower::{Layer, Service};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an outgoing call carries from the request it is made for.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub request_id: RequestId,
    /// The page request's trace: the parent of the server's span.
    pub trace: TraceContext,
    /// When the caller stops waiting; sent as `grpc-timeout`.
    pub deadline: Instant,
}

/// Counts and logs every call through it, and writes each call's context. A call without a
/// [`CallContext`] goes out with a fresh request id and no deadline of ours (only
/// `crate::source` calls through this layer, and it always sets one).
#[derive(Debug, Clone)]
pub struct ClientCallLayer {
    series: Arc<CallSeries>,
    /// The address this connection goes to.
    peer: Arc<str>,
}

impl ClientCallLayer {
    pub fn new(
        metrics: Metrics,
        methods: &'static [KnownMethod],
        peer: &str,
        lines: Sampling,
    ) -> Self {
        ClientCallLayer {
            series: CallSeries::new(&grpc_call::CLIENT, metrics, methods, lines),
            peer: peer.into(),
        }
    }
}

impl<S> Layer<S> for ClientCallLayer {
    type Service = ClientCall<S>;

    fn layer(&self, inner: S) -> ClientCall<S> {
        ClientCall {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ClientCallLayer`] wraps.
#[derive(Clone)]
pub struct ClientCall<S> {
    inner: S,
    layer: ClientCallLayer,
}

impl<S> fmt::Debug for ClientCall<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCall")
            .field("peer", &self.layer.peer)
            .finish_non_exhaustive()
    }
}

impl<S> Service<http::Request<Body>> for ClientCall<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let (request_id, trace, budget) = match request.extensions_mut().remove::<CallContext>() {
            Some(context) => {
                let budget = context.deadline.saturating_duration_since(started);
                write_context(request.headers_mut(), &context, budget);
                (context.request_id, Some(context.trace), Some(budget))
            }
            None => (RequestId::from_header(None), None, None),
        };
        let peer_addr = PeerAddr::Named(self.layer.peer.clone());
        let record = self
            .layer
            .series
            .start(request.uri().path(), request_id, trace, peer_addr);
        // The inner service must be the one that was polled ready; leave a clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // Recorded as given up if the caller's timer drops this future before an answer.
            let pending = Unanswered::new(record, budget);
            let response = match inner.call(request).await {
                Ok(response) => response,
                Err(_) if budget.is_some_and(|b| started.elapsed() >= b) => {
                    deadline_exceeded(budget)
                }
                Err(error) => {
                    let error: BoxError = error.into();
                    Status::unavailable(format!(
                        "cannot reach the service: {}",
                        cause_chain(error.as_ref())
                    ))
                    .into_http()
                }
            };
            Ok(match pending.take() {
                Some(record) => record.answered(response),
                None => response,
            })
        })
    }
}

/// The call's request id, its trace context (our span as the server's parent) and what is left
/// of its deadline, as the headers the server reads.
fn write_context(headers: &mut http::HeaderMap, context: &CallContext, budget: Duration) {
    if let Ok(id) = HeaderValue::try_from(context.request_id.as_str()) {
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), id);
    }
    if let Ok(parent) = HeaderValue::try_from(context.trace.header()) {
        headers.insert(HeaderName::from_static(TRACEPARENT_HEADER), parent);
    }
    headers.insert(
        HeaderName::from_static(GRPC_TIMEOUT_HEADER),
        grpc_timeout_value(budget),
    );
}

/// An error and each of its causes, joined by `: `, with a cause left out when the text before
/// it already says it (hyper and tonic often repeat their source in their own message).
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
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
}
