//! Where recommendations come from: a trait the routes depend on, and its gRPC implementation,
//! which balances calls over every address of the service and retries the unreachable ones.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bookstore_common::{
    context::{REQUEST_ID_HEADER, RequestContext, TRACEPARENT_HEADER},
    grpc_call::KnownMethod,
    metrics::Metrics,
};
use bookstore_proto::{BookCategory, RecommendationRequest};
use rand::Rng;
use tonic::{Code, metadata::MetadataValue};
use tower::retry::budget::{Budget, TpsBudget};

use crate::{
    backends::Backends,
    books::{Book, Category, RecommendationQuery},
};

/// The methods the marketplace calls, as its client metrics name them.
pub const METHODS: &[KnownMethod] = &[KnownMethod {
    path: "/Recommendations/Recommend",
    kind: "unary",
}];

/// At most this many retries per request, and only for UNAVAILABLE.
const MAX_RETRIES: u32 = 2;
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
}

impl std::fmt::Debug for GrpcSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcSource")
            .field("backends", &self.backends)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl GrpcSource {
    /// Calls through `backends`; every request, retries included, ends within `timeout`.
    pub fn new(backends: Arc<Backends>, timeout: Duration, metrics: Metrics) -> Self {
        GrpcSource {
            backends,
            timeout,
            budget: TpsBudget::new(RETRY_WINDOW, RETRY_FLOOR_PER_SEC, RETRY_PERCENT),
            metrics,
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

#[async_trait]
impl RecommendationSource for GrpcSource {
    async fn recommend(
        &self,
        query: &RecommendationQuery,
        context: &RequestContext,
    ) -> Result<Vec<Book>, SourceError> {
        let deadline = Instant::now() + self.timeout;
        self.budget.deposit();
        let mut attempt = 0;
        loop {
            let Some(backend) = self.backends.pick() else {
                return Err(SourceError::Unavailable(
                    "no address of the recommendations service is known yet".into(),
                ));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(SourceError::Timeout(self.timeout));
            }
            let mut request = tonic::Request::new(RecommendationRequest {
                user_id: query.user_id,
                category: to_proto(query.category) as i32,
                max_results: query.max_results,
            });
            // Sent as `grpc-timeout`: the server stops working once nobody waits any more.
            request.set_timeout(remaining);
            let metadata = request.metadata_mut();
            if let Ok(id) = MetadataValue::try_from(context.request_id.as_str()) {
                metadata.insert(REQUEST_ID_HEADER, id);
            }
            // Our request's span is the parent of the server's.
            if let Ok(parent) = MetadataValue::try_from(context.trace.header()) {
                metadata.insert(TRACEPARENT_HEADER, parent);
            }
            // The call layer enforces the deadline up to the answer's headers; this covers the
            // rest of the answer too.
            let reply = tokio::time::timeout(remaining, backend.client().recommend(request)).await;
            let status = match reply {
                Err(_) => return Err(SourceError::Timeout(self.timeout)),
                Ok(Ok(reply)) => {
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
                Ok(Err(status)) => status,
            };
            let failure = format!("{:?}: {}", status.code(), status.message());
            match status.code() {
                Code::NotFound => return Err(SourceError::NoBooks),
                Code::DeadlineExceeded => return Err(SourceError::Timeout(self.timeout)),
                // Nothing was done: safe to try again, elsewhere if there is an elsewhere.
                Code::Unavailable => backend.eject(),
                _ => return Err(SourceError::Unavailable(failure)),
            }
            attempt += 1;
            if attempt > MAX_RETRIES {
                return Err(SourceError::Unavailable(failure));
            }
            let wait = backoff(attempt);
            if Instant::now() + wait >= deadline {
                self.count_retry("past_deadline");
                return Err(SourceError::Unavailable(failure));
            }
            if !self.budget.withdraw() {
                self.count_retry("budget_exhausted");
                return Err(SourceError::Unavailable(failure));
            }
            self.count_retry("attempted");
            tracing::debug!(attempt, wait_ms = wait.as_millis(), %failure, "retrying Recommend");
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_windows_grow_and_are_capped() {
        for _ in 0..200 {
            assert!(backoff(1) <= BACKOFF_BASE * 2);
            assert!(backoff(2) <= BACKOFF_BASE * 4);
            assert!(backoff(30) <= BACKOFF_MAX);
        }
        let spread: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(3)).collect();
        assert!(spread.len() > 10, "jittered, not fixed: {spread:?}");
    }
}
