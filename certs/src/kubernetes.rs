//! The development PKI made inside a cluster, as Kubernetes Secrets: what the `pki` Job of
//! `k8s/base/pki.yaml` runs, so `kubectl apply -k k8s` needs no step before it.
//!
//! If both Secrets exist they are left alone; if neither does a new PKI is made and both are
//! created; if only one does, the tool stops and names it: it never replaces or deletes a Secret
//! (k8s/base/pki.yaml gives its account `create` only, and an admission policy refuses any other
//! write to the two Secrets from inside the namespace), so mending a half-made pair is the
//! operator's step. Whether a Secret exists is learnt from a dry-run create (409 if it does), so
//! the tool never reads one. The CA's private key is used in memory and dropped: it is never
//! stored in the cluster.
//!
//! The API client is a few lines of HTTP/1.1 over rustls rather than a Kubernetes client crate:
//! it makes one kind of request (create one Secret, dry-run or not) and runs once per install.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use crate::{DevPki, Issued, SHARES};

/// Where a pod finds its service account's credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The API server as seen from inside a pod.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// Host (an IP address or a name the server certificate carries) and port.
    pub host: String,
    pub port: u16,
    /// The CA bundle that signs the API server's certificate, PEM.
    pub ca_pem: Vec<u8>,
    /// The service account's bearer token.
    pub token: String,
    /// The namespace to write into.
    pub namespace: String,
}

impl ApiServer {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST` and `_PORT`, and the token, CA and
    /// namespace files of the pod's service account.
    pub fn in_cluster() -> Result<Self> {
        let env = |name: &str| {
            std::env::var(name).with_context(|| {
                format!("{name} is not set: --kubernetes runs inside a Kubernetes pod")
            })
        };
        let host = env("KUBERNETES_SERVICE_HOST")?;
        let port = env("KUBERNETES_SERVICE_PORT")?
            .parse()
            .context("KUBERNETES_SERVICE_PORT is not a port number")?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let read = |name: &str| {
            std::fs::read(dir.join(name)).with_context(|| {
                format!(
                    "{}: cannot read (is the service account token mounted?)",
                    dir.join(name).display()
                )
            })
        };
        Ok(ApiServer {
            host,
            port,
            ca_pem: read("ca.crt")?,
            token: String::from_utf8_lossy(&read("token")?).trim().to_owned(),
            namespace: String::from_utf8_lossy(&read("namespace")?)
                .trim()
                .to_owned(),
        })
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots
                .add(der.context("the service account's ca.crt")?)
                .context("the service account's ca.crt")?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Sends one request with `Connection: close` and returns the status and body.
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let name = ServerName::try_from(self.host.clone())
            .with_context(|| format!("{:?} is not a host name or address", self.host))?;
        let conn = rustls::ClientConnection::new(self.tls()?, name).context("TLS client")?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port))
            .with_context(|| format!("resolving {}", self.host))?
            .next()
            .with_context(|| format!("{} has no address", self.host))?;
        let tcp = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
            .with_context(|| format!("connecting to the API server at {addr}"))?;
        tcp.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        tcp.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: kubernetes.default.svc\r\n\
             Authorization: Bearer {}\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             User-Agent: bookstore-certs\r\nConnection: close\r\n\r\n",
            self.token,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .and_then(|()| stream.flush())
            .with_context(|| format!("{method} {path}: sending"))?;
        let mut response = Vec::new();
        match stream.read_to_end(&mut response) {
            Ok(_) => {}
            // A server that closes without TLS close_notify: what arrived is the whole answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(e).with_context(|| format!("{method} {path}: reading")),
        }
        parse_response(&response).with_context(|| format!("{method} {path}"))
    }
}

/// The status code and body of an HTTP/1.1 response.
fn parse_response(response: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .context("the API server's answer is not an HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `message` of a Kubernetes `Status` body, or the start of the body.
fn reason(body: &str) -> String {
    let json = body.find('{').map_or(body, |start| &body[start..]);
    let json = json.rfind('}').map_or(json, |end| &json[..=end]);
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// The Secret holding `service`'s files.
pub fn secret_name(service: &str) -> String {
    format!("{service}-tls")
}

/// What [`ensure_secrets`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both Secrets were there and were left alone.
    AlreadyPresent,
    /// A new PKI was written to the Secrets named.
    Written(Vec<String>),
}

/// Makes sure each service's Secret exists (see the module documentation).
pub fn ensure_secrets(api: &ApiServer) -> Result<Outcome> {
    let base = format!("/api/v1/namespaces/{}/secrets", api.namespace);
    // Which Secrets exist, without reading them: a dry-run create persists nothing and answers
    // 409 AlreadyExists for a name that is taken. The probe carries no data.
    let mut present = Vec::new();
    for (service, _) in SHARES {
        let name = secret_name(service);
        let probe = secret_body(&name, &api.namespace, service, serde_json::Map::new());
        let (status, body) = api.request("POST", &format!("{base}?dryRun=All"), Some(&probe))?;
        match status {
            409 => present.push(name),
            200..=299 => {}
            _ => bail!(
                "checking Secret {name}: HTTP {status}: {}{}",
                reason(&body),
                hint(status)
            ),
        }
    }
    match present.len() {
        0 => {}
        n if n == SHARES.len() => return Ok(Outcome::AlreadyPresent),
        _ => bail!(
            "{} exists without the rest of its pair, and is never replaced from inside the cluster: \
             delete it (kubectl -n {} delete secret {}) and run the Job again",
            present.join(", "),
            api.namespace,
            present.join(" ")
        ),
    }
    let pki = DevPki::new()?;
    let mut written = Vec::new();
    for (service, files) in SHARES {
        let name = secret_name(service);
        let secret = secret_json(&name, &api.namespace, service, files, &pki)?;
        let (status, body) = api.request("POST", &base, Some(&secret))?;
        match status {
            200..=299 => written.push(name),
            // Another run made the first Secret between the check and now: it makes the pair,
            // in the same order, from its own CA. Stop, so no second CA joins it.
            409 if written.is_empty() => return Ok(Outcome::AlreadyPresent),
            _ => bail!(
                "creating Secret {name}: HTTP {status}: {}{}",
                reason(&body),
                hint(status)
            ),
        }
    }
    Ok(Outcome::Written(written))
}

fn hint(status: u16) -> &'static str {
    match status {
        401 | 403 => {
            " (the Job's service account needs the Role, and the admission policy must allow it: \
             k8s/base/pki.yaml)"
        }
        _ => "",
    }
}

/// A Secret with `files` of `pki` as `stringData` (the API server encodes it).
fn secret_json(
    name: &str,
    namespace: &str,
    service: &str,
    files: &[&str],
    pki: &DevPki,
) -> Result<String> {
    let mut data = serde_json::Map::new();
    for file in files {
        data.insert((*file).to_owned(), pki.file(file)?.into());
    }
    Ok(secret_body(name, namespace, service, data))
}

/// The Secret `name` of `service`, with `data` as its `stringData`.
fn secret_body(
    name: &str,
    namespace: &str,
    service: &str,
    data: serde_json::Map<String, serde_json::Value>,
) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": service,
                "app.kubernetes.io/part-of": "bookstore",
                "app.kubernetes.io/component": "pki",
                "app.kubernetes.io/managed-by": "bookstore-certs",
            },
        },
        "type": "Opaque",
        "stringData": data,
    })
    .to_string()
}

impl DevPki {
    /// The contents of one of [`crate::FILES`].
    pub fn file(&self, name: &str) -> Result<String> {
        let issued: &Issued = match name.split_once('.') {
            Some(("ca", _)) => self.ca.issued(),
            Some(("server", _)) => &self.server,
            Some(("client", _)) => &self.client,
            _ => bail!("{name}: not a PKI file"),
        };
        Ok(match name.rsplit_once('.') {
            Some((_, "pem")) => issued.cert_pem.clone(),
            Some((_, "key")) => issued.key_pem.clone(),
            _ => bail!("{name}: not a PKI file"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_gives_its_status_and_the_status_message() {
        let (status, body) = parse_response(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\r\n\
              {\"kind\":\"Status\",\"message\":\"secrets is forbidden\"}",
        )
        .expect("parse");
        assert_eq!(status, 403);
        assert_eq!(reason(&body), "secrets is forbidden");
        assert!(parse_response(b"SSH-2.0-OpenSSH").is_err());
    }

    #[test]
    fn each_secret_holds_its_service_files_and_never_the_ca_key() {
        let pki = DevPki::new().expect("pki");
        for (service, files) in SHARES {
            let json = secret_json(&secret_name(service), "bookstore", service, files, &pki)
                .expect("json");
            let secret: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            let mut keys: Vec<&str> = secret["stringData"]
                .as_object()
                .expect("stringData")
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut want = files.to_vec();
            want.sort_unstable();
            assert_eq!(keys, want, "{service}");
            assert!(!json.contains(&pki.ca.issued().key_pem.replace('\n', "\\n")));
        }
    }
}
