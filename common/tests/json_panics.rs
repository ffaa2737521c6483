//! With `LOG_FORMAT=json` a panic is logged as one JSON object like every other line, not the
//! default hook's plain-text paragraph. The panic hook is process-wide, so the test runs the
//! logging half in a child process of its own (this same test binary, re-run) and reads the
//! child's standard error as a collector would.

use std::process::Command;

use bookstore_common::telemetry::{LogArgs, LogFormat, init};

const CHILD: &str = "BOOKSTORE_JSON_PANICS_CHILD";
const TEST: &str = "a_panic_is_one_json_line_among_the_others";

#[test]
fn a_panic_is_one_json_line_among_the_others() {
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let _guard = runtime.enter();
        let args = LogArgs {
            format: LogFormat::Json,
            ..LogArgs::default()
        };
        let _telemetry = init(&args, "json-panics");
        tracing::info!("before");
        let worker = std::thread::Builder::new()
            .name("worker".into())
            .spawn(|| panic!("boom {}", 42))
            .expect("spawn");
        assert!(worker.join().is_err(), "the thread panicked");
        tracing::info!("after");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        // --nocapture: the panic hook writes where it would in a service, to standard error.
        .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("re-run the test binary");
    assert!(out.status.success(), "child failed: {out:?}");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert_eq!(messages, ["before", "panicked", "after"], "{stderr}");
    let panic = &lines[1];
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["panic"], "boom 42");
    assert_eq!(panic["thread"], "worker");
    let location = panic["location"].as_str().unwrap_or_default();
    assert!(location.contains("json_panics.rs"), "{location}");
    let backtrace = panic["backtrace"].as_str().unwrap_or_default();
    assert!(backtrace.contains("json_panics"), "{backtrace}");
}
