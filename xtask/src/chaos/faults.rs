//! The faults done to a replica's network path: the relay in front of it, which can delay every
//! byte, and the iptables rule that blackholes its address. Apart from the processes they hit.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::Command,
};

/// How the relay in front of a replica passes bytes.
pub(super) const PASS: u8 = 0;
pub(super) const DELAY: u8 = 1;

/// The relay's added latency in the slow scenario, each way.
const SLOW_BY: Duration = Duration::from_millis(200);

/// Relays every connection to `listen` on to `to`, each byte delayed by [`SLOW_BY`] while
/// `mode` is [`DELAY`].
pub(super) async fn relay(listen: SocketAddr, to: SocketAddr, mode: Arc<AtomicU8>) {
    let Ok(listener) = TcpListener::bind(listen).await else {
        eprintln!("chaos: cannot listen on {listen}");
        return;
    };
    while let Ok((inbound, _)) = listener.accept().await {
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(to).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(pump(in_read, out_write, mode.clone()));
            tokio::spawn(pump(out_read, in_write, mode));
        });
    }
}

/// Copies one direction of a relayed connection, each chunk held until [`SLOW_BY`] after it
/// was read while the relay is slow (order kept).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = if mode.load(Ordering::Relaxed) == DELAY {
            SLOW_BY
        } else {
            Duration::ZERO
        };
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Whether packets can be dropped here: `iptables`, as root.
pub(super) async fn can_blackhole() -> bool {
    Command::new("iptables")
        .args(["-L", "-n"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Adds (`-A`) or deletes (`-D`) the rule dropping every packet to `addr`.
pub(super) async fn iptables(op: &str, addr: SocketAddr) -> Result<()> {
    let status = Command::new("iptables")
        .args([
            op,
            "INPUT",
            "-d",
            &addr.ip().to_string(),
            "-p",
            "tcp",
            "--dport",
            &addr.port().to_string(),
            "-j",
            "DROP",
        ])
        .status()
        .await?;
    if !status.success() {
        bail!("iptables {op} failed");
    }
    Ok(())
}
