//! How to open a channel to one address: TLS, timeouts and keepalive, shared by every address.

use std::{net::SocketAddr, time::Duration};

use bookstore_common::request_log::Sampling;
use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How often a connection with nothing coming in is pinged, and how long the answer may take:
/// a frozen or cut-off peer is found within about two seconds, idle or busy.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// How to open a channel to one address: TLS settings and timeouts, shared by every address.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// None for plaintext (`TLS_MODE=off`).
    pub tls: Option<ClientTlsConfig>,
    pub connect_timeout: Duration,
    /// Calls in flight to one address at most; more wait for a slot (see
    /// [`crate::source::GrpcSource`]). Kept below the server's per-connection limit, so a burst
    /// waits here instead of being shed there.
    pub max_calls: usize,
    /// Which calls get a log line of their own.
    pub lines: Sampling,
}

impl ChannelSettings {
    pub(super) fn channel(&self, addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // SocketAddr's Display brackets IPv6 literals, as a URI needs.
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        // With a connector of our own, tonic bounds the whole handshake, TCP and TLS, by the
        // connect timeout; its own connector bounds only the TCP connect. A hung replica's
        // kernel still accepts, so a call waiting for that connection waited as long as the
        // replica stayed hung, holding its call slot, never failing, so never ejecting it.
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        Ok(endpoint.connect_with_connector_lazy(tcp))
    }
}
