//! The services as real processes: started from their built binaries with an explicit
//! environment, watched through their log lines, stopped with real signals.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// Where cargo put the workspace binary `name`: next to the `deps/` folder holding this test.
/// If it is not built yet (a single package's tests were asked for), it is built now.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--bin", name, "-p", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    path
}

/// A running service process. It is killed if dropped while still running.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
}

impl ServiceProcess {
    /// Starts binary `name` with exactly `env` (nothing inherited, so the test does not depend on
    /// the ambient environment), plain-text logs on standard error.
    pub fn start(name: &str, env: &[(&str, String)]) -> Self {
        Self::spawn(name, Command::new(binary(name)), env)
    }

    /// [`ServiceProcess::start`], but the process begins with the open-file limit a shell's
    /// `ulimit {limit}` leaves: `-S -n 256` for a soft limit of 256 under the hard one, `-n 256`
    /// for both.
    pub fn start_with_ulimit(name: &str, env: &[(&str, String)], limit: &str) -> Self {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("ulimit {limit} && exec \"$0\""))
            .arg(binary(name));
        Self::spawn(name, command, env)
    }

    fn spawn(name: &str, mut command: Command, env: &[(&str, String)]) -> Self {
        // Tests hold hundreds of sockets of their own against the services they start; a
        // shell's soft limit of 1024 would fail them before the service.
        static RAISED: std::sync::Once = std::sync::Once::new();
        RAISED.call_once(|| {
            bookstore_common::fd_limit::raise();
        });
        command
            .env_clear()
            .env("RUST_LOG", "info")
            // Many tests run at once: the admin port must not collide unless a test picks one.
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = bookstore_process::start(&mut command, Stdio::piped())
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ServiceProcess {
            name: name.to_owned(),
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a log line containing `needle` and returns it.
    pub async fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = self.lines.recv().await {
                self.log.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "{} never logged {needle:?}; its log:\n{}",
                self.name,
                self.log.join("\n")
            ),
        }
    }

    /// Waits until at least `n` log lines contain `needle`; returns the `n`th.
    pub async fn wait_for_nth(&mut self, needle: &str, n: usize, timeout: Duration) -> String {
        let found = tokio::time::timeout(timeout, async {
            loop {
                let matching: Vec<&String> =
                    self.log.iter().filter(|l| l.contains(needle)).collect();
                if matching.len() >= n {
                    return Some(matching[n - 1].clone());
                }
                match self.lines.recv().await {
                    Some(line) => self.log.push(line),
                    None => return None,
                }
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "{} never logged {needle:?} {n} times; its log:\n{}",
                self.name,
                self.log.join("\n")
            ),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Resident memory in KiB, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        bookstore_process::rss_kib(self.pid()).expect("VmRSS in /proc/<pid>/status")
    }

    /// How many files (sockets included) the process has open, from `/proc`.
    pub fn open_fds(&self) -> usize {
        bookstore_process::open_fds(self.pid()).expect("read /proc/<pid>/fd")
    }

    /// Drains the log lines that arrived so far without waiting.
    pub fn read_available(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// The log lines read so far.
    pub fn log_so_far(&self) -> &[String] {
        &self.log
    }

    /// Waits for the "listening" line and returns the address it names.
    pub async fn listening_addr(&mut self) -> SocketAddr {
        let line = self
            .wait_for_line("listening", Duration::from_secs(20))
            .await;
        let addr = field(&line, "addr").unwrap_or_else(|| panic!("no addr in {line:?}"));
        addr.parse()
            .unwrap_or_else(|e| panic!("bad addr {addr:?}: {e}"))
    }

    /// The admin address, from the service's own start-up log line.
    pub async fn admin_addr(&mut self) -> SocketAddr {
        let line = self
            .wait_for_line("admin endpoints up", Duration::from_secs(60))
            .await;
        let addr =
            field(&line, "admin_addr").unwrap_or_else(|| panic!("no admin_addr in {line:?}"));
        addr.parse()
            .unwrap_or_else(|e| panic!("bad admin_addr {addr:?}: {e}"))
    }

    /// Sends a signal by name: `TERM`, `INT`, `HUP` or `KILL`.
    pub fn signal(&self, signal: &str) {
        use bookstore_process::Signal;
        let sig = match signal {
            "TERM" => Signal::TERM,
            "INT" => Signal::INT,
            "HUP" => Signal::HUP,
            "KILL" => Signal::KILL,
            "STOP" => Signal::STOP,
            "CONT" => Signal::CONT,
            other => panic!("no such signal here: {other}"),
        };
        let id = self.pid();
        bookstore_process::send(id, sig)
            .unwrap_or_else(|e| panic!("kill -{signal} {id} failed: {e}"));
    }

    /// Waits up to `timeout` for the process to exit; returns its status and whole log.
    pub async fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log.join("\n")
                )
            })
            .expect("wait");
        while let Some(line) = self.lines.recv().await {
            self.log.push(line);
        }
        (status, self.log)
    }
}

/// A field of a log line, in either format: `name=value` (text) or `"name":"value"` (JSON).
fn field(line: &str, name: &str) -> Option<String> {
    if line.starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        return event.get(name)?.as_str().map(str::to_owned);
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"').to_owned())
}

/// Starts the recommendations binary on a free loopback port with the PKI in `certs`; `extra`
/// adds or overrides variables (a later `LISTEN_ADDR` wins). Returns it and its address.
pub async fn start_recommendations(
    certs: &Path,
    extra: &[(&str, String)],
) -> (ServiceProcess, SocketAddr) {
    let mut env = vec![
        ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ("CERTS_DIR", certs.display().to_string()),
    ];
    env.extend_from_slice(extra);
    let mut process = ServiceProcess::start("recommendations", &env);
    let addr = process.listening_addr().await;
    (process, addr)
}

/// A loopback address nothing listens on (a port the kernel just handed out and took back): a
/// backend that is not there.
pub fn unused_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Starts the marketplace binary on a free loopback port, calling recommendations at
/// `localhost` on `backend`'s port, with the PKI in `certs`; `extra` adds or overrides variables.
pub async fn start_marketplace(
    certs: &Path,
    backend: SocketAddr,
    extra: &[(&str, String)],
) -> (ServiceProcess, SocketAddr) {
    let mut process = ServiceProcess::start("marketplace", &marketplace_env(certs, backend, extra));
    let addr = process.listening_addr().await;
    (process, addr)
}

/// A backend address where nothing listens (the discard port), for a marketplace whose backend
/// is never asked.
pub const VACANT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// A marketplace whose backend is never asked (unfinished requests never reach a handler): its
/// recommendations address is [`VACANT`].
pub async fn start_marketplace_alone(
    certs: &Path,
    extra: &[(&str, String)],
) -> (ServiceProcess, SocketAddr) {
    start_marketplace(certs, VACANT, extra).await
}

/// Both services, as a deployment runs them: recommendations with its defaults, and a
/// marketplace calling it with `extra`. Returns both processes and the marketplace's address.
pub async fn start_stack(
    certs: &Path,
    extra: &[(&str, String)],
) -> (ServiceProcess, ServiceProcess, SocketAddr) {
    let (recommendations, backend) = start_recommendations(certs, &[]).await;
    let (marketplace, web) = start_marketplace(certs, backend, extra).await;
    (recommendations, marketplace, web)
}

/// The environment [`start_marketplace`] gives the marketplace, for a test that starts it
/// another way: a free loopback port, recommendations at `localhost` on `backend`'s port, the
/// PKI in `certs`; `extra` adds or overrides variables.
pub fn marketplace_env<'a>(
    certs: &Path,
    backend: SocketAddr,
    extra: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ("RECOMMENDATIONS_HOST", "localhost".to_owned()),
        ("RECOMMENDATIONS_PORT", backend.port().to_string()),
        ("CERTS_DIR", certs.display().to_string()),
    ];
    env.extend_from_slice(extra);
    env
}
