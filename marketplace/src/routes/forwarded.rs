//! Who a request came from, behind a proxy: the client's address and whether it used HTTPS.
//!
//! `X-Forwarded-For` and `X-Forwarded-Proto` are believed only when the connection comes from
//! an address in `TRUSTED_PROXIES`; from anyone else they are ignored, so a client cannot
//! choose the address its requests are logged under. The client is the first address, read
//! from the right of `X-Forwarded-For`, that is not itself a trusted proxy: each proxy appends
//! the address it was called from, and anything to the left of the last trusted hop was
//! written by the client. (`Forwarded`, RFC 7239, is not read: the ingress controllers and
//! load balancers in use write the `X-Forwarded-*` pair.)

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use axum::http::HeaderMap;

const FORWARDED_FOR: &str = "x-forwarded-for";
const FORWARDED_PROTO: &str = "x-forwarded-proto";

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range (an IPv4 address written as IPv6, `::ffff:a.b.c.d`, counts
    /// as the IPv4 address: what a dual-stack listener reports).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` agree.
fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = (usize::from(prefix / 8), prefix % 8);
    a[..bytes] == b[..bytes]
        && (bits == 0 || {
            let mask = 0xff_u8 << (8 - bits);
            a[bytes] & mask == b[bytes] & mask
        })
}

impl FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or an address/prefix range"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {width}"))?,
        };
        Ok(IpRange { network, prefix })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The proxies whose `X-Forwarded-*` headers are believed (`TRUSTED_PROXIES`); none by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[IpRange]>);

impl TrustedProxies {
    pub fn new(ranges: &[IpRange]) -> Self {
        TrustedProxies(ranges.into())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(ip))
    }
}

/// Where a request came from, as far as can be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client's address: the connection's, or the one a trusted proxy forwarded.
    pub client: Option<IpAddr>,
    /// A trusted proxy says the client used HTTPS.
    pub https: bool,
}

impl TrustedProxies {
    /// The origin of a request that came on a connection from `peer` with these headers.
    pub fn origin(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Origin {
        let Some(peer) = peer.map(|p| p.ip().to_canonical()) else {
            return Origin {
                client: None,
                https: false,
            };
        };
        if !self.trusts(peer) {
            return Origin {
                client: Some(peer),
                https: false,
            };
        }
        // Every X-Forwarded-For field, in order, as one list.
        let hops: Vec<&str> = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                // Garbage: nothing left of it can be believed; the last trusted hop stands.
                None => break,
            }
        }
        let https = headers
            .get(FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
        Origin {
            client: Some(client),
            https,
        }
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(ranges: &[&str]) -> TrustedProxies {
        let ranges: Vec<IpRange> = ranges.iter().map(|r| r.parse().expect("range")).collect();
        TrustedProxies::new(&ranges)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("value"));
        }
        map
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().expect("ip"), 40_000))
    }

    #[test]
    fn ranges_parse_and_match() {
        let range: IpRange = "10.0.0.0/8".parse().expect("range");
        assert!(range.contains("10.200.1.2".parse().expect("ip")));
        assert!(range.contains("::ffff:10.0.0.1".parse().expect("ip")));
        assert!(!range.contains("11.0.0.1".parse().expect("ip")));
        let range: IpRange = "fd00::/8".parse().expect("range");
        assert!(range.contains("fd12::1".parse().expect("ip")));
        assert!(!range.contains("fe80::1".parse().expect("ip")));
        let one: IpRange = "192.168.1.7".parse().expect("one address");
        assert_eq!(one.to_string(), "192.168.1.7/32");
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("proxy.example".parse::<IpRange>().is_err());
        assert!(
            "10.0.0.0/23"
                .parse::<IpRange>()
                .expect("range")
                .contains("10.0.1.255".parse().expect("ip"))
        );
    }

    #[test]
    fn headers_from_an_untrusted_address_are_ignored() {
        let forged = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let origin = proxies(&["10.0.0.0/8"]).origin(peer("203.0.113.9"), &forged);
        assert_eq!(
            origin,
            Origin {
                client: Some("203.0.113.9".parse().expect("ip")),
                https: false
            }
        );
        let nobody = TrustedProxies::default().origin(peer("10.0.0.1"), &forged);
        assert_eq!(nobody.client, Some("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // The client forged the first entry; the ingress appended the client's real address;
        // an inner proxy appended the ingress's.
        let chain = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "10.1.0.5"),
            ("x-forwarded-proto", "https"),
        ]);
        let origin = trusted.origin(peer("10.2.0.9"), &chain);
        assert_eq!(origin.client, Some("198.51.100.7".parse().expect("ip")));
        assert!(origin.https);
        // Garbage stops the walk at the last trusted hop.
        let garbage = headers(&[("x-forwarded-for", "198.51.100.7, not-an-ip, 10.1.0.5")]);
        let origin = trusted.origin(peer("10.2.0.9"), &garbage);
        assert_eq!(origin.client, Some("10.1.0.5".parse().expect("ip")));
        // Ports and brackets are allowed.
        let ported = headers(&[("x-forwarded-for", "[2001:db8::1]:443")]);
        let origin = trusted.origin(peer("10.2.0.9"), &ported);
        assert_eq!(origin.client, Some("2001:db8::1".parse().expect("ip")));
        // No header: the proxy is the client.
        let origin = trusted.origin(peer("10.2.0.9"), &HeaderMap::new());
        assert_eq!(origin.client, Some("10.2.0.9".parse().expect("ip")));
        assert!(!origin.https);
    }
}
