//! Noticing that TLS files changed: by polling their modification times and sizes (what a
//! Kubernetes Secret update, cert-manager or a plain `cp` changes), and on SIGHUP.
//!
//! Polling rather than inotify (the `notify` crate): a Secret volume is updated by swapping a
//! `..data` symlink, which a watch on the files themselves does not report as a change, and a
//! stat per file per interval costs nothing worth a dependency.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime},
};

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// Remembers a set of files' modification times and sizes, to tell when any of them changed.
#[derive(Debug)]
pub struct FileStamps {
    paths: Vec<PathBuf>,
    last: Mutex<Stamp>,
    /// SIGHUP, caught from the moment a service's stamps are taken ([`FileStamps::of`]).
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl FileStamps {
    /// Takes the files' current state as the starting point.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        let last = Mutex::new(stamp(&paths));
        FileStamps {
            paths,
            last,
            #[cfg(unix)]
            hangup: None,
        }
    }

    /// The stamps of a service's TLS files, and SIGHUP caught from now on. Take them while the
    /// service builds, before it loads the files (so a change made meanwhile is seen by the
    /// first check) and before it reports ready: until a handler exists, SIGHUP does what it
    /// does by default, which is to end the process. Must run inside the Tokio runtime.
    pub fn of(files: &crate::tls::TlsFiles) -> Self {
        #[allow(unused_mut)] // not mutated off unix
        let mut stamps = FileStamps::new([files.ca.clone(), files.cert.clone(), files.key.clone()]);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            stamps.hangup = signal(SignalKind::hangup())
                .inspect_err(|e| tracing::warn!(error = %e, "cannot catch SIGHUP"))
                .ok();
        }
        stamps
    }

    /// Whether any file changed since the last call (or creation). The new state is remembered
    /// even if the caller then refuses the files, so a broken set is reported once and the next
    /// change (the writer finishing) is tried again.
    pub fn changed(&self) -> bool {
        let now = stamp(&self.paths);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return false;
        }
        *last = now;
        true
    }
}

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Until `stop` is cancelled: every `interval`, if any of the files in `stamps` changed, calls
/// `reload`; on SIGHUP, calls it whatever. Logs the outcome either way: reloaded, or refused
/// with the reason, in which case `reload` must have left the material in use untouched. Counts
/// it in `bookstore_tls_reloads_total{outcome="reloaded"|"refused"}`, whose series exist from
/// this call on (before the returned future first runs), at zero.
pub fn watch_files<E: std::fmt::Display>(
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
    stamps: FileStamps,
    metrics: crate::metrics::Metrics,
    reload: impl Fn() -> Result<(), E> + Send,
) -> impl std::future::Future<Output = ()> {
    let [reloaded, refused] = ["reloaded", "refused"].map(|outcome| {
        let counter = metrics.counter("bookstore_tls_reloads_total", &[("outcome", outcome)]);
        counter.increment(0);
        counter
    });
    watch(interval, stop, stamps, reload, reloaded, refused)
}

async fn watch<E: std::fmt::Display>(
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
    #[allow(unused_mut)] // not mutated off unix
    mut stamps: FileStamps,
    reload: impl Fn() -> Result<(), E> + Send,
    reloaded: metrics::Counter,
    refused: metrics::Counter,
) {
    let attempt = || match reload() {
        Ok(()) => {
            reloaded.increment(1);
            tracing::info!(
                files = ?stamps.paths,
                "TLS certificates reloaded; new connections use them"
            );
        }
        Err(e) => {
            refused.increment(1);
            tracing::warn!(
                error = %e,
                "new TLS files refused; keeping the certificates in use"
            );
        }
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; the files were just loaded
    #[cfg(unix)]
    let mut hangup = stamps.hangup.take();
    loop {
        #[cfg(unix)]
        let sighup = crate::shutdown::next(hangup.as_mut());
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {
                if stamps.changed() {
                    attempt();
                }
            }
            () = sighup => {
                tracing::info!("SIGHUP: reloading TLS certificates");
                // Take the new state as seen, so the next tick does not reload it again.
                stamps.changed();
                attempt();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.pem");
        std::fs::write(&file, "one").expect("write");
        let stamps = FileStamps::new([file.clone()]);
        assert!(!stamps.changed());
        std::fs::write(&file, "two, longer").expect("write");
        assert!(stamps.changed());
        assert!(!stamps.changed());
        std::fs::remove_file(&file).expect("rm");
        assert!(stamps.changed(), "a file going away is a change too");
    }
}
