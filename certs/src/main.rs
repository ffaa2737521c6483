//! `bookstore-certs`: writes the development PKI (also reachable as `cargo xtask certs`), with
//! `--share` a copy of each service's own files, or with `--kubernetes` the two Secrets inside a
//! cluster instead of files.

use std::{path::PathBuf, process::ExitCode};

use bookstore_certs::{
    Generated, generate,
    kubernetes::{self, ApiServer, Outcome},
    share,
};
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
    /// Also copy each service's files (the CA certificate, its own certificate and key) into
    /// DIR/recommendations and DIR/marketplace, so each can be given only its own.
    #[arg(long, value_name = "DIR")]
    share: Option<PathBuf>,
    /// Inside a Kubernetes pod: make the Secrets recommendations-tls and marketplace-tls unless
    /// both exist, through the API with the pod's service account. Writes nothing to disk; the
    /// CA's key is not kept.
    #[arg(long, conflicts_with_all = ["force", "share"])]
    kubernetes: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = if args.kubernetes {
        in_cluster()
    } else {
        files(&args)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn files(args: &Args) -> anyhow::Result<()> {
    match generate(&args.out, args.force)? {
        Generated::Created => {
            eprintln!("created a development PKI in {}", args.out.display());
        }
        Generated::AlreadyPresent => eprintln!(
            "a PKI is already in {}; left as is (--force to recreate)",
            args.out.display()
        ),
    }
    if let Some(into) = &args.share {
        share(&args.out, into)?;
        eprintln!(
            "each service's files are in {}/{{recommendations,marketplace}}",
            into.display()
        );
    }
    Ok(())
}

fn in_cluster() -> anyhow::Result<()> {
    let api = ApiServer::in_cluster()?;
    match kubernetes::ensure_secrets(&api)? {
        Outcome::AlreadyPresent => eprintln!(
            "the Secrets are already in namespace {}; left as is",
            api.namespace
        ),
        Outcome::Written(names) => eprintln!(
            "wrote a new development PKI to {} in namespace {}",
            names.join(" and "),
            api.namespace
        ),
    }
    Ok(())
}
