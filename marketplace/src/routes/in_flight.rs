//! A bound on the requests being answered at once. Past it a request gets a 503 with
//! `Retry-After` before any work is done for it, so under an overload the excess costs a few
//! microseconds each and the requests let in keep their latency: without it every connection's
//! request is let in, and all of them share the CPU until each takes seconds.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bookstore_common::metrics::Metrics;
use metrics::Counter;
use tokio::sync::Semaphore;

use crate::error::{AppError, HtmlError, JsonError};

/// Requests being answered now, at most.
#[derive(Debug)]
pub struct InFlight {
    slots: Semaphore,
    /// `bookstore_requests_shed_total`.
    shed: Counter,
}

impl InFlight {
    pub fn new(max: usize, metrics: &Metrics) -> Arc<Self> {
        Arc::new(InFlight {
            slots: Semaphore::new(max.min(Semaphore::MAX_PERMITS)),
            shed: metrics.counter("bookstore_requests_shed_total", &[]),
        })
    }
}

/// Lets a request in if a slot is free (for as long as its handler runs), else answers 503 at
/// once: JSON on the API, a page elsewhere.
pub async fn limit(
    State(in_flight): State<Arc<InFlight>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = in_flight.slots.try_acquire() else {
        in_flight.shed.increment(1);
        return if request.uri().path().starts_with("/api/") {
            JsonError(AppError::Busy).into_response()
        } else {
            HtmlError(AppError::Busy).into_response()
        };
    };
    next.run(request).await
}
