//! Building the release binaries that `bench` and `chaos` run. A module of its own because both
//! tasks need it and neither owns it.

use anyhow::{Result, bail};
use tokio::process::Command;

use crate::workspace::root;

/// Builds the release binaries the benchmark runs; their folder.
pub(crate) async fn build_release() -> Result<std::path::PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "recommendations",
            "-p",
            "marketplace",
            "-p",
            "loadgen",
        ])
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(root().join("target").join("release"))
}
