//! `cargo xtask bench`: the whole-process benchmark.
//!
//! Builds release binaries, starts every server on loopback, and measures each service next to
//! its floor (a minimal server answering the same bytes), interleaved A B A B so that drift on a
//! shared machine hits both alike. Figures are reported as ratios against those floors. Also
//! measured: time from exec to ready, idle and loaded RSS, binary sizes, latency against
//! concurrency, and a catalog of 1,000,000 books. Writes `bench/results/<date>.{json,md,svg}`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::report::Report;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use crate::root;

/// How much to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// A B rounds per comparison.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds per point of the concurrency sweep.
    #[arg(long, default_value_t = 3.0)]
    pub sweep_duration: f64,
    /// Books in the large catalog.
    #[arg(long, default_value_t = 1_000_000)]
    pub big_catalog: u32,
    /// Also measure the original Python stack (Flask + grpcio, installed into target/bench-venv
    /// from PyPI) the same way, as the page's baseline.
    #[arg(long)]
    pub original: bool,
    /// A smoke run: 1 s measurements, one round, a 10,000-book catalog; results go to
    /// target/bench instead of bench/results.
    #[arg(long)]
    pub quick: bool,
}

/// Callers for the throughput comparisons: gRPC over 4 HTTP/2 connections, pages over 32
/// keep-alive connections.
const GRPC_CONCURRENCY: usize = 64;
const GRPC_CONNECTIONS: usize = 4;
const HTTP_CONCURRENCY: usize = 32;
const SWEEP: [usize; 4] = [1, 8, 32, 128];

/// One server process under test.
pub(crate) struct Server {
    name: String,
    child: Child,
    addr: SocketAddr,
    /// The plaintext admin address, for services.
    admin: Option<SocketAddr>,
    /// Exec to `/readyz` 200.
    ready_after: Option<Duration>,
}

impl Server {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn stop(mut self) {
        if let Some(pid) = self.pid() {
            crate::terminate(pid);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

/// A free loopback port (bound, then released for the server to take).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Resident memory of a process, in KiB, from /proc.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// GET `path` on `addr`; the status code.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

async fn http_body(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
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
async fn metric(server: &Server, name: &str) -> Result<f64> {
    let admin = server.admin.context("no admin port")?;
    let text = String::from_utf8(http_body(admin, "/metrics").await?)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Starts a service and times exec → `/readyz` 200 on its admin port.
async fn start_service(
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
    let child = Command::new(binary)
        .env_clear()
        .env("LISTEN_ADDR", addr.to_string())
        .env("ADMIN_ADDR", admin.to_string())
        // As the images run them: JSON lines at the default level and sampling (a case may
        // override either; the cost of a line per call is measured as its own case).
        .env("LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // To a file, as a collector would take it; read it if something goes wrong.
        .stderr(std::fs::File::create(
            logs.join(format!("{}.log", name.replace(' ', "_"))),
        )?)
        .kill_on_drop(true)
        .spawn()
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
    })
}

/// Starts a floor server, which prints `listening addr=…`.
async fn start_floor(name: &str, loadgen: &Path, args: &[String]) -> Result<Server> {
    let mut child = Command::new(loadgen)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
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
    })
}

/// The original Python stack: its recommendations server (interop/python/server.py) and a
/// Flask marketplace (bench/original/marketplace.py), with mutual TLS between them.
async fn start_original(certs: &Path, work: &Path) -> Result<(Server, Server)> {
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
        Command::new(&python)
            .current_dir(&py)
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
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
    };
    let market = Server {
        name: "original marketplace (Python)".into(),
        child: market,
        addr: web,
        admin: None,
        ready_after: None,
    };
    Ok((server, market))
}

/// A load run and the peak RSS of the server under it.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    case: String,
    round: u32,
    report: Report,
    peak_rss_kib: Option<u64>,
}

/// Runs loadgen with `args` (its report as JSON), sampling `server`'s RSS meanwhile.
pub(crate) async fn load(
    loadgen: &Path,
    args: &[String],
    server: &Server,
) -> Result<(Report, Option<u64>)> {
    load_on(None, loadgen, args, server).await
}

/// [`load`], with the load generator kept to CPU `cpu` if given (through `taskset`).
pub(crate) async fn load_on(
    cpu: Option<usize>,
    loadgen: &Path,
    args: &[String],
    server: &Server,
) -> Result<(Report, Option<u64>)> {
    let mut command = match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpu.to_string()]).arg(loadgen);
            taskset
        }
        None => Command::new(loadgen),
    };
    let run = command
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let pid = server.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let done = done.clone();
        async move {
            let mut peak = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(pid.and_then(rss_kib));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        }
    });
    let output = run.await?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.ok().flatten();
    if !output.status.success() {
        bail!("loadgen {args:?} failed");
    }
    let report: Report = serde_json::from_slice(&output.stdout).context("loadgen's JSON")?;
    Ok((report, peak))
}

fn grpc_args(
    server: &Server,
    certs: Option<&Path>,
    concurrency: usize,
    duration: f64,
) -> Vec<String> {
    let mut args = vec![
        "grpc".into(),
        "--addr".into(),
        server.addr.to_string(),
        "--connections".into(),
        GRPC_CONNECTIONS.to_string(),
        "-c".into(),
        concurrency.to_string(),
        "-d".into(),
        duration.to_string(),
    ];
    if let Some(certs) = certs {
        args.extend(["--certs".into(), certs.display().to_string()]);
    }
    args
}

pub(crate) fn http_args(server: &Server, concurrency: usize, duration: f64) -> Vec<String> {
    vec![
        "http".into(),
        "--url".into(),
        format!("http://{}/", server.addr),
        "-c".into(),
        concurrency.to_string(),
        "-d".into(),
        duration.to_string(),
    ]
}

/// A catalog of `n` books spread over the three categories, as CATALOG_PATH reads it.
fn write_catalog(path: &Path, n: u32) -> Result<()> {
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

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: String,
    args: String,
    binaries_bytes: BTreeMap<String, u64>,
    ready_ms: BTreeMap<String, f64>,
    idle_rss_kib: BTreeMap<String, u64>,
    /// TLS handshakes recommendations completed during the page runs, and the pages served
    /// meanwhile: no handshake per request.
    backend_handshakes: f64,
    pages: u64,
    runs: Vec<Measured>,
    sweep: Vec<Measured>,
    summary: Vec<Row>,
    overload: crate::overload::Overload,
}

/// One line of the table: a case next to its floor.
#[derive(Debug, Clone, Serialize)]
struct Row {
    what: String,
    throughput: f64,
    floor_throughput: f64,
    /// The median over rounds of this round's throughput over the baseline's in the same round,
    /// and the lowest and highest of those ratios: how far the noise moved it.
    ratio: f64,
    ratio_low: f64,
    ratio_high: f64,
    p50_ms: f64,
    p99_ms: f64,
    floor_p99_ms: f64,
    errors: u64,
    target: String,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn summarize(runs: &[Measured], case: &str, floor: &str, what: &str, target: &str) -> Option<Row> {
    let pick = |name: &str| -> Vec<&Measured> { runs.iter().filter(|m| m.case == name).collect() };
    let (ours, base) = (pick(case), pick(floor));
    if ours.is_empty() || base.is_empty() {
        return None;
    }
    let med = |ms: &[&Measured], f: fn(&Report) -> f64| {
        let mut v: Vec<f64> = ms.iter().map(|m| f(&m.report)).collect();
        median(&mut v)
    };
    // Each round's pair was measured within the same round, a few runs apart at most, so its
    // ratio is freer of the machine's drift than a ratio of medians taken minutes apart.
    let mut ratios: Vec<f64> = ours
        .iter()
        .filter_map(|m| {
            let b = base.iter().find(|b| b.round == m.round)?;
            Some(m.report.throughput / b.report.throughput.max(1e-9))
        })
        .collect();
    let ratio = median(&mut ratios);
    Some(Row {
        what: what.into(),
        throughput: med(&ours, |r| r.throughput),
        floor_throughput: med(&base, |r| r.throughput),
        ratio,
        ratio_low: ratios.iter().copied().fold(ratio, f64::min),
        ratio_high: ratios.iter().copied().fold(ratio, f64::max),
        p50_ms: med(&ours, |r| r.latency_ms.p50),
        p99_ms: med(&ours, |r| r.latency_ms.p99),
        floor_p99_ms: med(&base, |r| r.latency_ms.p99),
        errors: ours.iter().map(|m| m.report.error_count()).sum(),
        target: target.into(),
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs ({model}), Linux, loopback")
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    let (duration, rounds, sweep_duration, big) = if args.quick {
        (1.0, 1, 1.0, 10_000)
    } else {
        (
            args.duration,
            args.rounds,
            args.sweep_duration,
            args.big_catalog,
        )
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "recommendations",
            "-p",
            "marketplace",
            "-p",
            "loadgen",
        ])
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let bin = root().join("target").join("release");
    let loadgen = bin.join("loadgen");
    let work = std::env::temp_dir().join(format!("bookstore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let certs = work.join("certs");
    bookstore_certs::generate(&certs, false)?;
    let catalog = work.join("catalog.json");
    write_catalog(&catalog, big)?;

    eprintln!("starting servers");
    let certs_env = ("CERTS_DIR", certs.display().to_string());
    let rec_mtls = start_service(
        "recommendations",
        &bin.join("recommendations"),
        std::slice::from_ref(&certs_env),
        &work,
    )
    .await?;
    let rec_plain = start_service(
        "recommendations (plaintext)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("TLS_MODE", "off".into())],
        &work,
    )
    .await?;
    let rec_text = start_service(
        "recommendations (text log)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("LOG_FORMAT", "text".into())],
        &work,
    )
    .await?;
    let rec_every_call = start_service(
        "recommendations (a line per call)",
        &bin.join("recommendations"),
        &[certs_env.clone(), ("LOG_SAMPLE", "1".into())],
        &work,
    )
    .await?;
    let rec_big = start_service(
        "recommendations (big catalog)",
        &bin.join("recommendations"),
        &[
            certs_env.clone(),
            ("CATALOG_PATH", catalog.display().to_string()),
        ],
        &work,
    )
    .await?;
    let market = start_service(
        "marketplace",
        &bin.join("marketplace"),
        &[
            certs_env.clone(),
            ("RECOMMENDATIONS_HOST", "127.0.0.1".into()),
            ("RECOMMENDATIONS_PORT", rec_mtls.addr.port().to_string()),
            ("RECOMMENDATIONS_TLS_NAME", "localhost".into()),
        ],
        &work,
    )
    .await?;
    let floor_mtls = start_floor(
        "floor-grpc (mTLS)",
        &loadgen,
        &[
            "floor-grpc".into(),
            "--certs".into(),
            certs.display().to_string(),
        ],
    )
    .await?;
    let floor_plain = start_floor("floor-grpc", &loadgen, &["floor-grpc".into()]).await?;
    let page = http_body(market.addr, "/").await?;
    let page_file = work.join("page.html");
    std::fs::write(&page_file, &page)?;
    let floor_page = start_floor(
        "floor-http",
        &loadgen,
        &[
            "floor-http".into(),
            "--body-file".into(),
            page_file.display().to_string(),
        ],
    )
    .await?;
    let floor_chain = start_floor(
        "floor-chain",
        &loadgen,
        &[
            "floor-chain".into(),
            "--backend".into(),
            floor_mtls.addr.to_string(),
            "--certs".into(),
            certs.display().to_string(),
            "--body-file".into(),
            page_file.display().to_string(),
        ],
    )
    .await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut idle_rss_kib = BTreeMap::new();
    let mut ready_ms = BTreeMap::new();
    for server in [&rec_mtls, &market, &rec_big, &floor_mtls, &floor_page] {
        if let Some(rss) = server.pid().and_then(rss_kib) {
            idle_rss_kib.insert(server.name.clone(), rss);
        }
        if let Some(ready) = server.ready_after {
            ready_ms.insert(server.name.clone(), ready.as_secs_f64() * 1e3);
        }
    }

    // Each comparison's two cases run close together in each round: a floor runs once a round,
    // just before the first case compared with it (the text-log and line-per-call cases are the
    // third and fourth runs after it; the constant page is the second after the page, the
    // original's the third), so a drift of the machine between rounds touches both sides of a
    // ratio alike.
    let cases: Vec<(&str, &Server, Vec<String>)> = vec![
        (
            "floor_grpc_mtls",
            &floor_mtls,
            grpc_args(&floor_mtls, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls",
            &rec_mtls,
            grpc_args(&rec_mtls, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_big_catalog",
            &rec_big,
            grpc_args(&rec_big, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_text_log",
            &rec_text,
            grpc_args(&rec_text, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_mtls_every_call",
            &rec_every_call,
            grpc_args(&rec_every_call, Some(&certs), GRPC_CONCURRENCY, duration),
        ),
        (
            "recommend_plain",
            &rec_plain,
            grpc_args(&rec_plain, None, GRPC_CONCURRENCY, duration),
        ),
        (
            "floor_grpc_plain",
            &floor_plain,
            grpc_args(&floor_plain, None, GRPC_CONCURRENCY, duration),
        ),
        (
            "page",
            &market,
            http_args(&market, HTTP_CONCURRENCY, duration),
        ),
        (
            "floor_chain",
            &floor_chain,
            http_args(&floor_chain, HTTP_CONCURRENCY, duration),
        ),
        (
            "floor_page",
            &floor_page,
            http_args(&floor_page, HTTP_CONCURRENCY, duration),
        ),
    ];
    let original = if args.original {
        eprintln!("starting the original Python stack");
        Some(start_original(&certs, &work).await?)
    } else {
        None
    };
    let mut cases = cases;
    if let Some((_, flask)) = &original {
        cases.push((
            "original_page",
            flask,
            http_args(flask, HTTP_CONCURRENCY, duration),
        ));
    }
    const HANDSHAKES: &str = "bookstore_tls_handshakes_total{result=\"completed\"}";
    let mut handshakes = 0.0;
    let mut runs = Vec::new();
    for round in 0..rounds {
        for (case, server, args) in &cases {
            eprintln!("round {} of {rounds}: {case}", round + 1);
            // Handshakes recommendations completes while only the marketplace calls it.
            let before = if *case == "page" {
                Some(metric(&rec_mtls, HANDSHAKES).await?)
            } else {
                None
            };
            let (report, peak_rss_kib) = load(&loadgen, args, server).await?;
            if let Some(before) = before {
                handshakes += metric(&rec_mtls, HANDSHAKES).await? - before;
            }
            runs.push(Measured {
                case: (*case).into(),
                round,
                report,
                peak_rss_kib,
            });
        }
    }
    let pages: u64 = runs
        .iter()
        .filter(|m| m.case == "page")
        .map(|m| m.report.requests)
        .sum();
    let mut sweep = Vec::new();
    for concurrency in SWEEP {
        for (case, server, args) in [
            (
                "page",
                &market,
                http_args(&market, concurrency, sweep_duration),
            ),
            (
                "floor_page",
                &floor_page,
                http_args(&floor_page, concurrency, sweep_duration),
            ),
            (
                "recommend_mtls",
                &rec_mtls,
                grpc_args(&rec_mtls, Some(&certs), concurrency, sweep_duration),
            ),
        ] {
            eprintln!("sweep: {case} at {concurrency}");
            let (report, peak_rss_kib) = load(&loadgen, &args, server).await?;
            sweep.push(Measured {
                case: case.into(),
                round: 0,
                report,
                peak_rss_kib,
            });
        }
    }
    let overload = crate::overload::run(
        &loadgen,
        [&market, &rec_mtls],
        duration,
        Duration::from_secs(if args.quick { 5 } else { 60 }),
    )
    .await?;
    for server in [
        rec_mtls,
        rec_plain,
        rec_text,
        rec_every_call,
        rec_big,
        market,
        floor_chain,
        floor_mtls,
        floor_plain,
        floor_page,
    ] {
        server.stop().await;
    }

    let mut summary = Vec::new();
    for (case, floor, what, target) in [
        (
            "recommend_mtls",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, as shipped (JSON log)",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_text_log",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, text log",
            "≥ 0.9× floor",
        ),
        (
            "recommend_plain",
            "floor_grpc_plain",
            "Recommend, plaintext",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_every_call",
            "floor_grpc_mtls",
            "Recommend with a line per call (LOG_SAMPLE=1)",
            "(its cost)",
        ),
        (
            "page",
            "floor_chain",
            "Page end to end vs its chain floor",
            "≥ 0.9× chain floor",
        ),
        (
            "page",
            "floor_page",
            "Page end to end (mTLS to the backend)",
            "p99 ≤ 5 ms at 32",
        ),
        (
            "page",
            "original_page",
            "Page end to end vs the original (Python)",
            "≥ 25×",
        ),
        (
            "recommend_mtls_big_catalog",
            "recommend_mtls",
            &format!("Recommend, {big} books vs 9"),
            "≥ 0.9×",
        ),
    ] {
        if let Some(row) = summarize(&runs, case, floor, what, target) {
            summary.push(row);
        }
    }
    let mut binaries_bytes = BTreeMap::new();
    for name in ["recommendations", "marketplace"] {
        if let Some(size) = file_size(&bin.join(name)) {
            binaries_bytes.insert(name.to_owned(), size);
        }
    }
    let date = today();
    let results = Results {
        date: date.clone(),
        machine: machine(),
        args: format!(
            "duration {duration} s, {rounds} rounds, sweep {sweep_duration} s, {big} books; gRPC {GRPC_CONCURRENCY} callers over {GRPC_CONNECTIONS} connections, HTTP {HTTP_CONCURRENCY} keep-alive connections; services as the images run them (JSON log, default level and sampling)"
        ),
        binaries_bytes,
        ready_ms,
        idle_rss_kib,
        backend_handshakes: handshakes,
        pages,
        runs,
        sweep,
        summary,
        overload,
    };
    let out = if args.quick {
        root().join("target").join("bench")
    } else {
        root().join("bench").join("results")
    };
    std::fs::create_dir_all(&out)?;
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(out.join(format!("{date}.json")), json)?;
    let markdown = markdown(&results);
    std::fs::write(out.join(format!("{date}.md")), &markdown)?;
    std::fs::write(out.join(format!("{date}.svg")), svg(&results))?;
    std::fs::write(
        out.join(format!("{date}-overload.svg")),
        crate::overload::curve_svg(&results.overload, &date),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    println!("{markdown}");
    println!("written to {}", out.join(&date).display());
    let errors: u64 = results.summary.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} calls failed during the benchmark");
    }
    // A 503 is the marketplace shedding what it does not let in; anything else is a fault.
    let failed_pages: u64 = results.overload.runs.iter().map(|r| r.failed).sum();
    if failed_pages > 0 {
        bail!("{failed_pages} pages failed under overload other than by a 503");
    }
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD, without a date crate.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Measured {} on {} ({}).\n", r.date, r.machine, r.args);
    let _ = writeln!(
        md,
        "| Case | Throughput (ok/s) | Baseline (ok/s) | Ratio (lowest–highest round) | p50 ms | p99 ms | Baseline p99 ms | Errors | Target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &r.summary {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2}× ({:.2}–{:.2}) | {:.3} | {:.3} | {:.3} | {} | {} |",
            row.what,
            row.throughput,
            row.floor_throughput,
            row.ratio,
            row.ratio_low,
            row.ratio_high,
            row.p50_ms,
            row.p99_ms,
            row.floor_p99_ms,
            row.errors,
            row.target
        );
    }
    let _ = writeln!(
        md,
        "\nLatency against concurrency (closed loop; p99 ms, throughput ok/s):\n"
    );
    let _ = writeln!(
        md,
        "| Concurrency | Page p99 | Page ok/s | Floor page p99 | Floor page ok/s | Recommend mTLS p99 | Recommend ok/s |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for c in SWEEP {
        let get = |case: &str| {
            r.sweep
                .iter()
                .find(|m| m.case == case && m.report.concurrency == c)
        };
        let cell = |m: Option<&Measured>| {
            m.map_or("–|–".to_owned(), |m| {
                format!("{:.3}|{:.0}", m.report.latency_ms.p99, m.report.throughput)
            })
        };
        let _ = writeln!(
            md,
            "| {c} | {} | {} | {} |",
            cell(get("page")),
            cell(get("floor_page")),
            cell(get("recommend_mtls"))
        );
    }
    let _ = writeln!(md, "\n| Process | Ready after exec (ms) | Idle RSS (MiB) |");
    let _ = writeln!(md, "|---|---:|---:|");
    let names: std::collections::BTreeSet<&String> =
        r.ready_ms.keys().chain(r.idle_rss_kib.keys()).collect();
    for name in names {
        let ready = r
            .ready_ms
            .get(name)
            .map_or("–".into(), |ms| format!("{ms:.1}"));
        let rss = r
            .idle_rss_kib
            .get(name)
            .map_or("–".into(), |k| format!("{:.1}", *k as f64 / 1024.0));
        let _ = writeln!(md, "| {name} | {ready} | {rss} |");
    }
    let peak = |case: &str| {
        r.runs
            .iter()
            .filter(|m| m.case == case)
            .filter_map(|m| m.peak_rss_kib)
            .max()
    };
    let _ = writeln!(
        md,
        "\nPeak RSS under load: recommendations {:.1} MiB, marketplace {:.1} MiB.",
        peak("recommend_mtls").unwrap_or(0) as f64 / 1024.0,
        peak("page").unwrap_or(0) as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "TLS handshakes completed by recommendations during the page runs: {:.0}, for {} pages.",
        r.backend_handshakes, r.pages
    );
    let sizes: Vec<String> = r
        .binaries_bytes
        .iter()
        .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / 1_048_576.0))
        .collect();
    let _ = writeln!(md, "Release binaries (stripped): {}.", sizes.join(", "));
    crate::overload::markdown(&mut md, &r.overload);
    md
}

/// Throughput of each case next to its baseline, as horizontal bars; below, p99 latency against
/// concurrency for the page, its floor and Recommend, as lines.
fn svg(r: &Results) -> String {
    let rows = &r.summary;
    let (width, bar_h, gap, left) = (760.0, 16.0, 14.0, 300.0);
    let bars_end = 40.0 + rows.len() as f64 * (2.0 * bar_h + gap);
    let (plot_top, plot_h) = (bars_end + 50.0, 200.0);
    let height = plot_top + plot_h + 50.0;
    let max = rows
        .iter()
        .flat_map(|row| [row.throughput, row.floor_throughput])
        .fold(1.0_f64, f64::max);
    let scale = (width - left - 120.0) / max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">Throughput (ok/s): ours (dark) against the baseline (light), {}</text>\n",
        r.date
    );
    for (i, row) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (2.0 * bar_h + gap);
        let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\">{}</text>",
            y + bar_h + 4.0,
            escape(&row.what)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#7a3b1d\"/>",
            row.throughput * scale
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{:.0} ({:.2}×)</text>",
            left + row.throughput * scale + 6.0,
            y + 12.0,
            row.throughput,
            row.ratio
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#d9b8a6\"/>",
            y + bar_h,
            row.floor_throughput * scale
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{:.0}</text>",
            left + row.floor_throughput * scale + 6.0,
            y + bar_h + 12.0,
            row.floor_throughput
        );
    }
    latency_lines(&mut s, r, plot_top, plot_h);
    s.push_str("</svg>\n");
    s
}

/// The concurrency sweep's p99 latencies as one line per case, concurrency evenly spaced.
fn latency_lines(s: &mut String, r: &Results, top: f64, h: f64) {
    let (left, w) = (70.0, 520.0);
    let series = [
        ("page", "Page", "#7a3b1d"),
        ("floor_page", "Floor page", "#d9b8a6"),
        ("recommend_mtls", "Recommend, mTLS", "#2f5d8a"),
    ];
    let p99 = |case: &str, c: usize| {
        r.sweep
            .iter()
            .find(|m| m.case == case && m.report.concurrency == c)
            .map(|m| m.report.latency_ms.p99)
    };
    let max = series
        .iter()
        .flat_map(|(case, _, _)| SWEEP.iter().filter_map(|c| p99(case, *c)))
        .fold(1.0_f64, f64::max);
    let x = |i: usize| left + i as f64 * w / (SWEEP.len() - 1) as f64;
    let y = |ms: f64| top + h - ms / max * h;
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"{}\" font-size=\"14\">p99 latency (ms) against concurrency</text>",
        top - 20.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#888\"/>",
        top + h,
        left + w,
        top + h,
        top + h
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.1}</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
        left - 6.0,
        top + 4.0,
        left - 6.0,
        top + h + 4.0
    );
    for (i, c) in SWEEP.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{c}</text>",
            x(i),
            top + h + 18.0
        );
    }
    for (n, (case, label, colour)) in series.iter().enumerate() {
        let points: Vec<String> = SWEEP
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some(format!("{:.1},{:.1}", x(i), y(p99(case, *c)?))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            points.join(" ")
        );
        let ly = top + 10.0 + n as f64 * 18.0;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{colour}\"/>\n<text x=\"{}\" y=\"{}\">{label}</text>",
            left + w + 20.0,
            ly - 4.0,
            left + w + 40.0,
            ly
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">concurrent callers</text>",
        left + w / 2.0,
        top + h + 36.0
    );
}
