//! The series only the marketplace exports, with their `# HELP` text (those both services
//! export are described in `bookstore_common::metrics`).

use bookstore_common::metrics::{Description, Kind};

/// Every series only this service exports.
pub const SERIES: &[Description] = &[
    (
        "bookstore_client_retries_total",
        Kind::Counter,
        "Second calls to the backend, by outcome: attempted (a retry), hedged (a second call on another address after the per-try timeout), budget_exhausted (cut off by the retry budget), past_deadline.",
    ),
    (
        "bookstore_client_queue_rejected_total",
        Kind::Counter,
        "Pages answered 503 because every backend call slot was taken and the queue for them was full (reason=full), or a page waited MAX_QUEUE_WAIT_MS or arrived while the queue took that long (reason=wait).",
    ),
    (
        "bookstore_backend_calls_total",
        Kind::Counter,
        "Backend calls to each recommendations address: sent, or waiting for a call slot there (each retry and hedge sent is a call).",
    ),
    (
        "bookstore_backend_in_flight",
        Kind::Gauge,
        "Backend calls in flight to each recommendations address, as the balancer weighs them.",
    ),
    (
        "bookstore_backend_latency_estimate_seconds",
        Kind::Gauge,
        "Each recommendations address's latency estimate as of its last answer (a peak-EWMA: a slower answer raises it at once, faster ones lower it over 10 s).",
    ),
    (
        "bookstore_backend_ejected",
        Kind::Gauge,
        "1 while a recommendations address is out of the rotation (its calls failed; it rejoins once a probe passes), else 0.",
    ),
    (
        "bookstore_backend_ejections_total",
        Kind::Counter,
        "Times an address was taken out of the rotation (five failures in a row, or a failure rate far above the others', or a failed probe).",
    ),
    (
        "bookstore_backend_readmissions_total",
        Kind::Counter,
        "Times an ejected address rejoined the rotation.",
    ),
    (
        "http_requests_total",
        Kind::Counter,
        "HTTP requests answered, by method, route and status.",
    ),
    (
        "http_request_duration_seconds",
        Kind::Histogram,
        "Time to answer an HTTP request, by method, route and status.",
    ),
    (
        "bookstore_requests_shed_total",
        Kind::Counter,
        "Requests answered 503 because MAX_REQUESTS_IN_FLIGHT were being worked on (at once, or after waiting for a place).",
    ),
    (
        "bookstore_requests_in_flight",
        Kind::Gauge,
        "Requests being worked on now, as of the scrape (at most bookstore_requests_in_flight_max).",
    ),
    (
        "bookstore_requests_in_flight_max",
        Kind::Gauge,
        "MAX_REQUESTS_IN_FLIGHT: past it, requests are shed.",
    ),
    (
        "bookstore_client_queue_waiting",
        Kind::Gauge,
        "Calls waiting in the queue for a backend call slot now, as of the scrape.",
    ),
    (
        "bookstore_client_queue_max",
        Kind::Gauge,
        "The most calls that may wait for a backend call slot (MAX_QUEUED_CALLS).",
    ),
    (
        "bookstore_backend_call_slots",
        Kind::Gauge,
        "CALLS_PER_BACKEND: the calls one recommendations address may have in flight (bookstore_backend_in_flight).",
    ),
];
