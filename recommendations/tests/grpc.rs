//! The recommendations service over real sockets and real TLS handshakes, started through its
//! real start-up path on port 0.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use bookstore_certs::Usage;
use bookstore_common::{shutdown::Drained, tls::TlsMode};
use bookstore_proto::{BookCategory, RecommendationRequest};
use bookstore_testkit::{
    TestPki, eventually_every, grpc_client, identity, plaintext_client, raw,
    recommendations_config, spawn_recommendations, tls_channel, trusted_channel, trusted_client,
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Certificate};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Asserts the call failed because the TLS peer refused us with `alert`. With TLS 1.3 the client
/// finishes its side of the handshake before the server checks the client certificate, so the
/// refusal arrives as a fatal alert on the first request.
fn assert_refused_with_alert(status: &tonic::Status, alert: &str) {
    let detail = format!("{status:?}");
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable) && detail.contains(alert),
        "expected a TLS refusal with alert {alert}, got {detail}"
    );
}

fn mystery(max_results: i32) -> RecommendationRequest {
    RecommendationRequest {
        user_id: 1,
        category: BookCategory::Mystery as i32,
        max_results,
    }
}

#[tokio::test]
async fn a_trusted_client_gets_three_distinct_mystery_books() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let mut client = trusted_client(server.addr, &pki);

    let books = client
        .recommend(mystery(3))
        .await
        .expect("ok")
        .into_inner()
        .recommendations;
    let ids: HashSet<i32> = books.iter().map(|b| b.id).collect();
    assert_eq!(ids, HashSet::from([1, 2, 3]));
    assert!(books.iter().any(|b| b.title == "The Maltese Falcon"));
    assert_eq!(server.stop().await, Drained::Gracefully);
}

#[tokio::test]
async fn errors_arrive_as_clean_statuses() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let mut client = trusted_client(server.addr, &pki);

    let status = client
        .recommend(RecommendationRequest {
            category: 42,
            ..mystery(1)
        })
        .await
        .expect_err("unknown category");
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "Category not found")
    );

    let status = client.recommend(mystery(-1)).await.expect_err("negative");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "max_results must be between 0 and 1000, got -1"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;

    let mut anonymous = grpc_client(server.addr, pki.ca_certificate(), None, "localhost");
    let status = anonymous
        .recommend(mystery(1))
        .await
        .expect_err("no client cert");
    assert_refused_with_alert(&status, "CertificateRequired");

    // The server keeps serving legitimate clients.
    let mut client = trusted_client(server.addr, &pki);
    client
        .recommend(mystery(1))
        .await
        .expect("trusted client still served");
}

#[tokio::test]
async fn a_client_of_another_ca_is_refused() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;

    let rogue_ca = bookstore_certs::Authority::new("Rogue CA").expect("ca");
    let rogue = rogue_ca
        .issue("marketplace", &["marketplace"], Usage::Client)
        .expect("cert");
    let mut client = grpc_client(
        server.addr,
        pki.ca_certificate(),
        Some(identity(&rogue)),
        "localhost",
    );
    let status = client.recommend(mystery(1)).await.expect_err("foreign CA");
    assert_refused_with_alert(&status, "UnknownCA");

    trusted_client(server.addr, &pki)
        .recommend(mystery(1))
        .await
        .expect("still served");
}

#[tokio::test]
async fn the_client_refuses_a_server_certificate_for_another_name() {
    let pki = TestPki::new();
    let impostor = pki
        .pki
        .ca
        .issue("elsewhere", &["elsewhere.example"], Usage::Server)
        .expect("cert");
    let (cert, key) = pki.write("elsewhere", &impostor);
    let mut config = recommendations_config(pki.dir());
    config.service.tls.cert_file = Some(cert);
    config.service.tls.key_file = Some(key);
    let server = spawn_recommendations(&config).await;

    let status = trusted_client(server.addr, &pki)
        .recommend(mystery(1))
        .await
        .expect_err("name mismatch");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        format!("{status:?}").contains("NotValidForName"),
        "{status:?}"
    );
    // The same server is fine for a client that expects that name.
    grpc_client(
        server.addr,
        pki.ca_certificate(),
        Some(pki.client_identity()),
        "elsewhere.example",
    )
    .recommend(mystery(1))
    .await
    .expect("matching name");
}

#[tokio::test]
async fn the_client_refuses_a_server_of_another_ca() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let other_ca = bookstore_certs::Authority::new("Other CA").expect("ca");
    let mut client = grpc_client(
        server.addr,
        Certificate::from_pem(&other_ca.issued().cert_pem),
        Some(pki.client_identity()),
        "localhost",
    );
    let status = client.recommend(mystery(1)).await.expect_err("unknown CA");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        format!("{status:?}").contains("UnknownIssuer"),
        "{status:?}"
    );
}

#[tokio::test]
async fn server_only_tls_and_plaintext_modes_work_when_chosen() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.service.tls.tls_mode = TlsMode::Server;
    let server = spawn_recommendations(&config).await;
    grpc_client(server.addr, pki.ca_certificate(), None, "localhost")
        .recommend(mystery(1))
        .await
        .expect("server-only TLS needs no client certificate");

    config.service.tls.tls_mode = TlsMode::Off;
    let server = spawn_recommendations(&config).await;
    plaintext_client(server.addr)
        .recommend(mystery(1))
        .await
        .expect("plaintext");
}

#[tokio::test]
async fn a_catalog_file_replaces_the_built_in_books() {
    let pki = TestPki::new();
    let path = pki.dir().join("books.json");
    std::fs::write(
        &path,
        r#"{"books":[{"id":100,"category":"SELF_HELP","title":"Meditations"}]}"#,
    )
    .expect("write");
    let mut config = recommendations_config(pki.dir());
    config.catalog_path = Some(path);
    let server = spawn_recommendations(&config).await;
    let mut client = trusted_client(server.addr, &pki);

    let books = client
        .recommend(RecommendationRequest {
            category: BookCategory::SelfHelp as i32,
            ..mystery(5)
        })
        .await
        .expect("ok")
        .into_inner()
        .recommendations;
    assert_eq!(books.len(), 1);
    assert_eq!((books[0].id, books[0].title.as_str()), (100, "Meditations"));
    let status = client
        .recommend(mystery(1))
        .await
        .expect_err("no mystery books");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_and_a_watch_cannot_hold_shutdown() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.service.shutdown_grace_secs = 1;
    let mut server = spawn_recommendations(&config).await;
    let channel = trusted_channel(server.addr, &pki);
    let mut health = HealthClient::new(channel);
    for service in ["", "Recommendations"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("an update").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let started = Instant::now();
    server.signal();
    let next = watch.next().await.expect("an update").expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The Watch stream never ends by itself; the grace period must cut it off.
    assert_eq!(server.finished().await, Drained::GraceElapsed);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let channel = trusted_channel(server.addr, &pki);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.next().await.expect("a reply").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("Recommendations"), "{names:?}");
    assert!(names.contains("grpc.health.v1.Health"), "{names:?}");
}

/// The original's AsyncIO lesson: a delayed answer must not hold up other calls. Five calls
/// against a one-second delay finish in about one second if they overlap, five if serialized.
#[tokio::test]
async fn concurrent_calls_overlap_while_each_is_delayed() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.artificial_delay_ms = 1000;
    let server = spawn_recommendations(&config).await;
    let client = trusted_client(server.addr, &pki);
    // Connect first, so the handshake is not part of what is timed.
    client.clone().recommend(mystery(0)).await.expect("warm-up");

    let started = Instant::now();
    let calls = (0..5).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move { c.recommend(mystery(1)).await })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.expect("task").expect("ok");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1000),
        "the delay was not applied: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(3000),
        "calls were serialized: {elapsed:?}"
    );
}

/// A certificate from the right CA is not enough: its identity must be in ALLOWED_CLIENTS, for
/// every service on the port.
#[tokio::test]
async fn a_valid_certificate_with_an_identity_not_allowed_is_permission_denied() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let intruder = pki
        .pki
        .ca
        .issue("intruder", &["intruder"], Usage::Client)
        .expect("cert");
    let mut client = grpc_client(
        server.addr,
        pki.ca_certificate(),
        Some(identity(&intruder)),
        "localhost",
    );
    let status = client.recommend(mystery(1)).await.expect_err("not allowed");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "caller is not allowed to call this service"
    );

    let channel = tls_channel(
        server.addr,
        pki.ca_certificate(),
        Some(identity(&intruder)),
        "localhost",
    );
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("health is not an exception on the mTLS port");
    assert_eq!(status.code(), Code::PermissionDenied);

    trusted_client(server.addr, &pki)
        .recommend(mystery(1))
        .await
        .expect("marketplace still served");
}

#[tokio::test]
async fn a_spiffe_identity_can_be_allowed() {
    let pki = TestPki::new();
    let spiffe = "spiffe://bookstore.example/ns/shop/sa/marketplace";
    let mut config = recommendations_config(pki.dir());
    config.allowed_clients = spiffe.parse().expect("infallible");
    let server = spawn_recommendations(&config).await;
    let workload = pki
        .pki
        .ca
        .issue("shop", &[spiffe], Usage::Client)
        .expect("cert");

    grpc_client(
        server.addr,
        pki.ca_certificate(),
        Some(identity(&workload)),
        "localhost",
    )
    .recommend(mystery(1))
    .await
    .expect("listed SPIFFE id");
    // The development client identity `marketplace` is no longer listed.
    let status = trusted_client(server.addr, &pki)
        .recommend(mystery(1))
        .await
        .expect_err("unlisted");
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Past the per-connection call limit, calls are refused at once with RESOURCE_EXHAUSTED instead
/// of queueing without bound.
#[tokio::test]
async fn calls_past_the_connection_limit_are_shed_not_queued() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.artificial_delay_ms = 2000;
    let server = spawn_recommendations(&config).await;
    let client = trusted_client(server.addr, &pki);
    let calls: Vec<_> = (0..300)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.recommend(mystery(1)).await.map(|_| ()) })
        })
        .collect();
    let (mut served, mut shed) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(()) => served += 1,
            Err(status) if status.code() == Code::ResourceExhausted => shed += 1,
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert_eq!((served, shed), (256, 44));
}

/// Requests are a few bytes; a large one is refused (OUT_OF_RANGE, naming the limit) before it
/// is decoded.
#[tokio::test]
async fn an_oversized_request_is_refused() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Padded {
        #[prost(int32, tag = "3")]
        max_results: i32,
        // Unknown to the server: only its size matters.
        #[prost(bytes = "vec", tag = "99")]
        padding: Vec<u8>,
    }
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let grpc = tonic::client::Grpc::new(trusted_channel(server.addr, &pki));
    let call = |padding: usize| {
        let request = tonic::Request::new(Padded {
            max_results: 1,
            padding: vec![b'x'; padding],
        });
        let codec =
            tonic_prost::ProstCodec::<Padded, bookstore_proto::RecommendationResponse>::default();
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.expect("ready");
            grpc.unary(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static("/Recommendations/Recommend"),
                codec,
            )
            .await
        }
    };
    call(100)
        .await
        .expect("a small request with an unknown field is fine");
    let status = call(64 * 1024).await.expect_err("too large");
    // tonic's code for a request over the decoding limit, with our own text naming the limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("the limit of 4096 bytes"),
        "{status:?}"
    );
}

async fn admin_status(admin: std::net::SocketAddr, path: &str) -> Option<u16> {
    reqwest::get(format!("http://{admin}{path}"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// The plaintext admin port: live and ready while serving; not ready (but still live and
/// answering) from the shutdown signal through the drain; gone once the drain is over.
#[tokio::test]
async fn readiness_turns_off_at_the_signal_and_the_admin_port_answers_through_the_drain() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.artificial_delay_ms = 1500;
    let mut server = spawn_recommendations(&config).await;
    let admin = server.admin_addr;
    assert_eq!(admin_status(admin, "/healthz").await, Some(200));
    assert_eq!(admin_status(admin, "/readyz").await, Some(200));

    let mut client = trusted_client(server.addr, &pki);
    client
        .clone()
        .recommend(mystery(0))
        .await
        .expect("connected");
    let slow = tokio::spawn(async move { client.recommend(mystery(1)).await });
    // Once the second call has started, it is in its delay.
    raw::until_metric(
        admin,
        &["grpc_server_started_total", "grpc_method=\"Recommend\""],
        2.0,
        Duration::from_secs(10),
    )
    .await;
    server.signal();
    // Looked at every 10 ms: how soon readiness turns off is what is checked.
    eventually_every(
        "/readyz not ready after the signal",
        Duration::from_secs(1),
        Duration::from_millis(10),
        async || admin_status(admin, "/readyz").await == Some(503),
    )
    .await;
    assert_eq!(
        admin_status(admin, "/healthz").await,
        Some(200),
        "live during the drain"
    );
    assert!(!slow.is_finished(), "the drain must still be going on");

    slow.await
        .expect("task")
        .expect("the in-flight call completes");
    assert_eq!(server.finished().await, Drained::Gracefully);
    assert_eq!(
        admin_status(admin, "/healthz").await,
        None,
        "admin port closed after the drain"
    );
}
