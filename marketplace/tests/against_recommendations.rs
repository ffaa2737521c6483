//! The marketplace and a real recommendations service, both in this process, talking mutual-TLS
//! gRPC over loopback; pages fetched over real HTTP.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bookstore_common::{
    context::{RequestId, TraceContext},
    metrics::Metrics,
    request_log::Sampling,
};
use bookstore_proto::recommendations_client::RecommendationsClient;
use bookstore_testkit::{
    TestPki, eventually, eventually_every, marketplace_config, raw, recommendations_config,
    spawn_marketplace, spawn_recommendations,
};
use marketplace::{
    backends::METHODS,
    call_layer::{CallContext, ClientCallLayer},
};
use tonic::Code;

async fn fetch(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("HTTP request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// A loopback address with nothing listening on it (the port was just free).
fn vacant_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test]
async fn the_page_shows_three_mystery_books_fetched_over_mutual_tls() {
    let pki = TestPki::new();
    let recommendations = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), recommendations.addr)).await;

    let (status, body) = fetch(marketplace.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<title>Online Books For You</title>"));
    assert_eq!(body.matches("<li>").count(), 3, "{body}");
    for title in [
        "The Maltese Falcon",
        "Murder on the Orient Express",
        "The Hound of the Baskervilles",
    ] {
        assert!(body.contains(title), "{title} missing");
    }

    let (status, body) = fetch(
        marketplace.addr,
        "/api/recommendations?category=self_help&max_results=1",
    )
    .await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["recommendations"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_slow_backend_gets_the_503_page_within_the_deadline() {
    let pki = TestPki::new();
    let mut slow = recommendations_config(pki.dir());
    slow.artificial_delay_ms = 10_000;
    let recommendations = spawn_recommendations(&slow).await;
    let mut config = marketplace_config(pki.dir(), recommendations.addr);
    config.recommendations_timeout_ms = 300;
    let marketplace = spawn_marketplace(&config).await;

    let started = Instant::now();
    let (status, body) = fetch(marketplace.addr, "/").await;
    let elapsed = started.elapsed();
    assert_eq!(status, 503);
    assert!(body.contains("Recommendations are unavailable"));
    // 300 ms deadline against a 10 s delay: the page must not wait for the backend.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

#[tokio::test]
async fn the_marketplace_starts_without_its_backend_and_recovers_when_it_appears() {
    let pki = TestPki::new();
    let backend_addr = vacant_addr();
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), backend_addr)).await;

    let (status, body) = fetch(marketplace.addr, "/").await;
    assert_eq!(status, 503, "{body}");
    let (status, _) = fetch(marketplace.addr, "/api/recommendations").await;
    assert_eq!(status, 503);

    let mut config = recommendations_config(pki.dir());
    config.listen_addr = backend_addr;
    let _recommendations = spawn_recommendations(&config).await;
    // The same channel reconnects on the next call; allow for its reconnect backoff.
    eventually("recovered", Duration::from_secs(10), async || {
        let (status, body) = fetch(marketplace.addr, "/").await;
        if status == 200 {
            assert_eq!(body.matches("<li>").count(), 3);
            return Ok(());
        }
        Err(format!("never recovered: last status {status}"))
    })
    .await;
}

#[tokio::test]
async fn a_marketplace_without_a_client_certificate_is_refused_and_says_unavailable() {
    let pki = TestPki::new();
    let recommendations = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let mut config = marketplace_config(pki.dir(), recommendations.addr);
    // Server-only TLS on the client side: it verifies the server but presents no certificate.
    config.service.tls.tls_mode = bookstore_common::tls::TlsMode::Server;
    let marketplace = spawn_marketplace(&config).await;
    let (status, body) = fetch(marketplace.addr, "/").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn readiness_turns_off_at_the_signal_while_a_slow_page_finishes() {
    let pki = TestPki::new();
    let mut slow = recommendations_config(pki.dir());
    slow.artificial_delay_ms = 1500;
    let recommendations = spawn_recommendations(&slow).await;
    let mut config = marketplace_config(pki.dir(), recommendations.addr);
    config.recommendations_timeout_ms = 5000;
    let mut marketplace = spawn_marketplace(&config).await;
    let (web, admin) = (marketplace.addr, marketplace.admin_addr);
    let ready = || async move {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .ok()
    };
    assert_eq!(ready().await, Some(200));

    let page = tokio::spawn(fetch(web, "/"));
    // The page is in flight once it has called the backend.
    raw::until_metric(
        admin,
        &["bookstore_backend_calls_total"],
        1.0,
        Duration::from_secs(10),
    )
    .await;
    marketplace.signal();
    // Looked at every 10 ms: how soon readiness turns off is what is checked.
    eventually_every(
        "/readyz not ready after the signal",
        Duration::from_secs(1),
        Duration::from_millis(10),
        async || ready().await == Some(503),
    )
    .await;
    let (status, body) = page.await.expect("task");
    assert_eq!(status, 200, "{body}");
    marketplace.finished().await;
    assert_eq!(ready().await, None, "admin port closed after the drain");
}

/// The server gives up at the caller's deadline and records DEADLINE_EXCEEDED (tonic alone
/// would record CANCELLED), having stopped the work rather than finishing it. The caller's own
/// timer fires at the same moment, so what the caller sees is decided by its client: through
/// the marketplace's client layer it is DEADLINE_EXCEEDED too.
#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_on_both_ends() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.artificial_delay_ms = 2_000;
    let server = spawn_recommendations(&config).await;
    let client_metrics = Metrics::new("test-client", "0");
    let layer = ClientCallLayer::new(
        client_metrics.clone(),
        METHODS,
        &server.addr.to_string(),
        Sampling::default(),
    );
    let channel = bookstore_testkit::trusted_channel(server.addr, &pki);
    // Connected first: a call's deadline runs from before its connection is made, the server's
    // from when the call arrives, so a handshake slower than the few milliseconds of slack
    // would let the caller's give-up reach the server before the server's own deadline.
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health check");
    let mut client = RecommendationsClient::new(tower::Layer::layer(&layer, channel));
    for timeout_ms in [50, 200] {
        let mut call = tonic::Request::new(bookstore_testkit::mystery());
        let started = Instant::now();
        call.extensions_mut().insert(CallContext {
            request_id: RequestId::generate(),
            trace: TraceContext::new_root(),
            deadline: started + Duration::from_millis(timeout_ms),
        });
        let status = client.recommend(call).await.expect_err("too slow");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "gave up in time"
        );
    }
    // The server records its side as the calls end.
    const RECOMMEND: &str = r#"grpc_method="Recommend""#;
    let handled = ["grpc_server_handled_total{", RECOMMEND, "DeadlineExceeded"];
    raw::until_metric(server.admin_addr, &handled, 2.0, Duration::from_secs(5)).await;
    let text = raw::scrape(server.admin_addr).await;
    assert_eq!(raw::metric(&text, &handled), 2.0, "{text}");
    // 50 ms + 200 ms of waiting, not 2 × 2 s of delay: the work was stopped.
    let spent = raw::metric(&text, &["grpc_server_handling_seconds_sum{", RECOMMEND]);
    assert!(spent > 0.0 && spent < 1.0, "server kept working: {spent} s");
    let client_text = client_metrics.render();
    let handled = ["grpc_client_handled_total{", RECOMMEND, "DeadlineExceeded"];
    assert_eq!(raw::metric(&client_text, &handled), 2.0, "{client_text}");
}
