//! The load generator against a real recommendations service (mutual TLS, in this process) and
//! its own floor servers: counts are exact, failures are never successes, and the open loop
//! keeps its rate.

use std::{sync::Arc, time::Duration};

use bookstore_testkit::{TestPki, eventually, recommendations_config, spawn_recommendations};
use loadgen::{
    drive::{Load, Stop, run},
    target::{GrpcTls, Target},
};

fn mtls(pki: &TestPki) -> Option<GrpcTls> {
    let dir = pki.dir();
    Some(GrpcTls {
        ca: dir.join("ca.pem"),
        identity: Some((dir.join("client.pem"), dir.join("client.key"))),
        server_name: "localhost".into(),
    })
}

/// The timeline cuts a run into intervals by when each call was due: an open loop of 400
/// calls a second for 2 s is 8 intervals of about 100, which add up to the whole.
#[tokio::test]
async fn an_open_loop_timeline_counts_each_call_in_the_interval_it_was_due() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let target = Target::grpc(&server.addr.to_string(), mtls(&pki), 1, 1)
        .await
        .expect("connect");
    let report = run(
        Arc::new(target),
        Load::Open {
            rate: 400.0,
            max_outstanding: 1000,
        },
        Stop::After(Duration::from_secs(2)),
        false,
        Some(Duration::from_millis(250)),
    )
    .await;
    assert_eq!(report.timeline.len(), 8, "{:?}", report.timeline);
    for (i, interval) in report.timeline.iter().enumerate() {
        assert!((interval.at_s - 0.25 * i as f64).abs() < 1e-9);
        assert_eq!(interval.ok + interval.failed, 100, "{interval:?}");
        assert!(interval.p50_ms > 0.0 && interval.p50_ms <= interval.p99_ms);
    }
    let ok: u64 = report.timeline.iter().map(|i| i.ok).sum();
    assert_eq!(ok, report.ok);
}

#[tokio::test]
async fn a_closed_loop_makes_exactly_the_calls_asked_for_over_mutual_tls() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let target = Target::grpc(&server.addr.to_string(), mtls(&pki), 2, 3)
        .await
        .expect("connect");
    let report = run(
        Arc::new(target),
        Load::Closed { concurrency: 8 },
        Stop::Requests(500),
        false,
        None,
    )
    .await;
    assert_eq!(report.requests, 500);
    assert_eq!(report.ok, 500, "{report}");
    assert!(report.errors.is_empty());
    assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.p50 <= report.latency_ms.p99);
    assert!(report.latency_ms.p99 <= report.latency_ms.max);
    assert_eq!(report.connections, 2);
    assert!(report.target.starts_with("grpc+mtls://"));
}

#[tokio::test]
async fn grpc_errors_are_counted_by_code_and_never_as_successes() {
    let pki = TestPki::new();
    let mut config = recommendations_config(pki.dir());
    config.failure_rate = "1".parse().expect("rate");
    let server = spawn_recommendations(&config).await;
    let target = Target::grpc(&server.addr.to_string(), mtls(&pki), 1, 3)
        .await
        .expect("connect");
    let report = run(
        Arc::new(target),
        Load::Closed { concurrency: 4 },
        Stop::Requests(100),
        false,
        None,
    )
    .await;
    assert_eq!(report.ok, 0);
    assert_eq!(report.throughput, 0.0);
    assert_eq!(
        report.errors.get("grpc:Unavailable"),
        Some(&100),
        "{report}"
    );
}

#[tokio::test]
async fn an_open_loop_keeps_its_rate() {
    let pki = TestPki::new();
    let server = spawn_recommendations(&recommendations_config(pki.dir())).await;
    let target = Target::grpc(&server.addr.to_string(), mtls(&pki), 1, 3)
        .await
        .expect("connect");
    let report = run(
        Arc::new(target),
        Load::Open {
            rate: 200.0,
            max_outstanding: 100,
        },
        Stop::After(Duration::from_secs(2)),
        false,
        None,
    )
    .await;
    assert_eq!(report.requests, 400, "{report}");
    assert_eq!(report.ok, 400);
    assert!((1.8..3.0).contains(&report.duration_s), "{report}");
}

#[tokio::test]
async fn http_statuses_other_than_2xx_are_failures() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    tokio::spawn(loadgen::floor::http(addr, b"<p>hi</p>".to_vec()));
    eventually(
        &format!("the floor answering on {addr}"),
        Duration::from_secs(10),
        async || bookstore_testkit::raw::get(addr, "/").await == Some(200),
    )
    .await;
    for (path, ok) in [("/", true), ("/missing", false)] {
        let target = Target::http(&format!("http://{addr}{path}"), 2).expect("client");
        let report = run(
            Arc::new(target),
            Load::Closed { concurrency: 2 },
            Stop::Requests(20),
            false,
            None,
        )
        .await;
        if ok {
            assert_eq!(report.ok, 20, "{report}");
        } else {
            assert_eq!(report.ok, 0);
            assert_eq!(report.errors.get("http:404"), Some(&20), "{report}");
        }
    }
}

/// A closed loop of N HTTP/1.1 callers holds N connections, as wrk does: one shared pool
/// opened a new connection whenever a caller found none idle, so "1,000 connections" were up
/// to 2,000 and met the marketplace's connection cap. Counted here by a server that answers
/// every request on a kept-alive connection, a little late as a busy server would, and counts
/// the connections it accepts.
#[tokio::test]
async fn a_closed_loop_of_n_http_callers_opens_n_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have.extend_from_slice(&buf[..n]);
                    while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        have.drain(..end + 4);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let callers = 300;
    let target = Target::http(&format!("http://{addr}/"), callers).expect("client");
    let report = run(
        Arc::new(target),
        Load::Closed {
            concurrency: callers,
        },
        Stop::Requests(6000),
        false,
        None,
    )
    .await;
    assert_eq!(report.ok, 6000, "{report}");
    assert_eq!(accepted.load(Ordering::Relaxed), callers);
}
