//! `GET /`: the recommendations page.

use askama::Template;
use axum::{
    Extension,
    extract::{RawQuery, State},
    response::Html,
};

use super::{AppState, query};
use crate::{
    error::{AppError, HtmlError},
    source::{RequestContext, SourceError},
    templates::{NavLink, RecommendationsPage},
};

/// Recommendations in one category (mystery by default, three books for user 1, as in the
/// original). A category with no books is an ordinary page saying so, not an error.
pub async fn recommendations(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    RawQuery(raw): RawQuery,
) -> Result<Html<String>, HtmlError> {
    let query = query::parse(raw.as_deref()).map_err(AppError::BadRequest)?;
    let books = match state.source.recommend(&query, &context).await {
        Ok(books) => books,
        Err(SourceError::NoBooks) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let page = RecommendationsPage {
        heading: format!("{} books you may like", query.category.label()),
        label: query.category.label(),
        books,
        nav: NavLink::all(Some(query.category)),
    };
    let html = page.render().map_err(|e| {
        tracing::error!(error = %e, "page failed to render");
        AppError::Internal
    })?;
    Ok(Html(html))
}
