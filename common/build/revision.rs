// Included by the services' build scripts: the commit a binary is built from, for
// `bookstore_build_info{revision}`. BOOKSTORE_REVISION wins (image builds, whose context leaves
// .git out, pass it as a build argument); otherwise it is read from the checkout's .git without
// needing a git binary; otherwise "unknown". Rebuilt when HEAD or the branch it names moves.

use std::{
    fs,
    path::{Path, PathBuf},
};

fn emit_revision() {
    println!("cargo:rerun-if-env-changed=BOOKSTORE_REVISION");
    let revision = match std::env::var("BOOKSTORE_REVISION") {
        Ok(given) if !given.trim().is_empty() => given.trim().to_owned(),
        _ => std::env::var("CARGO_MANIFEST_DIR")
            .ok()
            .and_then(|dir| from_git(&Path::new(&dir).join("..").join(".git")))
            .unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=BOOKSTORE_REVISION={revision}");
}

fn from_git(git: &Path) -> Option<String> {
    let watch = |path: &PathBuf| println!("cargo:rerun-if-changed={}", path.display());
    let head_path = git.join("HEAD");
    let head = fs::read_to_string(&head_path).ok()?;
    watch(&head_path);
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return is_commit(head).then(|| head.to_owned());
    };
    let loose = git.join(reference);
    let packed = git.join("packed-refs");
    if packed.exists() {
        watch(&packed);
    }
    if let Ok(commit) = fs::read_to_string(&loose) {
        watch(&loose);
        let commit = commit.trim();
        return is_commit(commit).then(|| commit.to_owned());
    }
    // A branch not yet written loose since the last `git gc`: in packed-refs. Watch where it
    // will appear when it moves.
    if let Some(parent) = loose.parent().filter(|p| p.exists()) {
        watch(&parent.to_path_buf());
    }
    fs::read_to_string(&packed).ok()?.lines().find_map(|line| {
        let (commit, name) = line.split_once(' ')?;
        (name == reference && is_commit(commit)).then(|| commit.to_owned())
    })
}

fn is_commit(text: &str) -> bool {
    text.len() >= 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}
