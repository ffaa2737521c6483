//! docs/configuration.md against the binaries: every environment variable each binary's
//! `--help` names has its row in that service's table, and every row names a variable the binary
//! reads. The two cannot drift apart.

use std::{collections::BTreeSet, path::Path, process::Command};

/// The variables `--help` names (`[env: NAME=…]`).
fn from_help(binary: &str) -> BTreeSet<String> {
    let output = Command::new(bookstore_testkit::process::binary(binary))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(output.status.success(), "{binary} --help failed");
    let help = String::from_utf8_lossy(&output.stdout);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect()
}

/// The variables in the first column of the table under `**service**` in the document.
fn from_doc(doc: &str, service: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("**{service}**"))
        .unwrap_or_else(|| panic!("no table for {service}"));
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the header and its rule
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_owned))
        .collect()
}

#[test]
fn every_setting_is_documented_and_every_documented_setting_exists() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&path).expect("docs/configuration.md");
    for service in ["recommendations", "marketplace"] {
        let (help, documented) = (from_help(service), from_doc(&doc, service));
        assert!(!help.is_empty(), "{service}: no variable in --help");
        let undocumented: Vec<_> = help.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&help).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "{service}: in --help but not in docs/configuration.md: {undocumented:?}; \
             documented but not in --help: {unknown:?}"
        );
    }
}
