//! The bytes of request heads still arriving, bounded per connection and in total, for HTTP/2
//! as for HTTP/1.1.
//!
//! hyper bounds an HTTP/1.1 head by its read buffer, but HTTP/2 buffers a header block that
//! spans a HEADERS frame and its CONTINUATIONs until the block ends, and h2's own bound on that
//! allows several frames of 16 KiB: measured at about 96 KB a connection, four times
//! `MAX_HEAD_BYTES`, held for the first-request timeout. So [`Metered`] watches the bytes each
//! connection reads, below hyper:
//!
//! - **HTTP/2** (told by its connection preface): it reads each frame's 9-byte header. A header
//!   block whose frames declare more than `max_head` bytes closes the connection before the
//!   payload that would cross it is read. Any frame still arriving is charged at its declared
//!   length, since the decoder sets aside room for all of it; a header block until it ends.
//! - **HTTP/1.1**: the bytes read since the last head ended (`\r\n\r\n`) while no request is
//!   in flight (a body read during a request is not a head).
//!
//! A head that arrives within one read is never charged: only what is still unfinished when a
//! read ends counts against the listener's [`HeadBudget`]. When a charge would take the total
//! past it, the connections that have held unfinished heads the longest give way (closed, and
//! counted), as many as it takes: a flood of unfinished heads shortens its own connections'
//! lives, never a real client's, whose head is done within a round trip.

use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use bookstore_common::metrics::Metrics;

/// What an HTTP/2 client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// The total of unfinished heads on one listener, and who holds them, oldest first.
pub struct HeadBudget {
    max: usize,
    used: AtomicUsize,
    next_ticket: AtomicU64,
    holders: Mutex<BTreeMap<u64, Holder>>,
    /// `bookstore_connections_closed_total{reason="head_budget"}`.
    gave_way: Counter,
    /// `bookstore_connections_closed_total{reason="head_too_large"}`.
    too_large: Counter,
}

/// A connection holding an unfinished head: its charge, and how to make it give way.
struct Holder {
    charged: Arc<AtomicUsize>,
    give_way: CancellationToken,
}

impl std::fmt::Debug for HeadBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadBudget")
            .field("max", &self.max)
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HeadBudget {
    /// At most `max` bytes of unfinished heads on the listener `listener`.
    pub fn new(max: usize, metrics: &Metrics, listener: &'static str) -> Arc<Self> {
        let closed = |reason| {
            metrics.counter(
                "bookstore_connections_closed_total",
                &[("listener", listener), ("reason", reason)],
            )
        };
        Arc::new(HeadBudget {
            max,
            used: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            holders: Mutex::default(),
            gave_way: closed("head_budget"),
            too_large: closed("head_too_large"),
        })
    }

    /// Bytes of unfinished heads now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Adds `more` bytes to a holder's charge, and makes the oldest holders give way while the
    /// total is past the budget. Returns the holder's ticket (it may be a new holder).
    fn charge(&self, ticket: Option<u64>, holder: &Holder, more: usize) -> u64 {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = ticket.unwrap_or_else(|| {
            let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            holders.insert(
                ticket,
                Holder {
                    charged: holder.charged.clone(),
                    give_way: holder.give_way.clone(),
                },
            );
            ticket
        });
        holder.charged.fetch_add(more, Ordering::Relaxed);
        let mut used = self.used.fetch_add(more, Ordering::Relaxed) + more;
        while used > self.max {
            let Some((_, oldest)) = holders.pop_first() else {
                break;
            };
            // Its bytes no longer count: it is closed at its next turn, and its buffers go
            // with it.
            let freed = oldest.charged.swap(0, Ordering::Relaxed);
            used = self.used.fetch_sub(freed, Ordering::Relaxed) - freed;
            oldest.give_way.cancel();
            self.gave_way.increment(1);
        }
        ticket
    }

    /// Gives back a holder's whole charge; it holds nothing any more.
    fn release(&self, ticket: u64, holder: &Holder) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        holders.remove(&ticket);
        let freed = holder.charged.swap(0, Ordering::Relaxed);
        self.used.fetch_sub(freed, Ordering::Relaxed);
    }
}

/// What a connection's bytes are, as far as its head goes.
#[derive(Debug)]
enum Proto {
    /// Not known yet: this many bytes matched the HTTP/2 preface.
    Sniffing(usize),
    Http1(Http1Heads),
    Http2(Frames),
}

/// The HTTP/1.1 head in progress: its bytes so far, and how much of `\r\n\r\n` ended them.
#[derive(Debug, Default)]
struct Http1Heads {
    bytes: usize,
    matched: u8,
}

impl Http1Heads {
    /// Reads `data`; returns the bytes of the head still unfinished after it.
    fn read(&mut self, data: &[u8]) -> usize {
        for &byte in data {
            self.bytes += 1;
            self.matched = match (self.matched, byte) {
                (0 | 2, b'\r') => self.matched + 1,
                (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                self.bytes = 0;
                self.matched = 0;
            }
        }
        self.bytes
    }
}

/// The HTTP/2 frames read so far: the one in progress, and the header block it belongs to.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame's declared length, type and flags.
    length: usize,
    kind: u8,
    flags: u8,
    /// Declared bytes of the header block in progress, its current frame included.
    block: usize,
}

/// A header block grew past the bound.
#[derive(Debug)]
struct TooLarge;

impl Frames {
    /// Reads `data`; returns the bytes still unfinished after it: the header block in
    /// progress, or the frame in progress at its declared length.
    fn read(&mut self, mut data: &[u8], max_head: usize) -> Result<usize, TooLarge> {
        while !data.is_empty() {
            if self.have < FRAME_HEADER {
                let take = (FRAME_HEADER - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < FRAME_HEADER {
                    break;
                }
                let [a, b, c, kind, flags, ..] = self.header;
                self.length = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.left = self.length;
                (self.kind, self.flags) = (kind, flags);
                if self.in_block_frame() {
                    self.block += self.length;
                    if self.block > max_head {
                        return Err(TooLarge);
                    }
                }
            } else {
                let take = self.left.min(data.len());
                self.left -= take;
                data = &data[take..];
            }
            if self.left == 0 {
                self.frame_done();
            }
        }
        Ok(self.unfinished())
    }

    fn in_block_frame(&self) -> bool {
        matches!(self.kind, HEADERS | PUSH_PROMISE | CONTINUATION)
    }

    fn frame_done(&mut self) {
        if self.in_block_frame() && self.flags & END_HEADERS != 0 {
            self.block = 0;
        }
        self.have = 0;
    }

    fn unfinished(&self) -> usize {
        let frame = if self.have == FRAME_HEADER && !self.in_block_frame() {
            self.length
        } else {
            0
        };
        self.block + frame
    }
}

/// A connection's reads, metered against the head bounds: [`Metered::give_way`] completes when
/// the connection must be closed to stay within the budget; a header block past `max_head`
/// fails the read, which closes it.
pub struct Metered<IO> {
    io: IO,
    proto: Proto,
    max_head: usize,
    budget: Arc<HeadBudget>,
    holder: Holder,
    ticket: Option<u64>,
    /// Requests in flight on the connection (an HTTP/1.1 body is not a head).
    in_flight: Arc<AtomicUsize>,
}

impl<IO> std::fmt::Debug for Metered<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("proto", &self.proto)
            .field("charged", &self.holder.charged.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<IO> Metered<IO> {
    /// `io` with heads of at most `max_head` bytes each, within `budget`; `in_flight` counts the
    /// connection's requests being answered.
    pub fn new(
        io: IO,
        max_head: usize,
        budget: Arc<HeadBudget>,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        Metered {
            io,
            proto: Proto::Sniffing(0),
            max_head,
            budget,
            holder: Holder {
                charged: Arc::new(AtomicUsize::new(0)),
                give_way: CancellationToken::new(),
            },
            ticket: None,
            in_flight,
        }
    }

    /// Cancelled when the connection must close so that newer heads fit the budget.
    pub fn give_way(&self) -> CancellationToken {
        self.holder.give_way.clone()
    }

    /// Meters `data`, just read: the head bytes unfinished after it, or an error past the bound.
    fn meter(&mut self, data: &[u8]) -> io::Result<()> {
        let unfinished = loop {
            match &mut self.proto {
                Proto::Sniffing(matched) => {
                    let want = &PREFACE[*matched..];
                    let n = want.len().min(data.len());
                    if data[..n] != want[..n] {
                        self.proto = Proto::Http1(Http1Heads {
                            bytes: *matched,
                            matched: 0,
                        });
                        continue;
                    }
                    *matched += n;
                    if *matched < PREFACE.len() {
                        break *matched;
                    }
                    let mut frames = Frames::default();
                    let rest = frames.read(&data[n..], self.max_head);
                    self.proto = Proto::Http2(frames);
                    break rest.map_err(|TooLarge| self.too_large())?;
                }
                Proto::Http1(heads) => {
                    if self.in_flight.load(Ordering::Acquire) > 0 {
                        *heads = Http1Heads::default();
                        break 0;
                    }
                    // The common case, with nothing left over from an earlier read: whole heads
                    // only (a GET has no body), nothing unfinished.
                    if heads.bytes == 0 && data.ends_with(b"\r\n\r\n") {
                        break 0;
                    }
                    break heads.read(data);
                }
                Proto::Http2(frames) => {
                    let max = self.max_head;
                    break frames
                        .read(data, max)
                        .map_err(|TooLarge| self.too_large())?;
                }
            }
        };
        let charged = self.holder.charged.load(Ordering::Relaxed);
        if unfinished > charged {
            self.ticket = Some(
                self.budget
                    .charge(self.ticket, &self.holder, unfinished - charged),
            );
        } else if unfinished == 0
            && let Some(ticket) = self.ticket.take()
        {
            self.budget.release(ticket, &self.holder);
        }
        Ok(())
    }

    fn too_large(&self) -> io::Error {
        self.budget.too_large.increment(1);
        io::Error::new(
            io::ErrorKind::InvalidData,
            "an HTTP/2 header block longer than the head limit",
        )
    }
}

impl<IO> Drop for Metered<IO> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.budget.release(ticket, &self.holder);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                Poll::Ready(this.meter(&buf.filled()[before..]))
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, length: usize) -> Vec<u8> {
        let mut bytes = vec![
            (length >> 16) as u8,
            (length >> 8) as u8,
            length as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        bytes.resize(FRAME_HEADER + length, 0);
        bytes
    }

    #[test]
    fn an_http1_head_is_unfinished_until_its_blank_line() {
        let mut heads = Http1Heads::default();
        assert_eq!(heads.read(b"GET / HTTP/1.1\r\nHost: x\r\n"), 25);
        assert_eq!(heads.read(b"\r"), 26);
        assert_eq!(heads.read(b"\n"), 0, "ended across two reads");
        assert_eq!(heads.read(b"GET / HTTP/1.1\r\n\r\nGET /"), 5);
        assert_eq!(heads.read(b"\r\n\r\r\n\r\n"), 0);
    }

    #[test]
    fn a_header_block_counts_until_it_ends_and_fails_past_the_bound() {
        let mut frames = Frames::default();
        // A whole block in one frame, read whole: nothing unfinished.
        let one = frame(HEADERS, END_HEADERS, 100);
        assert_eq!(frames.read(&one, 1000).ok(), Some(0));
        // A block left open: its bytes count until the CONTINUATION that ends it.
        let open = frame(HEADERS, 0, 400);
        assert_eq!(
            frames.read(&open[..5], 1000).ok(),
            Some(0),
            "header not read yet"
        );
        assert_eq!(frames.read(&open[5..20], 1000).ok(), Some(400));
        assert_eq!(frames.read(&open[20..], 1000).ok(), Some(400));
        let ends = frame(CONTINUATION, END_HEADERS, 300);
        assert_eq!(frames.read(&ends[..9], 1000).ok(), Some(700));
        assert_eq!(frames.read(&ends[9..], 1000).ok(), Some(0));
        // Past the bound, as soon as the frame header that crosses it is read.
        assert_eq!(frames.read(&open, 1000).ok(), Some(400));
        let more = frame(CONTINUATION, 0, 700);
        assert!(frames.read(&more[..9], 1000).is_err());
    }

    #[test]
    fn a_block_is_refused_at_the_frame_that_crosses_the_bound_however_it_is_split() {
        let mut block = frame(HEADERS, 0, 16_384);
        for _ in 0..5 {
            block.extend(frame(CONTINUATION, 0, 16_384));
        }
        // The second frame's header is what crosses 24 KiB.
        let crossing = FRAME_HEADER + 16_384 + FRAME_HEADER;
        for size in [1, 7, 9, 10, 100, 4096, 8195, 16_393, 16_402, 100_000] {
            let mut frames = Frames::default();
            let mut read = 0;
            let failed_at = block.chunks(size).find_map(|chunk| {
                read += chunk.len();
                frames.read(chunk, 24 * 1024).is_err().then_some(read)
            });
            let failed_at = failed_at.unwrap_or_else(|| panic!("never refused, reads of {size}"));
            assert!(
                failed_at >= crossing && failed_at < crossing + size,
                "reads of {size}: refused after {failed_at} bytes"
            );
        }
    }

    #[test]
    fn any_frame_still_arriving_counts_at_its_declared_length() {
        let mut frames = Frames::default();
        let data = frame(0x0, 0, 16_384);
        assert_eq!(frames.read(&data[..100], 24_576).ok(), Some(16_384));
        assert_eq!(frames.read(&data[100..], 24_576).ok(), Some(0));
    }

    #[test]
    fn past_the_budget_the_oldest_holders_give_way() {
        let metrics = Metrics::new("t", "0");
        let budget = HeadBudget::new(1000, &metrics, "http");
        let holder = || Holder {
            charged: Arc::new(AtomicUsize::new(0)),
            give_way: CancellationToken::new(),
        };
        let (a, b, c) = (holder(), holder(), holder());
        let ta = budget.charge(None, &a, 400);
        let tb = budget.charge(None, &b, 400);
        assert_eq!(budget.used(), 800);
        // c's 300 would make 1,100: the oldest, a, gives way.
        let _tc = budget.charge(None, &c, 300);
        assert!(a.give_way.is_cancelled());
        assert!(!b.give_way.is_cancelled() && !c.give_way.is_cancelled());
        assert_eq!(budget.used(), 700);
        // b finishes its head; a's release after giving way frees nothing twice.
        budget.release(tb, &b);
        budget.release(ta, &a);
        assert_eq!(budget.used(), 300);
    }
}
