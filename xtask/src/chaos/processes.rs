//! The processes under test: the two recommendations replicas, each behind its relay's address,
//! and the marketplace calling both; started, signalled and probed over plain HTTP.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, atomic::AtomicU8},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

use super::faults::PASS;

/// A replica and the relay in front of it.
pub(super) struct Replica {
    name: &'static str,
    /// The address the marketplace calls (the relay's).
    pub(super) public: SocketAddr,
    /// The address the process listens on.
    pub(super) private: SocketAddr,
    admin: SocketAddr,
    pub(super) child: Option<Child>,
    pub(super) mode: Arc<AtomicU8>,
}

impl Replica {
    pub(super) fn new(name: &'static str, ip: Ipv4Addr, port: u16) -> Result<Self> {
        Ok(Replica {
            name,
            public: SocketAddr::from((ip, port)),
            private: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            child: None,
            mode: Arc::new(AtomicU8::new(PASS)),
        })
    }

    pub(super) async fn start(&mut self, bin: &Path, certs: &Path, out: &Path) -> Result<()> {
        let log = std::fs::File::create(out.join(format!("recommendations-{}.log", self.name)))?;
        let mut command = Command::new(bin.join("recommendations"));
        command
            .env_clear()
            .env("LISTEN_ADDR", self.private.to_string())
            .env("ADMIN_ADDR", self.admin.to_string())
            .env("CERTS_DIR", certs)
            .env("LOG_FORMAT", "json");
        let child = bookstore_process::start(&mut command, log)
            .with_context(|| format!("cannot start replica {}", self.name))?;
        self.child = Some(child);
        ready(self.admin).await
    }

    pub(super) fn signal(&mut self, signal: bookstore_process::Signal, gone: bool) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("replica not running")?;
        bookstore_process::send(pid, signal)?;
        if gone {
            self.child = None;
        }
        Ok(())
    }

    pub(super) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = bookstore_process::stop(&mut child, Duration::from_secs(10)).await;
        }
    }
}

pub(super) struct Market {
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    pub(super) admin: SocketAddr,
}

pub(super) async fn start_marketplace(
    bin: &Path,
    certs: &Path,
    out: &Path,
    replicas: &[Replica],
) -> Result<Market> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let addrs: Vec<String> = replicas.iter().map(|r| r.public.to_string()).collect();
    let log = std::fs::File::create(out.join("marketplace.log"))?;
    let mut command = Command::new(bin.join("marketplace"));
    command
        .env_clear()
        .env("LISTEN_ADDR", addr.to_string())
        .env("ADMIN_ADDR", admin.to_string())
        .env("RECOMMENDATIONS_ADDRS", addrs.join(","))
        .env("RECOMMENDATIONS_TLS_NAME", "localhost")
        .env("CERTS_DIR", certs)
        .env("LOG_FORMAT", "json");
    let child =
        bookstore_process::start(&mut command, log).context("cannot start the marketplace")?;
    ready(admin).await?;
    Ok(Market { child, addr, admin })
}

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

async fn ready(admin: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if scrape_path(admin, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{admin} was not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn scrape(admin: SocketAddr) -> Result<String> {
    Ok(scrape_path(admin, "/metrics").await?.1)
}

async fn scrape_path(admin: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut all)).await??;
    let status = all.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = all.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}
