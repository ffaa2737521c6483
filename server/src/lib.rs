//! How a bookstore service runs, written once for both.
//!
//! - `service`: the settings both services take (shutdown grace, admin port, logging, TLS, the
//!   `healthcheck` subcommand), a service's process from start to exit, and its two bound ports.
//! - `admin`: the plaintext admin port (liveness, readiness, metrics) and the health check.
//! - `http_server`: the HTTP listener (the marketplace's page and both admin ports), with
//!   `head_budget`, its bound on unfinished request heads, and `conn_cap`, the connection cap
//!   every listener shares, the gRPC one included.
//!
//! The building blocks these use (TLS, metrics, logging, the shutdown signal) are in
//! `bookstore-common`, which the load generator and xtask use as well.

pub mod admin;
pub mod conn_cap;
pub mod head_budget;
pub mod http_server;
pub mod service;
