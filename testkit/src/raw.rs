//! Plain sockets for tests that act as a hostile or heavy client: one-line HTTP/1.1 requests,
//! the admin port's metrics, and a metric's value read from them.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How long any one exchange here may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one HTTP/1.1 response (head and a Content-Length body) from `stream`; its status, or
/// None if the connection closed or failed first.
pub async fn read_response(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(status)
}

/// Sends `GET path` on an open keep-alive connection and returns the status.
pub async fn get_on(stream: &mut TcpStream, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        stream.write_all(request.as_bytes()).await.ok()?;
        read_response(stream).await
    })
    .await
    .ok()
    .flatten()
}

/// `GET path` on a fresh connection; the status, or None if refused, closed or timed out.
pub async fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    get_on(&mut stream, path).await
}

/// The admin port's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    let mut stream = TcpStream::connect(admin).await.expect("connect to admin");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut text = String::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_to_string(&mut text))
        .await
        .expect("metrics in time")
        .expect("read metrics");
    text
}

/// The value of the first series whose line contains every one of `parts` (0 if none does).
pub fn metric(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to `timeout` for the first series on `admin` whose line contains every one of
/// `parts` to reach `at_least`: for a test to go on when something has happened, not after a
/// guess at how long it takes. It looks every 20 ms, so a test can act on the moment.
pub async fn until_metric(admin: SocketAddr, parts: &[&str], at_least: f64, timeout: Duration) {
    let what = format!("{parts:?} reaching {at_least}");
    crate::eventually_every(&what, timeout, Duration::from_millis(20), async || {
        let value = metric(&scrape(admin).await, parts);
        if value >= at_least {
            Ok(())
        } else {
            Err(format!("it stayed at {value}"))
        }
    })
    .await;
}

/// Waits up to `timeout` for the peer to close `stream` (EOF or reset), reading and discarding
/// whatever it sends; true if it did.
pub async fn closed_by_peer(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut sink = [0u8; 4096];
    tokio::time::timeout(timeout, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A port that takes every TCP connection and then neither reads nor writes, as a hung process
/// does while its kernel still accepts. Connections are held until the returned task is
/// aborted or the runtime ends.
pub async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}
