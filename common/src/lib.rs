//! Plumbing shared by the two bookstore services, and nothing else: loading and checking TLS
//! material, catching handler panics, waiting for a shutdown signal and draining within a deadline, and log set-up.
//! Domain code and wire types stay in the services.

pub mod admin;
pub mod conn_cap;
pub mod context;
pub mod grpc_call;
pub mod http_server;
pub mod log_limit;
pub mod metrics;
pub mod panic;
pub mod process_metrics;
pub mod request_log;
pub mod server_tls;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod watch;
