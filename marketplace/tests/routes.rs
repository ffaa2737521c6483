//! The HTTP surface driven without a socket, with a stand-in recommendations source (the real
//! gRPC source is exercised in `against_recommendations.rs`): pages, the API, errors, security
//! headers and size limits, panics, request ids and HTTP metrics. The in-flight limit and the
//! storm's waiting room are in `routes_in_flight.rs`.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use bookstore_common::metrics::Metrics;
use http_body_util::BodyExt;
use marketplace::{
    books::{Book, Category, RecommendationQuery},
    routes::router,
    source::{RecommendationSource, RequestContext, SourceError},
};
use tower::ServiceExt;

mod support;
use support::{body_text, get_with};

/// Answers every query with the same reply and remembers the queries.
struct StandIn {
    reply: Result<Vec<Book>, SourceError>,
    seen: Mutex<Vec<RecommendationQuery>>,
    contexts: Mutex<Vec<RequestContext>>,
}

impl StandIn {
    fn new(reply: Result<Vec<Book>, SourceError>) -> Arc<Self> {
        Arc::new(StandIn {
            reply,
            seen: Mutex::new(Vec::new()),
            contexts: Mutex::new(Vec::new()),
        })
    }

    fn books(titles: &[&str]) -> Arc<Self> {
        StandIn::new(Ok(titles
            .iter()
            .zip(1..)
            .map(|(t, id)| Book {
                id,
                title: (*t).to_owned(),
            })
            .collect()))
    }

    fn seen(&self) -> Vec<RecommendationQuery> {
        self.seen.lock().expect("lock").clone()
    }
}

#[async_trait]
impl RecommendationSource for StandIn {
    async fn recommend(
        &self,
        query: &RecommendationQuery,
        context: &RequestContext,
    ) -> Result<Vec<Book>, SourceError> {
        self.seen.lock().expect("lock").push(*query);
        self.contexts.lock().expect("lock").push(context.clone());
        self.reply.clone()
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(source: Arc<StandIn>, method: &str, uri: &str) -> Reply {
    let response = router(source, Metrics::new("test", "0"), 1024)
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    Reply {
        status: response.status(),
        headers: response.headers().clone(),
        body: body_text(response).await,
    }
}

async fn get(source: Arc<StandIn>, uri: &str) -> Reply {
    send(source, "GET", uri).await
}

#[tokio::test]
async fn the_home_page_is_the_originals_three_mystery_books_for_user_1() {
    let source = StandIn::books(&[
        "The Maltese Falcon",
        "Murder on the Orient Express",
        "The Hound of the Baskervilles",
    ]);
    let reply = get(source.clone(), "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    assert!(reply.body.contains("<title>Online Books For You</title>"));
    assert!(reply.body.contains("<h1>Mystery books you may like</h1>"));
    assert_eq!(reply.body.matches("<li>").count(), 3, "{}", reply.body);
    assert!(reply.body.contains("<li>The Maltese Falcon</li>"));
    assert_eq!(
        source.seen(),
        vec![RecommendationQuery {
            user_id: 1,
            category: Category::Mystery,
            max_results: 3
        }]
    );
}

#[tokio::test]
async fn other_categories_are_linked_and_browsable() {
    let source = StandIn::books(&["Ender's Game"]);
    let home = get(source.clone(), "/").await;
    for slug in ["mystery", "science_fiction", "self_help"] {
        assert!(
            home.body.contains(&format!("href=\"/?category={slug}\"")),
            "{slug}"
        );
    }
    let reply = get(source.clone(), "/?category=science_fiction").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .body
            .contains("<h1>Science fiction books you may like</h1>")
    );
    assert!(
        reply
            .body
            .contains("href=\"/?category=science_fiction\" aria-current=\"page\"")
    );
    assert_eq!(source.seen()[1].category, Category::ScienceFiction);
}

#[tokio::test]
async fn titles_are_shown_as_text_not_markup() {
    let source = StandIn::books(&["<script>alert('x')</script> & \"Friends\""]);
    let reply = get(source, "/").await;
    assert!(!reply.body.contains("<script>"), "{}", reply.body);
    // askama escapes with numeric character references.
    assert!(
        reply.body.contains(
            "<li>&#60;script&#62;alert(&#39;x&#39;)&#60;/script&#62; &#38; &#34;Friends&#34;</li>"
        ),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn bad_query_values_are_400_with_the_reason_as_a_page_or_json() {
    let source = StandIn::books(&["A"]);
    let page = get(source.clone(), "/?max_results=-4").await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(
        page.headers[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("text/html")
    );
    assert!(
        page.body
            .contains("max_results must be a whole number from 0 to 100, got &#34;-4&#34;"),
        "{}",
        page.body
    );

    let api = get(source.clone(), "/api/recommendations?category=poetry").await;
    assert_eq!(api.status, StatusCode::BAD_REQUEST);
    let json: serde_json::Value = serde_json::from_str(&api.body).expect("json");
    assert_eq!(json["error"]["code"], "invalid_argument");
    assert!(
        json["error"]["message"]
            .as_str()
            .expect("str")
            .starts_with("unknown category \"poetry\"")
    );
    assert!(
        source.seen().is_empty(),
        "a bad request must not reach recommendations"
    );
}

#[tokio::test]
async fn the_api_returns_json() {
    let source = StandIn::books(&["Ender's Game", "The Dune Chronicles"]);
    let reply = get(
        source.clone(),
        "/api/recommendations?category=science-fiction&max_results=2&user_id=7",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    let json: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "category": "science_fiction",
            "user_id": 7,
            "recommendations": [{"id": 1, "title": "Ender's Game"}, {"id": 2, "title": "The Dune Chronicles"}]
        })
    );
    assert_eq!(
        source.seen(),
        vec![RecommendationQuery {
            user_id: 7,
            category: Category::ScienceFiction,
            max_results: 2
        }]
    );
}

#[tokio::test]
async fn an_unavailable_backend_is_a_friendly_503_without_internals() {
    let secret = "Unavailable: tcp connect error 10.1.2.3:50051 (internal detail)";
    for error in [
        SourceError::Unavailable(secret.into()),
        SourceError::Timeout(std::time::Duration::from_secs(1)),
    ] {
        let source = StandIn::new(Err(error));
        let page = get(source.clone(), "/").await;
        assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(page.headers[header::RETRY_AFTER], "5");
        assert!(page.body.contains("<title>Online Books For You</title>"));
        assert!(
            page.body
                .contains("<h1>Recommendations are unavailable</h1>")
        );
        assert!(page.body.contains("Please try again in a moment."));
        assert!(!page.body.contains("10.1.2.3") && !page.body.contains("tcp connect"));

        let api = get(source, "/api/recommendations").await;
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        let json: serde_json::Value = serde_json::from_str(&api.body).expect("json");
        assert_eq!(json["error"]["code"], "unavailable");
        assert!(!api.body.contains("10.1.2.3"));
    }
}

#[tokio::test]
async fn a_full_or_slow_call_queue_is_a_busy_503_not_an_outage() {
    let source = StandIn::new(Err(SourceError::Overloaded));
    let page = get(source.clone(), "/").await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page.headers[header::RETRY_AFTER], "5");
    assert!(
        page.body.contains("<h1>The bookstore is busy</h1>"),
        "{}",
        page.body
    );
    let api = get(source, "/api/recommendations").await;
    assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
    let json: serde_json::Value = serde_json::from_str(&api.body).expect("json");
    assert_eq!(json["error"]["code"], "busy");
}

#[tokio::test]
async fn a_category_without_books_is_an_empty_page_or_a_json_404() {
    let source = StandIn::new(Err(SourceError::NoBooks));
    let page = get(source.clone(), "/?category=self_help").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("No self-help books to recommend right now.")
    );
    assert_eq!(page.body.matches("<li>").count(), 0);

    let api = get(source, "/api/recommendations?category=self_help").await;
    assert_eq!(api.status, StatusCode::NOT_FOUND);
    let json: serde_json::Value = serde_json::from_str(&api.body).expect("json");
    assert_eq!(json["error"]["code"], "category_not_found");
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let source = StandIn::books(&["A"]);
    let reply = get(source.clone(), "/admin").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.contains("Page not found"));
    assert_eq!(
        send(source.clone(), "POST", "/").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        send(source, "DELETE", "/api/recommendations").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn the_stylesheet_is_served() {
    let reply = get(StandIn::books(&[]), "/style.css").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "text/css; charset=utf-8"
    );
    assert!(reply.body.contains("ul.books"));
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let source = StandIn::books(&["A"]);
    for uri in [
        "/",
        "/api/recommendations",
        "/?category=bad",
        "/nowhere",
        "/style.css",
    ] {
        let reply = get(source.clone(), uri).await;
        let h = &reply.headers;
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{uri}: {csp}"
        );
        assert!(
            csp.contains("style-src 'self'"),
            "the stylesheet must stay allowed: {csp}"
        );
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{uri}");
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY", "{uri}");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer", "{uri}");
    }
}

#[tokio::test]
async fn oversized_uris_and_headers_are_refused_before_any_handler() {
    let source = StandIn::books(&["A"]);
    let long = format!("/?category=mystery&pad={}", "x".repeat(3000));
    let reply = get(source.clone(), &long).await;
    assert_eq!(reply.status, StatusCode::URI_TOO_LONG);
    assert!(reply.body.contains("That request was too large"));

    let mut request = Request::builder().uri("/");
    for i in 0..20 {
        request = request.header(format!("x-filler-{i}"), "y".repeat(1000));
    }
    let response = router(source.clone(), Metrics::new("test", "0"), 1024)
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert!(
        source.seen().is_empty(),
        "a refused request must not reach recommendations"
    );
}

/// A source that panics, standing in for a bug anywhere behind a handler.
struct Panics;

#[async_trait]
impl RecommendationSource for Panics {
    async fn recommend(
        &self,
        _: &RecommendationQuery,
        _: &RequestContext,
    ) -> Result<Vec<Book>, SourceError> {
        panic!("bug behind a handler")
    }
}

#[tokio::test]
async fn a_panic_behind_a_handler_is_a_500_page_and_the_app_keeps_serving() {
    let app = router(Arc::new(Panics), Metrics::new("test", "0"), 1024);
    for _ in 0..2 {
        let response = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response.headers()[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("Something went wrong"), "{body}");
        assert!(
            !body.contains("bug behind a handler"),
            "panic text leaked: {body}"
        );
    }
}

#[tokio::test]
async fn the_callers_request_id_and_trace_reach_the_source_and_the_id_comes_back() {
    let source = StandIn::books(&["A"]);
    let app = router(source.clone(), Metrics::new("test", "0"), 1024);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = get_with(
        &app,
        "/",
        &[("x-request-id", "req-123"), ("traceparent", parent)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let seen = source.contexts.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_id.as_str(), "req-123");
    assert_eq!(seen[0].trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        seen[0].trace.span_id(),
        "00f067aa0ba902b7",
        "our own span, a child"
    );
}

#[tokio::test]
async fn a_missing_or_unfit_request_id_is_replaced_with_a_fresh_one() {
    let source = StandIn::books(&["A"]);
    let app = router(source.clone(), Metrics::new("test", "0"), 1024);
    let mut ids = Vec::new();
    for headers in [&[][..], &[("x-request-id", "has space")][..]] {
        let response = get_with(&app, "/api/recommendations", headers).await;
        let id = response.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(id.len(), 32, "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let seen = source.contexts.lock().expect("lock").clone();
    assert_eq!(seen[0].request_id.as_str(), ids[0]);
    assert_eq!(seen[1].request_id.as_str(), ids[1]);
    assert_ne!(
        seen[0].trace.trace_id(),
        seen[1].trace.trace_id(),
        "new traces"
    );
}

#[tokio::test]
async fn http_metrics_count_requests_by_route_and_status() {
    let metrics = Metrics::new("marketplace", "9.9.9");
    let app = router(StandIn::books(&["A"]), metrics.clone(), 1024);
    for uri in [
        "/",
        "/",
        "/api/recommendations?category=nope",
        "/wp-admin.php",
        "/x",
    ] {
        get_with(&app, uri, &[]).await;
    }
    let text = metrics.render();
    for line in [
        r#"http_requests_total{method="GET",route="/",status="200"} 2"#,
        r#"http_requests_total{method="GET",route="/api/recommendations",status="400"} 1"#,
        r#"http_requests_total{method="GET",route="unmatched",status="404"} 2"#,
        r#"http_request_duration_seconds_count{method="GET",route="/",status="200"} 2"#,
        r#"bookstore_build_info{service="marketplace",version="9.9.9",revision="unknown"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
    assert!(text.contains(
        r#"http_request_duration_seconds_bucket{method="GET",route="/",status="200",le="0.005"}"#
    ));
}

/// A place is for work: an answer that is ready but not yet read (a client that stops
/// reading) gives its place back (it used to keep it until sent, so one connection that never
/// read could hold every place). What such answers hold is bounded by the listener
/// (`abuse_http2.rs`).
#[tokio::test]
async fn an_answer_ready_but_not_yet_sent_holds_no_place() {
    let app = router(StandIn::books(&["A"]), Metrics::new("test", "0"), 1);
    let unsent = get_with(&app, "/", &[]).await;
    assert_eq!(unsent.status(), StatusCode::OK);
    assert_eq!(get_with(&app, "/", &[]).await.status(), StatusCode::OK);
    assert!(body_text(unsent).await.contains("<li>"), "sent in full");
}
