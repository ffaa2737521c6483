//! `GET /api/recommendations`: the same recommendations as JSON.

use axum::{
    Extension, Json,
    extract::{RawQuery, State},
};
use serde::Serialize;

use super::{AppState, query};
use crate::{
    books::{Book, Category},
    error::{AppError, JsonError},
    source::RequestContext,
};

/// The JSON answer.
#[derive(Debug, Serialize)]
pub struct RecommendationsBody {
    pub category: Category,
    pub user_id: i32,
    pub recommendations: Vec<Book>,
}

pub async fn recommendations(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    RawQuery(raw): RawQuery,
) -> Result<Json<RecommendationsBody>, JsonError> {
    let query = query::parse(raw.as_deref()).map_err(AppError::BadRequest)?;
    let recommendations = state.source.recommend(&query, &context).await?;
    Ok(Json(RecommendationsBody {
        category: query.category,
        user_id: query.user_id,
        recommendations,
    }))
}
