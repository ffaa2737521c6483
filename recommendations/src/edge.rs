//! The gRPC edge: what a request must be before any service sees it, and what an answer may
//! say, as the gRPC over HTTP/2 protocol and status-code documents lay them down.
//!
//! - [`ProtocolLayer`], outermost: a request that is not gRPC at all (a method other than POST,
//!   a content-type other than `application/grpc…`) gets a plain HTTP 405 or 415, counted in
//!   `bookstore_requests_refused_total{reason}`.
//! - [`LimitLayer`], inside the call layer so that every refusal is counted and logged as a
//!   call: calls past the per-connection or the whole-server limit get `RESOURCE_EXHAUSTED` at
//!   once; a unary call carrying other than exactly one message gets `UNIMPLEMENTED`; the text
//!   of a status made by the gRPC library rather than by us (a decoder's, a transport's) is
//!   replaced by a fixed message of ours, and logged at debug level.

use std::{
    fmt,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bookstore_common::{grpc_call::KnownMethod, metrics::Metrics};
use bytes::Buf;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::Counter;
use tonic::{Code, Status, body::Body, codegen::BoxFuture};
use tower::{Layer, Service};

use crate::listener::PeerInfo;

/// What a caller reads when its message could not be decoded.
pub const UNDECODABLE: &str = "the request message could not be decoded";
/// What a caller reads for any other failure of ours or of the library: never its text.
pub const INTERNAL: &str = "internal error";
/// What a call whose caller reset its stream before its message was whole is recorded with.
pub const CANCELLED: &str = "the caller cancelled the call";
/// What a caller reads for a compressed request (the library's own text named its internals).
pub const COMPRESSED: &str =
    "compressed requests are not supported: send them uncompressed (grpc-encoding: identity)";

/// Refuses requests that are not gRPC with a plain HTTP status.
#[derive(Clone)]
pub struct ProtocolLayer {
    wrong_method: Counter,
    wrong_content_type: Counter,
}

impl fmt::Debug for ProtocolLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtocolLayer").finish_non_exhaustive()
    }
}

impl ProtocolLayer {
    pub fn new(metrics: &Metrics) -> Self {
        let counter =
            |reason| metrics.counter("bookstore_requests_refused_total", &[("reason", reason)]);
        ProtocolLayer {
            wrong_method: counter("method"),
            wrong_content_type: counter("content_type"),
        }
    }
}

impl<S> Layer<S> for ProtocolLayer {
    type Service = Protocol<S>;

    fn layer(&self, inner: S) -> Protocol<S> {
        Protocol {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ProtocolLayer`] makes.
#[derive(Debug, Clone)]
pub struct Protocol<S> {
    inner: S,
    layer: ProtocolLayer,
}

/// Is this a gRPC content-type (`application/grpc`, `application/grpc+proto`…)?
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

fn plain(status: StatusCode, text: &'static str) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(
        bytes::Bytes::from_static(text.as_bytes()),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl<S> Service<http::Request<Body>> for Protocol<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.method() != http::Method::POST {
            self.layer.wrong_method.increment(1);
            let mut refusal = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "gRPC calls are POST requests\n",
            );
            refusal
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        if !is_grpc(request.headers()) {
            self.layer.wrong_content_type.increment(1);
            let refusal = plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "this port speaks gRPC: content-type must be application/grpc\n",
            );
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        Box::pin(self.inner.call(request))
    }
}

/// Call limits, message cardinality and clean status texts.
#[derive(Clone)]
pub struct LimitLayer {
    shared: Arc<Limits>,
}

struct Limits {
    /// Calls in flight on the whole server.
    in_flight: AtomicUsize,
    max_calls: usize,
    max_calls_per_connection: usize,
    /// Paths of unary methods: their requests carry exactly one message.
    unary: Vec<&'static str>,
    /// The decoding limit, named in the fixed text for an oversized message.
    max_message_bytes: usize,
}

impl fmt::Debug for LimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitLayer")
            .field("max_calls", &self.shared.max_calls)
            .field(
                "max_calls_per_connection",
                &self.shared.max_calls_per_connection,
            )
            .finish_non_exhaustive()
    }
}

impl LimitLayer {
    pub fn new(
        methods: &[KnownMethod],
        max_calls: usize,
        max_calls_per_connection: usize,
        max_message_bytes: usize,
    ) -> Self {
        LimitLayer {
            shared: Arc::new(Limits {
                in_flight: AtomicUsize::new(0),
                max_calls,
                max_calls_per_connection,
                unary: methods
                    .iter()
                    .filter(|m| m.kind == "unary")
                    .map(|m| m.path)
                    .collect(),
                max_message_bytes,
            }),
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`LimitLayer`] makes.
#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    shared: Arc<Limits>,
}

impl<S> fmt::Debug for Limit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit").finish_non_exhaustive()
    }
}

/// A call holding its places under both limits until its answer is ready.
struct Slots {
    server: Arc<Limits>,
    connection: Option<Arc<AtomicUsize>>,
}

impl Slots {
    /// Takes a place under each limit, or says which one is full.
    fn take(shared: &Arc<Limits>, connection: Option<Arc<AtomicUsize>>) -> Result<Slots, Status> {
        if let Some(calls) = &connection
            && calls.fetch_add(1, Ordering::AcqRel) >= shared.max_calls_per_connection
        {
            calls.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(
                "too many calls in flight on this connection",
            ));
        }
        if shared.in_flight.fetch_add(1, Ordering::AcqRel) >= shared.max_calls {
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            if let Some(calls) = &connection {
                calls.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(Status::resource_exhausted(
                "the server is at its call limit",
            ));
        }
        Ok(Slots {
            server: shared.clone(),
            connection,
        })
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(calls) = &self.connection {
            calls.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<S> Service<http::Request<Body>> for Limit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let connection = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.calls.clone());
        let slots = match Slots::take(&self.shared, connection) {
            Ok(slots) => slots,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let unary = self.shared.unary.contains(&request.uri().path());
        let cancelled = Arc::new(AtomicBool::new(false));
        let request = if unary {
            request.map(|body| Body::new(OneMessage::new(body, cancelled.clone())))
        } else {
            request
        };
        let call = self.inner.call(request);
        let max_bytes = self.shared.max_message_bytes;
        Box::pin(async move {
            let mut response = call.await?;
            if cancelled.load(Ordering::Relaxed) {
                // tonic answers a request body cut short "Missing request message" (INTERNAL);
                // the caller gave up, which is CANCELLED.
                let _ = Status::cancelled(CANCELLED).add_header(response.headers_mut());
            } else {
                clean_status(response.headers_mut(), max_bytes);
            }
            if unary {
                // The answer is complete; its trailers are tonic's status for our handler's
                // result (an encoder cannot fail on our small messages).
                drop(slots);
            } else {
                // A stream holds its places until it ends, and its status comes in its trailers.
                response = response.map(|body| {
                    Body::new(CleanTrailers {
                        body,
                        max_bytes,
                        _slots: slots,
                    })
                });
            }
            Ok(response)
        })
    }
}

/// Replaces the text of a status the library made (decoder, transport) with one of ours.
fn clean_status(headers: &mut HeaderMap, max_message_bytes: usize) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let fixed = match status.code() {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            if status.message().starts_with("failed to decode") {
                UNDECODABLE.to_owned()
            } else {
                INTERNAL.to_owned()
            }
        }
        Code::OutOfRange => {
            format!("the request message is larger than the limit of {max_message_bytes} bytes")
        }
        Code::Unimplemented if status.message().starts_with("Content is compressed") => {
            COMPRESSED.to_owned()
        }
        _ => return,
    };
    if fixed != status.message() {
        tracing::debug!(code = ?status.code(), detail = status.message(), "status text replaced");
        // Percent-encoded as gRPC wants; our fixed texts always encode.
        let _ = Status::new(status.code(), fixed).add_header(headers);
    }
}

/// A stream's response body: its trailers get [`clean_status`], and it holds the call's places
/// under the limits until it ends.
struct CleanTrailers {
    body: Body,
    max_bytes: usize,
    _slots: Slots,
}

impl HttpBody for CleanTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let max_bytes = self.max_bytes;
        Pin::new(&mut self.body).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        clean_status(trailers, max_bytes);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A unary request body that fails with `UNIMPLEMENTED` unless it holds exactly one message:
/// gRPC's "request cardinality violation". It reads the 5-byte frame headers as they pass.
struct OneMessage {
    body: Body,
    /// Set when the caller resets the stream before the message is whole.
    cancelled: Arc<AtomicBool>,
    /// Bytes of the current frame header read so far (5 in all: flag and length).
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    messages: u32,
}

impl OneMessage {
    fn new(body: Body, cancelled: Arc<AtomicBool>) -> Self {
        OneMessage {
            body,
            cancelled,
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            messages: 0,
        }
    }

    /// Follows the framing through `data`; an error once a second message begins.
    fn follow(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let step = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= step as u64;
                data.advance(step);
                continue;
            }
            if self.header_len == 0 && self.messages == 1 {
                return Err(cardinality());
            }
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data.advance(1);
            if self.header_len == 5 {
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.header_len = 0;
                self.messages += 1;
            }
        }
        Ok(())
    }
}

/// Whether `status` comes from the caller resetting its HTTP/2 stream.
fn reset_by_caller(status: &Status) -> bool {
    if status.code() == Code::Cancelled {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_reset() && h2.is_remote();
        }
        cause = error.source();
    }
    false
}

fn cardinality() -> Status {
    Status::unimplemented("a unary call carries exactly one request message")
}

impl HttpBody for OneMessage {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = self.follow(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // No message at all. A stream cut inside a frame is left to the decoder (INTERNAL).
            Poll::Ready(None) if self.messages == 0 && self.header_len == 0 => {
                Poll::Ready(Some(Err(cardinality())))
            }
            // The caller reset its stream before its message was whole: it gave up, which is
            // CANCELLED, not a failure of ours (noted for the answer: tonic reports a body that
            // failed as a missing message).
            Poll::Ready(Some(Err(status))) if reset_by_caller(&status) => {
                self.cancelled.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Status::cancelled(CANCELLED))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // An empty body must be polled once more, to answer UNIMPLEMENTED.
        self.body.is_end_stream() && self.messages > 0
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f
    }

    #[test]
    fn one_message_passes_in_any_chunking_and_a_second_is_refused() {
        let one = frame(10);
        for split in 0..one.len() {
            let mut body = OneMessage::new(Body::empty(), Arc::default());
            body.follow(&one[..split]).expect("first part");
            body.follow(&one[split..]).expect("second part");
            assert_eq!(body.messages, 1);
        }
        let mut two = frame(3);
        two.extend(frame(0));
        let mut body = OneMessage::new(Body::empty(), Arc::default());
        let refused = body.follow(&two).expect_err("two messages");
        assert_eq!(refused.code(), Code::Unimplemented);
    }

    #[test]
    fn library_texts_are_replaced_and_ours_kept() {
        let text = |code: Code, message: &str| {
            let mut headers = HeaderMap::new();
            Status::new(code, message)
                .add_header(&mut headers)
                .expect("header");
            clean_status(&mut headers, 4096);
            Status::from_header_map(&headers)
                .expect("status")
                .message()
                .to_owned()
        };
        assert_eq!(
            text(
                Code::Internal,
                "failed to decode Protobuf message: invalid varint"
            ),
            UNDECODABLE
        );
        assert_eq!(
            text(Code::Unknown, "h2 protocol error: stream reset"),
            INTERNAL
        );
        assert!(
            text(Code::OutOfRange, "Error, decoded message length too large")
                .contains("4096 bytes")
        );
        assert_eq!(
            text(
                Code::Unimplemented,
                "Content is compressed with `gzip` which isn't supported"
            ),
            COMPRESSED
        );
        assert_eq!(
            text(Code::NotFound, "Category not found"),
            "Category not found"
        );
        assert_eq!(
            text(
                Code::ResourceExhausted,
                "too many calls in flight on this connection"
            ),
            "too many calls in flight on this connection"
        );
    }

    #[test]
    fn only_grpc_content_types_are_grpc() {
        let ct = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(!ct("text/plain"));
        assert!(!ct("application/grpcx"));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
