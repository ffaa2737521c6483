//! What operators rely on, checked on both real binaries: a request id and trace followed from
//! the browser through both services' logs, degradation and recovery without a restart, and
//! retries that mask injected failures without hammering a failing backend.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bookstore_testkit::{
    TestPki, eventually,
    process::{self, ServiceProcess},
};

async fn start_recommendations(
    pki: &TestPki,
    listen: &str,
    extra: &[(&'static str, String)],
) -> (ServiceProcess, SocketAddr) {
    let mut env = vec![("LISTEN_ADDR", listen.to_owned())];
    env.extend_from_slice(extra);
    process::start_recommendations(pki.dir(), &env).await
}

struct Web {
    process: ServiceProcess,
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn start_marketplace(
    pki: &TestPki,
    backend: SocketAddr,
    extra: &[(&'static str, String)],
) -> Web {
    let (mut process, addr) = process::start_marketplace(pki.dir(), backend, extra).await;
    let admin = process.admin_addr().await;
    Web {
        process,
        addr,
        admin,
    }
}

async fn get(url: String, headers: &[(&str, &str)]) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("HTTP request")
}

/// The value of the first series whose line contains every one of `parts`.
fn value(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(admin: SocketAddr) -> String {
    get(format!("http://{admin}/metrics"), &[])
        .await
        .text()
        .await
        .expect("body")
}

#[tokio::test]
async fn a_request_id_and_trace_are_followed_through_both_services() {
    let pki = TestPki::new();
    // A line for every request and call, as an operator following one request would ask.
    let every = [("LOG_SAMPLE", "1".to_owned())];
    let (mut recommendations, backend) = start_recommendations(&pki, "127.0.0.1:0", &every).await;
    let mut web = start_marketplace(&pki, backend, &every).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = get(
        format!("http://{}/", web.addr),
        &[
            ("x-request-id", "order-7f3a"),
            ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "order-7f3a");

    let timeout = Duration::from_secs(5);
    let http_line = web.process.wait_for_line("order-7f3a", timeout).await;
    assert!(http_line.contains(trace), "{http_line}");
    let grpc_line = recommendations
        .wait_for_line("request_id=order-7f3a", timeout)
        .await;
    for field in [
        "gRPC call",
        &format!("trace_id={trace}"),
        "code=\"OK\"",
        "method=Recommendations/Recommend",
        "peer_identity=\"marketplace\"",
        "latency_ms=",
    ] {
        assert!(
            grpc_line.contains(field),
            "{field} missing from: {grpc_line}"
        );
    }

    // Without an id, the marketplace makes one and recommendations logs that one.
    let response = get(format!("http://{}/", web.addr), &[]).await;
    let made = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    recommendations
        .wait_for_line(&format!("request_id={made}"), timeout)
        .await;

    // The client side is counted under the grpc-ecosystem names too.
    let text = metrics(web.admin).await;
    assert_eq!(
        value(
            &text,
            &[
                "grpc_client_handled_total{",
                r#"grpc_method="Recommend""#,
                r#"grpc_code="OK""#
            ]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &[
                "grpc_client_started_total{",
                r#"grpc_service="Recommendations""#
            ]
        ),
        2.0
    );
    assert!(text.contains("grpc_client_handling_seconds_bucket{"));
    assert!(text.contains(r#"http_requests_total{method="GET",route="/",status="200"} 2"#));
}

#[tokio::test]
async fn with_the_backend_down_pages_say_so_quickly_and_recover_without_a_restart() {
    let pki = TestPki::new();
    // A free port for the backend that is not there yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let backend = SocketAddr::from(([127, 0, 0, 1], port));
    let web = start_marketplace(
        &pki,
        backend,
        &[("RECOMMENDATIONS_TIMEOUT_MS", "500".to_owned())],
    )
    .await;

    for path in ["/", "/api/recommendations"] {
        let started = Instant::now();
        let response = get(format!("http://{}{path}", web.addr), &[]).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered in time"
        );
        assert_eq!(response.status(), 503);
        let body = response.text().await.expect("body");
        if path == "/" {
            assert!(body.contains("Recommendations are unavailable"), "{body}");
        } else {
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(json["error"]["code"], "unavailable", "{json}");
        }
    }

    // The failed call's log line says why, down to the operating system's answer.
    let mut web = web;
    let line = web
        .process
        .wait_for_line("cannot reach the service", Duration::from_secs(5))
        .await;
    assert!(
        line.contains("Connection refused") || line.contains("os error 111"),
        "the cause is missing: {line}"
    );

    let (_recommendations, _) = start_recommendations(&pki, &backend.to_string(), &[]).await;
    eventually("recovered", Duration::from_secs(5), async || {
        let status = get(format!("http://{}/", web.addr), &[]).await.status();
        if status == 200 {
            Ok(())
        } else {
            Err(format!("not recovered: {status}"))
        }
    })
    .await;
}

#[tokio::test]
async fn retries_mask_injected_failures_within_a_budget() {
    let pki = TestPki::new();
    let (mut flaky, backend) =
        start_recommendations(&pki, "127.0.0.1:0", &[("FAILURE_RATE", "0.3".to_owned())]).await;
    flaky
        .wait_for_line("FAILURE_RATE is set", Duration::from_secs(5))
        .await;
    let web = start_marketplace(&pki, backend, &[]).await;
    let mut ok = 0;
    for _ in 0..100 {
        if get(format!("http://{}/", web.addr), &[]).await.status() == 200 {
            ok += 1;
        }
    }
    // Without retries about 70 would succeed; with up to two retries about 97.
    assert!(ok >= 88, "only {ok} of 100 pages with retries");
    let text = metrics(web.admin).await;
    let retried = value(
        &text,
        &["bookstore_client_retries_total{", r#"outcome="attempted""#],
    );
    let unavailable = value(
        &text,
        &["grpc_client_handled_total{", r#"grpc_code="Unavailable""#],
    );
    assert!(retried >= 15.0, "{text}");
    assert!(unavailable >= 15.0, "{text}");
}

#[tokio::test]
async fn a_backend_failing_every_call_is_not_hammered_by_retries() {
    let pki = TestPki::new();
    let (_broken, backend) =
        start_recommendations(&pki, "127.0.0.1:0", &[("FAILURE_RATE", "1".to_owned())]).await;
    let web = start_marketplace(&pki, backend, &[]).await;
    let pages = 200;
    for _ in 0..pages {
        let status = get(format!("http://{}/", web.addr), &[]).await.status();
        assert_eq!(status, 503);
    }
    let text = metrics(web.admin).await;
    let calls = value(&text, &["grpc_client_started_total{"]);
    // Two retries each would be 600 calls. The budget allows 20 % more calls than pages, plus
    // a reserve of 5 a second over its 10 s window.
    assert!(calls >= f64::from(pages), "{text}");
    assert!(
        calls <= f64::from(pages) * 1.2 + 50.0 + 5.0,
        "{calls} calls for {pages} pages"
    );
    assert!(
        value(
            &text,
            &[
                "bookstore_client_retries_total{",
                r#"outcome="budget_exhausted""#
            ]
        ) > 0.0,
        "{text}"
    );
}

/// Checks a scrape the way Prometheus and dashboards read it: every series has a `# TYPE` and a
/// `# HELP` (a histogram's `_bucket`, `_sum` and `_count` belong to its name).
fn assert_described(service: &str, text: &str) {
    use std::collections::{BTreeMap, BTreeSet};
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help.insert(rest.split(' ').next().unwrap_or("").to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let name = words.next().unwrap_or("").to_owned();
            types.insert(name, words.next().unwrap_or("").to_owned());
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            samples.insert(name.to_owned());
        }
    }
    for sample in &samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = sample.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(sample);
        assert!(
            types.contains_key(family),
            "{service}: {sample} has no # TYPE"
        );
        assert!(help.contains(family), "{service}: {family} has no # HELP");
    }
    for name in types.keys() {
        assert!(
            samples.iter().any(|s| s.starts_with(name.as_str())),
            "{service}: {name} typed but empty"
        );
    }
}

#[tokio::test]
async fn every_series_is_described_and_alerting_counters_start_at_zero() {
    let pki = TestPki::new();
    let (mut recommendations, backend) = start_recommendations(&pki, "127.0.0.1:0", &[]).await;
    let recommendations_admin = recommendations.admin_addr().await;
    let web = start_marketplace(&pki, backend, &[]).await;

    // Before any page: the retry outcomes an alert watches with increase() already exist.
    let fresh = metrics(web.admin).await;
    let mut at_zero: Vec<String> = ["attempted", "budget_exhausted", "past_deadline"]
        .iter()
        .map(|outcome| format!("bookstore_client_retries_total{{outcome=\"{outcome}\"}} 0\n"))
        .collect();
    at_zero.extend(
        [
            "bookstore_requests_shed_total 0\n",
            "bookstore_client_queue_rejected_total{reason=\"full\"} 0\n",
            "bookstore_client_queue_rejected_total{reason=\"wait\"} 0\n",
            "bookstore_tls_reloads_total{outcome=\"refused\"} 0\n",
            "http_requests_total{method=\"GET\",route=\"/\",status=\"503\"} 0\n",
            "http_requests_total{method=\"GET\",route=\"/api/recommendations\",status=\"500\"} 0\n",
        ]
        .map(str::to_owned),
    );
    let recommend = r#"grpc_type="unary",grpc_service="Recommendations",grpc_method="Recommend""#;
    // The client's series are per recommendations address.
    at_zero.push(format!(
        "grpc_client_handled_total{{addr=\"{backend}\",{recommend},grpc_code=\"Unavailable\"}} 0\n"
    ));
    for line in &at_zero {
        assert!(
            fresh.contains(line.as_str()),
            "{line} missing from:\n{fresh}"
        );
    }
    let served = metrics(recommendations_admin).await;
    for code in ["OK", "Internal", "ResourceExhausted", "Unavailable"] {
        let line = format!("grpc_server_handled_total{{{recommend},grpc_code=\"{code}\"}} 0\n");
        assert!(served.contains(&line), "{line} missing from:\n{served}");
    }

    for _ in 0..3 {
        assert_eq!(
            get(format!("http://{}/", web.addr), &[]).await.status(),
            200
        );
    }
    for (service, admin) in [
        ("marketplace", web.admin),
        ("recommendations", recommendations_admin),
    ] {
        let text = metrics(admin).await;
        assert_described(service, &text);
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{service}: {name} missing:\n{text}"
            );
        }
        let rss = value(&text, &["process_resident_memory_bytes"]);
        assert!(rss > 1e6 && rss < 1e9, "{service}: resident memory {rss}");
    }
}

/// A build without trace export, asked for it by the standard variable, says so once and
/// serves as usual.
#[cfg(not(feature = "otel"))]
#[tokio::test]
async fn a_build_without_trace_export_says_so_when_asked_for_it() {
    let pki = TestPki::new();
    let (_recommendations, backend) = start_recommendations(&pki, "127.0.0.1:0", &[]).await;
    let mut web = start_marketplace(
        &pki,
        backend,
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317".to_owned(),
        )],
    )
    .await;
    let line = web
        .process
        .wait_for_line("this build has no trace export", Duration::from_secs(5))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        get(format!("http://{}/", web.addr), &[]).await.status(),
        200
    );
    let warnings = web
        .process
        .read_available()
        .iter()
        .filter(|l| l.contains("no trace export"))
        .count();
    assert_eq!(warnings, 1, "one warning, not one per page");
}

/// With `LOG_FORMAT=json`, every line both services write through pages, a 404, failed and
/// retried calls, a backend going away and a shutdown is one JSON object with each key once,
/// named with its service; each request's and call's line carries its trace and span ids.
#[tokio::test]
async fn every_json_log_line_of_both_services_has_each_key_once() {
    let pki = TestPki::new();
    let json = ("LOG_FORMAT", "json".to_owned());
    let every = ("LOG_SAMPLE", "1".to_owned());
    let (recommendations, backend) = start_recommendations(
        &pki,
        "127.0.0.1:0",
        &[
            json.clone(),
            every.clone(),
            ("FAILURE_RATE", "0.5".to_owned()),
        ],
    )
    .await;
    let mut web = start_marketplace(
        &pki,
        backend,
        &[
            json,
            every,
            ("RUST_LOG", "debug,h2=info,hyper=info,tower=info".to_owned()),
        ],
    )
    .await;
    for path in [
        "/",
        "/",
        "/",
        "/nowhere",
        "/api/recommendations?category=mystery",
    ] {
        get(format!("http://{}{path}", web.addr), &[]).await;
    }
    recommendations.signal("TERM");
    let (_, recommendations_log) = recommendations.wait(Duration::from_secs(40)).await;
    get(format!("http://{}/", web.addr), &[]).await; // the backend is gone
    web.process
        .wait_for_line("cannot reach the service", Duration::from_secs(5))
        .await;
    web.process.signal("TERM");
    let (_, web_log) = web.process.wait(Duration::from_secs(40)).await;
    for (service, log, needles) in [
        (
            "recommendations",
            &recommendations_log,
            &["\"gRPC call\"", "Shut down gracefully"][..],
        ),
        (
            "marketplace",
            &web_log,
            &["\"HTTP request\"", "\"gRPC call\"", "Shut down gracefully"][..],
        ),
    ] {
        for line in log {
            let event = bookstore_testkit::json_log::parse_line(line);
            assert_eq!(event["service"], service, "{line}");
            let message = event["message"].as_str().unwrap_or_default();
            if ["HTTP request", "gRPC call"].contains(&message) {
                for (id, digits) in [("trace_id", 32), ("span_id", 16)] {
                    let value = event[id].as_str().unwrap_or_default();
                    assert!(
                        value.len() == digits && value.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{id}: {line}"
                    );
                }
            }
        }
        for needle in needles {
            assert!(
                log.iter().any(|l| l.contains(needle)),
                "{service}: no {needle} line was checked"
            );
        }
    }
}

/// Lines of `log` that contain `needle`.
fn count(log: &[String], needle: &str) -> usize {
    log.iter().filter(|l| l.contains(needle)).count()
}

/// Pages served, then the two services stopped: their whole logs.
async fn logs_after_pages(
    pki: &TestPki,
    env: &[(&'static str, String)],
    pages: usize,
    missing: usize,
) -> (Vec<String>, Vec<String>) {
    let (recommendations, backend) = start_recommendations(pki, "127.0.0.1:0", env).await;
    let web = start_marketplace(pki, backend, env).await;
    let client = reqwest::Client::new();
    for _ in 0..pages {
        let page = client.get(format!("http://{}/", web.addr)).send().await;
        assert_eq!(page.expect("page").status(), 200);
    }
    for _ in 0..missing {
        let page = client
            .get(format!("http://{}/nowhere", web.addr))
            .send()
            .await;
        assert_eq!(page.expect("page").status(), 404);
    }
    web.process.signal("TERM");
    let (_, web_log) = web.process.wait(Duration::from_secs(40)).await;
    recommendations.signal("TERM");
    let (_, recommendations_log) = recommendations.wait(Duration::from_secs(40)).await;
    (web_log, recommendations_log)
}

/// By default a request or call gets its own line when it fails or is slow, and one in 100 of
/// the rest does (the first included; a 404 counts as the rest too, so a scanner cannot fill a
/// disk); `LOG_SAMPLE=1` gives every one its line, and a slow one is logged whatever the sample.
#[tokio::test]
async fn failed_slow_and_one_in_a_hundred_requests_get_a_line_by_default() {
    let pki = TestPki::new();
    let (web, recommendations) = logs_after_pages(&pki, &[], 250, 4).await;
    // Requests 1, 101 and 201 (all pages; the 404s are 251 to 254).
    assert_eq!(count(&web, "HTTP request method="), 3, "{web:#?}");
    assert_eq!(count(&web, "status=404"), 0);
    // Calls 1, 101 and 201.
    assert_eq!(
        count(&recommendations, "gRPC call side="),
        3,
        "{recommendations:#?}"
    );

    let every = [("LOG_SAMPLE", "1".to_owned())];
    let (web, recommendations) = logs_after_pages(&pki, &every, 250, 4).await;
    assert_eq!(count(&web, "HTTP request method="), 254);
    assert_eq!(count(&recommendations, "gRPC call side="), 250);

    let slow_only = [
        ("LOG_SAMPLE", "0".to_owned()),
        ("LOG_SLOW_MS", "20".to_owned()),
        ("ARTIFICIAL_DELAY_MS", "25".to_owned()),
    ];
    let (web, recommendations) = logs_after_pages(&pki, &slow_only, 5, 0).await;
    assert_eq!(count(&web, "HTTP request method="), 5, "{web:#?}");
    assert_eq!(count(&recommendations, "gRPC call side="), 5);
}
