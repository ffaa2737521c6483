//! The bad-peer matrix, as real TLS handshakes against the real binary: each bad client is
//! refused, the log says why (without key material), and good clients keep being served. The
//! client-side cases check that our client refuses bad servers.

use std::time::Duration;

use bookstore_certs::{Authority, Issued, Usage};
use bookstore_testkit::{
    TestPki, grpc_client, identity, mystery, process::ServiceProcess, trusted_client,
};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tonic::Code;

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

#[tokio::test]
async fn every_bad_client_is_refused_with_its_reason_logged() {
    let pki = TestPki::new();
    let mut server = ServiceProcess::start(
        "recommendations",
        &[
            ("LISTEN_ADDR", "127.0.0.1:0".into()),
            ("CERTS_DIR", pki.dir().display().to_string()),
        ],
    );
    let addr = server.listening_addr().await;
    let ca = &pki.pki.ca;
    let now = OffsetDateTime::now_utc();
    let rogue_ca = Authority::new("Rogue CA").expect("ca");
    let self_signed = {
        let made =
            rcgen::generate_simple_self_signed(vec!["marketplace".to_owned()]).expect("cert");
        Issued {
            cert_pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
        }
    };

    // (case, client identity, reason the server must log)
    let cases: Vec<(&str, Option<Issued>, &str)> = vec![
        ("no certificate", None, "peer sent no certificates"),
        ("self-signed", Some(self_signed), "UnknownIssuer"),
        (
            "another CA",
            Some(
                rogue_ca
                    .issue("marketplace", &["marketplace"], Usage::Client)
                    .expect("cert"),
            ),
            "UnknownIssuer",
        ),
        (
            "expired",
            Some(
                ca.issue_valid(
                    "marketplace",
                    &["marketplace"],
                    Usage::Client,
                    now - days(30),
                    now - days(1),
                )
                .expect("cert"),
            ),
            "certificate expired",
        ),
        (
            "not yet valid",
            Some(
                ca.issue_valid(
                    "marketplace",
                    &["marketplace"],
                    Usage::Client,
                    now + days(1),
                    now + days(30),
                )
                .expect("cert"),
            ),
            "certificate not valid yet",
        ),
        (
            "server certificate used as a client (no clientAuth usage)",
            Some(
                ca.issue("marketplace", &["marketplace"], Usage::Server)
                    .expect("cert"),
            ),
            "does not allow extended key usage for client authentication",
        ),
    ];
    for (n, (case, client_identity, reason)) in cases.into_iter().enumerate() {
        let key_line = client_identity
            .as_ref()
            .and_then(|i| i.key_pem.lines().nth(1).map(str::to_owned));
        let status = grpc_client(
            addr,
            pki.ca_certificate(),
            client_identity.as_ref().map(identity),
            "localhost",
        )
        .recommend(mystery())
        .await
        .expect_err(case);
        assert_ne!(status.code(), Code::Ok, "{case}");
        let line = server
            .wait_for_nth("TLS handshake refused", n + 1, Duration::from_secs(10))
            .await;
        assert!(
            line.contains(reason),
            "{case}: expected {reason:?} in {line}"
        );
        if let Some(key_line) = key_line {
            assert!(!line.contains(&key_line), "{case}: key material in the log");
        }
        trusted_client(addr, &pki)
            .recommend(mystery())
            .await
            .unwrap_or_else(|e| panic!("after {case}: {e:?}"));
    }

    // Plaintext HTTP/2 to the TLS port.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let line = server
        .wait_for_nth("TLS handshake refused", 7, Duration::from_secs(10))
        .await;
    assert!(
        line.contains("InvalidContentType") || line.contains("corrupt message"),
        "{line}"
    );

    // A certificate from our CA whose identity is not allowed: the handshake succeeds, the call
    // does not.
    let stranger = ca
        .issue("stranger", &["stranger"], Usage::Client)
        .expect("cert");
    let status = grpc_client(
        addr,
        pki.ca_certificate(),
        Some(identity(&stranger)),
        "localhost",
    )
    .recommend(mystery())
    .await
    .expect_err("not allowed");
    assert_eq!(status.code(), Code::PermissionDenied);
    server
        .wait_for_line("not in ALLOWED_CLIENTS", Duration::from_secs(5))
        .await;
    trusted_client(addr, &pki)
        .recommend(mystery())
        .await
        .expect("still serving");
}

/// Our client refuses an expired server certificate. The recommendations binary cannot be
/// started with one (start-up checks refuse it), so a bare TLS server presents it.
#[tokio::test]
async fn the_client_refuses_an_expired_server_certificate() {
    let pki = TestPki::new();
    let now = OffsetDateTime::now_utc();
    let expired = pki
        .pki
        .ca
        .issue_valid(
            "recommendations",
            &["localhost"],
            Usage::Server,
            now - days(30),
            now - days(1),
        )
        .expect("cert");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let chain = rustls::pki_types::CertificateDer::from_pem_slice(expired.cert_pem.as_bytes())
        .expect("pem");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(expired.key_pem.as_bytes()).expect("pem");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![chain], key)
    .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let status = trusted_client(addr, &pki)
        .recommend(mystery())
        .await
        .expect_err("expired server");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(format!("{status:?}").contains("Expired"), "{status:?}");
}

use rustls::pki_types::pem::PemObject;
