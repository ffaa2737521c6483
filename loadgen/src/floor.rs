//! The floors: the least a server can do and still answer the same bytes. A minimal tonic
//! server whose `Recommend` returns one constant response, and a minimal axum server whose `/`
//! returns one constant page. The benchmark reports the services as a fraction of these.
//!
//! The chain floor is the least a page can do: an axum handler that makes one mutual-TLS tonic
//! call to the gRPC floor and puts the three titles into the page. The marketplace's page is
//! measured against it.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context;
use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
    serve::ListenerExt,
};
use bookstore_common::tls;
use bookstore_proto::{
    BookCategory, BookRecommendation, RecommendationRequest, RecommendationResponse,
    recommendations_client::RecommendationsClient,
    recommendations_server::{Recommendations, RecommendationsServer},
};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server, ServerTlsConfig, server::TcpIncoming};

use crate::target::{GrpcTls, connect, endpoint};

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
    serve(listen, "floor-http", router).await
}

/// Serves `router` on `listen` with TCP_NODELAY, as the marketplace sets it. Prints
/// `<name> listening addr=…`.
async fn serve(listen: SocketAddr, name: &str, router: Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("{name} listening addr={}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await?;
    Ok(())
}

/// The marketplace's page split around its list of books: what comes before the first entry,
/// and what follows the last.
fn split_page(page: &str) -> anyhow::Result<(Arc<str>, Arc<str>)> {
    const LIST: &str = "<ul class=\"books\">";
    const END: &str = "\n    </ul>";
    let start = page.find(LIST).context("the page has no list of books")? + LIST.len();
    let end = page[start..]
        .find(END)
        .context("the page's list of books never ends")?
        + start;
    Ok((page[..start].into(), page[end..].into()))
}

/// `text` with the five characters HTML gives meaning to escaped, as the page's template does.
fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
}

/// Serves the chain floor on `listen`: each `GET /` calls `Recommend` on `backend` over one
/// HTTP/2 connection made with `tls`, and answers `page` (the marketplace's own page) with the
/// titles that came back in place of its list. Prints `listening addr=…`.
pub async fn chain(
    listen: SocketAddr,
    backend: &str,
    tls: Option<GrpcTls>,
    page: &str,
) -> anyhow::Result<()> {
    let (head, tail) = split_page(page)?;
    let channel = connect(&endpoint(backend, tls.as_ref())?, backend).await?;
    let client = RecommendationsClient::new(channel);
    let router = Router::new().route(
        "/",
        get(move || titles_page(client.clone(), head.clone(), tail.clone())),
    );
    serve(listen, "floor-chain", router).await
}

async fn titles_page(
    mut client: RecommendationsClient<Channel>,
    head: Arc<str>,
    tail: Arc<str>,
) -> Response {
    let request = RecommendationRequest {
        user_id: 1,
        category: BookCategory::Mystery as i32,
        max_results: 3,
    };
    match client.recommend(request).await {
        Ok(response) => {
            let mut body = String::with_capacity(head.len() + tail.len() + 256);
            body.push_str(&head);
            for book in &response.get_ref().recommendations {
                body.push_str("\n      <li>");
                push_escaped(&mut body, &book.title);
                body.push_str("</li>");
            }
            body.push_str(&tail);
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
        }
        Err(status) => {
            (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_splits_around_its_list_and_titles_are_escaped() {
        let page = "<h1>x</h1>\n    <ul class=\"books\">\n      <li>A</li>\n    </ul>\n</main>";
        let (head, tail) = split_page(page).expect("split");
        assert_eq!(&*head, "<h1>x</h1>\n    <ul class=\"books\">");
        assert_eq!(&*tail, "\n    </ul>\n</main>");
        let mut out = String::new();
        push_escaped(&mut out, "Tom & \"Jerry\" <3 'x'");
        assert_eq!(out, "Tom &amp; &quot;Jerry&quot; &lt;3 &#x27;x&#x27;");
        assert!(split_page("<p>no list</p>").is_err());
    }
}
