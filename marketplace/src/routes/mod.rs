//! The HTTP surface: the router and its handlers.

mod api;
mod page;
pub mod query;
pub mod templates;

use std::sync::Arc;

use axum::{
    Router,
    extract::Request,
    http::{HeaderName, HeaderValue, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use bookstore_common::panic::CatchPanicLayer;

use crate::{
    error::{AppError, HtmlError},
    source::RecommendationSource,
};

/// The longest request target accepted; ours are a path and three short parameters.
const MAX_URI_BYTES: usize = 2048;

/// The most header bytes (names and values) a request may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Sent with every response. The pages load nothing but their own stylesheet, so the policy can
/// forbid everything else, including framing.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub source: Arc<dyn RecommendationSource>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The whole app, with recommendations from `source`. Tests call this with a fake source and
/// drive it without a socket.
pub fn router(source: Arc<dyn RecommendationSource>) -> Router {
    Router::new()
        .route("/", get(page::recommendations))
        .route("/api/recommendations", get(api::recommendations))
        .route("/style.css", get(stylesheet))
        .fallback(not_found)
        .with_state(AppState { source })
        .layer(CatchPanicLayer::new(internal_error as fn() -> Response))
        .layer(middleware::from_fn(limit_request_size))
        .layer(middleware::from_fn(security_headers))
}

fn internal_error() -> Response {
    HtmlError(AppError::Internal).into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Refuses over-long URIs (414) and header sets (431) before any handler sees them.
async fn limit_request_size(request: Request, next: Next) -> Response {
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return HtmlError(AppError::UriTooLong).into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return HtmlError(AppError::HeadersTooLarge).into_response();
    }
    next.run(request).await
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/style.css"),
    )
}

async fn not_found() -> HtmlError {
    HtmlError(AppError::NotFound)
}
