//! The charter: what both bookstore services need, and nothing that only one of them uses.
//! Domain code, wire types and anything one service alone needs (the gRPC listener's TLS and
//! the server's call layer in recommendations, the client's call layer in marketplace) live in
//! that service.
//!
//! - `tls`: the PEM files, loaded with every check at start-up; `watch`: reloading them.
//! - `shutdown`: the signal, and a drain bounded in time.
//! - `http_server` and `conn_cap`: the HTTP listener with its limits (marketplace's page, both
//!   admin ports); `admin`: the admin port (health, metrics, log level).
//! - `metrics` and `process_metrics`: the Prometheus registry; `grpc_call`: what either end of
//!   a gRPC call records about it (series and log line).
//! - `context`: request ids and trace context; `telemetry`, `request_log`, `log_limit`: logging
//!   set-up, which requests get a line, rate-limited warnings; `panic`: a panic becomes an
//!   answer and a log line.
//!
//! Without the `service` feature the crate is only `tls` and `shutdown`: what the load
//! generator and xtask use.

#[cfg(feature = "service")]
pub mod admin;
#[cfg(feature = "service")]
pub mod conn_cap;
#[cfg(feature = "service")]
pub mod context;
#[cfg(feature = "service")]
pub mod grpc_call;
#[cfg(feature = "service")]
pub mod http_server;
#[cfg(feature = "service")]
pub mod log_limit;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod panic;
#[cfg(feature = "service")]
pub mod process_metrics;
#[cfg(feature = "service")]
pub mod request_log;
pub mod shutdown;
#[cfg(feature = "service")]
pub mod telemetry;
pub mod tls;
#[cfg(feature = "service")]
pub mod watch;
