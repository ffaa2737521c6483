//! The whole stack as real processes: both binaries, a real PKI on disk, mutual TLS between them,
//! a real HTTP client, and real signals.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bookstore_testkit::{
    TestPki,
    process::{self, ServiceProcess},
    raw,
};

async fn start_recommendations(
    pki: &TestPki,
    extra: &[(&'static str, String)],
) -> (ServiceProcess, SocketAddr) {
    process::start_recommendations(pki.dir(), extra).await
}

async fn start_marketplace(
    pki: &TestPki,
    backend: SocketAddr,
    extra: &[(&'static str, String)],
) -> (ServiceProcess, SocketAddr) {
    process::start_marketplace(pki.dir(), backend, extra).await
}

async fn fetch(addr: SocketAddr, path: &str) -> reqwest::Result<(u16, String)> {
    let response = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

#[tokio::test]
async fn the_page_is_served_by_both_binaries_over_mutual_tls() {
    let pki = TestPki::new();
    let (_recommendations, backend) = start_recommendations(&pki, &[]).await;
    // `localhost` resolves to ::1 and 127.0.0.1; the server certificate names all three.
    let (_marketplace, web) = start_marketplace(&pki, backend, &[]).await;

    let (status, body) = fetch(web, "/").await.expect("page");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<title>Online Books For You</title>"));
    assert!(body.contains("<h1>Mystery books you may like</h1>"));
    assert_eq!(body.matches("<li>").count(), 3, "{body}");

    let (status, body) = fetch(web, "/?category=self_help").await.expect("page");
    assert_eq!(status, 200);
    assert!(
        body.contains("Man&#39;s Search for Meaning") || body.contains("How to Win Friends"),
        "{body}"
    );
}

/// SIGTERM to the marketplace while slow pages are in flight: each page still arrives complete,
/// new connections are refused, and the process exits 0 within the grace period. SIGINT (Ctrl+C)
/// stops the recommendations service the same way.
#[tokio::test]
async fn sigterm_lets_in_flight_pages_finish_and_sigint_stops_recommendations() {
    let pki = TestPki::new();
    let (recommendations, backend) =
        start_recommendations(&pki, &[("ARTIFICIAL_DELAY_MS", "2000".into())]).await;
    let (mut marketplace, web) = start_marketplace(
        &pki,
        backend,
        &[
            ("RECOMMENDATIONS_TIMEOUT_MS", "10000".into()),
            ("SHUTDOWN_GRACE_SECS", "20".into()),
        ],
    )
    .await;

    let pages: Vec<_> = (0..3).map(|_| tokio::spawn(fetch(web, "/"))).collect();
    // Once all three have called the backend, they wait on its 2 s delay.
    let admin = marketplace.admin_addr().await;
    raw::until_metric(
        admin,
        &["bookstore_backend_calls_total"],
        3.0,
        Duration::from_secs(10),
    )
    .await;
    let signalled = Instant::now();
    marketplace.signal("TERM");
    marketplace
        .wait_for_line("Stopped accepting new connections", Duration::from_secs(5))
        .await;
    assert!(
        tokio::net::TcpStream::connect(web).await.is_err(),
        "a new connection was accepted during the drain: {:?}",
        marketplace.log_so_far()
    );
    for page in pages {
        let (status, body) = page.await.expect("task").expect("an in-flight page failed");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.matches("<li>").count(), 3);
    }
    let (status, log) = marketplace.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("Shut down gracefully")),
        "{log:?}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(20));

    recommendations.signal("INT");
    let (status, log) = recommendations.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("Received shutdown signal")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("Shut down gracefully")),
        "{log:?}"
    );
}

/// The PKI from `certs/openssl-dev-pki.sh` (standard openssl, the documented alternative to
/// `cargo xtask certs`) works for both services. Needs the `openssl` command (CI installs it).
#[tokio::test]
async fn certificates_made_with_openssl_work_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("pki");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs/openssl-dev-pki.sh");
    let made = std::process::Command::new("sh")
        .arg(&script)
        .arg(&out)
        .output()
        .expect("run the openssl script (is `openssl` installed?)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let certs = ("CERTS_DIR", out.display().to_string());
    let mut recommendations = ServiceProcess::start(
        "recommendations",
        &[("LISTEN_ADDR", "127.0.0.1:0".into()), certs.clone()],
    );
    let backend = recommendations.listening_addr().await;
    let mut marketplace = ServiceProcess::start(
        "marketplace",
        &[
            ("LISTEN_ADDR", "127.0.0.1:0".into()),
            ("RECOMMENDATIONS_HOST", "127.0.0.1".into()),
            ("RECOMMENDATIONS_PORT", backend.port().to_string()),
            certs,
        ],
    );
    let web = marketplace.listening_addr().await;
    let (status, body) = fetch(web, "/").await.expect("page");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.matches("<li>").count(), 3, "{body}");
}

/// A broken client file set (here a key that is not a key) is refused by the marketplace's
/// reload, which says so in its log, and pages keep working with the certificates in use.
#[tokio::test]
async fn the_marketplace_ignores_a_broken_certificate_rotation() {
    let pki = TestPki::new();
    let (_recommendations, backend) = start_recommendations(&pki, &[]).await;
    let (mut marketplace, web) =
        start_marketplace(&pki, backend, &[("TLS_RELOAD_SECS", "1".into())]).await;
    assert_eq!(fetch(web, "/").await.expect("page").0, 200);

    std::fs::write(pki.dir().join("client.key"), "not a key\n").expect("write");
    let line = marketplace
        .wait_for_line("new TLS files refused", Duration::from_secs(10))
        .await;
    assert!(line.contains("client.key"), "{line}");
    let (status, body) = fetch(web, "/").await.expect("page");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn sighup_makes_the_marketplace_reload_its_certificates_at_once() {
    let pki = TestPki::new();
    let (_recommendations, backend) = start_recommendations(&pki, &[]).await;
    let (mut marketplace, web) =
        start_marketplace(&pki, backend, &[("TLS_RELOAD_SECS", "3600".into())]).await;
    let renewed = pki
        .pki
        .ca
        .issue(
            "marketplace",
            &["marketplace"],
            bookstore_certs::Usage::Client,
        )
        .expect("cert");
    pki.write("client", &renewed);
    marketplace.signal("HUP");
    marketplace
        .wait_for_line("TLS certificates reloaded", Duration::from_secs(5))
        .await;
    let (status, body) = fetch(web, "/").await.expect("page");
    assert_eq!(status, 200, "{body}");
}

/// Markup in a catalog title reaches the browser as text, through the real services.
#[tokio::test]
async fn a_catalog_title_with_markup_is_shown_as_text() {
    let pki = TestPki::new();
    let catalog = pki.dir().join("books.json");
    std::fs::write(
        &catalog,
        r#"{"books":[{"id":1,"category":"MYSTERY","title":"<img src=x onerror=alert(1)> & <b>Co</b>"}]}"#,
    )
    .expect("write");
    let (_recommendations, backend) =
        start_recommendations(&pki, &[("CATALOG_PATH", catalog.display().to_string())]).await;
    let (_marketplace, web) = start_marketplace(&pki, backend, &[]).await;
    let (status, body) = fetch(web, "/").await.expect("page");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("<img") && !body.contains("<b>"), "{body}");
    assert!(
        body.contains(
            "<li>&#60;img src=x onerror=alert(1)&#62; &#38; &#60;b&#62;Co&#60;/b&#62;</li>"
        ),
        "{body}"
    );
}

/// New settings are checked at start-up: a bad value stops it with one line naming it.
#[tokio::test]
async fn bad_admission_and_backend_settings_stop_start_up_with_one_line() {
    let pki = TestPki::new();
    let backend = SocketAddr::from(([127, 0, 0, 1], 9));
    for (setting, value, says) in [
        (
            "MAX_HEAD_BYTES_TOTAL",
            "10000",
            "MAX_HEAD_BYTES_TOTAL (10000) is below MAX_HEAD_BYTES",
        ),
        (
            "RECOMMENDATIONS_ADDRS",
            "127.0.0.2:50051,nowhere",
            "nowhere",
        ),
    ] {
        let env = process::marketplace_env(pki.dir(), backend, &[(setting, value.into())]);
        let started = ServiceProcess::start("marketplace", &env);
        let (status, log) = started.wait(Duration::from_secs(20)).await;
        assert!(!status.success(), "{setting}={value}: it started anyway");
        let errors: Vec<_> = log
            .iter()
            .filter(|l| l.contains("error") || l.contains("ERROR"))
            .collect();
        assert!(
            errors.iter().any(|l| l.contains(says)),
            "{setting}={value}: {log:?}"
        );
        assert_eq!(errors.len(), 1, "{setting}={value}: {log:?}");
    }
}
