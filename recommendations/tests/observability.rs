//! What an operator sees of the recommendations service: Prometheus metrics under the
//! grpc-ecosystem names, deadlines answered as DEADLINE_EXCEEDED, and injected failures. Real
//! server, real mutual TLS, metrics fetched over HTTP from the admin port.

use std::{net::SocketAddr, time::Duration};

use bookstore_certs::Usage;
use bookstore_proto::{BookCategory, RecommendationRequest};
use bookstore_testkit::{
    TestPki, grpc_client, identity, recommendations_config, spawn_recommendations, trusted_client,
};
use tonic::Code;

fn request(category: i32, max_results: i32) -> RecommendationRequest {
    RecommendationRequest {
        user_id: 1,
        category,
        max_results,
    }
}

async fn metrics(admin: SocketAddr) -> String {
    let response = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.expect("body")
}

/// The value of the series that is exactly `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The labels of Recommend, in the order they are rendered.
const RECOMMEND: &str =
    r#"grpc_type="unary",grpc_service="Recommendations",grpc_method="Recommend""#;

#[tokio::test]
async fn calls_are_counted_under_the_grpc_ecosystem_names_by_code() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let client = trusted_client(server.addr, &pki);
    // A caller with a CA-signed certificate whose identity is not allowed.
    let stranger = pki
        .pki
        .ca
        .issue("stranger", &["stranger"], Usage::Client)
        .expect("cert");
    let refused = grpc_client(
        server.addr,
        pki.ca_certificate(),
        Some(identity(&stranger)),
        "localhost",
    );
    // A caller without a certificate is refused during the handshake.
    let anonymous = grpc_client(server.addr, pki.ca_certificate(), None, "localhost");
    let mystery = BookCategory::Mystery as i32;
    // (case, caller, request, the code the call ends with; None: refused in the handshake,
    // before there is a call). The trusted caller's clones share one connection.
    let cases = [
        ("served, 1st", &client, request(mystery, 1), Some(Code::Ok)),
        ("served, 2nd", &client, request(mystery, 1), Some(Code::Ok)),
        ("served, 3rd", &client, request(mystery, 1), Some(Code::Ok)),
        (
            "bad max_results",
            &client,
            request(mystery, -1),
            Some(Code::InvalidArgument),
        ),
        (
            "unknown category",
            &client,
            request(99, 1),
            Some(Code::NotFound),
        ),
        (
            "identity not allowed",
            &refused,
            request(mystery, 1),
            Some(Code::PermissionDenied),
        ),
        ("no certificate", &anonymous, request(mystery, 1), None),
    ];
    for (case, caller, request, expected) in cases {
        let outcome = caller.clone().recommend(request).await;
        let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        match expected {
            Some(expected) => assert_eq!(code, expected, "{case}: {outcome:?}"),
            None => assert!(outcome.is_err(), "{case}: {outcome:?}"),
        }
    }

    // The server counts its side of the refusal as it finishes it, which may be just after
    // the client has seen it.
    let refused = r#"bookstore_tls_handshakes_total{result="refused"}"#;
    let parts = ["bookstore_tls_handshakes_total", r#"result="refused""#];
    bookstore_testkit::raw::until_metric(server.admin_addr, &parts, 1.0, Duration::from_secs(5))
        .await;
    let text = metrics(server.admin_addr).await;
    // One connection for the trusted client and one for the stranger: a handshake per
    // connection, not per call.
    assert_eq!(
        value(
            &text,
            r#"bookstore_tls_handshakes_total{result="completed"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(value(&text, refused), Some(1.0), "{text}");
    let expect = [
        (format!("grpc_server_started_total{{{RECOMMEND}}}"), 6.0),
        (
            format!(r#"grpc_server_handled_total{{{RECOMMEND},grpc_code="OK"}}"#),
            3.0,
        ),
        (
            format!(r#"grpc_server_handled_total{{{RECOMMEND},grpc_code="InvalidArgument"}}"#),
            1.0,
        ),
        (
            format!(r#"grpc_server_handled_total{{{RECOMMEND},grpc_code="NotFound"}}"#),
            1.0,
        ),
        (
            format!(r#"grpc_server_handled_total{{{RECOMMEND},grpc_code="PermissionDenied"}}"#),
            1.0,
        ),
        (
            format!("grpc_server_handling_seconds_count{{{RECOMMEND}}}"),
            6.0,
        ),
    ];
    for (series, expected) in expect {
        assert_eq!(
            value(&text, &series),
            Some(expected),
            "{series} in:\n{text}"
        );
    }
    assert!(
        text.contains(&format!(
            r#"grpc_server_handling_seconds_bucket{{{RECOMMEND},le="0.001"}}"#
        )),
        "a histogram with fine buckets:\n{text}"
    );
    assert!(text.contains(r#"bookstore_build_info{service="recommendations",version=""#));
    // The commit it was built from: this checkout's HEAD, unless the build was told otherwise.
    let revision = text
        .lines()
        .find(|l| l.starts_with("bookstore_build_info{"))
        .and_then(|l| l.split(r#"revision=""#).nth(1)?.split('"').next())
        .expect("a revision label");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(out) if out.status.success() && std::env::var_os("BOOKSTORE_REVISION").is_none() => {
            assert_eq!(revision, String::from_utf8_lossy(&out.stdout).trim());
        }
        _ => assert!(!revision.is_empty()),
    }
}

#[tokio::test]
async fn unknown_methods_are_counted_without_their_path_as_a_label() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let channel = bookstore_testkit::trusted_channel(server.addr, &pki);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RecommendationRequest, RecommendationRequest>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/Scanner/Probe123");
    let status = grpc
        .unary(tonic::Request::new(request(1, 1)), path, codec)
        .await
        .expect_err("no such method");
    assert_eq!(status.code(), Code::Unimplemented);
    let text = metrics(server.admin_addr).await;
    assert!(
        !text.contains("Probe123") && !text.contains("Scanner"),
        "{text}"
    );
    assert!(
        text.contains(r#"grpc_server_handled_total{grpc_type="unknown",grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn failure_rate_answers_that_share_of_calls_unavailable() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.failure_rate = "0.5".parse().expect("rate");
    let server = spawn_recommendations(&config).await;
    let mut client = trusted_client(server.addr, &pki);
    let mut failed = 0;
    for _ in 0..200 {
        match client
            .recommend(request(BookCategory::Mystery as i32, 1))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                assert!(status.message().contains("FAILURE_RATE"));
                failed += 1;
            }
        }
    }
    // Binomial(200, 0.5): outside 60..140 has odds far below one in a million.
    assert!((60..140).contains(&failed), "{failed} of 200 failed");
}
