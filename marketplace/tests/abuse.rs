//! The public edge under abuse and overload, as a hostile or heavy client sees it: the real
//! binaries on loopback, raw sockets, real signals, and the server's own memory, open files and
//! metrics read from outside. Every count and wait here is bounded. This file covers requests
//! that never finish (unfinished and endless heads, slowloris, SIGTERM with such connections
//! open), the connection cap and the open-file limit, and overload: a thousand HTTP/1.1
//! connections, eight of 200 HTTP/2 streams, the in-flight limit and the bounded call queue.
//! The attacks that need HTTP/2 itself are in `abuse_http2.rs`.

use std::time::{Duration, Instant};

use bookstore_testkit::{
    TestPki,
    process::{self, ServiceProcess},
    raw,
};
use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};

/// A deadline, a queue wait and an in-flight limit far off, for tests of reach rather than of
/// speed or shedding.
fn patient() -> [(&'static str, String); 3] {
    [
        ("RECOMMENDATIONS_TIMEOUT_MS", "10000".into()),
        ("MAX_QUEUE_WAIT_MS", "10000".into()),
        ("MAX_REQUESTS_IN_FLIGHT", "100000".into()),
    ]
}

fn secs(n: u64) -> String {
    n.to_string()
}

/// Row 1: `GET / HTTP/1.1\r\nHost: x\r\n` and then nothing used to hold a connection for good.
#[tokio::test]
async fn an_unfinished_request_head_is_closed_at_the_header_timeout() {
    let pki = TestPki::new();
    let (_marketplace, web) =
        process::start_marketplace_alone(pki.dir(), &[("HEADER_READ_TIMEOUT_SECS", secs(1))]).await;
    let mut stream = TcpStream::connect(web).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    // A connection that sends nothing at all gets no longer.
    let mut silent = TcpStream::connect(web).await.expect("connect");
    let started = Instant::now();
    assert!(
        raw::closed_by_peer(&mut stream, Duration::from_secs(6)).await,
        "still open after 6 s"
    );
    assert!(
        raw::closed_by_peer(&mut silent, Duration::from_secs(6)).await,
        "a silent connection still open after 6 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// Row 2: endless header lines used to be buffered up to about 400 KB per connection.
#[tokio::test]
async fn an_endless_request_head_costs_a_small_bounded_buffer() {
    let pki = TestPki::new();
    let (marketplace, web) = process::start_marketplace_alone(pki.dir(), &[]).await;
    let idle_kib = marketplace.rss_kib();
    let mut clients = JoinSet::new();
    for _ in 0..100 {
        clients.spawn(async move {
            let mut stream = TcpStream::connect(web).await.expect("connect");
            let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
            head.extend(std::iter::repeat_n(b'a', 390 * 1024));
            // The server stops reading once its buffer is full, so the write may stall: it
            // gets a few seconds, then the client only listens.
            let _ = tokio::time::timeout(Duration::from_secs(3), stream.write_all(&head)).await;
            let status =
                tokio::time::timeout(Duration::from_secs(5), raw::read_response(&mut stream))
                    .await
                    .ok()
                    .flatten();
            (status, stream)
        });
    }
    let mut held = Vec::new();
    while let Some(done) = clients.join_next().await {
        let (status, stream) = done.expect("client");
        // 431, or a connection closed on us mid-write: either way nothing waits for more.
        assert!(
            matches!(status, Some(431) | None),
            "unexpected answer {status:?}"
        );
        held.push(stream);
    }
    let peak_kib = marketplace.rss_kib();
    assert!(
        peak_kib < idle_kib + 16 * 1024,
        "RSS grew from {idle_kib} KiB to {peak_kib} KiB for 100 unfinished heads"
    );
    for mut stream in held {
        assert!(raw::closed_by_peer(&mut stream, Duration::from_secs(5)).await);
    }
}

/// Row 3: slowloris, one header line now and then, used to keep every connection open.
#[tokio::test]
async fn slowloris_connections_are_closed_at_the_header_timeout() {
    let pki = TestPki::new();
    let (_marketplace, web) =
        process::start_marketplace_alone(pki.dir(), &[("HEADER_READ_TIMEOUT_SECS", secs(1))]).await;
    let mut clients = JoinSet::new();
    for _ in 0..200 {
        clients.spawn(async move {
            let mut stream = TcpStream::connect(web).await.expect("connect");
            let started = Instant::now();
            stream.write_all(b"GET / HTTP/1.1\r\n").await.expect("send");
            // A header line every 300 ms, for at most 6 s: a write fails once the server has
            // closed the connection.
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let line = format!("X-Slow-{n}: a\r\n");
                if stream.write_all(line.as_bytes()).await.is_err()
                    || started.elapsed() > Duration::from_secs(6)
                {
                    break;
                }
            }
            raw::closed_by_peer(&mut stream, Duration::from_millis(500)).await
        });
    }
    let closed = clients.join_all().await;
    let still_open = closed.iter().filter(|c| !**c).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of 200 slowloris connections still open"
    );
}

/// Row 4: tens of thousands of idle connections used to exhaust the process' open files, taking
/// the page and the admin port down with it. Past the cap they are closed on arrival and
/// counted; the connections already open, and the admin port, keep working.
#[tokio::test]
async fn past_the_connection_cap_new_connections_are_refused_and_the_rest_keep_working() {
    let pki = TestPki::new();
    // Timeouts far off, so the kept connections stay open however slow the machine is.
    let (_recommendations, mut marketplace, web) = process::start_stack(
        pki.dir(),
        &[
            ("MAX_CONNECTIONS", "20".into()),
            ("HEADER_READ_TIMEOUT_SECS", secs(120)),
            ("IDLE_TIMEOUT_SECS", secs(120)),
        ],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let mut kept = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(web).await.expect("connect");
        assert_eq!(raw::get_on(&mut stream, "/").await, Some(200));
        kept.push(stream);
    }
    let fds_before = marketplace.open_fds();
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(stream) = TcpStream::connect(web).await {
            flood.push(stream);
        }
    }
    for stream in &mut flood {
        assert!(
            raw::closed_by_peer(stream, Duration::from_secs(5)).await,
            "a connection past the cap was kept open"
        );
    }
    let fds_after = marketplace.open_fds();
    assert!(
        fds_after <= fds_before + 5,
        "open files grew from {fds_before} to {fds_after}"
    );
    assert_eq!(raw::get(admin, "/readyz").await, Some(200));
    assert_eq!(raw::get(admin, "/healthz").await, Some(200));
    for stream in &mut kept {
        assert_eq!(raw::get_on(stream, "/").await, Some(200));
    }
    let metrics = raw::scrape(admin).await;
    let refused = raw::metric(
        &metrics,
        &[
            "bookstore_connections_refused_total",
            "listener=\"http\"",
            "reason=\"max_connections\"",
        ],
    );
    assert_eq!(refused, flood.len() as f64, "{metrics}");
}

/// A shell's soft open-file limit is often 1024, below the default cap of 2048 connections: at
/// it, accept failed (EMFILE) and connections were refused long before the cap. The service
/// raises its soft limit to the hard one at start-up; started at 256 here, it holds 400
/// connections open at once and refuses none.
#[tokio::test]
async fn a_low_soft_open_file_limit_is_raised_so_the_connection_cap_is_reachable() {
    let pki = TestPki::new();
    let env = process::marketplace_env(
        pki.dir(),
        process::VACANT,
        &[
            ("HEADER_READ_TIMEOUT_SECS", secs(120)),
            ("IDLE_TIMEOUT_SECS", secs(120)),
        ],
    );
    let mut marketplace = ServiceProcess::start_with_ulimit("marketplace", &env, "-S -n 256");
    let web = marketplace.listening_addr().await;
    let admin = marketplace.admin_addr().await;
    // A page that needs no backend (a 404), on each of 400 connections held open together.
    let mut held = Vec::new();
    for i in 0..400 {
        let mut stream = TcpStream::connect(web).await.expect("connect");
        assert_eq!(
            raw::get_on(&mut stream, "/no-such-page").await,
            Some(404),
            "connection {i} not served"
        );
        held.push(stream);
    }
    for stream in &mut held {
        assert_eq!(raw::get_on(stream, "/no-such-page").await, Some(404));
    }
    let metrics = raw::scrape(admin).await;
    let refused = raw::metric(
        &metrics,
        &["bookstore_connections_refused_total", "listener=\"http\""],
    );
    assert_eq!(refused, 0.0, "{metrics}");
    let line = marketplace
        .wait_for_line("open-file limit", Duration::from_secs(5))
        .await;
    assert!(line.contains("raised_from=256"), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", marketplace.pid()))
        .expect("read /proc/<pid>/limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(
        fields[3], fields[4],
        "soft limit not raised to the hard one: {open_files}"
    );
}

/// A hard open-file limit below the connection caps cannot be raised without privileges: the
/// service says so at start-up, with what it has and what its caps need, and still serves.
#[tokio::test]
async fn a_hard_open_file_limit_below_the_caps_is_warned_about_at_start_up() {
    let pki = TestPki::new();
    let env = process::marketplace_env(pki.dir(), process::VACANT, &[]);
    let mut marketplace = ServiceProcess::start_with_ulimit("marketplace", &env, "-n 256");
    let web = marketplace.listening_addr().await;
    let line = marketplace
        .wait_for_line(
            "below what the connection caps allow",
            Duration::from_secs(5),
        )
        .await;
    // The default caps: 2,048 page connections and 64 admin ones, and 64 for the rest.
    assert!(line.contains("open_files=256"), "{line}");
    assert!(line.contains("needed=2176"), "{line}");
    assert_eq!(raw::get(web, "/no-such-page").await, Some(404));
}

/// Row 5: one unfinished connection used to hold SIGTERM for the whole grace period.
#[tokio::test]
async fn sigterm_closes_unfinished_connections_at_once() {
    let pki = TestPki::new();
    let (mut marketplace, web) =
        process::start_marketplace_alone(pki.dir(), &[("SHUTDOWN_GRACE_SECS", secs(20))]).await;
    let mut unfinished = TcpStream::connect(web).await.expect("connect");
    unfinished
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    let mut idle = TcpStream::connect(web).await.expect("connect");
    // Both connections are accepted before the signal.
    let admin = marketplace.admin_addr().await;
    raw::until_metric(
        admin,
        &["bookstore_connections_open", "listener=\"http\""],
        2.0,
        Duration::from_secs(5),
    )
    .await;
    let started = Instant::now();
    marketplace.signal("TERM");
    let (status, log) = marketplace.wait(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}\n{}", log.join("\n"));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(raw::closed_by_peer(&mut unfinished, Duration::from_secs(1)).await);
    assert!(raw::closed_by_peer(&mut idle, Duration::from_secs(1)).await);
}

/// Row 6: 1,000 concurrent HTTP/1.1 connections used to get 41 % of their pages as 503 while
/// recommendations had capacity to spare.
#[tokio::test]
async fn a_thousand_concurrent_http1_connections_get_every_page() {
    let pki = TestPki::new();
    // A deadline and a queue wait far off: this is about how the marketplace reaches its
    // backend, not about how fast a debug build on a shared machine is.
    let (_recommendations, _marketplace, web) = process::start_stack(pki.dir(), &patient()).await;
    let mut clients = JoinSet::new();
    for _ in 0..1000 {
        clients.spawn(async move {
            let mut stream = TcpStream::connect(web).await.expect("connect");
            let mut statuses = Vec::new();
            for _ in 0..3 {
                statuses.push(raw::get_on(&mut stream, "/").await);
            }
            statuses
        });
    }
    let statuses: Vec<Option<u16>> = clients.join_all().await.into_iter().flatten().collect();
    let failed = statuses.iter().filter(|s| **s != Some(200)).count();
    assert_eq!(failed, 0, "{failed} of {} pages failed", statuses.len());
}

/// Row 7: eight HTTP/2 (h2c) connections of 200 streams each used to get 54 % of their pages as
/// 503.
#[tokio::test]
async fn eight_h2c_connections_of_200_streams_get_every_page() {
    let pki = TestPki::new();
    let (_recommendations, _marketplace, web) = process::start_stack(pki.dir(), &patient()).await;
    let mut connections = JoinSet::new();
    for _ in 0..8 {
        connections.spawn(async move {
            let tcp = TcpStream::connect(web).await.expect("connect");
            let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
            tokio::spawn(connection);
            let mut streams = JoinSet::new();
            for _ in 0..200 {
                let mut client = client.clone();
                streams.spawn(async move {
                    let request = http::Request::get(format!("http://{web}/"))
                        .body(())
                        .expect("request");
                    client = client.ready().await.ok()?;
                    let (response, _) = client.send_request(request, true).ok()?;
                    let response = response.await.ok()?;
                    let status = response.status().as_u16();
                    let mut body = response.into_body();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.ok()?;
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    Some(status)
                });
            }
            streams.join_all().await
        });
    }
    let statuses: Vec<Option<u16>> =
        tokio::time::timeout(Duration::from_secs(60), connections.join_all())
            .await
            .expect("1,600 pages within a minute")
            .into_iter()
            .flatten()
            .collect();
    let failed = statuses.iter().filter(|s| **s != Some(200)).count();
    assert_eq!(failed, 0, "{failed} of {} pages failed", statuses.len());
}

/// Past MAX_REQUESTS_IN_FLIGHT a request is answered 503 at once, counted, while the ones let in
/// are served; when they are done, requests are let in again.
#[tokio::test]
async fn past_the_in_flight_limit_requests_get_a_fast_503_and_the_rest_are_served() {
    let pki = TestPki::new();
    let (recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("ARTIFICIAL_DELAY_MS", "2000".into())]).await;
    let (mut marketplace, web) = process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("MAX_REQUESTS_IN_FLIGHT", "2".into()),
            ("RECOMMENDATIONS_TIMEOUT_MS", "5000".into()),
        ],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let holders: Vec<_> = (0..2).map(|_| tokio::spawn(raw::get(web, "/"))).collect();
    // Both holders have called the backend, and hold their places for 2 s.
    raw::until_metric(
        admin,
        &["bookstore_backend_calls_total"],
        2.0,
        Duration::from_secs(10),
    )
    .await;
    let mut refused = JoinSet::new();
    for path in ["/", "/style.css", "/api/recommendations", "/nope"].repeat(5) {
        refused.spawn(async move {
            let started = Instant::now();
            (raw::get(web, path).await, started.elapsed())
        });
    }
    for (status, took) in refused.join_all().await {
        assert_eq!(status, Some(503));
        assert!(took < Duration::from_millis(1000), "{took:?}");
    }
    for holder in holders {
        assert_eq!(holder.await.expect("page"), Some(200));
    }
    assert_eq!(raw::get(web, "/style.css").await, Some(200));
    let metrics = raw::scrape(admin).await;
    assert_eq!(
        raw::metric(&metrics, &["bookstore_requests_shed_total"]),
        20.0
    );
    drop(recommendations);
}

/// Past real capacity, the queue in front of recommendations is bounded: the excess gets a fast
/// 503 (the page that says when to retry), counted.
#[tokio::test]
async fn past_the_queue_pages_get_a_fast_503() {
    let pki = TestPki::new();
    let (recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("ARTIFICIAL_DELAY_MS", "1500".into())]).await;
    let (mut marketplace, web) = process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("CALLS_PER_BACKEND", "4".into()),
            ("MAX_QUEUED_CALLS", "4".into()),
            // Long enough to wait out two rounds: this test is about the length bound.
            ("MAX_QUEUE_WAIT_MS", "5000".into()),
            ("RECOMMENDATIONS_TIMEOUT_MS", "5000".into()),
        ],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let mut clients = JoinSet::new();
    for _ in 0..40 {
        clients.spawn(async move {
            let started = Instant::now();
            let mut stream = TcpStream::connect(web).await.expect("connect");
            let status = raw::get_on(&mut stream, "/").await;
            (status, started.elapsed())
        });
    }
    let answers = clients.join_all().await;
    let ok = answers.iter().filter(|(s, _)| *s == Some(200)).count();
    let fast_503 = answers
        .iter()
        .filter(|(s, took)| *s == Some(503) && *took < Duration::from_millis(1000))
        .count();
    // 4 calls at once and 4 waiting: two rounds of 1.5 s fit in the 5 s deadline; the other
    // 32 find the queue full (a few may arrive after a slot freed up).
    assert!(ok >= 8, "{answers:?}");
    assert!(fast_503 >= 24, "{answers:?}");
    assert_eq!(ok + fast_503, 40, "{answers:?}");
    let metrics = raw::scrape(admin).await;
    assert_eq!(
        raw::metric(
            &metrics,
            &["bookstore_client_queue_rejected_total", "reason=\"full\""]
        ),
        fast_503 as f64
    );
    drop(recommendations);
}

/// The queue is bounded in time as well as length: a page waits for a call slot at most
/// MAX_QUEUE_WAIT_MS, and while the queue takes that long a newcomer is refused on arrival
/// instead of waiting it out too. The pages already holding slots are served.
#[tokio::test]
async fn a_queue_that_moves_too_slowly_refuses_newcomers_at_once() {
    let pki = TestPki::new();
    let (recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("ARTIFICIAL_DELAY_MS", "4000".into())]).await;
    let (mut marketplace, web) = process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("CALLS_PER_BACKEND", "2".into()),
            ("MAX_QUEUE_WAIT_MS", "1000".into()),
            ("RECOMMENDATIONS_TIMEOUT_MS", "8000".into()),
        ],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let timed_page = move || async move {
        let started = Instant::now();
        let status = raw::get(web, "/").await;
        (status, started.elapsed())
    };
    let waited_out = ["bookstore_client_queue_rejected_total", "reason=\"wait\""];
    let rejected_for_waiting = move || async move {
        let metrics = raw::scrape(admin).await;
        raw::metric(&metrics, &waited_out)
    };

    // Both slots taken for 4 s.
    let holders: Vec<_> = (0..2).map(|_| tokio::spawn(timed_page())).collect();
    raw::until_metric(
        admin,
        &["bookstore_backend_calls_total"],
        2.0,
        Duration::from_secs(10),
    )
    .await;
    // The first to queue waits the whole bound, then gets a 503.
    let first = timed_page().await;
    assert_eq!(first.0, Some(503), "{first:?}");
    assert!(first.1 >= Duration::from_millis(1000), "{first:?}");
    raw::until_metric(admin, &waited_out, 1.0, Duration::from_secs(10)).await;
    // The next one joins an empty queue and waits; while it does, a newcomer is told at once.
    let waiting = tokio::spawn(timed_page());
    // It has picked its address (the two holders, the first and now it), and joins the queue
    // without waiting for anything else.
    let picked = ["bookstore_backend_calls_total"];
    raw::until_metric(admin, &picked, 4.0, Duration::from_secs(5)).await;
    // Picking is counted just before joining: on two busy CPUs (the whole suite at once) the
    // page's task can be descheduled between the two, and a newcomer then finds the queue
    // empty. A moment's grace, far inside the verdict's 1 s, lets it join first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let newcomer = timed_page().await;
    assert_eq!(newcomer.0, Some(503), "{newcomer:?}");
    assert!(newcomer.1 < Duration::from_millis(500), "{newcomer:?}");
    let waiting = waiting.await.expect("page");
    assert_eq!(waiting.0, Some(503), "{waiting:?}");
    assert!(waiting.1 >= Duration::from_millis(1000), "{waiting:?}");
    assert_eq!(rejected_for_waiting().await, 3.0);
    for holder in holders {
        let (status, _) = holder.await.expect("page");
        assert_eq!(status, Some(200));
    }
    drop(recommendations);
}
