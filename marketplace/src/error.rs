//! The one place where the marketplace's errors meet HTTP: each error knows its status, and is
//! shown as a page to browsers and as JSON to API callers. No internal detail reaches either.

use std::sync::{LazyLock, Mutex};

use askama::Template;
use axum::{
    Json,
    body::Bytes,
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use bookstore_common::log_limit::LogLimit;
use serde_json::json;

use crate::{
    source::SourceError,
    templates::{ErrorPage, NavLink},
};

/// Seconds a client is asked to wait before retrying when recommendations are unavailable or
/// the marketplace is busy.
const RETRY_AFTER_SECS: &str = "5";

/// What can go wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    /// A query value is invalid; the message says which and why.
    #[error("{0}")]
    BadRequest(String),
    /// The category has no books.
    #[error("no books in this category")]
    NoBooks,
    /// The recommendations service is down, slow or failing.
    #[error("recommendations are unavailable right now; please try again in a moment")]
    Unavailable,
    /// More requests are being answered than the marketplace lets in at once.
    #[error("the bookstore is busy; please try again in a moment")]
    Busy,
    /// No such page.
    #[error("there is no page at this address")]
    NotFound,
    /// The request target is longer than any real link.
    #[error("the address is too long")]
    UriTooLong,
    /// The request headers are larger than any real browser sends.
    #[error("the request headers are too large")]
    HeadersTooLarge,
    /// A bug on our side (a template that failed to render).
    #[error("something went wrong on our side")]
    Internal,
}

/// At most this many "answering 503" warnings a minute.
static UNAVAILABLE_LOG: LazyLock<Mutex<LogLimit>> =
    LazyLock::new(|| Mutex::new(LogLimit::per_minute(20)));

impl From<SourceError> for AppError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::NoBooks => AppError::NoBooks,
            SourceError::Timeout(_) | SourceError::Unavailable(_) => {
                // An outage fails every page: a few lines a minute say so, the metrics count.
                let admitted = UNAVAILABLE_LOG
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit();
                match admitted {
                    Some(suppressed) => tracing::warn!(
                        error = %e,
                        suppressed,
                        "no recommendations; answering 503"
                    ),
                    None => tracing::debug!(error = %e, "no recommendations; answering 503"),
                }
                AppError::Unavailable
            }
            // An overload of our own, not an outage: many pages at once, counted, not logged
            // one by one, and told the same as a request shed on arrival.
            SourceError::Overloaded => {
                tracing::debug!(error = %e, "no recommendations; answering 503");
                AppError::Busy
            }
        }
    }
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NoBooks | AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::UriTooLong => StatusCode::URI_TOO_LONG,
            AppError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AppError::Unavailable | AppError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable name for the JSON body.
    fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "invalid_argument",
            AppError::NoBooks => "category_not_found",
            AppError::Unavailable => "unavailable",
            AppError::Busy => "busy",
            AppError::NotFound => "not_found",
            AppError::UriTooLong => "uri_too_long",
            AppError::HeadersTooLarge => "headers_too_large",
            AppError::Internal => "internal",
        }
    }

    fn heading(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "That request did not make sense",
            AppError::NoBooks => "No books here yet",
            AppError::Unavailable => "Recommendations are unavailable",
            AppError::Busy => "The bookstore is busy",
            AppError::NotFound => "Page not found",
            AppError::UriTooLong | AppError::HeadersTooLarge => "That request was too large",
            AppError::Internal => "Something went wrong",
        }
    }

    /// The sentence shown under the heading of an error page.
    fn page_text(&self) -> String {
        match self {
            AppError::BadRequest(reason) => reason.clone(),
            AppError::NoBooks => "There are no books in this category yet.".into(),
            AppError::Unavailable => {
                "We could not fetch recommendations just now. Please try again in a moment.".into()
            }
            AppError::Busy => {
                "Too many people are asking at once. Please try again in a moment.".into()
            }
            AppError::NotFound => "There is no page at this address.".into(),
            AppError::UriTooLong => "The address is longer than any link on this site.".into(),
            AppError::HeadersTooLarge => "The request carried more headers than we accept.".into(),
            AppError::Internal => "Something went wrong on our side. Please try again.".into(),
        }
    }

    fn with_retry_after(&self, mut response: Response) -> Response {
        if matches!(self, AppError::Unavailable | AppError::Busy) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

/// An error shown as an HTML page.
#[derive(Debug)]
pub struct HtmlError(pub AppError);

impl<E: Into<AppError>> From<E> for HtmlError {
    fn from(e: E) -> Self {
        HtmlError(e.into())
    }
}

impl IntoResponse for HtmlError {
    fn into_response(self) -> Response {
        let e = self.0;
        let response = match fixed_page(&e) {
            Some(html) => (e.status(), Html(html.clone())).into_response(),
            None => match render_page(&e) {
                Ok(html) => (e.status(), Html(html)).into_response(),
                Err(render) => {
                    tracing::error!(error = %render, "error page failed to render");
                    (e.status(), e.to_string()).into_response()
                }
            },
        };
        e.with_retry_after(response)
    }
}

/// Every error whose page never changes (all but a bad request, which names its reason).
const FIXED: [AppError; 7] = [
    AppError::NoBooks,
    AppError::Unavailable,
    AppError::Busy,
    AppError::NotFound,
    AppError::UriTooLong,
    AppError::HeadersTooLarge,
    AppError::Internal,
];

/// `e`'s page if it never changes, rendered once: a flood answered 503 (shed) or 404 (a
/// scanner) then costs no template work and no allocation for its body.
fn fixed_page(e: &AppError) -> Option<&'static Bytes> {
    static PAGES: LazyLock<Vec<(AppError, Bytes)>> = LazyLock::new(|| {
        FIXED
            .into_iter()
            .filter_map(|e| render_page(&e).ok().map(|html| (e, Bytes::from(html))))
            .collect()
    });
    PAGES
        .iter()
        .find(|(fixed, _)| fixed == e)
        .map(|(_, html)| html)
}

fn render_page(e: &AppError) -> askama::Result<String> {
    ErrorPage {
        heading: e.heading(),
        message: e.page_text(),
        nav: NavLink::all(None),
    }
    .render()
}

/// An error shown as JSON: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct JsonError(pub AppError);

impl<E: Into<AppError>> From<E> for JsonError {
    fn from(e: E) -> Self {
        JsonError(e.into())
    }
}

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = json!({ "error": { "code": e.code(), "message": e.to_string() } });
        let response = (e.status(), Json(body)).into_response();
        e.with_retry_after(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_page_is_what_rendering_it_gives_and_a_bad_request_is_rendered_each_time() {
        for e in FIXED {
            let rendered = render_page(&e).expect("renders");
            let fixed = fixed_page(&e).expect("kept");
            assert_eq!(fixed.as_ref(), rendered.as_bytes(), "{e:?}");
        }
        assert!(fixed_page(&AppError::BadRequest("no".into())).is_none());
    }
}
