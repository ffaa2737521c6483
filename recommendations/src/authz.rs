//! Caller authorization by certificate identity, as one tower layer in front of every gRPC
//! service on the port (Recommend, health, reflection).
//!
//! Mutual TLS proves a caller holds a certificate from our CA; this decides whether that caller
//! may call at all. A CA signs many things over its life, so "signed by the CA" alone is not a
//! permission (the original accepted any CA-signed client).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bookstore_common::{grpc_call::PeerIdentity, tls::identities};
use tonic::{
    Status,
    codegen::{BoxFuture, http},
};
use tower::{Layer, Service};

use crate::listener::PeerInfo;

/// Allows only callers with one of the listed identities.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    allowed: Arc<BTreeSet<String>>,
    /// Decisions by the exact bytes of the leaf certificate: the same few callers present the
    /// same certificate on every call, and parsing X.509 each time was a large part of a call.
    /// Matched on the whole certificate, so a different certificate is always parsed. A short
    /// list compared byte for byte is cheaper here than hashing a kilobyte per call.
    decided: Arc<Mutex<Vec<Remembered>>>,
}

type Decision = Result<String, Vec<String>>;

/// A leaf certificate's bytes and the decision on it.
type Remembered = (Vec<u8>, Decision);

/// Distinct certificates remembered; past it the memory starts over (a rotation, or a flood of
/// strangers, costs only parsing).
const REMEMBERED_CERTIFICATES: usize = 64;

impl AuthorizeLayer {
    pub fn new(allowed: impl IntoIterator<Item = String>) -> Self {
        AuthorizeLayer {
            allowed: Arc::new(allowed.into_iter().collect()),
            decided: Arc::default(),
        }
    }

    /// The first identity of the peer's leaf certificate that is allowed, or every identity it
    /// has (for the refusal log) if none is.
    fn decide(&self, leaf: Option<&[u8]>) -> Decision {
        let Some(leaf) = leaf else {
            return Err(Vec::new());
        };
        let mut decided = self.decided.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, decision)) = decided.iter().find(|(der, _)| der.as_slice() == leaf) {
            return decision.clone();
        }
        let claimed = identities(leaf);
        let decision = claimed
            .iter()
            .find(|id| self.allowed.contains(*id))
            .cloned()
            .ok_or(claimed);
        if decided.len() >= REMEMBERED_CERTIFICATES {
            decided.clear();
        }
        decided.push((leaf.to_vec(), decision.clone()));
        decision
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthorizeLayer`] wraps around the gRPC services.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S, B, R> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let chain = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.certs.clone());
        let leaf = chain.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        match self.layer.decide(leaf) {
            Ok(identity) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let mut response = call.await?;
                    // For the call's log line, written outside this layer.
                    response.extensions_mut().insert(PeerIdentity(identity));
                    Ok(response)
                })
            }
            Err(claimed) => {
                tracing::warn!(
                    identities = ?claimed,
                    method = request.uri().path(),
                    "refused a caller whose certificate identity is not in ALLOWED_CLIENTS"
                );
                let mut refusal: http::Response<R> =
                    Status::permission_denied("caller is not allowed to call this service")
                        .into_http();
                refusal
                    .extensions_mut()
                    .insert(PeerIdentity(claimed.join(",")));
                Box::pin(async move { Ok(refusal) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bookstore_certs::{Authority, Usage};
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    use super::*;

    fn leaf(names: &[&str], cn: &str) -> Vec<u8> {
        let ca = Authority::new("CA").expect("ca");
        let issued = ca.issue(cn, names, Usage::Client).expect("cert");
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    #[test]
    fn a_listed_identity_is_allowed_and_named() {
        let layer = AuthorizeLayer::new(["marketplace".to_owned()]);
        assert_eq!(
            layer.decide(Some(&leaf(&["marketplace"], "marketplace"))),
            Ok("marketplace".to_owned())
        );
    }

    #[test]
    fn a_spiffe_id_can_be_listed() {
        let layer = AuthorizeLayer::new(["spiffe://bookstore/ns/shop/sa/marketplace".to_owned()]);
        let cert = leaf(&["spiffe://bookstore/ns/shop/sa/marketplace"], "whatever");
        assert_eq!(
            layer.decide(Some(&cert)),
            Ok("spiffe://bookstore/ns/shop/sa/marketplace".to_owned())
        );
    }

    #[test]
    fn the_common_name_counts_only_without_sans() {
        let layer = AuthorizeLayer::new(["marketplace".to_owned()]);
        assert_eq!(
            layer.decide(Some(&leaf(&[], "marketplace"))),
            Ok("marketplace".to_owned())
        );
        // A SAN-bearing certificate is judged by its SANs; its CN is not a second identity.
        assert_eq!(
            layer.decide(Some(&leaf(&["intruder"], "marketplace"))),
            Err(vec!["intruder".to_owned()])
        );
    }

    #[test]
    fn remembered_decisions_stay_per_certificate() {
        let layer = AuthorizeLayer::new(["marketplace".to_owned()]);
        let (good, bad) = (leaf(&["marketplace"], "m"), leaf(&["intruder"], "i"));
        let strangers: Vec<_> = (0..REMEMBERED_CERTIFICATES + 3)
            .map(|i| leaf(&[&format!("stranger-{i}")], "s"))
            .collect();
        for _ in 0..2 {
            assert_eq!(layer.decide(Some(&good)), Ok("marketplace".to_owned()));
            assert_eq!(layer.decide(Some(&bad)), Err(vec!["intruder".to_owned()]));
            // Past the memory's size it starts over, and decisions stay right.
            for (i, stranger) in strangers.iter().enumerate() {
                assert_eq!(
                    layer.decide(Some(stranger)),
                    Err(vec![format!("stranger-{i}")])
                );
            }
        }
    }

    #[test]
    fn no_certificate_is_refused() {
        let layer = AuthorizeLayer::new(["marketplace".to_owned()]);
        assert_eq!(layer.decide(None), Err(Vec::new()));
    }
}
