//! What the load generator calls: `Recommend` over gRPC (mutual TLS or plaintext, over a fixed
//! number of HTTP/2 connections) or a URL over HTTP/1.1 with keep-alive, or over a fixed number
//! of plaintext HTTP/2 (h2c) connections.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use bookstore_common::tls;
use bookstore_proto::{
    BookCategory, RecommendationRequest, recommendations_client::RecommendationsClient,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::http1::Callers;

/// What [`Target::call`] answers, so users of a target find it here too.
pub use crate::outcome::Outcome;

/// TLS material for a gRPC target; none means plaintext.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    pub ca: PathBuf,
    /// Client certificate and key, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server certificate must carry.
    pub server_name: String,
}

/// Where to connect for `addr`: mutual TLS with `tls` (its files read now), else plaintext.
pub fn endpoint(addr: &str, tls: Option<&GrpcTls>) -> anyhow::Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .context("bad address")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(tls::load_ca(&tls.ca)?)
            .domain_name(tls.server_name.clone());
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(tls::load_identity(cert, key)?);
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint)
}

/// One HTTP/2 connection to `endpoint` (which is `addr`), established now.
pub async fn connect(endpoint: &Endpoint, addr: &str) -> anyhow::Result<Channel> {
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// A target and its open connections.
#[derive(Debug, Clone)]
pub enum Target {
    Grpc {
        label: String,
        clients: Vec<RecommendationsClient<Channel>>,
        request: RecommendationRequest,
    },
    /// HTTP/1.1, a connection per caller.
    Http1 {
        label: String,
        callers: Arc<Callers>,
    },
    /// HTTP/1.1 from one shared pool (the open loop's crowd).
    Crowd {
        label: String,
        client: reqwest::Client,
        url: String,
    },
    /// HTTP/2 with prior knowledge, a client per connection.
    H2c {
        label: String,
        clients: Vec<reqwest::Client>,
        url: String,
    },
}

impl Target {
    /// `connections` HTTP/2 connections to `addr`, each established before the run starts.
    pub async fn grpc(
        addr: &str,
        tls: Option<GrpcTls>,
        connections: usize,
        max_results: i32,
    ) -> anyhow::Result<Self> {
        let endpoint = endpoint(addr, tls.as_ref())?;
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            clients.push(RecommendationsClient::new(connect(&endpoint, addr).await?));
        }
        let kind = match &tls {
            Some(t) if t.identity.is_some() => "grpc+mtls",
            Some(_) => "grpc+tls",
            None => "grpc",
        };
        Ok(Target::Grpc {
            label: format!("{kind}://{addr}"),
            clients,
            request: RecommendationRequest {
                user_id: 1,
                category: BookCategory::Mystery as i32,
                max_results,
            },
        })
    }

    /// HTTP/1.1 to `url` over exactly `connections` keep-alive connections, one per caller
    /// ([`Callers`]).
    pub fn http(url: &str, connections: usize) -> anyhow::Result<Self> {
        Ok(Target::Http1 {
            label: url.to_owned(),
            callers: Arc::new(Callers::new(url, connections)?),
        })
    }

    /// HTTP/1.1 to `url` as a crowd: one pool that opens a connection whenever a call finds
    /// none idle and keeps up to `idle` of them, so an open loop that outruns the server brings
    /// new connections, as more visitors would.
    pub fn http_crowd(url: &str, idle: usize) -> anyhow::Result<Self> {
        Ok(Target::Crowd {
            label: url.to_owned(),
            client: http1_client(idle.max(1))?,
            url: url.to_owned(),
        })
    }

    /// HTTP/2 with prior knowledge (h2c) to `url`, over exactly `connections` connections:
    /// callers share them, many streams each.
    pub fn h2c(url: &str, connections: usize) -> anyhow::Result<Self> {
        let clients = (0..connections.max(1))
            .map(|_| {
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .tcp_nodelay(true)
                    .timeout(Duration::from_secs(30))
                    .build()
            })
            .collect::<Result<_, _>>()?;
        Ok(Target::H2c {
            label: format!("h2c {url}"),
            clients,
            url: url.to_owned(),
        })
    }

    pub fn label(&self) -> &str {
        match self {
            Target::Grpc { label, .. }
            | Target::Http1 { label, .. }
            | Target::Crowd { label, .. }
            | Target::H2c { label, .. } => label,
        }
    }

    /// Connections in use (gRPC, h2c and HTTP/1.1 callers: fixed; the crowd: at most one per
    /// call outstanding).
    pub fn connections(&self, concurrency: usize) -> usize {
        match self {
            Target::Grpc { clients, .. } => clients.len(),
            Target::H2c { clients, .. } => clients.len(),
            Target::Http1 { callers, .. } => callers.len(),
            Target::Crowd { .. } => concurrency,
        }
    }

    /// One call, from caller number `worker` (which picks its connection).
    pub async fn call(&self, worker: usize) -> Outcome {
        match self {
            Target::Grpc {
                clients, request, ..
            } => {
                let mut client = clients[worker % clients.len()].clone();
                match client.recommend(*request).await {
                    Ok(_) => Outcome::Ok,
                    Err(status) => Outcome::Failed(format!("grpc:{:?}", status.code())),
                }
            }
            Target::Http1 { callers, .. } => callers.call(worker).await,
            Target::Crowd { client, url, .. } => get(client, url).await,
            Target::H2c { clients, url, .. } => get(&clients[worker % clients.len()], url).await,
        }
    }
}

/// One GET of `url`, its whole body read, as a browser would.
async fn get(client: &reqwest::Client, url: &str) -> Outcome {
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(_) if status.is_success() => Outcome::Ok,
                Ok(_) => Outcome::Failed(format!("http:{}", status.as_u16())),
                Err(_) => Outcome::Failed("http:body".into()),
            }
        }
        Err(e) if e.is_timeout() => Outcome::Failed("http:timeout".into()),
        Err(_) => Outcome::Failed("http:transport".into()),
    }
}

/// An HTTP/1.1 client keeping up to `idle` connections open between calls.
fn http1_client(idle: usize) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(idle)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_reports_the_connections_it_holds() {
        let url = "http://127.0.0.1:9/";
        let concurrency = 100;
        let h2c = |n| {
            Target::h2c(url, n)
                .expect("client")
                .connections(concurrency)
        };
        assert_eq!(h2c(1), 1);
        assert_eq!(h2c(8), 8);
        let http1 = Target::http(url, 32).expect("callers");
        assert_eq!(http1.connections(concurrency), 32);
        let crowd = Target::http_crowd(url, 50).expect("client");
        assert_eq!(crowd.connections(concurrency), concurrency);
    }
}
