//! Client-side load balancing across several real recommendations processes behind one name.
//!
//! The marketplace runs in this process so the test can play DNS: its resolver answers with a
//! list the test changes, as a headless Service's records change when pods come and go. (The
//! system resolver cannot be pointed at a test's own records here; the DNS path itself is
//! covered by the unit test resolving `localhost`.) Everything else is real: separate processes,
//! mutual TLS, HTTP page loads, SIGKILL.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bookstore_testkit::{
    TestPki, eventually, eventually_every, marketplace_config,
    process::{self, ServiceProcess},
    raw, spawn_marketplace_resolving,
};
use marketplace::backends::Resolve;

/// The records the test publishes.
#[derive(Default)]
struct Records(Mutex<Vec<SocketAddr>>);

impl Records {
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().expect("lock") = addrs;
    }
}

#[async_trait]
impl Resolve for Records {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.lock().expect("lock").clone())
    }
    fn target(&self) -> String {
        "recommendations.test".into()
    }
}

struct Instance {
    process: ServiceProcess,
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn start_instance(pki: &TestPki) -> Instance {
    let (mut process, addr) = process::start_recommendations(pki.dir(), &[]).await;
    let admin = process.admin_addr().await;
    Instance {
        process,
        addr,
        admin,
    }
}

/// Recommend calls this instance answered OK, from its own metrics.
async fn served(instance: &Instance) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", instance.admin))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    text.lines()
        .find(|l| {
            l.starts_with("grpc_server_handled_total{")
                && l.contains(r#"grpc_method="Recommend""#)
                && l.contains(r#"grpc_code="OK""#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The marketplace's `bookstore_backend_*` series, for a failure message.
async fn balancer_view(admin: SocketAddr) -> String {
    let Ok(response) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return "(no metrics)".into();
    };
    backend_lines(&response.text().await.unwrap_or_default())
}

/// The `bookstore_backend_*` series of the marketplace's metrics `text`.
fn backend_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("bookstore_backend_"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn page(addr: SocketAddr) -> u16 {
    match reqwest::get(format!("http://{addr}/")).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn calls_spread_over_instances_survive_a_kill_and_reach_a_new_one() {
    let pki = TestPki::new();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(start_instance(&pki).await);
    }
    let records = Arc::new(Records::default());
    records.set(instances.iter().map(|i| i.addr).collect());
    // Any address of the service must present a certificate for the service's name.
    let config = marketplace_config(pki.dir(), instances[0].addr);
    let web = spawn_marketplace_resolving(&config, records.clone()).await;

    // Spread: 60 pages over three instances.
    for _ in 0..60 {
        assert_eq!(page(web.addr).await, 200);
    }
    for instance in &instances {
        let n = served(instance).await;
        assert!(
            (12..=28).contains(&n),
            "uneven spread: {n} of 60 calls on one instance"
        );
    }

    // Kill one instance outright while pages keep loading from four clients; its address stays
    // published (DNS lags), so the marketplace must route around it by itself.
    let failures = Arc::new(AtomicUsize::new(0));
    let loaded = Arc::new(AtomicUsize::new(0));
    let load_until = Instant::now() + Duration::from_secs(3);
    let served_before = served(&instances[0]).await;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (failures, loaded) = (failures.clone(), loaded.clone());
            let addr = web.addr;
            tokio::spawn(async move {
                while Instant::now() < load_until {
                    let status = page(addr).await;
                    loaded.fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // The one about to be killed is taking calls when it dies.
    raw::until_metric(
        instances[0].admin,
        &[
            "grpc_server_handled_total{",
            r#"grpc_method="Recommend""#,
            r#"grpc_code="OK""#,
        ],
        served_before as f64 + 5.0,
        Duration::from_secs(5),
    )
    .await;
    let killed = instances.remove(0);
    killed.process.signal("KILL");
    for client in clients {
        client.await.expect("load task");
    }
    let loaded = loaded.load(Ordering::Relaxed);
    assert!(loaded > 50, "only {loaded} pages loaded");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "pages failed after an instance was killed ({loaded} loaded)"
    );

    // A new instance appears in the records: it gets traffic within a few resolve intervals.
    let newcomer = start_instance(&pki).await;
    records.set(
        instances
            .iter()
            .map(|i| i.addr)
            .chain([newcomer.addr])
            .collect(),
    );
    eventually(
        "the new instance getting a call",
        Duration::from_secs(10),
        async || {
            assert_eq!(page(web.addr).await, 200);
            served(&newcomer).await > 0
        },
    )
    .await;
}

/// Pages loaded back to back by `clients` clients until `until`: (statuses, when each ended).
async fn load_until(addr: SocketAddr, clients: usize, until: Instant) -> Vec<(Instant, u16)> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    let status = page(addr).await;
                    seen.push((Instant::now(), status));
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load task"));
    }
    all
}

/// One series of the marketplace's for `addr`, e.g. `bookstore_backend_ejected`.
async fn backend_series(admin: SocketAddr, name: &str, addr: SocketAddr) -> f64 {
    series_in(&raw::scrape(admin).await, name, addr)
}

/// [`backend_series`] in metrics `text` already scraped.
fn series_in(text: &str, name: &str, addr: SocketAddr) -> f64 {
    let (name, addr) = (format!("{name}{{"), format!(r#"addr="{addr}""#));
    raw::metric(text, &[&name, &addr])
}

/// Issue 22: one replica frozen (SIGSTOP) took the site down: half the calls went to it and
/// each waited the page's whole deadline (16 pages/s of 4,000, 64 of 143 failed). It now stops
/// getting calls within a few, the pages whose calls it held are answered by the other
/// (hedged), its connection is found dead by the keepalive and the new one's handshake times
/// out, so it is ejected; once it thaws it is probed and takes calls again.
#[tokio::test]
async fn a_frozen_instance_costs_almost_nothing_and_takes_calls_again_after_it_thaws() {
    let pki = TestPki::new();
    let (frozen, healthy) = (start_instance(&pki).await, start_instance(&pki).await);
    let records = Arc::new(Records::default());
    records.set(vec![frozen.addr, healthy.addr]);
    let config = marketplace_config(pki.dir(), frozen.addr);
    let web = spawn_marketplace_resolving(&config, records.clone()).await;
    // Both take calls.
    for _ in 0..20 {
        assert_eq!(page(web.addr).await, 200);
    }
    assert!(served(&frozen).await > 0 && served(&healthy).await > 0);

    let stopped = Instant::now();
    frozen.process.signal("STOP");
    let during = load_until(web.addr, 4, stopped + Duration::from_secs(5)).await;
    let series = |name| backend_series(web.admin_addr, name, frozen.addr);
    let ejected = series("bookstore_backend_ejections_total").await;
    frozen.process.signal("CONT");
    let failed: Vec<_> = during.iter().filter(|(_, s)| *s != 200).collect();
    let late: Vec<_> = failed
        .iter()
        .filter(|(at, _)| at.duration_since(stopped) > Duration::from_secs(2))
        .collect();
    assert!(during.len() > 100, "only {} pages in 5 s", during.len());
    assert!(
        failed.len() * 100 <= during.len(),
        "{} of {} pages failed while an instance was frozen",
        failed.len(),
        during.len()
    );
    assert!(
        late.is_empty(),
        "{} pages failed after the first 2 s",
        late.len()
    );
    assert!(
        ejected >= 1.0,
        "the frozen instance was never ejected:\n{}",
        balancer_view(web.admin_addr).await
    );

    // Thawed: probed and readmitted, then it answers calls sent after that (not only the ones
    // it held while frozen, which it answers as soon as it runs again) within 10 s.
    // Every 20 ms: each look loads a page, the traffic that reaches the thawed instance.
    let mut since_readmitted = None;
    eventually_every(
        "the thawed instance taking a call",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            assert_eq!(page(web.addr).await, 200);
            let text = raw::scrape(web.admin_addr).await;
            let readmissions =
                series_in(&text, "bookstore_backend_readmissions_total", frozen.addr);
            match since_readmitted {
                None if readmissions >= 1.0 => since_readmitted = Some(served(&frozen).await),
                Some(before) if served(&frozen).await > before => return Ok(()),
                _ => {}
            }
            Err(format!(
                "readmitted: {}; the balancer's view:\n{}",
                since_readmitted.is_some(),
                backend_lines(&text)
            ))
        },
    )
    .await;
}

/// Issue 22: the marketplace pings each connection after a second with nothing coming in. The
/// server must take that rate: a connection left idle for 5 s is still the one the next page
/// uses, with no new handshake (a server that closed it for too many pings, as grpc-go's
/// keepalive policy does, would show a second). The server's idle timeout is 2 s here, so
/// without the pings it would have closed the connection too.
#[tokio::test]
async fn an_idle_connection_pinged_every_second_stays_open() {
    let pki = TestPki::new();
    let (mut recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("IDLE_TIMEOUT_SECS", "2".into())]).await;
    let admin = recommendations.admin_addr().await;
    let (_marketplace, web) = process::start_marketplace(pki.dir(), backend, &[]).await;
    let handshakes = || async {
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        raw::metric(
            &text,
            &["bookstore_tls_handshakes_total", r#"result="completed""#],
        )
    };
    assert_eq!(page(web).await, 200);
    let first = handshakes().await;
    assert!(first >= 1.0, "{first}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(page(web).await, 200);
    assert_eq!(
        handshakes().await,
        first,
        "the idle connection was replaced"
    );
}

/// Issue 22: an address that takes the TCP connection and then says nothing (a hung process:
/// the kernel still accepts) must not hold calls. Its handshake is bounded by the connect
/// timeout, so the calls waiting for it end, the address is taken out, and every page is
/// answered by the other one. (tonic's own connect timeout covers only the TCP connect: a call
/// waiting for the TLS handshake of a hung replica waited for as long as it stayed hung.)
#[tokio::test]
async fn an_address_that_accepts_but_never_answers_holds_no_call() {
    let pki = TestPki::new();
    let healthy = start_instance(&pki).await;
    let (silent, _held) = raw::silent_listener().await;
    let records = Arc::new(Records::default());
    records.set(vec![silent, healthy.addr]);
    let config = marketplace_config(pki.dir(), healthy.addr);
    let web = spawn_marketplace_resolving(&config, records.clone()).await;

    let pages = load_until(web.addr, 2, Instant::now() + Duration::from_secs(3)).await;
    let failed = pages.iter().filter(|(_, s)| *s != 200).count();
    assert!(pages.len() > 50, "only {} pages in 3 s", pages.len());
    assert_eq!(failed, 0, "{failed} of {} pages failed", pages.len());

    // Nothing is left waiting on the silent address: each handshake ends at the connect
    // timeout (1 s). Its failures in a row take it out of the rotation.
    eventually(
        "no call waiting on the silent address",
        Duration::from_secs(3),
        async || {
            let text = raw::scrape(web.admin_addr).await;
            if series_in(&text, "bookstore_backend_in_flight", silent) > 0.0 {
                Err(format!("calls still wait:\n{}", backend_lines(&text)))
            } else {
                Ok(())
            }
        },
    )
    .await;
    // Each failed handshake fails one call (the cheaper address gets the others), so the five
    // in a row that eject it take about five connect timeouts of light load: a page every
    // 20 ms, each look.
    eventually_every(
        "the silent address ejected",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let text = raw::scrape(web.admin_addr).await;
            if series_in(&text, "bookstore_backend_ejections_total", silent) >= 1.0 {
                return Ok(());
            }
            assert_eq!(page(web.addr).await, 200);
            Err(format!("not yet:\n{}", backend_lines(&text)))
        },
    )
    .await;
}
