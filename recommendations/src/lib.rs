//! The recommendations service: book recommendations by category over gRPC.
//!
//! `catalog` is the domain, `grpc` the transport adapter, `error` Recommend's errors and their
//! gRPC codes, `authz` the caller allow-list, `edge` what a request must be and what an answer
//! may say, `call_layer` each call's count, log line and deadline, `listener` the gRPC listener
//! (connection limits, handshakes), `server_tls` its TLS (reloaded from the files), `series` its
//! own metrics' help text, `config` the settings and `startup` the wiring. The binary is one
//! call to the shared skeleton over `startup`.

pub mod authz;
pub mod call_layer;
pub mod catalog;
pub mod config;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod listener;
pub mod series;
pub mod server_tls;
pub mod startup;
