//! A backend call that runs to its end even when the page stops waiting for it.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll},
};

/// A future run in the caller's task while the caller waits for it, and in a task of its own,
/// to its end, if the caller gives up first. A backend call thus finishes whatever the page does,
/// without a task spawned for every call: the spawn, its wake-ups and a switch between worker
/// threads were a few microseconds of every page.
pub(super) struct RunToEnd<T: Send + 'static> {
    /// None once it has finished.
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
}

impl<T: Send + 'static> RunToEnd<T> {
    pub(super) fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        RunToEnd {
            future: Some(Box::pin(future)),
        }
    }
}

impl<T: Send + 'static> Future for RunToEnd<T> {
    /// Err if the future panicked: it is then dropped, not handed on to be polled again.
    type Output = std::thread::Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(mut future) = self.future.take() else {
            // Polled again after it finished: nothing more will come.
            return Poll::Pending;
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => {
                self.future = Some(future);
                Poll::Pending
            }
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

impl<T: Send + 'static> Drop for RunToEnd<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(future);
        }
    }
}
