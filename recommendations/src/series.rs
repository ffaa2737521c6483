//! The series only the recommendations service exports, with their `# HELP` text (those both services
//! export are described in `bookstore_common::metrics`).

use bookstore_common::metrics::{Description, Kind};

/// Every series only this service exports.
pub const SERIES: &[Description] = &[
    (
        "bookstore_tls_handshakes_total",
        Kind::Counter,
        "TLS handshakes on the gRPC port, by result: completed, refused, timed_out, evicted (gave way to a newer connection with MAX_HANDSHAKES in progress).",
    ),
    (
        "bookstore_requests_refused_total",
        Kind::Counter,
        "Requests to the gRPC port that are not gRPC, by reason: method (405), content_type (415).",
    ),
];
