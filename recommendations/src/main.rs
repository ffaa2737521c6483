//! The recommendations binary: settings from flags and the environment (or the `healthcheck`
//! subcommand), log set-up, then `startup` until a shutdown signal; jemalloc as the allocator.

use std::process::ExitCode;

use clap::Parser;
use recommendations::{config::Config, startup::Application};

/// jemalloc, with its background thread, gives memory freed after a burst back to the system
/// within seconds; glibc's malloc kept it in per-thread arenas for good (docs/security.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Some(command) = config.command {
        return bookstore_common::admin::run(command, config.admin_addr);
    }
    let telemetry = bookstore_common::telemetry::init(&config.log, "recommendations");
    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = app
        .run_until_stopped(bookstore_common::shutdown::signal())
        .await;
    // Sends the last spans before the process ends.
    drop(telemetry);
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
