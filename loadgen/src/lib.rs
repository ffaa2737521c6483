//! The bookstore's load generator: drives `Recommend` over mutual-TLS or plaintext gRPC, or the
//! marketplace over HTTP, in a closed loop (N callers, each waiting for its answer) or an open
//! loop (a fixed rate, latency measured from when each call was due, so a stall is not hidden).
//! Latencies go into an HDR histogram; errors are counted by gRPC code or HTTP status and never
//! as successes.
//!
//! It also has the floor servers the benchmark measures against: a minimal tonic server and a
//! minimal axum server, each answering constant bytes, and the chain floor: an axum handler
//! making one mutual-TLS tonic call to the tonic floor and formatting its titles.

pub mod drive;
pub mod floor;
pub mod http1;
pub mod outcome;
pub mod report;
pub mod target;
