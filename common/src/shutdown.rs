//! Graceful shutdown: wait for SIGTERM or Ctrl+C, stop accepting, drain within a deadline.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// Completes when the process receives SIGTERM (what Kubernetes and `docker stop` send) or SIGINT
/// (Ctrl+C). The handlers are installed when this is called, not when the future is first
/// polled: call it before the service reports ready, since until a handler exists either signal
/// ends the process at once instead of draining it.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| {
            signal(kind)
                .inspect_err(|e| tracing::error!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                () = next(term.as_mut()) => {},
                () = next(int.as_mut()) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl+C");
            std::future::pending::<()>().await;
        }
    }
}

/// The next delivery of a signal being listened for; never, if it could not be listened for.
#[cfg(unix)]
pub(crate) async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// How a server's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished within the grace period.
    Gracefully,
    /// The grace period ran out; the requests still running were cancelled.
    GraceElapsed,
}

/// Runs `serve` until `shutdown` completes, then drains it within `grace`.
///
/// `serve` must stop accepting new connections as soon as `stop` is cancelled, and finish once its
/// in-flight requests have. The servers' own graceful shutdown waits without limit (a long gRPC
/// stream such as health `Watch` would hold it forever), so this bounds it: past `grace` the
/// server future is dropped, which cancels whatever was still running.
pub async fn serve_until<E>(
    serve: impl Future<Output = Result<(), E>>,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<Drained, E> {
    tokio::pin!(serve);
    tokio::select! {
        res = &mut serve => return res.map(|()| Drained::Gracefully),
        () = shutdown => {}
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "Received shutdown signal");
    stop.cancel();
    match tokio::time::timeout(grace, serve).await {
        Ok(res) => {
            res?;
            tracing::info!("Shut down gracefully");
            Ok(Drained::Gracefully)
        }
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "grace period elapsed; cancelling the requests still in flight"
            );
            Ok(Drained::GraceElapsed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_finishes_its_drain_in_time_ends_gracefully() {
        let stop = CancellationToken::new();
        let watched = stop.clone();
        let serve = async move {
            watched.cancelled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<(), ()>(())
        };
        let outcome = serve_until(serve, stop, async {}, Duration::from_secs(30)).await;
        assert_eq!(outcome, Ok(Drained::Gracefully));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_outlasts_the_grace_period_is_cut_off() {
        let stop = CancellationToken::new();
        let serve = std::future::pending::<Result<(), ()>>();
        let outcome = serve_until(serve, stop.clone(), async {}, Duration::from_secs(30)).await;
        assert_eq!(outcome, Ok(Drained::GraceElapsed));
        assert!(
            stop.is_cancelled(),
            "the server must be told to stop accepting"
        );
    }

    #[tokio::test]
    async fn a_server_error_before_any_signal_is_returned() {
        let serve = async { Err::<(), _>("bind failed") };
        let outcome = serve_until(
            serve,
            CancellationToken::new(),
            std::future::pending(),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(outcome, Err("bind failed"));
    }
}
