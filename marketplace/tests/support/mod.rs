//! Helpers shared by `routes.rs` and `routes_in_flight.rs`: a request through the router
//! without a socket, and an answer's body as text.

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The whole body of `response`, as UTF-8 text.
pub async fn body_text(response: axum::response::Response) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// `GET uri` with `headers`, through a clone of `app`.
pub async fn get_with(
    app: &axum::Router,
    uri: &str,
    headers: &[(&str, &str)],
) -> axum::response::Response {
    let mut request = Request::builder().uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    app.clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible")
}
