//! The repository root, which every task's paths start from. A module of its own so that `bench`
//! and `chaos` take it from here rather than from the crate's entry point.

use std::path::{Path, PathBuf};

/// The repository root: xtask lives one level below it.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
