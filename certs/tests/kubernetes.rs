//! `bookstore-certs --kubernetes` against a stand-in API server. No kube-apiserver can run on
//! this machine, so a small HTTPS server here plays its part for the requests the tool makes
//! (create one Secret, or a dry-run create that keeps nothing): it checks the bearer token, keeps
//! what it is sent, and answers as the real one does (201, 409, 401, Status bodies). Anything
//! else (a get, a replace, a delete) is answered 405 and would fail the test.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

use bookstore_certs::{
    Authority, SHARES, Usage,
    kubernetes::{ApiServer, Outcome, ensure_secrets},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::Value;

const TOKEN: &str = "the-service-account-token";

#[derive(Default)]
struct State {
    secrets: BTreeMap<String, Value>,
    requests: Vec<String>,
    /// A Secret another run creates just before this run's first real (not dry-run) create.
    race: Option<(String, Value)>,
}

struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    fn start() -> Self {
        let ca = Authority::new("stand-in API server CA").expect("ca");
        let leaf = ca
            .issue(
                "kubernetes",
                &["127.0.0.1", "kubernetes.default.svc"],
                Usage::Server,
            )
            .expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("pem")],
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("pem"),
        )
        .expect("config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let conn = rustls::ServerConnection::new(config.clone()).expect("conn");
                let mut stream = rustls::StreamOwned::new(conn, tcp);
                let Some((head, body)) = read_request(&mut stream) else {
                    continue;
                };
                let (status, reply) = answer(&mut shared.lock().expect("lock"), &head, &body);
                let reply = reply.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
        });
        FakeApi {
            addr,
            ca_pem: ca.issued().cert_pem.clone(),
            state,
        }
    }

    fn client(&self, token: &str) -> ApiServer {
        ApiServer {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
            ca_pem: self.ca_pem.clone().into_bytes(),
            token: token.to_owned(),
            namespace: "bookstore".to_owned(),
        }
    }

    fn secret(&self, name: &str) -> Option<Value> {
        self.state.lock().expect("lock").secrets.get(name).cloned()
    }

    /// The requests since the last call, as `METHOD path`.
    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().expect("lock").requests)
    }
}

fn read_request(stream: &mut impl Read) -> Option<(String, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            while bytes.len() < end + 4 + len {
                let n = stream.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                bytes.extend_from_slice(&buf[..n]);
            }
            return Some((head, bytes[end + 4..end + 4 + len].to_vec()));
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
}

fn status(code: u16, message: &str) -> (u16, Value) {
    (
        code,
        serde_json::json!({"kind": "Status", "code": code, "message": message}),
    )
}

fn answer(state: &mut State, head: &str, body: &[u8]) -> (u16, Value) {
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    state.requests.push(format!("{method} {path}"));
    if !head.contains(&format!("Authorization: Bearer {TOKEN}\r\n")) {
        return status(401, "Unauthorized");
    }
    let Some(rest) = path.strip_prefix("/api/v1/namespaces/bookstore/secrets") else {
        return status(404, "no such path");
    };
    let sent = || serde_json::from_slice::<Value>(body).ok();
    let dry_run = match rest {
        "" => false,
        "?dryRun=All" => true,
        _ => return status(405, "not handled by the stand-in"),
    };
    if method != "POST" {
        return status(405, "not handled by the stand-in");
    }
    let Some(secret) = sent() else {
        return status(400, "not JSON");
    };
    if !dry_run && let Some((other, made)) = state.race.take() {
        state.secrets.insert(other, made);
    }
    let name = secret["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if state.secrets.contains_key(&name) {
        return status(409, &format!("secrets \"{name}\" already exists"));
    }
    if !dry_run {
        state.secrets.insert(name, secret.clone());
    }
    (201, secret)
}

fn files(secret: &Value) -> BTreeMap<String, String> {
    secret["stringData"]
        .as_object()
        .expect("stringData")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_owned()))
        .collect()
}

#[test]
fn a_fresh_namespace_gets_both_secrets_each_with_only_its_own_files() {
    let api = FakeApi::start();
    assert_eq!(
        ensure_secrets(&api.client(TOKEN)).expect("ensure"),
        Outcome::Written(vec!["recommendations-tls".into(), "marketplace-tls".into()])
    );
    let mut cas = Vec::new();
    for (service, wanted) in SHARES {
        let secret = api
            .secret(&format!("{service}-tls"))
            .expect("secret written");
        let files = files(&secret);
        let mut wanted: Vec<&str> = wanted.to_vec();
        wanted.sort_unstable();
        assert_eq!(files.keys().collect::<Vec<_>>(), wanted, "{service}");
        assert!(
            files.values().all(|v| v.starts_with("-----BEGIN ")),
            "{service}: PEM files"
        );
        assert_eq!(
            secret["metadata"]["labels"]["app.kubernetes.io/name"],
            *service
        );
        cas.push(files["ca.pem"].clone());
    }
    assert_eq!(cas[0], cas[1], "both services trust the same CA");
    assert_eq!(
        api.take_requests(),
        [
            "POST /api/v1/namespaces/bookstore/secrets?dryRun=All",
            "POST /api/v1/namespaces/bookstore/secrets?dryRun=All",
            "POST /api/v1/namespaces/bookstore/secrets",
            "POST /api/v1/namespaces/bookstore/secrets",
        ]
    );

    // The Job run again (a re-apply): both exist, nothing is read or written.
    assert_eq!(
        ensure_secrets(&api.client(TOKEN)).expect("again"),
        Outcome::AlreadyPresent
    );
    assert!(
        api.take_requests()
            .iter()
            .all(|r| r.ends_with("?dryRun=All"))
    );
}

#[test]
fn a_half_made_pair_is_named_and_left_alone() {
    let api = FakeApi::start();
    ensure_secrets(&api.client(TOKEN)).expect("first");
    let before = api.secret("recommendations-tls").expect("secret");
    api.state
        .lock()
        .expect("lock")
        .secrets
        .remove("marketplace-tls");
    api.take_requests();
    let err = ensure_secrets(&api.client(TOKEN)).expect_err("half a pair");
    let text = format!("{err:#}");
    assert!(
        text.contains("kubectl -n bookstore delete secret recommendations-tls"),
        "{text}"
    );
    assert_eq!(
        api.secret("recommendations-tls"),
        Some(before),
        "left as it was"
    );
    assert!(api.secret("marketplace-tls").is_none(), "no second CA");
    assert!(
        api.take_requests()
            .iter()
            .all(|r| r.ends_with("?dryRun=All"))
    );
}

#[test]
fn a_run_that_loses_the_race_for_the_first_secret_writes_nothing() {
    let api = FakeApi::start();
    // Another run creates recommendations-tls after this run's check and before its first create.
    let theirs = serde_json::json!({"metadata": {"name": "recommendations-tls"}});
    api.state.lock().expect("lock").race = Some(("recommendations-tls".into(), theirs.clone()));
    assert_eq!(
        ensure_secrets(&api.client(TOKEN)).expect("lost"),
        Outcome::AlreadyPresent
    );
    assert_eq!(
        api.secret("recommendations-tls"),
        Some(theirs),
        "theirs kept"
    );
    assert!(
        api.secret("marketplace-tls").is_none(),
        "no Secret from a second CA"
    );
}

#[test]
fn a_refused_token_is_an_error_that_says_what_the_server_said() {
    let api = FakeApi::start();
    let err = ensure_secrets(&api.client("stale-token")).expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("HTTP 401: Unauthorized"), "{text}");
    assert!(text.contains("k8s/base/pki.yaml"), "{text}");
    assert!(api.secret("recommendations-tls").is_none());
}

#[test]
fn an_api_server_with_another_ca_is_not_trusted() {
    let api = FakeApi::start();
    let mut client = api.client(TOKEN);
    client.ca_pem = Authority::new("someone else")
        .expect("ca")
        .issued()
        .cert_pem
        .clone()
        .into_bytes();
    let err = ensure_secrets(&client).expect_err("untrusted");
    assert!(format!("{err:#}").contains("POST /api/v1"), "{err:#}");
    assert!(api.secret("recommendations-tls").is_none());
}
