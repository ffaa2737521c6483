//! What ties one user request together across both services: a request id (`x-request-id`) and
//! a W3C trace context (`traceparent`).
//!
//! Values from callers are taken only when well formed; anything else is replaced with a fresh
//! value, so logs never carry arbitrary caller bytes and a bad header never fails a request.
//!
//! Hand-written rather than taken from the OpenTelemetry crates: the ids are on every log line
//! even in builds without the `otel` feature, and a `traceparent` is a few lines to read and
//! write. With trace export on, the ids are the exported span's ([`continue_trace`]).

use std::fmt;

use rand::Rng;

/// The header (and gRPC metadata key) carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The W3C Trace Context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The longest request id taken from a caller.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request id: the caller's if it is 1 to 128 characters of letters, digits and `-_.:/+=@`,
/// otherwise a new random one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// A new random id (128 bits, hex).
    pub fn generate() -> Self {
        RequestId(hex(&rand::rng().random::<[u8; 16]>()))
    }

    /// The caller's id when acceptable, else a new one.
    pub fn from_header(value: Option<&[u8]>) -> Self {
        value
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|v| is_acceptable_request_id(v))
            .map(|v| RequestId(v.to_owned()))
            .unwrap_or_else(Self::generate)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_acceptable_request_id(value: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// A W3C trace context: which trace a request belongs to, and which span is its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` value (version `00`, or a later version read as `00` as the spec
    /// asks). `None` when malformed or when an id is all zeros.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?;
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let version = unhex::<1>(version)?[0];
        // Version ff is forbidden; version 00 has exactly four fields, later ones may add more.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id = unhex::<16>(trace_id)?;
        let span_id = unhex::<8>(span_id)?;
        let flags = unhex::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The start of a new, sampled trace.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        TraceContext {
            trace_id: nonzero(&mut rng),
            span_id: nonzero(&mut rng),
            flags: 0x01,
        }
    }

    /// A new span in the same trace, whose parent is this one: what to send downstream.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: nonzero(&mut rand::rng()),
            ..*self
        }
    }

    /// The trace id in hex, as logs show it.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The trace id, formatted only when displayed (log fields of disabled events cost nothing).
    pub fn trace_id_display(&self) -> impl fmt::Display + '_ {
        Hex(&self.trace_id)
    }

    /// The span id in hex.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    /// The span id in hex, formatted only when displayed.
    pub fn span_id_display(&self) -> impl fmt::Display + '_ {
        Hex(&self.span_id)
    }

    /// Fills the `trace_id` and `span_id` fields of a span made by `server_span!` (nothing to
    /// do when the span is off).
    pub fn record_ids(&self, span: &tracing::Span) {
        if !span.is_disabled() {
            span.record("trace_id", self.trace_id());
            span.record("span_id", self.span_id());
        }
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// Makes `span` part of the trace `parent` belongs to (or the first span of a new trace when
/// there is none), and returns the context to send downstream: the same trace, with `span` as
/// the parent. With the `otel` feature and export on, that is the exported span's own id, so the
/// services' spans join up in the collector.
pub fn continue_trace(span: &tracing::Span, parent: Option<TraceContext>) -> TraceContext {
    #[cfg(feature = "otel")]
    if let Some(exported) = otel::link(span, parent) {
        return exported;
    }
    let _ = span;
    match parent {
        Some(parent) => parent.child(),
        None => TraceContext::new_root(),
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// The span's exported context, parented on `parent`; None when nothing is exported.
    pub(super) fn link(span: &tracing::Span, parent: Option<TraceContext>) -> Option<TraceContext> {
        if let Some(parent) = parent {
            let remote = SpanContext::new(
                TraceId::from_bytes(parent.trace_id),
                SpanId::from_bytes(parent.span_id),
                TraceFlags::new(parent.flags),
                true,
                TraceState::default(),
            );
            // Fails only when no OpenTelemetry layer is installed: then nothing is exported.
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
                .ok()?;
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        own.is_valid().then(|| TraceContext {
            trace_id: own.trace_id().to_bytes(),
            span_id: own.span_id().to_bytes(),
            flags: own.trace_flags().to_u8(),
        })
    }
}

fn nonzero<const N: usize>(rng: &mut impl Rng) -> [u8; N] {
    loop {
        let bytes: [u8; N] = std::array::from_fn(|_| rng.random());
        if bytes != [0; N] {
            return bytes;
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex, by table: ids are made on every call, and `format!` per byte was measurable.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        out.push(char::from(HEX_DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(self.0))
    }
}

/// Exactly `N` bytes from `2 * N` lowercase hex digits (the spec forbids uppercase).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let ctx = TraceContext::parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id(), "00f067aa0ba902b7");
        assert_eq!(ctx.header(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let ctx = TraceContext::parse(EXAMPLE.as_bytes()).expect("valid");
        let child = ctx.child();
        assert_eq!(child.trace_id(), ctx.trace_id());
        assert_ne!(child.span_id(), ctx.span_id());
        assert!(child.header().ends_with("-01"));
        assert_eq!(TraceContext::parse(child.header().as_bytes()), Some(child));
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version may carry more fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceContext::parse(future.as_bytes()).is_some());
    }

    #[test]
    fn new_roots_are_valid_and_distinct() {
        let (a, b) = (TraceContext::new_root(), TraceContext::new_root());
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(TraceContext::parse(a.header().as_bytes()), Some(a));
    }

    #[test]
    fn request_ids_from_callers_are_kept_only_when_tame() {
        let kept = RequestId::from_header(Some(b"req-42.a:b/c+d=e@f_g"));
        assert_eq!(kept.as_str(), "req-42.a:b/c+d=e@f_g");
        for bad in [
            &b""[..],
            b"has space",
            b"new\nline",
            "caf\u{e9}".as_bytes(),
            &[b'a'; 129],
        ] {
            let replaced = RequestId::from_header(Some(bad));
            assert_ne!(replaced.as_str().as_bytes(), bad);
            assert_eq!(replaced.as_str().len(), 32, "a fresh id");
        }
        assert_eq!(
            RequestId::from_header(Some(&[b'a'; 128])).as_str().len(),
            128
        );
        assert_ne!(RequestId::generate(), RequestId::generate());
    }
}
