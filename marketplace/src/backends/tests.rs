use std::collections::BTreeSet;

use async_trait::async_trait;
use bookstore_common::request_log::Sampling;

use super::*;

/// Addresses set by the test.
struct Fixed(Mutex<std::io::Result<Vec<SocketAddr>>>);

#[async_trait]
impl Resolve for Fixed {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match &*self.0.lock().expect("lock") {
            Ok(addrs) => Ok(addrs.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
    fn target(&self) -> String {
        "fixed".into()
    }
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 50051))
}

fn backends(addrs: Vec<SocketAddr>) -> (Arc<Fixed>, Backends) {
    let fixed = Arc::new(Fixed(Mutex::new(Ok(addrs))));
    let settings = ChannelSettings {
        tls: None,
        connect_timeout: Duration::from_secs(1),
        max_calls: 4,
        lines: Sampling::default(),
    };
    let b = Backends::new(fixed.clone(), settings, Metrics::new("t", "0"));
    (fixed, b)
}

fn series(b: &Backends, name: &str, a: SocketAddr) -> String {
    let line = format!("{name}{{addr=\"{a}\"}} ");
    let text = b.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
        .unwrap_or_else(|| panic!("{line} missing from:\n{text}"))
}

#[tokio::test]
async fn equal_addresses_share_calls_in_turn() {
    let (_, b) = backends(vec![addr(3), addr(1), addr(2)]);
    assert!(
        b.pick(None).is_none(),
        "nothing before the first resolution"
    );
    b.refresh().await.expect("refresh");
    let picks: Vec<_> = (0..6).map(|_| b.pick(None).expect("pick").addr).collect();
    for a in [addr(1), addr(2), addr(3)] {
        assert_eq!(picks.iter().filter(|p| **p == a).count(), 2, "{picks:?}");
    }
    // Another than the one already tried, when there is one.
    assert!((0..6).all(|_| b.pick(Some(addr(2))).expect("pick").addr != addr(2)));
    assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "2");
}

#[tokio::test]
async fn a_hedge_gets_another_address_or_none_and_is_counted_only_when_sent() {
    let (fixed, b) = backends(vec![addr(1)]);
    b.refresh().await.expect("refresh");
    // One address: no other to hedge on, and nothing counted (a page waiting on its one
    // call is counted once, not once more for each hedge it could not send).
    assert!(b.pick_another(addr(1)).is_none());
    assert_eq!(series(&b, "bookstore_backend_calls_total", addr(1)), "0");
    *fixed.0.lock().expect("lock") = Ok(vec![addr(1), addr(2)]);
    b.refresh().await.expect("refresh");
    let other = b.pick_another(addr(1)).expect("another");
    assert_eq!(other.addr, addr(2));
    assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "0");
    other.count_call();
    assert_eq!(series(&b, "bookstore_backend_calls_total", addr(2)), "1");
}

#[tokio::test]
async fn an_address_that_stops_answering_stops_getting_calls() {
    let (_, b) = backends(vec![addr(1), addr(2)]);
    b.refresh().await.expect("refresh");
    let hung = b.current_map()[&addr(1)].clone();
    // Three calls sent to it, none answered, for 20 ms: it costs at least 20 ms × 4, the
    // other 1 ms.
    let pending: Vec<_> = (0..3).map(|_| hung.start_call()).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!((0..10).all(|_| b.pick(None).expect("pick").addr == addr(2)));
    assert_eq!(series(&b, "bookstore_backend_in_flight", addr(1)), "3");
    drop(pending);
    assert_eq!(series(&b, "bookstore_backend_in_flight", addr(1)), "0");
}

#[tokio::test]
async fn a_slow_address_stops_getting_calls_and_its_estimate_is_exported() {
    let (_, b) = backends(vec![addr(1), addr(2)]);
    b.refresh().await.expect("refresh");
    let slow = b.current_map()[&addr(1)].clone();
    let call = slow.start_call();
    tokio::time::sleep(Duration::from_millis(30)).await;
    call.finished(Outcome::Answered);
    assert!((0..10).all(|_| b.pick(None).expect("pick").addr == addr(2)));
    let estimate: f64 = series(&b, "bookstore_backend_latency_estimate_seconds", addr(1))
        .parse()
        .expect("a number");
    assert!(estimate >= 0.03, "{estimate}");
}

#[test]
fn a_peak_ewma_jumps_to_a_slower_sample_and_decays_toward_faster_ones() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(t0);
    e.sample(Duration::from_millis(200), t0);
    assert!((e.at(t0) - 0.2).abs() < 1e-9);
    // A second later, a fast sample brings it down by a tenth of the way (1 s of 10).
    let t1 = t0 + Duration::from_secs(1);
    e.sample(Duration::from_millis(1), t1);
    let after = e.at(t1);
    assert!(after > 0.15 && after < 0.19, "{after}");
    // With no samples it decays toward zero: an address that got no calls gets a chance.
    assert!(e.at(t1 + DECAY * 5) < 0.002);
}

#[tokio::test]
async fn failures_in_a_row_eject_an_address_but_never_a_lone_one_or_more_than_half() {
    let (fixed, b) = backends(vec![addr(1)]);
    let b = Arc::new(b);
    b.refresh().await.expect("refresh");
    let lone = b.current_map()[&addr(1)].clone();
    for _ in 0..EJECT_AFTER {
        lone.start_call().finished(Outcome::Failed);
        b.judge(&lone);
    }
    assert!(lone.is_in(), "a lone address was ejected");

    // The lone one's failures stay counted: a second address of its own.
    *fixed.0.lock().expect("lock") = Ok(vec![addr(2), addr(3)]);
    b.refresh().await.expect("refresh");
    let (one, two) = (
        b.current_map()[&addr(2)].clone(),
        b.current_map()[&addr(3)].clone(),
    );
    // An answer in between resets the count.
    for _ in 0..EJECT_AFTER - 1 {
        one.start_call().finished(Outcome::Failed);
        b.judge(&one);
    }
    one.start_call().finished(Outcome::Answered);
    b.judge(&one);
    assert!(one.is_in());
    for _ in 0..EJECT_AFTER {
        one.start_call().finished(Outcome::Failed);
        b.judge(&one);
    }
    assert!(!one.is_in(), "five failures in a row");
    assert_eq!(
        series(&b, "bookstore_backend_ejections_total", addr(2)),
        "1"
    );
    assert_eq!(series(&b, "bookstore_backend_ejected", addr(2)), "1");
    assert!((0..6).all(|_| b.pick(None).expect("pick").addr == addr(3)));
    // The other fails too: half are out already, so it stays.
    for _ in 0..EJECT_AFTER {
        two.start_call().finished(Outcome::Failed);
        b.judge(&two);
    }
    assert!(two.is_in(), "more than half of the addresses ejected");
}

#[tokio::test]
async fn each_ejection_in_a_row_lasts_twice_as_long_up_to_the_cap() {
    let (_, b) = backends(vec![addr(1)]);
    let backend = b
        .backend(addr(1), &b.settings.read().expect("lock"))
        .expect("backend");
    let t0 = Instant::now();
    let lengths: Vec<_> = (0..6)
        .map(|_| backend.eject(t0).saturating_duration_since(t0))
        .collect();
    assert_eq!(
        lengths,
        [1, 2, 4, 4, 4, 4].map(Duration::from_secs),
        "{lengths:?}"
    );
    // Back for long enough, it starts again from the first length.
    backend.rejoin(t0);
    let later = t0 + FORGIVEN_AFTER;
    assert_eq!(
        backend.eject(later).saturating_duration_since(later),
        EJECTION
    );
}

#[tokio::test]
async fn a_readmitted_address_starts_afresh_and_its_held_calls_answering_late_change_nothing() {
    let (_, b) = backends(vec![addr(1), addr(2)]);
    b.refresh().await.expect("refresh");
    let frozen = b.current_map()[&addr(1)].clone();
    let estimate = || {
        series(&b, "bookstore_backend_latency_estimate_seconds", addr(1))
            .parse::<f64>()
            .expect("a number")
    };
    let held = frozen.start_call();
    let slow = frozen.start_call();
    tokio::time::sleep(Duration::from_millis(30)).await;
    slow.finished(Outcome::Answered);
    assert!(estimate() >= 0.03, "{}", estimate());
    frozen.eject(Instant::now());
    frozen.rejoin(Instant::now());
    assert_eq!(
        estimate(),
        FIRST_ESTIMATE.as_secs_f64(),
        "the exported estimate"
    );
    // A call sent before the readmission, answered after it, is as slow as the freeze was
    // long: it must not make the readmitted address look slow again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    held.finished(Outcome::Answered);
    assert_eq!(estimate(), FIRST_ESTIMATE.as_secs_f64());
    assert!(
        (0..2).any(|_| b.pick(None).expect("pick").addr == addr(1)),
        "no turn for the readmitted address"
    );
    // A call sent after it counts as usual.
    let fresh = frozen.start_call();
    tokio::time::sleep(Duration::from_millis(20)).await;
    fresh.finished(Outcome::Answered);
    assert!(estimate() >= 0.02, "{}", estimate());
}

#[tokio::test]
async fn re_resolving_adds_new_keeps_existing_and_drops_vanished_addresses() {
    let (fixed, b) = backends(vec![addr(1), addr(2)]);
    b.refresh().await.expect("refresh");
    let kept = b.current_map()[&addr(2)].clone();
    *fixed.0.lock().expect("lock") = Ok(vec![addr(2), addr(3)]);
    b.refresh().await.expect("refresh");
    assert_eq!(b.addrs(), vec![addr(2), addr(3)]);
    assert!(
        Arc::ptr_eq(&kept, &b.current_map()[&addr(2)]),
        "connection kept"
    );
    *fixed.0.lock().expect("lock") = Err(std::io::ErrorKind::NotFound.into());
    assert!(b.refresh().await.is_err());
    *fixed.0.lock().expect("lock") = Ok(vec![]);
    assert!(b.refresh().await.is_err());
    assert_eq!(
        b.addrs(),
        vec![addr(2), addr(3)],
        "kept through failed lookups"
    );
}

/// Every `addr` label value in a scrape.
fn labelled_addrs(text: &str) -> BTreeSet<String> {
    text.split("addr=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(a, _)| a.to_owned()))
        .collect()
}

/// Pods come and go, each with a new address: after a hundred changes the scrape has the
/// series of the addresses in use and of those gone in the last [`GONE_SERIES_KEPT`], no
/// more, and an address back within that time keeps its counts.
#[tokio::test(start_paused = true)]
async fn series_of_addresses_gone_for_minutes_are_dropped() {
    let at = |port: u16| SocketAddr::from(([10, 0, 0, 1], 40_000 + port));
    let (fixed, b) = backends(vec![at(0), at(1)]);
    b.refresh().await.expect("refresh");
    let every = Duration::from_secs(10);
    for change in 1..=100 {
        *fixed.0.lock().expect("lock") = Ok(vec![at(change), at(change + 1)]);
        b.refresh().await.expect("refresh");
        b.current_map()[&at(change)].count_call();
        tokio::time::advance(every).await;
    }
    let text = b.metrics.render();
    let seen = labelled_addrs(&text);
    // In use: 100 and 101; gone within the last 300 s: those that left at 10 s steps.
    let kept = GONE_SERIES_KEPT.as_secs() / every.as_secs();
    assert!(seen.contains(&at(101).to_string()), "{seen:?}");
    assert!(
        seen.len() as u64 <= 2 + kept && seen.len() as u64 >= kept,
        "{} addresses: {seen:?}",
        seen.len()
    );
    assert!(!seen.contains(&at(50).to_string()), "{seen:?}");
    let recent = at(95);
    assert_eq!(series(&b, "bookstore_backend_calls_total", recent), "1");
    assert!(
        text.contains(&format!("grpc_client_started_total{{addr=\"{recent}\",")),
        "the client-side series are per address too: {text}"
    );

    // One of them comes back before its series go: its count goes on.
    *fixed.0.lock().expect("lock") = Ok(vec![at(100), at(101), recent]);
    b.refresh().await.expect("refresh");
    b.current_map()[&recent].count_call();
    tokio::time::advance(GONE_SERIES_KEPT + every).await;
    let seen = labelled_addrs(&b.metrics.render());
    let now_in_use: BTreeSet<String> = [at(100), at(101), recent]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(seen, now_in_use);
    assert_eq!(series(&b, "bookstore_backend_calls_total", recent), "2");
}

#[tokio::test]
async fn the_system_resolver_finds_localhost() {
    let found = DnsResolver::new("localhost".into(), 7)
        .resolve()
        .await
        .expect("resolve");
    assert!(
        found.iter().all(|a| a.ip().is_loopback() && a.port() == 7),
        "{found:?}"
    );
    assert!(!found.is_empty());
    let literal = DnsResolver::new("[::1]".into(), 7)
        .resolve()
        .await
        .expect("literal");
    assert_eq!(
        literal,
        vec![SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7))]
    );
}
