//! The in-flight limit as the router applies it, driven without a socket, with a stand-in
//! source that holds every call until released: past the limit a request is answered busy at
//! once; a storm of refusals opens a room where requests wait for a place, which closes when one
//! waits it out. (That an answer ready but not yet sent holds no place is in `routes.rs`.)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use axum::http::{StatusCode, header};
use bookstore_common::metrics::Metrics;
use marketplace::{
    books::{Book, RecommendationQuery},
    routes::{
        in_flight::{ROOM_WAIT, STORM_DELAY},
        router,
    },
    source::{RecommendationSource, RequestContext, SourceError},
};

mod support;
use support::{body_text, get_with};

/// Holds every call until released, so requests stay in flight; says when each arrives.
struct Held {
    release: tokio::sync::Semaphore,
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Held {
    /// A source holding every call, and where each call's arrival is told.
    fn new() -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
        let held = Held {
            release: tokio::sync::Semaphore::new(0),
            arrived,
        };
        (Arc::new(held), arrivals)
    }
}

#[async_trait]
impl RecommendationSource for Held {
    async fn recommend(
        &self,
        _query: &RecommendationQuery,
        _context: &RequestContext,
    ) -> Result<Vec<Book>, SourceError> {
        let _ = self.arrived.send(());
        let _released = self.release.acquire().await;
        Ok(vec![Book {
            id: 1,
            title: "A".into(),
        }])
    }
}

#[tokio::test]
async fn past_the_in_flight_limit_a_request_is_answered_busy_at_once_and_counted() {
    let (held, mut arrivals) = Held::new();
    let metrics = Metrics::new("marketplace", "0");
    let app = router(held.clone(), metrics.clone(), 2);
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get_with(&app, "/", &[]).await.status() })
        })
        .collect();
    for _ in 0..2 {
        arrivals.recv().await.expect("a held request");
    }
    // Both are let in and held: the next ones are refused without waiting for them.
    let at_once = std::time::Duration::from_secs(5);
    let page = tokio::time::timeout(at_once, get_with(&app, "/", &[]))
        .await
        .expect("refused, not held");
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page.headers()[header::RETRY_AFTER], "5");
    assert!(page.headers().contains_key("x-request-id"));
    assert!(page.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    let page = body_text(page).await;
    assert!(page.contains("The bookstore is busy"), "{page}");
    let api = tokio::time::timeout(at_once, get_with(&app, "/api/recommendations", &[]))
        .await
        .expect("refused, not held");
    assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
    let api = body_text(api).await;
    assert!(api.contains(r#""code":"busy""#), "{api}");

    held.release.add_permits(3);
    for request in in_flight {
        assert_eq!(request.await.expect("request"), StatusCode::OK);
    }
    assert_eq!(get_with(&app, "/", &[]).await.status(), StatusCode::OK);
    let text = metrics.render();
    for line in [
        "bookstore_requests_shed_total 2",
        r#"http_requests_total{method="GET",route="/",status="503"} 1"#,
        r#"http_requests_total{method="GET",route="/",status="200"} 3"#,
    ] {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
}

/// A client that asks again the moment it is refused makes a storm of refusals; once the
/// marketplace sees one, a request that finds no place waits in a room for one instead of being
/// refused, and is served when a place frees.
#[tokio::test]
async fn a_storm_of_refusals_opens_a_room_where_requests_wait_for_a_place() {
    let (held, mut arrivals) = Held::new();
    let app = router(held.clone(), Metrics::new("marketplace", "0"), 1);
    let holder = {
        let app = app.clone();
        tokio::spawn(async move { get_with(&app, "/", &[]).await.status() })
    };
    arrivals.recv().await.expect("the held page");
    // Refused back to back, as fast as this process can ask, until one is kept waiting longer
    // than a refusal would be (during the storm, refusals wait STORM_DELAY).
    let started = Instant::now();
    let mut refused = 0u32;
    let mut waiting = loop {
        let app = app.clone();
        let mut ask = tokio::spawn(async move {
            let asked = Instant::now();
            let status = get_with(&app, "/style.css", &[]).await.status();
            (status, asked.elapsed())
        });
        match tokio::time::timeout(STORM_DELAY + Duration::from_millis(50), &mut ask).await {
            Ok(answer) => {
                assert_eq!(answer.expect("request").0, StatusCode::SERVICE_UNAVAILABLE);
                refused += 1;
            }
            Err(_) => break ask,
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{refused} refusals in 10 s, none kept waiting"
        );
    };
    assert!(
        refused > 1_000,
        "kept waiting after only {refused} refusals"
    );
    // The held page ends: its place goes to the request waiting, which is served.
    held.release.add_permits(2);
    assert_eq!(holder.await.expect("held page"), StatusCode::OK);
    let (status, took) = (&mut waiting).await.expect("request");
    assert_eq!(status, StatusCode::OK);
    assert!(took < ROOM_WAIT, "{took:?}");
    // During the storm, a request finding a place free is answered at once.
    let asked = Instant::now();
    assert_eq!(get_with(&app, "/", &[]).await.status(), StatusCode::OK);
    assert!(asked.elapsed() < STORM_DELAY, "{:?}", asked.elapsed());
}

/// A request that waits the room's whole bound gets its 503 then, and ends the storm: arrivals
/// that outrun the places would only pile up there (an open loop).
#[tokio::test]
async fn a_request_that_waits_the_room_out_is_refused_and_closes_the_room() {
    let (held, mut arrivals) = Held::new();
    let app = router(held.clone(), Metrics::new("marketplace", "0"), 1);
    let _holder = {
        let app = app.clone();
        tokio::spawn(async move { get_with(&app, "/", &[]).await.status() })
    };
    arrivals.recv().await.expect("the held page");
    let started = Instant::now();
    let waited = loop {
        let asked = Instant::now();
        assert_eq!(
            get_with(&app, "/style.css", &[]).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        if asked.elapsed() >= ROOM_WAIT {
            break asked.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never kept waiting"
        );
    };
    assert!(waited < ROOM_WAIT + STORM_DELAY * 2, "{waited:?}");
    // The room is closed: the next request is refused without waiting for a place (the refusal
    // itself may wait STORM_DELAY while the storm lasts).
    let asked = Instant::now();
    assert_eq!(
        get_with(&app, "/style.css", &[]).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(asked.elapsed() < ROOM_WAIT, "{:?}", asked.elapsed());
}
