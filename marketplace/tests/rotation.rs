//! A full CA rotation without restarting either service, under continuous page loads:
//! the server first trusts the old and the new CA, the marketplace switches to a client
//! certificate from the new CA, then the server drops the old CA. Zero failed pages proves the
//! marketplace kept serving; a backend restart at the end proves it presents its new identity.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bookstore_certs::{Authority, Usage};
use bookstore_proto::RecommendationRequest;
use bookstore_testkit::{
    TestPki, grpc_client, identity, marketplace_config, recommendations_config, spawn_marketplace,
    spawn_recommendations,
};

/// Polls `probe` until it returns true, for at most 15 s (the reload contract).
async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !probe().await {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn accepts(addr: SocketAddr, pki: &TestPki, client: &bookstore_certs::Issued) -> bool {
    grpc_client(
        addr,
        pki.ca_certificate(),
        Some(identity(client)),
        "localhost",
    )
    .recommend(RecommendationRequest {
        user_id: 1,
        category: 0,
        max_results: 1,
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_ca_rotation_under_load_fails_no_page() {
    let pki = TestPki::new();
    let old_ca = &pki.pki.ca;
    let new_ca = Authority::new("Bookstore CA, next generation").expect("ca");
    // The server's trust bundle lives in its own file, so it can change apart from the
    // marketplace's `ca.pem` (which keeps verifying the server's certificate).
    let trust = pki.dir().join("server-trust.pem");
    std::fs::write(&trust, &old_ca.issued().cert_pem).expect("write");
    let mut server_config = recommendations_config(pki.dir());
    server_config.tls.ca_file = Some(trust.clone());
    let server = spawn_recommendations(&server_config).await;
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), server.addr)).await;
    let web = marketplace.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let (pages, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, pages, failures) = (stop.clone(), pages.clone(), failures.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                pages.fetch_add(1, Ordering::Relaxed);
                let ok = match http.get(format!("http://{web}/")).send().await {
                    Ok(r) if r.status() == 200 => true,
                    Ok(r) => {
                        eprintln!("page: {}", r.status());
                        false
                    }
                    Err(e) => {
                        eprintln!("page: {e}");
                        false
                    }
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // 1. The server trusts both CAs.
    let new_client = new_ca
        .issue("marketplace", &["marketplace"], Usage::Client)
        .expect("cert");
    std::fs::write(
        &trust,
        format!("{}{}", old_ca.issued().cert_pem, new_ca.issued().cert_pem),
    )
    .expect("write");
    eventually("server trusts the new CA", async || {
        accepts(server.addr, &pki, &new_client).await
    })
    .await;

    // 2. The marketplace gets its certificate from the new CA.
    pki.write("client", &new_client);
    let pages_before_switch = pages.load(Ordering::Relaxed);

    // 3. The server drops the old CA: only the new client certificate works from here.
    tokio::time::sleep(Duration::from_millis(2500)).await; // the marketplace's reload (1 s polls)
    std::fs::write(&trust, &new_ca.issued().cert_pem).expect("write");
    let old_client = pki.pki.client.clone();
    eventually("server drops the old CA", async || {
        !accepts(server.addr, &pki, &old_client).await
    })
    .await;
    let pages_at_cutover = pages.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    let total = pages.load(Ordering::Relaxed);
    assert!(
        pages_at_cutover > pages_before_switch,
        "no load during the switch"
    );
    assert!(
        total > pages_at_cutover + 10,
        "too few pages after the old CA was dropped: {total}"
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} pages");

    // Open connections are never re-verified, so the pages above could still ride the old
    // connection. A recommendations restart (same address, trusting only the new CA) forces a
    // new handshake: the marketplace, not restarted, gets back in only with its new certificate.
    let addr = server.addr;
    server.stop().await;
    server_config.listen_addr = addr;
    let _restarted = spawn_recommendations(&server_config).await;
    let http = reqwest::Client::new();
    eventually("the marketplace reconnects with its new identity", async || {
        matches!(http.get(format!("http://{web}/")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
}
