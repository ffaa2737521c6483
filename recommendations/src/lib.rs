//! The recommendations service: book recommendations by category over gRPC.
//!
//! `catalog` is the domain, `grpc` the transport adapter, `error` Recommend's errors and their
//! gRPC codes, `authz` the caller allow-list, `edge` what a request must be and what an answer
//! may say, `call_layer` each call's count, log line and deadline, `server_tls` the listener
//! (TLS that reloads, connection limits), `config` the settings and `startup` the wiring. The
//! binary is a thin `main` over `startup`.

pub mod authz;
pub mod call_layer;
pub mod catalog;
pub mod config;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod series;
pub mod server_tls;
pub mod startup;
