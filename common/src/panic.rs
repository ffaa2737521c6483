//! What a panic in a request handler adds to the log: a line saying the request was answered
//! with an error (the process's panic hook, in `telemetry`, reports the panic itself). The
//! catching is tower-http's `CatchPanicLayer`, in each service with its own answer (`INTERNAL`
//! for gRPC, a 500 page for HTTP), so one bad request costs one response, not the connection.

use std::any::Any;

/// Logs a request handler's panic; the caller gets the service's own error answer.
pub fn log_panic(payload: &(dyn Any + Send)) {
    let message = message(payload);
    tracing::error!(panic = %message, "a request handler panicked; answered with an error");
}

/// The text a panic was raised with (`panic!("…")` carries a `&str` or a `String`).
pub(crate) fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
