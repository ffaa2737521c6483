//! The HTTP surface: the router and its handlers.

mod api;
mod page;
pub mod query;
pub mod templates;

use std::sync::Arc;

use axum::{Router, http::header, response::IntoResponse, routing::get};

use crate::{
    error::{AppError, HtmlError},
    source::RecommendationSource,
};

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
