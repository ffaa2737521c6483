//! The charter: what both bookstore services need, and nothing that only one of them uses.
//! Every module here serves both; a module may carry a helper only one service calls where it
//! belongs with the rest of that module (certificate identities beside certificate loading).
//! Domain code, wire types and what one service alone needs (the gRPC listener and the server's
//! call layer in recommendations, the client's call layer in marketplace) live in that service.
//!
//! - `tls`: the TLS settings and PEM files, loaded with every check at start-up, certificate
//!   identities and expiry; `watch`: noticing the files changed.
//! - `shutdown`: the signal, and a drain bounded in time; `fd_limit`: the open-file limit,
//!   raised at start-up to what the connection caps need.
//! - `metrics` and `process_metrics`: the Prometheus registry and the help text of the series
//!   both services export (each service describes its own); `grpc_call`: what either end of a
//!   gRPC call records about it (series and log line) and the `grpc-timeout` codec both ends use.
//! - `context`: request ids and trace context; `telemetry`: logging and trace export set-up;
//!   `request_log`: which requests get a line; `log_limit`: rate-limited warnings; `panic`: the
//!   line for a handler's panic (each service's tower-http `CatchPanicLayer` answers it).
//!
//! How a service runs (its settings, start-up, admin port and listeners) is built from these in
//! `bookstore-server`.
//!
//! Without the `service` feature the crate is only `tls`, `shutdown` and `fd_limit`: what the
//! load generator and xtask use.

#[cfg(feature = "service")]
pub mod context;
pub mod fd_limit;
#[cfg(feature = "service")]
pub mod grpc_call;
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
