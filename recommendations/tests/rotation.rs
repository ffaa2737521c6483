//! Certificate rotation without restart, under continuous load.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bookstore_certs::Usage;
use bookstore_proto::{BookCategory, RecommendationRequest};
use bookstore_testkit::{TestPki, raw, recommendations_config, spawn_recommendations};
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
                let request = RecommendationRequest {
                    user_id: 1,
                    category: BookCategory::Mystery as i32,
                    max_results: 1,
                };
                if let Err(status) = client.recommend(request).await {
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
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let served = served_certificate(addr, &pki).await;
        if served != before {
            break served;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
    let deadline = Instant::now() + Duration::from_secs(15);
    while refused().await <= refused_before {
        assert!(
            Instant::now() < deadline,
            "the broken set was not refused within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
