//! The recommendations binary as a real process: start-up failures and the SIGTERM drain.

use std::time::{Duration, Instant};

use bookstore_proto::{BookCategory, RecommendationRequest};
use bookstore_testkit::{TestPki, mystery, process::ServiceProcess, raw, trusted_client};

fn env(pki: &TestPki) -> Vec<(&'static str, String)> {
    vec![
        ("LISTEN_ADDR", "127.0.0.1:0".into()),
        ("CERTS_DIR", pki.dir().display().to_string()),
    ]
}

/// Runs the binary expecting it to refuse to start; returns its log.
async fn refused_start(env: &[(&str, String)]) -> Vec<String> {
    let process = ServiceProcess::start("recommendations", env);
    let (status, log) = process.wait(Duration::from_secs(20)).await;
    assert!(
        !status.success(),
        "it started anyway; log:\n{}",
        log.join("\n")
    );
    log
}

#[tokio::test]
async fn a_missing_certificate_stops_start_up_with_one_line_naming_it() {
    let pki = TestPki::new();
    std::fs::remove_file(pki.dir().join("server.pem")).expect("rm");
    let log = refused_start(&env(&pki)).await;
    let errors: Vec<_> = log.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log:?}");
    assert!(errors[0].contains("server.pem: cannot read"), "{log:?}");
}

#[tokio::test]
async fn a_key_that_does_not_match_stops_start_up() {
    let pki = TestPki::new();
    std::fs::copy(pki.dir().join("client.key"), pki.dir().join("server.key")).expect("cp");
    let log = refused_start(&env(&pki)).await;
    assert!(
        log.iter()
            .any(|l| l.contains("server.key: private key does not match the certificate")),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_bad_catalog_file_stops_start_up_naming_the_file_and_problem() {
    let pki = TestPki::new();
    let path = pki.dir().join("books.json");
    std::fs::write(
        &path,
        r#"{"books":[{"id":1,"category":"MYSTERY","title":""}]}"#,
    )
    .expect("write");
    let mut env = env(&pki);
    env.push(("CATALOG_PATH", path.display().to_string()));
    let log = refused_start(&env).await;
    let want = format!(
        "catalog file {}: book id 1: title must not be empty",
        path.display()
    );
    assert!(log.iter().any(|l| l.contains(&want)), "{log:?}");
}

#[tokio::test]
async fn weak_tls_modes_and_fault_injection_are_warned_about() {
    let pki = TestPki::new();
    let mut env = env(&pki);
    env.push(("TLS_MODE", "off".into()));
    env.push(("ARTIFICIAL_DELAY_MS", "5".into()));
    let mut process = ServiceProcess::start("recommendations", &env);
    process.listening_addr().await;
    process
        .wait_for_line("TLS is off", Duration::from_secs(5))
        .await;
    process
        .wait_for_line("ARTIFICIAL_DELAY_MS is set", Duration::from_secs(5))
        .await;
}

/// SIGTERM while slow calls are in flight: every call completes, new connections are refused at
/// once, and the process exits 0 well within the grace period.
#[tokio::test]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    let pki = TestPki::new();
    let mut env = env(&pki);
    env.push(("ARTIFICIAL_DELAY_MS", "2000".into()));
    env.push(("SHUTDOWN_GRACE_SECS", "20".into()));
    let mut process = ServiceProcess::start("recommendations", &env);
    let addr = process.listening_addr().await;

    let client = trusted_client(addr, &pki);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.recommend(RecommendationRequest {
                    user_id: 1,
                    category: BookCategory::Mystery as i32,
                    max_results: 2,
                })
                .await
            })
        })
        .collect();
    // Once all three have started, they are waiting out their 2 s delay on the server.
    let admin = process.admin_addr().await;
    raw::until_metric(
        admin,
        &["grpc_server_started_total", "grpc_method=\"Recommend\""],
        3.0,
        Duration::from_secs(10),
    )
    .await;

    let signalled = Instant::now();
    process.signal("TERM");
    process
        .wait_for_line("Stopped accepting new connections", Duration::from_secs(5))
        .await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during the drain: {:?}",
        process.log_so_far()
    );

    for call in calls {
        let reply = call.await.expect("task").expect("an in-flight call failed");
        assert_eq!(reply.into_inner().recommendations.len(), 2);
    }
    let (status, log) = process.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("Shut down gracefully")),
        "{log:?}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_refused_caller_is_logged_by_identity() {
    let pki = TestPki::new();
    let mut process = ServiceProcess::start("recommendations", &env(&pki));
    let addr = process.listening_addr().await;
    let intruder = pki
        .pki
        .ca
        .issue(
            "intruder",
            &["intruder.example"],
            bookstore_certs::Usage::Client,
        )
        .expect("cert");
    let status = bookstore_testkit::grpc_client(
        addr,
        pki.ca_certificate(),
        Some(bookstore_testkit::identity(&intruder)),
        "localhost",
    )
    .recommend(mystery())
    .await
    .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let line = process
        .wait_for_line("not in ALLOWED_CLIENTS", Duration::from_secs(5))
        .await;
    assert!(line.contains("intruder.example"), "{line}");
    assert!(line.contains("/Recommendations/Recommend"), "{line}");
}

#[tokio::test]
async fn an_empty_allow_list_stops_start_up() {
    let pki = TestPki::new();
    let mut env = env(&pki);
    env.push(("ALLOWED_CLIENTS", ",".into()));
    let log = refused_start(&env).await;
    assert!(
        log.iter().any(|l| l.contains("ALLOWED_CLIENTS is empty")),
        "{log:?}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_private_key_readable_by_others_is_warned_about_without_its_contents() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::new();
    let key = pki.dir().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut process = ServiceProcess::start("recommendations", &env(&pki));
    process.listening_addr().await;
    let line = process
        .wait_for_line("readable by others", Duration::from_secs(5))
        .await;
    assert!(
        line.contains("server.key") && line.contains("WARN"),
        "{line}"
    );
    let key_body = std::fs::read_to_string(&key).expect("read");
    let key_line = key_body.lines().nth(1).expect("a PEM body line");
    assert!(
        process.log_so_far().iter().all(|l| !l.contains(key_line)),
        "key material reached the log"
    );
}

#[tokio::test]
async fn sighup_reloads_the_certificates_at_once() {
    let pki = TestPki::new();
    let mut env = env(&pki);
    env.push(("TLS_RELOAD_SECS", "3600".into())); // polling out of the picture
    let mut process = ServiceProcess::start("recommendations", &env);
    let addr = process.listening_addr().await;
    let renewed = pki
        .pki
        .ca
        .issue(
            "recommendations",
            &["localhost"],
            bookstore_certs::Usage::Server,
        )
        .expect("cert");
    pki.write("server", &renewed);
    process.signal("HUP");
    process
        .wait_for_line("TLS certificates reloaded", Duration::from_secs(5))
        .await;
    trusted_client(addr, &pki)
        .recommend(mystery())
        .await
        .expect("served with the new certificate");
    assert!(
        process
            .log_so_far()
            .iter()
            .all(|l| !l.contains("Received shutdown signal")),
        "SIGHUP must not stop the service"
    );
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let pki = TestPki::new();
    let mut env = env(&pki);
    env.push(("LOG_FORMAT", "json".into()));
    let mut process = ServiceProcess::start("recommendations", &env);
    let line = process
        .wait_for_line("recommendations listening", Duration::from_secs(20))
        .await;
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["level"], "INFO", "{event}");
    assert_eq!(event["message"], "recommendations listening", "{event}");
    let addr: std::net::SocketAddr = event["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("an address");
    trusted_client(addr, &pki)
        .recommend(mystery())
        .await
        .expect("served");
    process.signal("TERM");
    let (status, log) = process.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    for line in &log {
        bookstore_testkit::json_log::parse_line(line);
    }
    assert!(
        log.iter().any(|l| l.contains("\"gRPC call\"")),
        "the call's own line was checked too: {log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("\"Shut down gracefully\"")),
        "{log:?}"
    );
}
