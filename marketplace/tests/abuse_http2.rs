//! The public edge under attacks that need HTTP/2, as a hostile client sees it: the real
//! binaries on loopback, hand-made frames or an h2 client, and the server's own memory, log and
//! metrics read from outside. Every count and wait here is bounded. It covers an idle h2c
//! connection, a flood of PING ACKs, pages cancelled by the hundred (resets), connections that
//! stop reading (a zero window), unfinished header blocks (HEADERS and CONTINUATION), and one
//! connection's share of the places. Requests that never finish over HTTP/1.1, the connection
//! cap and overload are in `abuse.rs`.

use std::time::{Duration, Instant};

use bookstore_server::http_server;
use bookstore_testkit::{TestPki, eventually, process, raw};
use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};

/// An HTTP/2 connection left idle after its requests is told to go and closed.
#[tokio::test]
async fn an_idle_h2c_connection_is_closed_at_the_idle_timeout() {
    let pki = TestPki::new();
    let (_recommendations, _marketplace, web) =
        process::start_stack(pki.dir(), &[("IDLE_TIMEOUT_SECS", "1".into())]).await;
    let tcp = TcpStream::connect(web).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{web}/"))
        .body(())
        .expect("request");
    // Kept: an h2 client whose last handle is dropped closes the connection itself.
    let _handle = client.clone();
    let (response, _) = client
        .ready()
        .await
        .expect("ready")
        .send_request(request, true)
        .expect("send");
    assert_eq!(response.await.expect("response").status(), 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the server closed the idle connection")
        .expect("task")
        .expect("a clean close (GOAWAY), not an error");
    assert!(started.elapsed() >= Duration::from_millis(800));
}

/// A peer decides how often the HTTP/2 library warns: one unsolicited PING ACK, one line. 5,000
/// of them on one h2c connection used to write 5,000 warnings (an attacker's 30 MB of frames in
/// 5 s became 353 MB of log); now the log keeps its start-up and shutdown lines only.
#[tokio::test]
async fn a_flood_of_unsolicited_ping_acks_writes_no_log_lines() {
    let pki = TestPki::new();
    let (marketplace, web) = process::start_marketplace_alone(pki.dir(), &[]).await;
    let mut stream = TcpStream::connect(web).await.expect("connect");
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    for _ in 0..5000 {
        // PING with the ACK flag, on stream 0, eight bytes of payload.
        frames.extend([0, 0, 8, 6, 1, 0, 0, 0, 0]);
        frames.extend(*b"ABCDEFGH");
    }
    stream.write_all(&frames).await.expect("send");
    // The service keeps serving; then its whole log is read at exit (the PINGs arrived first).
    assert_eq!(raw::get(web, "/style.css").await, Some(200));
    drop(stream);
    marketplace.signal("TERM");
    let (status, log) = marketplace.wait(Duration::from_secs(10)).await;
    assert!(status.success());
    let noisy: Vec<_> = log.iter().filter(|l| l.contains("h2")).collect();
    assert!(
        noisy.is_empty(),
        "{} h2 lines, e.g. {:?}",
        noisy.len(),
        noisy.first()
    );
    assert!(
        log.len() < 40,
        "{} log lines:\n{}",
        log.len(),
        log.join("\n")
    );
}

/// Pages whose client goes away used to reset their backend calls, and a burst of resets on the
/// one connection to recommendations looked like an HTTP/2 rapid-reset attack to its server,
/// which closed the connection (GOAWAY) under every other page's calls. A call now runs to its
/// end whether or not its page is still wanted, so no call fails for it.
#[tokio::test]
async fn clients_that_cancel_their_pages_do_not_break_the_backend_connection() {
    let pki = TestPki::new();
    let (mut recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("ARTIFICIAL_DELAY_MS", "200".into())]).await;
    // 600 pages let in at once, so that 600 are given up on at once.
    let (mut marketplace, web) = process::start_marketplace(
        pki.dir(),
        backend,
        &[("MAX_REQUESTS_IN_FLIGHT", "1024".into())],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let picked = ["bookstore_backend_calls_total"];
    let mut clients = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(web).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        clients.push(client);
    }
    for _ in 0..20 {
        let before = raw::metric(&raw::scrape(admin).await, &picked);
        let mut asked = Vec::new();
        for client in &clients {
            for _ in 0..150 {
                let request = http::Request::get(format!("http://{web}/"))
                    .body(())
                    .expect("request");
                let mut ready = client.clone().ready().await.expect("connection open");
                let (response, _) = ready.send_request(request, true).expect("request sent");
                asked.push(response);
            }
        }
        // Once every page of the round has reached the source (its call starts there, or
        // queues for a slot), the clients give up on all of them.
        let all = before + asked.len() as f64;
        raw::until_metric(admin, &picked, all, Duration::from_secs(10)).await;
        drop(asked);
    }
    // Every call that started has ended (each runs to its end, in 200 ms).
    let market = eventually("every call ended", Duration::from_secs(10), async || {
        let text = raw::scrape(admin).await;
        let recommend = r#"grpc_method="Recommend""#;
        let started = raw::metric(&text, &["grpc_client_started_total", recommend]);
        let ended: f64 = text
            .lines()
            .filter(|l| l.starts_with("grpc_client_handled_total{") && l.contains(recommend))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if started > 0.0 && ended >= started {
            Ok(text)
        } else {
            Err(format!("{ended} of {started} calls ended"))
        }
    })
    .await;
    let calls = raw::metric(&market, &["bookstore_backend_calls_total"]);
    assert!(
        calls >= 100.0,
        "only {calls} backend calls: the test asked too little"
    );
    let unavailable = raw::metric(
        &market,
        &["grpc_client_handled_total", "grpc_code=\"Unavailable\""],
    );
    assert_eq!(
        unavailable, 0.0,
        "calls failed when the backend connection was closed"
    );
    let backend_metrics = raw::scrape(recommendations.admin_addr().await).await;
    let shed = raw::metric(
        &backend_metrics,
        &[
            "grpc_server_handled_total",
            "grpc_code=\"ResourceExhausted\"",
        ],
    );
    assert_eq!(
        shed, 0.0,
        "more calls reached the backend than CALLS_PER_BACKEND"
    );
    assert_eq!(raw::get(web, "/").await, Some(200));
}

/// Issue 21: one h2c connection that set its stream window to 0 and opened 128 `GET /` streams
/// held every place in flight, so every other client's page was a 503 (39 of 40 in 20 s), for
/// good if it opened and reset a stream now and then. An answer now gives its place back when
/// it is ready, and a connection whose answers stop moving is closed.
async fn zero_window_hold(attackers: usize, keep_alive_trick: bool) {
    let pki = TestPki::new();
    let (_recommendations, mut marketplace, web) = process::start_stack(pki.dir(), &[]).await;
    let admin = marketplace.admin_addr().await;
    let started = Instant::now();
    let mut attacks = JoinSet::new();
    for _ in 0..attackers {
        let tcp = TcpStream::connect(web).await.expect("connect");
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .max_concurrent_reset_streams(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("h2 handshake");
        // Finishes when the server closes the connection.
        let connection = tokio::spawn(connection);
        attacks.spawn(async move {
            let mut held = Vec::new();
            let request = || {
                http::Request::get(format!("http://{web}/"))
                    .body(())
                    .expect("request")
            };
            for _ in 0..128 {
                let Ok(mut ready) = client.clone().ready().await else {
                    break;
                };
                let Ok(stream) = ready.send_request(request(), true) else {
                    break;
                };
                held.push(stream);
            }
            let mut tricks = 0;
            let closed = async {
                let _ = connection.await;
                started.elapsed()
            };
            tokio::pin!(closed);
            loop {
                tokio::select! {
                    took = &mut closed => break (took, held.len(), tricks),
                    () = tokio::time::sleep(Duration::from_secs(2)), if keep_alive_trick => {
                        // One more stream, at once reset: a request started and ended.
                        if let Ok(mut ready) = client.clone().ready().await
                            && let Ok((_, mut stream)) = ready.send_request(request(), false)
                        {
                            stream.send_reset(h2::Reason::CANCEL);
                            tricks += 1;
                        }
                    }
                    () = tokio::time::sleep(Duration::from_secs(30)) => {
                        break (Duration::MAX, held.len(), tricks);
                    }
                }
            }
        });
    }
    // Another client's pages, ten a second, throughout.
    let mut pages = Vec::new();
    let mut peak_rss_kib = 0;
    while started.elapsed() < http_server::SEND_TIMEOUT + Duration::from_secs(4) {
        pages.push(raw::get(web, "/").await);
        peak_rss_kib = peak_rss_kib.max(marketplace.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = pages.iter().filter(|s| **s == Some(200)).count();
    assert!(
        ok * 100 >= pages.len() * 99,
        "{ok} of {} pages were 200: {pages:?}",
        pages.len()
    );
    for (took, held, tricks) in attacks.join_all().await {
        assert_eq!(held, 128, "the attacker could not open its streams");
        assert!(
            !keep_alive_trick || tricks >= 3,
            "only {tricks} streams opened and reset"
        );
        assert!(
            took <= http_server::SEND_TIMEOUT + Duration::from_secs(3),
            "the attacker's connection lasted {took:?}"
        );
    }
    let metrics = raw::scrape(admin).await;
    let closed = raw::metric(
        &metrics,
        &[
            "bookstore_connections_closed_total",
            "listener=\"http\"",
            "reason=\"send_stalled\"",
        ],
    );
    assert_eq!(closed, attackers as f64, "{metrics}");
    eprintln!(
        "{attackers} zero-window connection(s), trick {keep_alive_trick}: {ok} of {} pages 200, \
         peak RSS {peak_rss_kib} KiB",
        pages.len()
    );
}

#[tokio::test]
async fn one_connection_that_never_reads_its_answers_takes_nothing_from_other_clients() {
    zero_window_hold(1, false).await;
}

#[tokio::test]
async fn one_connection_that_never_reads_and_keeps_opening_streams_is_closed_all_the_same() {
    zero_window_hold(1, true).await;
}

#[tokio::test]
async fn eight_connections_that_never_read_their_answers_take_nothing_from_other_clients() {
    zero_window_hold(8, false).await;
}

#[tokio::test]
async fn eight_connections_that_never_read_and_keep_opening_streams_are_closed_all_the_same() {
    zero_window_hold(8, true).await;
}

/// 2,000 h2c connections each sending `block` (after the preface and SETTINGS) and holding it,
/// the way an attack would until the first-request timeout: the marketplace's RSS before and at
/// its peak, and its metrics after. Held until `settled(closed, open)` (connections closed for
/// their heads, and open), or 15 s.
async fn unfinished_header_blocks(
    block: &[u8],
    settled: fn(f64, f64) -> bool,
) -> (u64, u64, String) {
    let pki = TestPki::new();
    let (mut marketplace, web) = process::start_marketplace_alone(pki.dir(), &[]).await;
    let admin = marketplace.admin_addr().await;
    let before = marketplace.rss_kib();
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    attack.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    attack.extend_from_slice(block);
    let attack = std::sync::Arc::new(attack);
    let mut connections = JoinSet::new();
    let mut peak = before;
    for batch in 0..10 {
        // 200 at a time: a burst of 2,000 would overflow the kernel's accept queue, and the
        // connections it drops come in seconds later.
        let mut connecting = JoinSet::new();
        for _ in 0..200 {
            connecting.spawn(TcpStream::connect(web));
        }
        for mut stream in connecting.join_all().await.into_iter().flatten() {
            let attack = attack.clone();
            connections.spawn(async move {
                // Stops at the first write the server no longer takes.
                let _ = stream.write_all(&attack).await;
                Some(stream)
            });
        }
        peak = peak.max(marketplace.rss_kib());
        assert_eq!(connections.len(), 200 * (batch + 1), "connections failed");
    }
    let mut streams = Vec::new();
    while !connections.is_empty() {
        peak = peak.max(marketplace.rss_kib());
        tokio::select! {
            Some(done) = connections.join_next() => {
                streams.extend(done.ok().flatten());
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // Held while the server reads them all (the kernel took every write at once): for at least
    // a second, and until they have settled.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(15) {
        peak = peak.max(marketplace.rss_kib());
        let text = raw::scrape(admin).await;
        let sorted = closed_for(&text, "head_too_large") + closed_for(&text, "head_budget");
        let open = raw::metric(&text, &["bookstore_connections_open", "listener=\"http\""]);
        if held.elapsed() > Duration::from_secs(1) && settled(sorted, open) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The site still answers.
    assert_eq!(raw::get(web, "/style.css").await, Some(200));
    let metrics = raw::scrape(admin).await;
    drop(streams);
    (before, peak, metrics)
}

/// A header block of `frames` (a HEADERS frame, then CONTINUATIONs, none ending the block) of
/// the given payload lengths: one header whose value runs through all of them, so that the
/// HPACK decoder must hold every byte until the block ends.
fn unfinished_block(frames: &[usize]) -> Vec<u8> {
    let total: usize = frames.iter().sum();
    // A literal header, new name "x", then the value's length as an HPACK integer (7-bit
    // prefix): the rest of the block.
    let mut payload = vec![0x00, 0x01, b'x', 0x7f];
    let mut rest = total - 4 - 127 - 3;
    while rest >= 128 {
        payload.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    payload.push(rest as u8);
    payload.resize(total, b'a');
    let mut block = Vec::new();
    let mut at = 0;
    for (i, length) in frames.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 }; // HEADERS, CONTINUATION
        let [_, a, b, c] = u32::try_from(*length)
            .expect("a frame length")
            .to_be_bytes();
        block.extend([a, b, c, kind, 0, 0, 0, 0, 1]);
        block.extend_from_slice(&payload[at..at + length]);
        at += length;
    }
    block
}

fn closed_for(metrics: &str, reason: &str) -> f64 {
    raw::metric(
        metrics,
        &[
            "bookstore_connections_closed_total",
            "listener=\"http\"",
            &format!("reason=\"{reason}\""),
        ],
    )
}

/// Issue 21: each HTTP/2 connection could hold about 96 KB of unfinished header block (a
/// 16 KiB HEADERS frame and five CONTINUATIONs of 16 KiB) for the first-request timeout;
/// 2,000 of them took the marketplace from 12.9 to 190.5 MiB, past its 160 MiB container
/// limit. A block is now held to MAX_HEAD_BYTES: the connection is closed at the frame that
/// would cross it.
#[tokio::test]
async fn two_thousand_oversized_http2_header_blocks_stay_within_half_the_memory_limit() {
    // As the attack was measured: zero bytes, which h2 decodes as they come (empty headers),
    // keeping what it decoded until the block ends.
    let mut block = Vec::new();
    for kind in [0x1, 0x9, 0x9, 0x9, 0x9, 0x9] {
        block.extend([0x00, 0x40, 0x00, kind, 0, 0, 0, 0, 1]);
        block.resize(block.len() + 16_384, 0);
    }
    // Every one closed: by the bound, or by h2 itself when what it decoded outgrew its own
    // limit first (not counted here).
    let (before, peak, metrics) = unfinished_header_blocks(&block, |_, open| open == 0.0).await;
    let too_large = closed_for(&metrics, "head_too_large");
    let gave_way = closed_for(&metrics, "head_budget");
    eprintln!(
        "2,000 blocks of 96 KiB: RSS {before} KiB, peak {peak} KiB; {too_large} closed at the \
         bound, {gave_way} gave way"
    );
    // Half of the 160 MiB container limit.
    assert!(peak <= 80 * 1024, "peak RSS {peak} KiB (from {before})");
    assert!(too_large >= 1000.0, "{metrics}");
}

/// The same with blocks just under MAX_HEAD_BYTES (24 KiB): each is allowed, but all of them
/// together are held to MAX_HEAD_BYTES_TOTAL (16 MiB); past it the connections that have held
/// theirs longest give way.
#[tokio::test]
async fn two_thousand_unfinished_http2_header_blocks_share_one_budget() {
    let block = unfinished_block(&[16_384, 24 * 1024 - 16_384]);
    // Every one read: the blocks that gave way, and those held.
    let (before, peak, metrics) = unfinished_header_blocks(&block, |closed, open| {
        closed >= 1300.0 && closed + open >= 2000.0
    })
    .await;
    let gave_way = closed_for(&metrics, "head_budget");
    eprintln!("2,000 blocks of 24 KiB: RSS {before} KiB, peak {peak} KiB; {gave_way} gave way");
    assert!(peak <= 80 * 1024, "peak RSS {peak} KiB (from {before})");
    // 16 MiB holds 682 blocks of 24 KiB.
    assert!(gave_way >= 1300.0, "{metrics}");
    assert_eq!(closed_for(&metrics, "head_too_large"), 0.0, "{metrics}");
}

/// Issue 21: one connection may hold at most a fair share of the places. One h2c connection
/// asking 20 pages at once of a slow backend used to take every place, and another client got
/// a 503; it now gets at most three quarters of them, and the other client is served.
#[tokio::test]
async fn one_connection_holds_at_most_its_share_of_the_places() {
    let pki = TestPki::new();
    let (_recommendations, backend) =
        process::start_recommendations(pki.dir(), &[("ARTIFICIAL_DELAY_MS", "1500".into())]).await;
    let (mut marketplace, web) = process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("MAX_REQUESTS_IN_FLIGHT", "8".into()),
            ("RECOMMENDATIONS_TIMEOUT_MS", "5000".into()),
        ],
    )
    .await;
    let admin = marketplace.admin_addr().await;
    let tcp = TcpStream::connect(web).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut greedy = JoinSet::new();
    for _ in 0..20 {
        let mut client = client.clone();
        greedy.spawn(async move {
            let request = http::Request::get(format!("http://{web}/"))
                .body(())
                .expect("request");
            client = client.ready().await.ok()?;
            let (response, _) = client.send_request(request, true).ok()?;
            Some(response.await.ok()?.status().as_u16())
        });
    }
    // The greedy connection's calls have reached the backend (or been refused).
    raw::until_metric(
        admin,
        &["bookstore_requests_shed_total"],
        14.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        raw::get(web, "/").await,
        Some(200),
        "another client was refused"
    );
    let statuses: Vec<_> = greedy.join_all().await;
    let served = statuses.iter().filter(|s| **s == Some(200)).count();
    assert_eq!(served, 6, "{statuses:?}");
}
