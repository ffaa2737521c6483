//! HTTP/1.1 callers that each hold one keep-alive connection of their own, as wrk's do, so a
//! closed loop of N callers has N connections open and never more. (reqwest's pool opens a new
//! connection whenever a call finds none idle, and a connection goes back to the pool a moment
//! after its answer is read: a caller that sends again at once opened another, up to twice N.)

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Uri, header::HOST};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Mutex};

use crate::outcome::Outcome;

/// How long one call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

type Connection = SendRequest<Empty<Bytes>>;

/// One connection slot per caller, each opened at its caller's first call and again after it
/// fails or the server closes it.
#[derive(Debug)]
pub struct Callers {
    /// `host:port`, to connect to and to send as `Host`.
    authority: String,
    /// The path and query, sent in origin form.
    path: Uri,
    slots: Vec<Mutex<Option<Connection>>>,
}

impl Callers {
    /// `callers` callers of `url` (`http://host:port/path`).
    pub fn new(url: &str, callers: usize) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("{url}: only http:// is supported");
        }
        let authority = uri.authority().context("no host in the URL")?;
        let authority = match authority.port() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        let path = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .context("bad path")?;
        Ok(Callers {
            authority,
            path,
            slots: (0..callers.max(1)).map(|_| Mutex::new(None)).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// One GET from caller `caller`, on its own connection; the whole body is read, as a
    /// browser would.
    pub async fn call(&self, caller: usize) -> Outcome {
        let mut slot = self.slots[caller % self.slots.len()].lock().await;
        match tokio::time::timeout(CALL_TIMEOUT, self.exchange(&mut slot)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                *slot = None;
                Outcome::Failed("http:timeout".into())
            }
        }
    }

    async fn exchange(&self, slot: &mut Option<Connection>) -> Outcome {
        // A kept-alive connection the server closed before or while this request was written
        // is replaced once (a GET is safe to send again), as any client does; a failure on a
        // fresh connection is the answer.
        loop {
            let reused = slot.as_ref().is_some_and(|c| !c.is_closed());
            if !reused {
                match self.connect().await {
                    Ok(connection) => *slot = Some(connection),
                    Err(_) => return transport(slot),
                }
            }
            let Some(connection) = slot.as_mut() else {
                return transport(slot);
            };
            if connection.ready().await.is_err() {
                if reused {
                    *slot = None;
                    continue;
                }
                return transport(slot);
            }
            let request = Request::get(self.path.clone())
                .header(HOST, &self.authority)
                .body(Empty::new());
            let Ok(request) = request else {
                return Outcome::Failed("http:request".into());
            };
            let response = match connection.send_request(request).await {
                Ok(response) => response,
                Err(e) if reused && (e.is_canceled() || e.is_incomplete_message()) => {
                    *slot = None;
                    continue;
                }
                Err(_) => return transport(slot),
            };
            let status = response.status();
            return match response.into_body().collect().await {
                Ok(_) if status.is_success() => Outcome::Ok,
                Ok(_) => Outcome::Failed(format!("http:{}", status.as_u16())),
                Err(_) => {
                    *slot = None;
                    Outcome::Failed("http:body".into())
                }
            };
        }
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(&self.authority).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// A failed exchange: the connection is dropped, the next call opens another.
fn transport(slot: &mut Option<Connection>) -> Outcome {
    *slot = None;
    Outcome::Failed("http:transport".into())
}
