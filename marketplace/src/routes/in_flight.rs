//! A bound on the requests being answered at once. Past it a request gets a 503 with
//! `Retry-After` before any work is done for it, so under an overload the excess costs a few
//! microseconds each and the requests let in keep their latency: without it every connection's
//! request is let in, and all of them share the CPU until each takes seconds.
//!
//! A request holds its place until its answer's body is sent or dropped, not only while its
//! handler runs: a client that stops reading (an HTTP/2 window left at zero) otherwise keeps
//! answers in memory beyond the bound, as many as its streams allow on every connection.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bookstore_common::metrics::Metrics;
use http_body_util::BodyExt;
use metrics::Counter;
use tokio::sync::Semaphore;

use crate::error::{AppError, HtmlError, JsonError};

/// Requests being answered now, at most.
#[derive(Debug)]
pub struct InFlight {
    slots: Arc<Semaphore>,
    /// `bookstore_requests_shed_total`.
    shed: Counter,
}

impl InFlight {
    pub fn new(max: usize, metrics: &Metrics) -> Arc<Self> {
        Arc::new(InFlight {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            shed: metrics.counter("bookstore_requests_shed_total", &[]),
        })
    }
}

/// Lets a request in if a slot is free (until its answer is sent), else answers 503 at once:
/// JSON on the API, a page elsewhere.
pub async fn limit(
    State(in_flight): State<Arc<InFlight>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(slot) = in_flight.slots.clone().try_acquire_owned() else {
        in_flight.shed.increment(1);
        return if request.uri().path().starts_with("/api/") {
            JsonError(AppError::Busy).into_response()
        } else {
            HtmlError(AppError::Busy).into_response()
        };
    };
    next.run(request).await.map(|body| {
        Body::new(body.map_frame(move |frame| {
            // Owned by the body: given back when the body is done with or dropped.
            let _ = &slot;
            frame
        }))
    })
}
