//! A tower layer that turns a panic in a request handler into an error response, so one bad
//! request costs one response, not the connection (and never the process). Each service says
//! what the response is: `INTERNAL` for gRPC, a 500 page for HTTP.

use std::{
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use tower::{Layer, Service};

/// Wraps a service so that a panic while handling a request becomes `on_panic()`.
#[derive(Debug, Clone, Copy)]
pub struct CatchPanicLayer<F> {
    on_panic: F,
}

impl<F> CatchPanicLayer<F> {
    pub fn new(on_panic: F) -> Self {
        CatchPanicLayer { on_panic }
    }
}

impl<S, F: Clone> Layer<S> for CatchPanicLayer<F> {
    type Service = CatchPanic<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic {
            inner,
            on_panic: self.on_panic.clone(),
        }
    }
}

/// The service [`CatchPanicLayer`] makes.
#[derive(Debug, Clone)]
pub struct CatchPanic<S, F> {
    inner: S,
    on_panic: F,
}

impl<S, F, Req, Res> Service<Req> for CatchPanic<S, F>
where
    S: Service<Req, Response = Res>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    Res: Send + 'static,
    F: Fn() -> Res + Clone + Send + Unpin + 'static,
{
    type Response = Res;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Res, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let on_panic = self.on_panic.clone();
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(future) => Box::pin(Caught {
                future: Box::pin(future),
                on_panic,
            }),
            Err(payload) => {
                log_panic(payload.as_ref());
                Box::pin(std::future::ready(Ok(on_panic())))
            }
        }
    }
}

/// Polls the handler's future, catching a panic inside any poll.
struct Caught<Fut, F> {
    future: Pin<Box<Fut>>,
    on_panic: F,
}

impl<Fut, F, Res, E> Future for Caught<Fut, F>
where
    Fut: Future<Output = Result<Res, E>>,
    F: Fn() -> Res + Unpin,
{
    type Output = Result<Res, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match catch_unwind(AssertUnwindSafe(|| this.future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                log_panic(payload.as_ref());
                Poll::Ready(Ok((this.on_panic)()))
            }
        }
    }
}

fn log_panic(payload: &(dyn std::any::Any + Send)) {
    let message = message(payload);
    tracing::error!(panic = %message, "a request handler panicked; answered with an error");
}

/// The text a panic was raised with (`panic!("…")` carries a `&str` or a `String`).
pub(crate) fn message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test]
    async fn a_panic_while_polling_becomes_the_error_response() {
        let svc = CatchPanicLayer::new(|| 500u16).layer(service_fn(|n: u32| async move {
            tokio::task::yield_now().await;
            if n == 0 {
                panic!("boom");
            }
            Ok::<_, Infallible>(200u16)
        }));
        assert_eq!(svc.clone().oneshot(0).await, Ok(500));
        // The service keeps answering afterwards.
        assert_eq!(svc.oneshot(1).await, Ok(200));
    }

    #[tokio::test]
    async fn a_panic_in_call_itself_becomes_the_error_response() {
        #[derive(Clone)]
        struct PanicsInCall;
        impl Service<()> for PanicsInCall {
            type Response = u16;
            type Error = Infallible;
            type Future = std::future::Ready<Result<u16, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: ()) -> Self::Future {
                panic!("boom in call")
            }
        }
        let svc = CatchPanicLayer::new(|| 500u16).layer(PanicsInCall);
        assert_eq!(svc.oneshot(()).await, Ok(500));
    }
}
