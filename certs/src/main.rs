//! `bookstore-certs`: writes the development PKI (also reachable as `cargo xtask certs`).

use std::{path::PathBuf, process::ExitCode};

use bookstore_certs::{Generated, generate};
use clap::Parser;

/// Creates a development PKI for the bookstore: a private CA, the recommendations server
/// certificate and the marketplace client certificate, with the original tutorial's file names.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory to write into.
    #[arg(long, default_value = "certs/dev", env = "CERTS_DIR")]
    out: PathBuf,
    /// Replace an existing PKI (every certificate and key is made anew).
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match generate(&args.out, args.force) {
        Ok(Generated::Created) => {
            eprintln!("created a development PKI in {}", args.out.display());
            ExitCode::SUCCESS
        }
        Ok(Generated::AlreadyPresent) => {
            eprintln!(
                "a PKI is already in {}; left as is (--force to recreate)",
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
