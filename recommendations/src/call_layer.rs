//! The server's call layer, around every gRPC service on the port: each call's request id and
//! trace context are read from its headers and its span opened, and the call is counted and
//! logged ([`bookstore_common::grpc_call`]) and bounded in time. The deadline is the caller's
//! `grpc-timeout`, capped, and past it the caller gets `DEADLINE_EXCEEDED` where tonic on its
//! own would report `CANCELLED` "Timeout expired".

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bookstore_common::{
    context::{REQUEST_ID_HEADER, RequestId, TRACEPARENT_HEADER, TraceContext, continue_trace},
    grpc_call::{
        self, CallSeries, GRPC_TIMEOUT_HEADER, KnownMethod, PeerAddr, Unanswered,
        deadline_exceeded, header, parse_grpc_timeout,
    },
    metrics::Metrics,
    request_log::Sampling,
};
use tonic::{Status, body::Body, codegen::BoxFuture, transport::server::TcpConnectInfo};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::listener::PeerInfo;

/// The server answers `DEADLINE_EXCEEDED` this much before the caller's deadline, so that its
/// answer, not tonic's own timer (which says `CANCELLED`), is what the caller gets.
const DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// Counts, logs and bounds every call through it.
#[derive(Debug, Clone)]
pub struct ServerCallLayer {
    series: Arc<CallSeries>,
    /// No call runs longer than this, whatever deadline its caller sent.
    max_duration: Duration,
}

impl ServerCallLayer {
    pub fn new(
        metrics: Metrics,
        methods: &'static [KnownMethod],
        max_duration: Duration,
        lines: Sampling,
    ) -> Self {
        ServerCallLayer {
            series: CallSeries::new(&grpc_call::SERVER, metrics, methods, lines),
            max_duration,
        }
    }
}

impl<S> Layer<S> for ServerCallLayer {
    type Service = ServerCall<S>;

    fn layer(&self, inner: S) -> ServerCall<S> {
        ServerCall {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ServerCallLayer`] wraps.
#[derive(Clone)]
pub struct ServerCall<S> {
    inner: S,
    layer: ServerCallLayer,
}

impl<S> fmt::Debug for ServerCall<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCall").finish_non_exhaustive()
    }
}

impl<S> Service<http::Request<Body>> for ServerCall<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let headers = request.headers();
        let request_id = RequestId::from_header(header(headers, REQUEST_ID_HEADER));
        let parent = header(headers, TRACEPARENT_HEADER).and_then(TraceContext::parse);
        let max = self.layer.max_duration;
        let budget = parse_grpc_timeout(headers.get(GRPC_TIMEOUT_HEADER))
            .map_or(max, |t| t.min(max))
            .saturating_sub(DEADLINE_MARGIN);
        let peer_addr = remote_addr(&request).map_or(PeerAddr::Unknown, PeerAddr::Socket);
        let path = request.uri().path();
        // The call's own line carries its ids; the span is for trace export.
        let (service, method) = self.layer.series.labels_of(path);
        let span =
            bookstore_common::server_span!("grpc", request_id, format_args!("{service}/{method}"));
        let trace = continue_trace(&span, parent);
        trace.record_ids(&span);
        let record = self
            .layer
            .series
            .start(path, request_id, Some(trace), peer_addr);
        // The inner service must be the one that was polled ready; leave a clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let pending = Unanswered::new(record, Some(budget));
                let response = match tokio::time::timeout(budget, inner.call(request)).await {
                    Err(_) => deadline_exceeded(Some(budget)),
                    Ok(Ok(response)) => response,
                    Ok(Err(error)) => {
                        if let Some(record) = pending.take() {
                            record.failed(&Status::unknown(error.to_string()));
                        }
                        return Err(error);
                    }
                };
                Ok(match pending.take() {
                    Some(record) => record.answered(response),
                    None => response,
                })
            }
            .instrument(span),
        )
    }
}

fn remote_addr(request: &http::Request<Body>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<PeerInfo>()
        .map(|peer| peer.remote_addr)
        .or_else(|| extensions.get::<TcpConnectInfo>()?.remote_addr())
}
