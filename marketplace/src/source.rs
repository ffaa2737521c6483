//! Where recommendations come from: a trait the routes depend on, and its gRPC implementation,
//! which picks an address from [`crate::backends`], waits for one of its call slots, and retries
//! calls refused before they ran.
//!
//! Each address takes a bounded number of calls at once; past it a call waits in a queue bounded
//! in length and in time, and past either bound the page gets a 503: a burst of pages waits a
//! little instead of being shed by the server, and an overload costs no memory beyond the queue.
//! A call that would only wait out the time bound is refused on arrival: while the last call
//! to leave the queue had waited the whole bound, newcomers are turned away at once, so under a
//! standing overload the excess is answered fast and the pages served wait no longer than the
//! bound (a queue that only grows adds delay to every page and serves none more).
//!
//! Retries (of calls refused before they ran) wait a full-jitter backoff computed here; the
//! budget that caps them is tower's `TpsBudget`. tower's own backoff is not used: it adds its
//! jitter on top of the window, which is not the full-jitter curve the docs describe.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bookstore_common::{
    context::{RequestId, TraceContext},
    metrics::Metrics,
};
use bookstore_proto::{BookCategory, RecommendationRequest};
use rand::Rng;
use tonic::Code;
use tower::retry::budget::{Budget, TpsBudget};

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::{
    backends::{Backend, Backends, Outcome},
    books::{Book, Category, RecommendationQuery},
    call_layer::CallContext,
};

mod queue;
mod run_to_end;

pub use queue::QueueBounds;
use queue::{RecentWait, Waiting};
use run_to_end::RunToEnd;

/// At most this many calls per request: the first, and retries (after UNAVAILABLE or
/// RESOURCE_EXHAUSTED) or hedges (after the per-try timeout) on other addresses.
const MAX_ATTEMPTS: u32 = 3;
/// The per-try timeout is never below this: calls take about a millisecond, and a hedge for
/// every jitter would spend the retry budget on nothing.
const PER_TRY_FLOOR: Duration = Duration::from_millis(10);
/// Retry backoff: full jitter over an exponentially growing window.
const BACKOFF_BASE: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Retries may add at most this fraction of extra calls over the last few seconds, beyond a
/// small floor, so a sick backend is not hammered by retry storms.
const RETRY_PERCENT: f32 = 0.2;
const RETRY_FLOOR_PER_SEC: u32 = 5;
const RETRY_WINDOW: Duration = Duration::from_secs(10);

/// Why no recommendations could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The service has no books in that category.
    #[error("no books in this category")]
    NoBooks,
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The service is down, unreachable, refused us, or failed. The text is for logs only.
    #[error("recommendations service failed: {0}")]
    Unavailable(String),
    /// Every call slot is taken and the queue for them is full, or moves too slowly.
    #[error("too many requests waiting for the recommendations service")]
    Overloaded,
}

/// The request id and trace context of the page request being served, handed down to every
/// call made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    pub request_id: RequestId,
    pub trace: TraceContext,
}

/// Something that recommends books. The routes hold an `Arc<dyn RecommendationSource>`, so
/// tests can stand in for the real service.
#[async_trait]
pub trait RecommendationSource: Send + Sync + 'static {
    async fn recommend(
        &self,
        query: &RecommendationQuery,
        context: &RequestContext,
    ) -> Result<Vec<Book>, SourceError>;
}

/// The recommendations service over gRPC.
pub struct GrpcSource {
    backends: Arc<Backends>,
    timeout: Duration,
    budget: TpsBudget,
    metrics: Metrics,
    /// Calls waiting for a slot now (shared with the scrape's gauge), and at most.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// How long a call may wait for a slot, and how long the recent ones waited.
    max_wait: Duration,
    waits: RecentWait,
    /// `bookstore_client_queue_rejected_total`, by reason: the queue was full, or too slow.
    rejected_full: metrics::Counter,
    rejected_wait: metrics::Counter,
    /// Calls' latency lately, for the per-try timeout.
    latency: Arc<TryTimer>,
}

/// The per-try timeout, from the latency of answered calls, as TCP times a retransmission:
/// the smoothed latency plus four times its mean deviation, at least [`PER_TRY_FLOOR`]. A
/// call to a healthy address answers within it nearly always; one to a hung or slow address
/// does not, and its page is answered from another address instead.
/// Both figures in seconds, as f64 bits: updated without a lock (two calls ending at once may
/// each miss the other's sample, which a smoothed figure can afford).
#[derive(Debug, Default)]
struct TryTimer {
    smoothed: AtomicU64,
    deviation: AtomicU64,
}

impl TryTimer {
    fn sample(&self, took: Duration) {
        let took = took.as_secs_f64();
        let smoothed = f64::from_bits(self.smoothed.load(Ordering::Relaxed));
        let deviation = f64::from_bits(self.deviation.load(Ordering::Relaxed));
        let (smoothed, deviation) = if smoothed == 0.0 {
            (took, took / 2.0)
        } else {
            (
                0.875 * smoothed + 0.125 * took,
                0.75 * deviation + 0.25 * (smoothed - took).abs(),
            )
        };
        self.smoothed.store(smoothed.to_bits(), Ordering::Relaxed);
        self.deviation.store(deviation.to_bits(), Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        let smoothed = f64::from_bits(self.smoothed.load(Ordering::Relaxed));
        let deviation = f64::from_bits(self.deviation.load(Ordering::Relaxed));
        Duration::from_secs_f64(smoothed + 4.0 * deviation).max(PER_TRY_FLOOR)
    }
}

impl std::fmt::Debug for GrpcSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcSource")
            .field("backends", &self.backends)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Calls refused by the queue for call slots, by `reason`.
const QUEUE_REJECTED: &str = "bookstore_client_queue_rejected_total";

/// The `outcome` values of `bookstore_client_retries_total`.
const RETRY_OUTCOMES: [&str; 4] = ["attempted", "hedged", "budget_exhausted", "past_deadline"];

impl GrpcSource {
    /// Calls through `backends`; every request, retries included, ends within `timeout`. A call
    /// that finds every slot of its address taken waits within `queue`, or is refused.
    pub fn new(
        backends: Arc<Backends>,
        timeout: Duration,
        queue: QueueBounds,
        metrics: Metrics,
    ) -> Self {
        // Every outcome exists from the start, at zero, so an alert on `increase()` sees the
        // first retry (a series born at 1 has no increase).
        for outcome in RETRY_OUTCOMES {
            metrics
                .counter("bookstore_client_retries_total", &[("outcome", outcome)])
                .increment(0);
        }
        let queued = Arc::new(AtomicUsize::new(0));
        metrics
            .gauge("bookstore_client_queue_max", &[])
            .set(queue.max_queued as f64);
        let waiting = metrics.gauge("bookstore_client_queue_waiting", &[]);
        let sampled = queued.clone();
        metrics.on_scrape(move || waiting.set(sampled.load(Ordering::Relaxed) as f64));
        GrpcSource {
            backends,
            timeout,
            budget: TpsBudget::new(RETRY_WINDOW, RETRY_FLOOR_PER_SEC, RETRY_PERCENT),
            rejected_full: metrics.counter(QUEUE_REJECTED, &[("reason", "full")]),
            rejected_wait: metrics.counter(QUEUE_REJECTED, &[("reason", "wait")]),
            metrics,
            queued,
            max_queued: queue.max_queued,
            max_wait: queue.max_wait,
            waits: RecentWait::new(),
            latency: Arc::new(TryTimer::default()),
        }
    }

    /// Whether a call joining the queue now would only wait out the bound: someone is waiting,
    /// and the last call to leave the queue, within the bound's length of now, had waited all
    /// of it.
    fn queue_too_slow(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
            && self.waits.too_slow(self.max_wait, Instant::now())
    }

    fn left_queue_after(&self, waited: Duration) {
        self.waits.left(waited, Instant::now());
    }

    /// A slot for a call to `backend`: at once if one is free, else after waiting in the queue
    /// (at most until `deadline`).
    async fn slot(
        &self,
        backend: &Backend,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, SourceError> {
        if let Some(slot) = backend.try_slot() {
            return Ok(slot);
        }
        if self.queue_too_slow() {
            self.rejected_wait.increment(1);
            return Err(SourceError::Overloaded);
        }
        let Some(_waiting) = Waiting::join(&self.queued, self.max_queued) else {
            self.rejected_full.increment(1);
            return Err(SourceError::Overloaded);
        };
        let joined = Instant::now();
        let remaining = deadline.saturating_duration_since(joined);
        let patience = remaining.min(self.max_wait);
        match tokio::time::timeout(patience, backend.slot()).await {
            Ok(Some(slot)) => {
                self.left_queue_after(joined.elapsed());
                Ok(slot)
            }
            Ok(None) => Err(SourceError::Unavailable(
                "the call slots were closed".into(),
            )),
            Err(_) if patience < remaining => {
                self.left_queue_after(self.max_wait);
                self.rejected_wait.increment(1);
                Err(SourceError::Overloaded)
            }
            Err(_) => Err(SourceError::Timeout(self.timeout)),
        }
    }

    fn count_retry(&self, outcome: &'static str) {
        self.metrics
            .counter("bookstore_client_retries_total", &[("outcome", outcome)])
            .increment(1);
    }
}

fn to_proto(category: Category) -> BookCategory {
    match category {
        Category::Mystery => BookCategory::Mystery,
        Category::ScienceFiction => BookCategory::ScienceFiction,
        Category::SelfHelp => BookCategory::SelfHelp,
    }
}

/// The wait before retry number `attempt` (1-based): uniform in [0, min(max, base * 2^attempt)].
fn backoff(attempt: u32) -> Duration {
    let window = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    window.mul_f64(rand::rng().random::<f64>())
}

/// One call of a request, to one address: its answer, and the address it went to.
type Attempt = RunToEnd<(Arc<Backend>, Reply)>;
type Reply = Result<tonic::Response<bookstore_proto::RecommendationResponse>, tonic::Status>;

/// Whether a call's status says its address may not work (so it counts toward ejection).
fn address_failed(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
    )
}

impl GrpcSource {
    /// Starts a call to `backend`, holding `slot`: it runs to its end whatever the page does
    /// (see [`RunToEnd`]), and its end is recorded in the address's load and health and in the
    /// per-try timer.
    fn attempt(
        &self,
        backend: Arc<Backend>,
        slot: OwnedSemaphorePermit,
        query: &RecommendationQuery,
        context: &RequestContext,
        deadline: Instant,
    ) -> Attempt {
        let mut request = tonic::Request::new(RecommendationRequest {
            user_id: query.user_id,
            category: to_proto(query.category) as i32,
            max_results: query.max_results,
        });
        // Written as headers by the call layer; the deadline goes as `grpc-timeout`, so the
        // server stops working once nobody waits any more.
        request.extensions_mut().insert(CallContext {
            request_id: context.request_id.clone(),
            trace: context.trace,
            deadline,
        });
        let (backends, latency) = (self.backends.clone(), self.latency.clone());
        let mut client = backend.client();
        // No timer of its own: the call ends at its deadline (tonic's channel gives up at the
        // `grpc-timeout` it carries, and the server stops then), or when the keepalive finds
        // its connection dead. A call given up by its page is never reset: a burst of resets
        // on the one connection per address looks like an HTTP/2 rapid-reset attack to the
        // server, which then closes the connection under every other page's calls.
        RunToEnd::new(
            async move {
                let started = Instant::now();
                let in_flight = backend.start_call();
                let reply = client.recommend(request).await;
                drop(slot);
                let outcome = match &reply {
                    Ok(_) => {
                        latency.sample(started.elapsed());
                        Outcome::Answered
                    }
                    Err(status) if address_failed(status.code()) => Outcome::Failed,
                    // NOT_FOUND, RESOURCE_EXHAUSTED…: the address answered.
                    Err(_) => Outcome::Answered,
                };
                in_flight.finished(outcome);
                if outcome == Outcome::Failed {
                    backends.judge(&backend);
                }
                (backend, reply)
            }
            .in_current_span(),
        )
    }

    fn per_try(&self) -> Duration {
        self.latency.timeout().min(self.timeout / 2)
    }
}

/// Keeps `attempt` in a free one of the two places for calls in flight (there is always one:
/// a second call starts only as a hedge beside the first, a retry only with none in flight; were
/// both taken, the call would still run to its end, unheard).
fn hold(first: &mut Option<Attempt>, second: &mut Option<Attempt>, attempt: Attempt) {
    if first.is_none() {
        *first = Some(attempt);
    } else if second.is_none() {
        *second = Some(attempt);
    }
}

/// The next answer of either call in flight (neither is polled after it finished); Err if that
/// call panicked.
async fn next_answer(
    first: &mut Option<Attempt>,
    second: &mut Option<Attempt>,
) -> std::thread::Result<(Arc<Backend>, Reply)> {
    std::future::poll_fn(|cx| {
        for slot in [&mut *first, &mut *second] {
            if let Some(attempt) = slot
                && let Poll::Ready(answer) = Pin::new(attempt).poll(cx)
            {
                *slot = None;
                return Poll::Ready(answer);
            }
        }
        Poll::Pending
    })
    .await
}

#[async_trait]
impl RecommendationSource for GrpcSource {
    async fn recommend(
        &self,
        query: &RecommendationQuery,
        context: &RequestContext,
    ) -> Result<Vec<Book>, SourceError> {
        let deadline = Instant::now() + self.timeout;
        let timed_out = || SourceError::Timeout(self.timeout);
        self.budget.deposit();
        let per_try = self.per_try();
        let mut started = 0u32;
        // Up to two calls in flight: the first (or a retry), and a hedge.
        let (mut first, mut second): (Option<Attempt>, Option<Attempt>) = (None, None);
        // When the next call starts: now, or after a retry's backoff.
        let mut start_at = Some(Instant::now());
        let mut hedge_at = None;
        let mut last_tried = None;
        let mut failure = String::new();
        loop {
            if let Some(at) = start_at
                && at <= Instant::now()
            {
                start_at = None;
                let Some(backend) = self.backends.pick(last_tried) else {
                    return Err(SourceError::Unavailable(
                        "no address of the recommendations service is known yet".into(),
                    ));
                };
                let slot = self.slot(&backend, deadline).await?;
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
                last_tried = Some(backend.addr);
                hold(
                    &mut first,
                    &mut second,
                    self.attempt(backend, slot, query, context, deadline),
                );
                started += 1;
                hedge_at = (started < MAX_ATTEMPTS).then(|| Instant::now() + per_try);
            }
            if first.is_none() && second.is_none() && start_at.is_none() {
                return Err(SourceError::Unavailable(failure));
            }
            let wake = [start_at, hedge_at, Some(deadline)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(deadline);
            let answer = tokio::select! {
                answer = next_answer(&mut first, &mut second), if first.is_some() || second.is_some() => answer,
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(timed_out());
                    }
                    if hedge_at.is_some_and(|at| at <= now) {
                        hedge_at = None;
                        // Another address, a free slot there, and the budget: else the call in
                        // flight is waited for.
                        let other = last_tried.and_then(|tried| self.backends.pick_another(tried));
                        if let Some(backend) = other
                            && let Some(slot) = backend.try_slot()
                        {
                            if self.budget.withdraw() {
                                self.count_retry("hedged");
                                backend.count_call();
                                last_tried = Some(backend.addr);
                                let attempt = self.attempt(backend, slot, query, context, deadline);
                                hold(&mut first, &mut second, attempt);
                                started += 1;
                            } else {
                                self.count_retry("budget_exhausted");
                            }
                        }
                    }
                    continue;
                }
            };
            let Ok((backend, reply)) = answer else {
                failure = "the backend call panicked".into();
                if first.is_some() || second.is_some() {
                    continue;
                }
                return Err(SourceError::Unavailable(failure));
            };
            let status = match reply {
                Ok(reply) => {
                    return Ok(reply
                        .into_inner()
                        .recommendations
                        .into_iter()
                        .map(|b| Book {
                            id: b.id,
                            title: b.title,
                        })
                        .collect());
                }
                Err(status) => status,
            };
            failure = format!(
                "{}: {:?}: {}",
                backend.addr,
                status.code(),
                status.message()
            );
            let other_in_flight = first.is_some() || second.is_some();
            match status.code() {
                Code::NotFound => return Err(SourceError::NoBooks),
                // Another call may still answer in time.
                _ if other_in_flight => continue,
                Code::DeadlineExceeded => return Err(timed_out()),
                // Nothing was done, or it was shed before it ran: safe to try again, elsewhere
                // if there is an elsewhere.
                Code::Unavailable | Code::ResourceExhausted => {}
                _ => return Err(SourceError::Unavailable(failure)),
            }
            if started >= MAX_ATTEMPTS {
                return Err(SourceError::Unavailable(failure));
            }
            let wait = backoff(started);
            if Instant::now() + wait >= deadline {
                self.count_retry("past_deadline");
                return Err(SourceError::Unavailable(failure));
            }
            if !self.budget.withdraw() {
                self.count_retry("budget_exhausted");
                return Err(SourceError::Unavailable(failure));
            }
            self.count_retry("attempted");
            tracing::debug!(attempt = started, wait_ms = wait.as_millis(), %failure, "retrying Recommend");
            hedge_at = None;
            start_at = Some(Instant::now() + wait);
        }
    }
}

#[cfg(test)]
mod tests;
