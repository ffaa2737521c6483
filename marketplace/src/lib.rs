//! The marketplace: a web page and a JSON API of book recommendations, fetched from the
//! recommendations service over mutual-TLS gRPC.
//!
//! `books` is the domain, `source` the gRPC client adapter behind a trait (it picks an address
//! from `backends`, which resolves and balances, and `call_layer` counts, logs and addresses each
//! call), `routes` the HTTP surface, `templates` the pages that `routes` and `error` render,
//! `error` where errors meet HTTP, `series` its own metrics' help text, `config` the settings and
//! `startup` the wiring. The binary is one call to the shared skeleton over `startup`.

pub mod backends;
pub mod books;
pub mod call_layer;
pub mod config;
pub mod error;
pub mod routes;
pub mod series;
pub mod source;
pub mod startup;
pub mod templates;
