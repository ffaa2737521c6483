//! Finding the service's addresses: the system resolver, or a fixed list.

use std::net::SocketAddr;

use async_trait::async_trait;

/// Finds the current addresses of the service.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>>;
    /// What is being resolved, for logs.
    fn target(&self) -> String;
}

/// The system resolver (DNS, /etc/hosts), as every other program on the host sees it.
#[derive(Debug, Clone)]
pub struct DnsResolver {
    host: String,
    port: u16,
}

impl DnsResolver {
    pub fn new(host: String, port: u16) -> Self {
        DnsResolver { host, port }
    }
}

#[async_trait]
impl Resolve for DnsResolver {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        Ok(tokio::net::lookup_host((host, self.port)).await?.collect())
    }

    fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A fixed list of addresses, in place of a lookup (`RECOMMENDATIONS_ADDRS`): replicas on
/// distinct loopback addresses in a test or a chaos run, or a deployment without DNS.
#[derive(Debug, Clone)]
pub struct StaticResolver(pub Vec<SocketAddr>);

#[async_trait]
impl Resolve for StaticResolver {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.clone())
    }

    fn target(&self) -> String {
        let addrs: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        addrs.join(",")
    }
}
