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
    time::Duration,
};

use bookstore_certs::{Authority, Usage};
use bookstore_proto::RecommendationRequest;
use bookstore_testkit::{
    TestPki, eventually, grpc_client, identity, marketplace_config, raw, recommendations_config,
    spawn_marketplace, spawn_recommendations,
};

/// How long a reload may take: the reload contract.
const RELOAD: Duration = Duration::from_secs(15);

/// Whether a new connection presenting `client`, and verifying the server with `trust`, gets a
/// call through.
/// Pages fetched one after another until [`PageLoad::finish`], counting those not answered 200.
struct PageLoad {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PageLoad {
    fn start(web: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (pages, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = {
            let (stop, pages, failures) = (stop.clone(), pages.clone(), failures.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    pages.fetch_add(1, Ordering::Relaxed);
                    match http.get(format!("http://{web}/")).send().await {
                        Ok(r) if r.status() == 200 => {}
                        other => {
                            eprintln!("page: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        PageLoad {
            stop,
            pages,
            failures,
            task,
        }
    }

    /// Pages requested so far.
    fn pages(&self) -> usize {
        self.pages.load(Ordering::Relaxed)
    }

    /// Stops the load; the pages requested, and how many failed.
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load");
        (
            self.pages.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Stops recommendations and starts it again on the same address with `config`, which forces
/// new handshakes; waits until the marketplace at `web` serves a page again.
async fn restart_then_page(
    server: bookstore_testkit::Running,
    mut config: recommendations::config::Config,
    web: SocketAddr,
    what: &str,
) {
    let addr = server.addr;
    server.stop().await;
    config.listen_addr = addr;
    let _restarted = spawn_recommendations(&config).await;
    let http = reqwest::Client::new();
    eventually(what, RELOAD, async || {
        matches!(http.get(format!("http://{web}/")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
}

async fn accepts(
    addr: SocketAddr,
    trust: tonic::transport::Certificate,
    client: &bookstore_certs::Issued,
) -> bool {
    grpc_client(addr, trust, Some(identity(client)), "localhost")
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
    server_config.service.tls.ca_file = Some(trust.clone());
    let server = spawn_recommendations(&server_config).await;
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), server.addr)).await;
    let web = marketplace.addr;

    let load = PageLoad::start(web);

    // 1. The server trusts both CAs.
    let new_client = new_ca
        .issue("marketplace", &["marketplace"], Usage::Client)
        .expect("cert");
    std::fs::write(
        &trust,
        format!("{}{}", old_ca.issued().cert_pem, new_ca.issued().cert_pem),
    )
    .expect("write");
    eventually("server trusts the new CA", RELOAD, async || {
        accepts(server.addr, pki.ca_certificate(), &new_client).await
    })
    .await;

    // 2. The marketplace gets its certificate from the new CA.
    pki.write("client", &new_client);
    let pages_before_switch = load.pages();

    // 3. Once the marketplace has taken its new files, the server drops the old CA: only the new
    // client certificate works from here.
    eventually(
        "the marketplace reloads its certificate",
        RELOAD,
        async || {
            let metrics = raw::scrape(marketplace.admin_addr).await;
            raw::metric(
                &metrics,
                &["bookstore_tls_reloads_total", "outcome=\"reloaded\""],
            ) >= 1.0
        },
    )
    .await;
    std::fs::write(&trust, &new_ca.issued().cert_pem).expect("write");
    let old_client = pki.pki.client.clone();
    eventually("server drops the old CA", RELOAD, async || {
        !accepts(server.addr, pki.ca_certificate(), &old_client).await
    })
    .await;
    let pages_at_cutover = load.pages();
    eventually("pages after the old CA was dropped", RELOAD, async || {
        load.pages() > pages_at_cutover + 10
    })
    .await;

    let (total, failures) = load.finish().await;
    assert!(
        pages_at_cutover > pages_before_switch,
        "no load during the switch"
    );
    assert!(
        total > pages_at_cutover + 10,
        "too few pages after the old CA was dropped: {total}"
    );
    assert_eq!(failures, 0, "of {total} pages");

    // Open connections are never re-verified, so the pages above could still ride the old
    // connection. A recommendations restart (same address, trusting only the new CA) forces a
    // new handshake: the marketplace, not restarted, gets back in only with its new certificate.
    restart_then_page(
        server,
        server_config,
        web,
        "the marketplace reconnects with its new identity",
    )
    .await;
}

/// Both services' successful TLS reloads so far.
async fn reloads(admin: SocketAddr) -> f64 {
    let text = bookstore_testkit::raw::scrape(admin).await;
    bookstore_testkit::raw::metric(
        &text,
        &["bookstore_tls_reloads_total", "outcome=\"reloaded\""],
    )
}

/// The CA renewed with a new key while both services run, the way an operator (or a CA that
/// rotates its key) does it: every `ca.pem` first holds the old and the new CA (plus an expired
/// CA, which is skipped), then each leaf is re-issued by the new CA, then the old CA leaves the
/// bundle. Both services share the files and reload them; the marketplace reconnects on each
/// of its reloads, so every phase is crossed by fresh handshakes. Zero failed pages throughout,
/// and a final restart of recommendations shows the pair handshakes on the new CA alone.
#[tokio::test]
async fn a_ca_renewed_with_a_new_key_fails_no_page_through_the_overlap_and_after() {
    use time::{Duration as Days, OffsetDateTime};
    let now = OffsetDateTime::now_utc();
    let pki = TestPki::new();
    let old_ca = &pki.pki.ca;
    let new_ca =
        Authority::valid("Bookstore CA, renewed", now, now + Days::days(4000)).expect("ca");
    let expired_ca = Authority::valid(
        "Bookstore CA, long gone",
        now - Days::days(800),
        now - Days::days(1),
    )
    .expect("ca");
    let ca_file = pki.dir().join("ca.pem");
    let server_config = recommendations_config(pki.dir());
    let server = spawn_recommendations(&server_config).await;
    let marketplace = spawn_marketplace(&marketplace_config(pki.dir(), server.addr)).await;
    let web = marketplace.addr;

    let load = PageLoad::start(web);
    // Waits until each service has reloaded `want` times, then for some pages on top.
    let phase = async |what: &str, server_reloads: f64, marketplace_reloads: f64| {
        eventually(what, RELOAD, async || {
            reloads(server.admin_addr).await >= server_reloads
                && reloads(marketplace.admin_addr).await >= marketplace_reloads
        })
        .await;
        let seen = load.pages();
        eventually("pages after the reload", RELOAD, async || {
            load.pages() > seen + 20
        })
        .await;
    };

    // 1. The overlap: every service trusts the old and the new CA.
    std::fs::write(
        &ca_file,
        [expired_ca.issued(), old_ca.issued(), new_ca.issued()]
            .map(|ca| ca.cert_pem.as_str())
            .concat(),
    )
    .expect("write");
    phase("both trust old and new", 1.0, 1.0).await;

    // 2. and 3. Each leaf is re-issued by the new CA: first the server's, then the client's
    // (the marketplace reconnects, verifying the new server certificate and presenting its own).
    let leaf_until = now + Days::days(90);
    let server_leaf = new_ca
        .issue_valid(
            "recommendations",
            bookstore_certs::SERVER_NAMES,
            Usage::Server,
            now,
            leaf_until,
        )
        .expect("cert");
    pki.write("server", &server_leaf);
    phase("the server's new certificate", 2.0, 1.0).await;
    let client_leaf = new_ca
        .issue_valid(
            "marketplace",
            &["marketplace"],
            Usage::Client,
            now,
            leaf_until,
        )
        .expect("cert");
    pki.write("client", &client_leaf);
    phase("the marketplace's new certificate", 2.0, 2.0).await;

    // 4. The old CA leaves every bundle.
    std::fs::write(&ca_file, &new_ca.issued().cert_pem).expect("write");
    phase("only the new CA", 3.0, 3.0).await;
    let new_trust = || tonic::transport::Certificate::from_pem(&new_ca.issued().cert_pem);
    assert!(
        accepts(server.addr, new_trust(), &client_leaf).await,
        "the new client certificate"
    );
    assert!(
        !accepts(server.addr, new_trust(), &pki.pki.client).await,
        "the old CA's client certificate must no longer be accepted"
    );
    let metrics = bookstore_testkit::raw::scrape(marketplace.admin_addr).await;
    let identity = bookstore_testkit::raw::metric(
        &metrics,
        &[
            "bookstore_tls_certificate_expiry_timestamp_seconds",
            "identity",
        ],
    );
    assert_eq!(identity, leaf_until.unix_timestamp() as f64, "{metrics}");

    let (total, failures) = load.finish().await;
    assert_eq!(failures, 0, "of {total} pages");

    // New handshakes on both sides with only the new CA: a restarted recommendations.
    restart_then_page(
        server,
        server_config,
        web,
        "pages after a restart on the new CA alone",
    )
    .await;
}
