//! Behind a proxy: the real binary believes `X-Forwarded-For` and `X-Forwarded-Proto` from the
//! addresses in `TRUSTED_PROXIES` only. The stand-in proxy is a client on 127.0.0.2 sending what
//! an ingress controller sends (the client's address appended, the scheme it was reached by);
//! the forger is a client on 127.0.0.1 sending the same headers, which must be ignored.

use std::{net::IpAddr, time::Duration};

use bookstore_testkit::{TestPki, process};

/// Requests `/style.css` from `from` with these headers; returns whether the answer carried
/// HSTS, and the request's log line.
async fn request(
    web: &mut process::ServiceProcess,
    addr: std::net::SocketAddr,
    from: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> (bool, String) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().expect("ip"))
        .build()
        .expect("client");
    let mut request = client
        .get(format!("http://{addr}/style.css"))
        .header("x-request-id", id);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("answer");
    assert_eq!(response.status(), 200);
    let hsts = response.headers().get("strict-transport-security").cloned();
    let line = web
        .wait_for_line(&format!("request_id={id}"), Duration::from_secs(5))
        .await;
    if let Some(hsts) = &hsts {
        assert_eq!(hsts, "max-age=31536000");
    }
    (hsts.is_some(), line)
}

#[tokio::test]
async fn forwarded_headers_count_from_a_trusted_proxy_only() {
    let pki = TestPki::new();
    // No backend: the stylesheet needs none.
    let backend = process::unused_address();
    let (mut web, addr) = process::start_marketplace(
        pki.dir(),
        backend,
        &[
            ("LISTEN_ADDR", "0.0.0.0:0".to_owned()),
            ("TRUSTED_PROXIES", "127.0.0.2/32,10.0.0.0/8".to_owned()),
            ("LOG_SAMPLE", "1".to_owned()),
        ],
    )
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let forwarded = [
        ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
        ("x-forwarded-proto", "https"),
    ];

    // Through the proxy: the client is the hop left of it, and it came over HTTPS.
    let (hsts, line) = request(&mut web, addr, "127.0.0.2", "via-proxy", &forwarded).await;
    assert!(hsts, "HTTPS through a trusted proxy gets HSTS");
    assert!(line.contains("client_addr=198.51.100.7"), "{line}");

    // The same headers straight from a client: ignored.
    let (hsts, line) = request(&mut web, addr, "127.0.0.1", "forged", &forwarded).await;
    assert!(!hsts, "a forged scheme gets no HSTS");
    assert!(line.contains("client_addr=127.0.0.1"), "{line}");
    assert!(
        !line.contains("198.51.100.7") && !line.contains("6.6.6.6"),
        "{line}"
    );

    // Through the proxy over plain HTTP: the client's address, no HSTS.
    let (hsts, line) = request(
        &mut web,
        addr,
        "127.0.0.2",
        "plain",
        &[
            ("x-forwarded-for", "198.51.100.8"),
            ("x-forwarded-proto", "http"),
        ],
    )
    .await;
    assert!(!hsts);
    assert!(line.contains("client_addr=198.51.100.8"), "{line}");
}
