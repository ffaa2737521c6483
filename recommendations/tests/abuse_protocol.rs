//! The gRPC edge under hand-made HTTP/2 requests, seen from outside: the real binary on
//! loopback in plaintext, requests written with the h2 client frame by frame, and the server's
//! own log and metrics. Requests that break the gRPC protocol are refused with a status and a
//! text of ours: an undecodable body, the wrong content type or method, two messages or none,
//! a message cut off by a reset, a compressed one. The rest of the edge under abuse is in
//! `abuse.rs`.

use std::time::Duration;

use bookstore_testkit::{
    eventually, mystery,
    process::{self, ServiceProcess},
    raw,
};
use bytes::Bytes;
use recommendations::edge::UNDECODABLE;
use tokio::net::TcpStream;

/// An HTTP/2 connection to a plaintext recommendations server, for hand-made requests.
async fn h2_plaintext() -> (ServiceProcess, h2::client::SendRequest<Bytes>) {
    let (server, addr) = process::start_recommendations(
        std::path::Path::new("/nonexistent"),
        &[("TLS_MODE", "off".into())],
    )
    .await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    (server, client)
}

/// A gRPC message frame: flag, length, bytes.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// What came back for a hand-made request: the HTTP status, the gRPC status (headers or
/// trailers) and message.
#[derive(Debug)]
struct Answer {
    http: u16,
    grpc: Option<String>,
    message: String,
}

async fn send(
    client: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Answer {
    let request = http::Request::builder()
        .method(method)
        .uri("http://localhost/Recommendations/Recommend")
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .expect("request");
    let ready = client.clone().ready().await.expect("ready");
    *client = ready;
    let (response, mut stream) = client.send_request(request, false).expect("send");
    stream.send_data(Bytes::from(body), true).expect("body");
    let response = response.await.expect("response");
    let http = response.status().as_u16();
    let mut grpc = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let mut message = response
        .headers()
        .get("grpc-message")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if grpc.is_none()
        && let Ok(Some(trailers)) = body.trailers().await
    {
        grpc = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        message = trailers
            .get("grpc-message")
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
    }
    Answer {
        http,
        grpc,
        message,
    }
}

/// Row 11: an undecodable body used to send the decoder's own text back
/// (`failed to decode Protobuf message: …`).
#[tokio::test]
async fn an_undecodable_request_gets_internal_with_a_fixed_text_of_ours() {
    let (_server, mut client) = h2_plaintext().await;
    // Field 1 (user_id, a varint) sent as a length-delimited field: not a valid message.
    let answer = send(
        &mut client,
        "POST",
        "application/grpc",
        grpc_frame(&[0x0a, 0x02, 0x41, 0x42]),
    )
    .await;
    assert_eq!(answer.grpc.as_deref(), Some("13"), "{answer:?}");
    assert_eq!(
        answer.message.replace("%20", " "),
        UNDECODABLE,
        "{answer:?}"
    );
}

/// Row 12: a non-gRPC content-type, a GET, or a unary call carrying two messages (or none)
/// used to be served as if nothing were wrong.
#[tokio::test]
async fn requests_that_break_the_grpc_protocol_are_refused() {
    let (_server, mut client) = h2_plaintext().await;
    let valid = prost::Message::encode_to_vec(&mystery());

    let answer = send(&mut client, "POST", "text/plain", grpc_frame(&valid)).await;
    assert_eq!(answer.http, 415, "{answer:?}");
    let answer = send(&mut client, "GET", "application/grpc", Vec::new()).await;
    assert_eq!(answer.http, 405, "{answer:?}");

    let two = [grpc_frame(&valid), grpc_frame(&valid)].concat();
    let answer = send(&mut client, "POST", "application/grpc", two).await;
    assert_eq!(
        answer.grpc.as_deref(),
        Some("12"),
        "two messages: {answer:?}"
    );
    let answer = send(&mut client, "POST", "application/grpc", Vec::new()).await;
    assert_eq!(answer.grpc.as_deref(), Some("12"), "no message: {answer:?}");

    let answer = send(
        &mut client,
        "POST",
        "application/grpc+proto",
        grpc_frame(&valid),
    )
    .await;
    assert_eq!(
        (answer.http, answer.grpc.as_deref()),
        (200, Some("0")),
        "one message is served: {answer:?}"
    );
}

/// Issue 21: a call whose client reset its stream before its message was whole was counted and
/// logged as UNKNOWN "internal error"; the caller gave up, which is CANCELLED.
#[tokio::test]
async fn a_call_cut_off_by_its_client_is_counted_as_cancelled() {
    let (mut server, client) = h2_plaintext().await;
    let admin = server.admin_addr().await;
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/Recommendations/Recommend")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut ready = client.clone().ready().await.expect("ready");
    let (_response, mut stream) = ready.send_request(request, false).expect("send");
    // A frame header promising 10 bytes, and 3 of them; then the client gives up.
    stream
        .send_data(Bytes::from_static(&[0, 0, 0, 0, 10, 8, 1, 16]), false)
        .expect("part of a message");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.send_reset(h2::Reason::CANCEL);
    let code = |code: &str| {
        let code = format!("grpc_code=\"{code}\"");
        move |text: &str| {
            raw::metric(
                text,
                &["grpc_server_handled_total", "Recommend\"", code.as_str()],
            )
        }
    };
    let text = eventually("the call counted", Duration::from_secs(10), async || {
        let text = raw::scrape(admin).await;
        if code("Canceled")(&text) + code("Unknown")(&text) + code("Internal")(&text) > 0.0 {
            Ok(text)
        } else {
            Err(format!("the server's metrics:\n{text}"))
        }
    })
    .await;
    assert_eq!(code("Canceled")(&text), 1.0, "{text}");
    assert_eq!(
        code("Unknown")(&text) + code("Internal")(&text),
        0.0,
        "{text}"
    );
    // It is the caller's doing: no warning for it.
    let warnings: Vec<_> = server
        .read_available()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("gRPC call"))
        .cloned()
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Issue 21: a compressed request got the library's own text ("Content is compressed with
/// `gzip` which isn't supported"); it gets UNIMPLEMENTED with a text of ours, which says what
/// to do instead.
#[tokio::test]
async fn a_compressed_request_is_told_to_come_uncompressed() {
    let (_server, client) = h2_plaintext().await;
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/Recommendations/Recommend")
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "gzip")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut ready = client.clone().ready().await.expect("ready");
    let (response, mut stream) = ready.send_request(request, false).expect("send");
    // The compressed flag set, on a few bytes that are not gzip at all.
    stream
        .send_data(Bytes::from_static(&[1, 0, 0, 0, 2, 8, 1]), true)
        .expect("body");
    let response = response.await.expect("response");
    let headers = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.map(|c| body.flow_control().release_capacity(c.len()));
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    let status = |name: &str| {
        headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap_or("").to_owned())
    };
    assert_eq!(
        status("grpc-status").as_deref(),
        Some("12"),
        "{headers:?} {trailers:?}"
    );
    let message = status("grpc-message")
        .unwrap_or_default()
        .replace("%20", " ");
    assert_eq!(
        message,
        recommendations::edge::COMPRESSED,
        "{headers:?} {trailers:?}"
    );
}
