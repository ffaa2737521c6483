//! The recommendations binary: the shared service skeleton (`bookstore_server::service::main`) over
//! this service's `startup`, with jemalloc as the allocator.

use std::process::ExitCode;

use recommendations::startup::Application;

/// jemalloc, with its background thread, gives memory freed after a burst back to the system
/// within seconds; glibc's malloc kept it in per-thread arenas for good (docs/security.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    bookstore_server::service::main::<Application>()
}
