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
    /// even if the caller then refuses the files: [`watch_files`] tries refused files again
    /// itself.
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

/// Why new files were not taken, as the watcher reports it.
#[derive(Debug)]
pub struct Refused {
    /// What is wrong, naming the file.
    pub reason: String,
    /// The only fault is a certificate that starts within [`crate::tls::CLOCK_LEEWAY`]: not a
    /// refusal, the files load once it has started.
    pub early: bool,
}

impl From<crate::tls::TlsError> for Refused {
    fn from(e: crate::tls::TlsError) -> Self {
        Refused {
            early: e.is_early(),
            reason: e.to_string(),
        }
    }
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Refused {
            reason,
            early: false,
        }
    }
}

/// Until `stop` is cancelled: every `interval`, if any of the files in `stamps` changed, or the
/// last ones were not taken, calls `reload`; on SIGHUP, calls it whatever. Files not taken are
/// so tried at every check until they load or change: a renewal refused for a passing reason
/// (a clock behind the issuer's, a half-written Secret) loads once the reason has passed
/// instead of waiting for the next renewal.
///
/// Logs each outcome once, not once per check: reloaded; early (a certificate that starts
/// within the clock leeway: the files in use stay until it has); or refused, with the reason,
/// in which case `reload` must have left the material in use untouched. Counts them in
/// `bookstore_tls_reloads_total{outcome="reloaded"|"refused"}` (a refusal once per distinct
/// reason), and keeps `bookstore_tls_reload_refused` at 1 while the files on disk are refused.
/// Those series exist from this call on (before the returned future first runs), at zero.
pub fn watch_files<E: Into<Refused>>(
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
    let refusing = metrics.gauge("bookstore_tls_reload_refused", &[]);
    refusing.set(0.0);
    let outcomes = Outcomes {
        reload: move || reload().map_err(Into::into),
        reloaded,
        refused,
        refusing,
        pending: None,
    };
    watch(interval, stop, stamps, outcomes)
}

/// What the watcher does with each try, and what it remembers of the last.
struct Outcomes<R> {
    reload: R,
    reloaded: metrics::Counter,
    refused: metrics::Counter,
    refusing: metrics::Gauge,
    /// Why the files on disk were not taken, while they still are not: tried again at every
    /// check, and logged again only for another reason.
    pending: Option<Refused>,
}

impl<R: Fn() -> Result<(), Refused>> Outcomes<R> {
    fn attempt(&mut self, files: &[PathBuf]) {
        let error = match (self.reload)() {
            Ok(()) => {
                self.pending = None;
                self.reloaded.increment(1);
                self.refusing.set(0.0);
                tracing::info!(
                    ?files,
                    "TLS certificates reloaded; new connections use them"
                );
                return;
            }
            Err(error) => error,
        };
        let repeated = self
            .pending
            .as_ref()
            .is_some_and(|last| last.reason == error.reason && last.early == error.early);
        self.refusing.set(if error.early { 0.0 } else { 1.0 });
        if !repeated {
            if error.early {
                tracing::info!(
                    reason = %error.reason,
                    "new TLS files start within the clock leeway; the certificates in use stay \
                     until then"
                );
            } else {
                self.refused.increment(1);
                tracing::warn!(
                    error = %error.reason,
                    "new TLS files refused; keeping the certificates in use and trying them \
                     again at every check"
                );
            }
        }
        self.pending = Some(error);
    }
}

async fn watch<R: Fn() -> Result<(), Refused>>(
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
    #[allow(unused_mut)] // not mutated off unix
    mut stamps: FileStamps,
    mut outcomes: Outcomes<R>,
) {
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
                // (`changed` first: it also takes the new state as seen.)
                if stamps.changed() || outcomes.pending.is_some() {
                    outcomes.attempt(&stamps.paths);
                }
            }
            () = sighup => {
                tracing::info!("SIGHUP: reloading TLS certificates");
                // Take the new state as seen, so the next tick does not reload it again.
                stamps.changed();
                outcomes.attempt(&stamps.paths);
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
