//! The floors: the least a server can do and still answer the same bytes. A minimal tonic
//! server whose `Recommend` returns one constant response, and a minimal axum server whose `/`
//! returns one constant page. The benchmark reports the services as a fraction of these.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context;
use axum::{Router, http::header, routing::get, serve::ListenerExt};
use bookstore_common::tls;
use bookstore_proto::{
    BookRecommendation, RecommendationRequest, RecommendationResponse,
    recommendations_server::{Recommendations, RecommendationsServer},
};
use tokio::net::TcpListener;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};

/// The answer of the floor: three mystery books, as the service answers the default query.
pub fn constant_response() -> RecommendationResponse {
    let books = [
        (1, "The Maltese Falcon"),
        (2, "Murder on the Orient Express"),
        (3, "The Hound of the Baskervilles"),
    ];
    RecommendationResponse {
        recommendations: books
            .into_iter()
            .map(|(id, title)| BookRecommendation {
                id,
                title: title.into(),
            })
            .collect(),
    }
}

struct Constant(RecommendationResponse);

#[tonic::async_trait]
impl Recommendations for Constant {
    async fn recommend(
        &self,
        _: tonic::Request<RecommendationRequest>,
    ) -> Result<tonic::Response<RecommendationResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.clone()))
    }
}

/// Serves the constant `Recommend` on `listen`, with mutual TLS from `certs` (the service's
/// own `ca.pem`, `server.pem`, `server.key`) or in plaintext. Prints `listening addr=…`.
pub async fn grpc(listen: SocketAddr, certs: Option<&Path>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let mut server = Server::builder();
    if let Some(dir) = certs {
        let identity = tls::load_identity(&dir.join("server.pem"), &dir.join("server.key"))?;
        let ca = tls::load_ca(&dir.join("ca.pem"))?;
        server = server
            .tls_config(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
            .context("TLS configuration")?;
    }
    eprintln!("floor-grpc listening addr={addr}");
    // TCP_NODELAY, as the services set it: the floor differs only in doing no work.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    server
        .add_service(RecommendationsServer::new(Constant(constant_response())))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Serves `body` as an HTML page on `listen`. Prints `listening addr=…`.
pub async fn http(listen: SocketAddr, body: Vec<u8>) -> anyhow::Result<()> {
    let body: Arc<[u8]> = body.into();
    let router = Router::new().route(
        "/",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    axum::body::Bytes::copy_from_slice(&body),
                )
            }
        }),
    );
    let listener = TcpListener::bind(listen).await?;
    eprintln!("floor-http listening addr={}", listener.local_addr()?);
    // TCP_NODELAY, as the marketplace sets it.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await?;
    Ok(())
}
