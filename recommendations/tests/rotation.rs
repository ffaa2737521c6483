//! Certificate rotation without restart, under continuous load; renewals refused or early.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bookstore_certs::Usage;
use bookstore_common::tls::CLOCK_LEEWAY;
use bookstore_testkit::{
    TestPki, eventually,
    process::{self, ServiceProcess},
    raw, recommendations_config, spawn_recommendations,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

/// The certificate the server presents to a new connection now.
async fn served_certificate(addr: SocketAddr, pki: &TestPki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.pki.ca.issued().cert_pem.as_bytes()).expect("pem"))
        .expect("root");
    let chain =
        vec![CertificateDer::from_pem_slice(pki.pki.client.cert_pem.as_bytes()).expect("pem")];
    let key = PrivateKeyDer::from_pem_slice(pki.pki.client.key_pem.as_bytes()).expect("pem");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

#[tokio::test]
async fn the_server_certificate_rotates_under_load_and_a_bad_set_is_ignored() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let addr = server.addr;
    let before = served_certificate(addr, &pki).await;

    // Continuous load: calls on one long-lived connection, plus a new connection every tenth
    // call so handshakes happen throughout the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let (ca, client) = (pki.ca_certificate(), pki.client_identity());
        tokio::spawn(async move {
            let fresh = || {
                bookstore_testkit::grpc_client(addr, ca.clone(), Some(client.clone()), "localhost")
            };
            let mut long_lived = fresh();
            while !stop.load(Ordering::Relaxed) {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                let mut client = if n % 10 == 0 {
                    fresh()
                } else {
                    long_lived.clone()
                };
                if let Err(status) = client.recommend(bookstore_testkit::mystery()).await {
                    eprintln!("call {n} failed: {status:?}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                if n % 100 == 0 {
                    long_lived = fresh();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Rotate: a new key and certificate from the same CA, written the way a Secret update or
    // `cp` does (certificate first, then key: for a moment they do not match).
    let renewed = pki
        .pki
        .ca
        .issue("recommendations", &["localhost"], Usage::Server)
        .expect("cert");
    pki.write("server", &renewed);
    let after = eventually(
        "the new certificate picked up",
        Duration::from_secs(15),
        async || {
            let served = served_certificate(addr, &pki).await;
            (served != before).then_some(served)
        },
    )
    .await;
    let renewed_der = CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).expect("pem");
    assert_eq!(after, renewed_der.to_vec());

    // A broken set (a truncated certificate) is refused; the renewed certificate stays in use.
    let refused = async || {
        let metrics = raw::scrape(server.admin_addr).await;
        raw::metric(
            &metrics,
            &["bookstore_tls_reloads_total", "outcome=\"refused\""],
        )
    };
    let refused_before = refused().await;
    std::fs::write(
        pki.dir().join("server.pem"),
        &renewed.cert_pem[..renewed.cert_pem.len() / 2],
    )
    .expect("write");
    eventually(
        "the broken set refused",
        Duration::from_secs(15),
        async || refused().await > refused_before,
    )
    .await;
    assert_eq!(served_certificate(addr, &pki).await, after);

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    let calls = calls.load(Ordering::Relaxed);
    assert!(
        calls > 50,
        "too little load to mean anything: {calls} calls"
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {calls} calls");
}

/// How many lines of `server`'s log so far contain `needle`.
fn lines_with(server: &mut ServiceProcess, needle: &str) -> usize {
    server
        .read_available()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// The refusal series: `bookstore_tls_reloads_total{outcome="refused"}` and the
/// `bookstore_tls_reload_refused` gauge.
async fn refusals(admin: SocketAddr) -> (f64, f64) {
    let text = raw::scrape(admin).await;
    (
        raw::metric(
            &text,
            &["bookstore_tls_reloads_total", "outcome=\"refused\""],
        ),
        raw::metric(&text, &["bookstore_tls_reload_refused "]),
    )
}

/// A server renewal whose certificate starts `ahead` of now, written as a Secret update is.
fn renew_starting_in(pki: &TestPki, ahead: time::Duration) -> Vec<u8> {
    let starts = time::OffsetDateTime::now_utc() + ahead;
    let renewed = pki
        .pki
        .ca
        .issue_valid(
            "recommendations",
            &["localhost"],
            Usage::Server,
            starts,
            starts + time::Duration::days(90),
        )
        .expect("cert");
    pki.write("server", &renewed);
    CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes())
        .expect("pem")
        .to_vec()
}

const WAITED_FOR: &str = "start within the clock leeway";
const REFUSED: &str = "new TLS files refused";

/// A renewal issued where the clock runs two minutes ahead of ours (its certificate starts two
/// minutes from now) is no fault: the real binary keeps serving the certificate in use, says
/// once that it waits, and serves the new one as soon as it has started, with no file changed
/// meanwhile. (Refused outright before, it waited for the next renewal: weeks.)
#[tokio::test]
async fn a_renewal_starting_two_minutes_from_now_is_waited_for_then_served() {
    let pki = TestPki::new();
    let (mut server, addr) =
        process::start_recommendations(pki.dir(), &[("TLS_RELOAD_SECS", "1".into())]).await;
    let admin = server.admin_addr().await;
    let before = served_certificate(addr, &pki).await;

    let starts = time::OffsetDateTime::now_utc() + time::Duration::minutes(2);
    let renewed = renew_starting_in(&pki, time::Duration::minutes(2));
    server
        .wait_for_line(WAITED_FOR, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_certificate(addr, &pki).await, before);
    assert_eq!(refusals(admin).await, (0.0, 0.0), "not a refusal");

    eventually(
        "the renewal served once started",
        Duration::from_secs(150),
        async || served_certificate(addr, &pki).await == renewed,
    )
    .await;
    assert!(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(1) >= starts,
        "served before it started"
    );
    server
        .wait_for_line("TLS certificates reloaded", Duration::from_secs(5))
        .await;
    assert_eq!(
        lines_with(&mut server, WAITED_FOR),
        1,
        "one line, not one per check"
    );
    assert_eq!(refusals(admin).await, (0.0, 0.0));
}

/// A renewal refused for a reason that passes by itself is tried again at every check, with no
/// file changing: here a certificate starting a few seconds past the clock leeway is refused
/// (one warning however many checks; the gauge at 1) until its start comes within the leeway,
/// when the gauge returns to 0 and the server says it waits for it.
#[tokio::test]
async fn a_refused_renewal_is_tried_at_every_check_and_logged_once() {
    let pki = TestPki::new();
    let (mut server, addr) =
        process::start_recommendations(pki.dir(), &[("TLS_RELOAD_SECS", "1".into())]).await;
    let admin = server.admin_addr().await;
    let before = served_certificate(addr, &pki).await;

    let leeway = time::Duration::try_from(CLOCK_LEEWAY).expect("leeway");
    renew_starting_in(&pki, leeway + time::Duration::seconds(5));
    server.wait_for_line(REFUSED, Duration::from_secs(10)).await;
    assert_eq!(refusals(admin).await, (1.0, 1.0));
    server
        .wait_for_line(WAITED_FOR, Duration::from_secs(15))
        .await;
    assert_eq!(
        refusals(admin).await,
        (1.0, 0.0),
        "counted once, and no longer refused"
    );
    assert_eq!(
        lines_with(&mut server, REFUSED),
        1,
        "one warning, not one per check"
    );
    assert_eq!(served_certificate(addr, &pki).await, before);
}
