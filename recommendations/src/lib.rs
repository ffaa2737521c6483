//! The recommendations service: book recommendations by category over gRPC.
//!
//! `catalog` is the domain, `authz` the caller allow-list, `edge` what a request must be and
//! what an answer may say, `grpc` the transport adapter, `error` where the two meet the wire,
//! `config` the settings, `server_tls` the listener (TLS that reloads, connection limits),
//! `call_layer` each call's count, log line and deadline, and `startup` the wiring. The binary is a thin `main` over `startup`.

pub mod authz;
pub mod call_layer;
pub mod catalog;
pub mod config;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod server_tls;
pub mod startup;
