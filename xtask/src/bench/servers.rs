//! The processes under test: the services, the floors and the original, started on loopback and
//! probed over plain HTTP; and the catalog the big-catalog case reads.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bookstore_process::Stopped;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use crate::workspace::root;

/// One server process under test.
pub(crate) struct Server {
    pub(super) name: String,
    child: Child,
    pub(super) addr: SocketAddr,
    /// The plaintext admin address, for services.
    pub(super) admin: Option<SocketAddr>,
    /// Exec to `/readyz` 200.
    pub(super) ready_after: Option<Duration>,
    /// Where its log goes, for services.
    pub(super) log: Option<std::path::PathBuf>,
}

impl Server {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub(super) async fn stop(mut self) {
        let stopped = bookstore_process::stop(&mut self.child, Duration::from_secs(10)).await;
        if let Stopped::Killed = stopped {
            eprintln!("{} did not stop within 10 s; killed it", self.name);
        }
    }
}

/// A free loopback port (bound, then released for the server to take).
pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// GET `path` on `addr`; the status code.
pub(super) async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

pub(super) async fn http_body(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    Ok(all[split + 4..].to_vec())
}

/// The sum of the series of `name` (every label set) on a service's `/metrics`.
pub(super) async fn metric(server: &Server, name: &str) -> Result<f64> {
    let admin = server.admin.context("no admin port")?;
    let text = String::from_utf8(http_body(admin, "/metrics").await?)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Starts a service and times exec → `/readyz` 200 on its admin port.
pub(super) async fn start_service(
    name: &str,
    binary: &Path,
    env: &[(&str, String)],
    logs: &Path,
) -> Result<Server> {
    let port = free_port()?;
    let admin_port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port));
    let exec = Instant::now();
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("LISTEN_ADDR", addr.to_string())
        .env("ADMIN_ADDR", admin.to_string())
        // As the images run them: JSON lines at the default level and sampling (a case may
        // override either; the cost of a line per call is measured as its own case).
        .env("LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)));
    // To a file, as a collector would take it; read it if something goes wrong.
    let log_path = logs.join(format!("{}.log", name.replace(' ', "_")));
    let log = std::fs::File::create(&log_path)?;
    let child = bookstore_process::start(&mut command, log)
        .with_context(|| format!("cannot start {name}"))?;
    let deadline = exec + Duration::from_secs(30);
    loop {
        if http_status(admin, "/readyz").await == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{name} was not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let ready_after = exec.elapsed();
    Ok(Server {
        name: name.into(),
        child,
        addr,
        admin: Some(admin),
        ready_after: Some(ready_after),
        log: Some(log_path),
    })
}

/// Starts a floor server, which prints `listening addr=…`.
pub(super) async fn start_floor(name: &str, loadgen: &Path, args: &[String]) -> Result<Server> {
    let mut child = bookstore_process::start(Command::new(loadgen).args(args), Stdio::piped())
        .with_context(|| format!("cannot start {name}"))?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.split("addr=").nth(1) {
                return addr.trim().parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .with_context(|| format!("{name} never said where it listens"))?;
    Ok(Server {
        name: name.into(),
        child,
        addr,
        admin: None,
        ready_after: None,
        log: None,
    })
}

/// The original Python stack: its recommendations server (interop/python/server.py) and a
/// Flask marketplace (bench/original/marketplace.py), with mutual TLS between them.
pub(super) async fn start_original(certs: &Path, work: &Path) -> Result<(Server, Server)> {
    let venv = root().join("target").join("bench-venv");
    let python = venv.join("bin").join("python");
    let have = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools, flask"])
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !have {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .await?;
        let pip = Command::new(venv.join("bin").join("pip"))
            .args(["install", "-q", "-r"])
            .arg(root().join("bench/original/requirements.txt"))
            .status()
            .await?;
        if !ok.success() || !pip.success() {
            bail!("cannot install the original's Python stack");
        }
    }
    let py = work.join("py");
    std::fs::create_dir_all(&py)?;
    let status = Command::new(&python)
        .current_dir(root())
        .args(["-m", "grpc_tools.protoc", "-I", "protobufs"])
        .arg(format!("--python_out={}", py.display()))
        .arg(format!("--grpc_python_out={}", py.display()))
        .arg("protobufs/recommendations.proto")
        .status()
        .await?;
    if !status.success() {
        bail!("cannot generate the Python stubs");
    }
    std::fs::copy(
        root().join("interop/python/server.py"),
        py.join("server.py"),
    )?;
    std::fs::copy(
        root().join("bench/original/marketplace.py"),
        py.join("marketplace.py"),
    )?;
    let grpc_port = free_port()?;
    let http_port = free_port()?;
    let start = |script: &str, args: Vec<String>| {
        let mut command = Command::new(&python);
        command.current_dir(&py).arg(script).args(args);
        bookstore_process::start(&mut command, Stdio::null())
    };
    let server = start(
        "server.py",
        vec![grpc_port.to_string(), certs.display().to_string()],
    )?;
    let market = start(
        "marketplace.py",
        vec![
            http_port.to_string(),
            grpc_port.to_string(),
            certs.display().to_string(),
        ],
    )?;
    let web = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(web, "/").await != Some(200) {
        if Instant::now() > deadline {
            bail!("the original's page never answered 200");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = Server {
        name: "original recommendations (Python)".into(),
        child: server,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, grpc_port)),
        admin: None,
        ready_after: None,
        log: None,
    };
    let market = Server {
        name: "original marketplace (Python)".into(),
        child: market,
        addr: web,
        admin: None,
        ready_after: None,
        log: None,
    };
    Ok((server, market))
}

/// A catalog of `n` books spread over the three categories, as CATALOG_PATH reads it.
pub(super) fn write_catalog(path: &Path, n: u32) -> Result<()> {
    let categories = ["MYSTERY", "SCIENCE_FICTION", "SELF_HELP"];
    let mut out = String::with_capacity(n as usize * 64);
    out.push_str("{\"books\":[\n");
    for id in 1..=n {
        let category = categories[(id % 3) as usize];
        let sep = if id == n { "" } else { "," };
        let _ = writeln!(
            out,
            "{{\"id\":{id},\"category\":\"{category}\",\"title\":\"Generated book number {id}\"}}{sep}"
        );
    }
    out.push_str("]}\n");
    std::fs::write(path, out)?;
    Ok(())
}
