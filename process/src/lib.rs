//! Child processes as the test kit and xtask drive them: started the one way they all are
//! ([`start`]), signals sent with `kill(2)` directly (no `kill` program spawned), a stop that
//! asks with SIGTERM and kills only past a grace period, and what `/proc` says of a process's
//! memory and open files. What is done with a child's log stays with the caller: the test kit
//! reads it, xtask prefixes it or files it.

use std::{
    io,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use rustix::process::{Pid, kill_process};
use tokio::process::{Child, Command};

/// Starts `command` as every tool here starts a service or a floor: no standard input, no
/// standard output (they write only to standard error), standard error to `stderr`, and
/// killed if its handle is dropped, so a failed test or run leaves no process behind.
pub fn start(command: &mut Command, stderr: impl Into<Stdio>) -> io::Result<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
}

pub use rustix::process::Signal;

/// Sends `signal` to process `pid`.
pub fn send(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    Ok(kill_process(pid, signal)?)
}

/// How a [`stop`] ended.
#[derive(Debug)]
pub enum Stopped {
    /// The process exited on its own, or at the SIGTERM, with this status.
    Exited(ExitStatus),
    /// It was still running after the grace period and was killed.
    Killed,
    /// Waiting for it failed.
    Lost(io::Error),
}

/// Asks `child` to stop with SIGTERM (if it still runs), waits up to `grace` for it to exit,
/// and kills it past that.
pub async fn stop(child: &mut Child, grace: Duration) -> Stopped {
    if let Ok(None) = child.try_wait()
        && let Some(pid) = child.id()
    {
        // It may exit between the check and the signal: then the wait below says how.
        let _ = send(pid, Signal::TERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => Stopped::Exited(status),
        Ok(Err(e)) => Stopped::Lost(e),
        Err(_) => {
            let _ = child.kill().await;
            Stopped::Killed
        }
    }
}

/// Resident memory of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How many files (sockets included) process `pid` has open, from `/proc/<pid>/fd`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> Child {
        start(Command::new("sleep").arg("30"), Stdio::null()).expect("spawn sleep")
    }

    #[tokio::test]
    async fn a_stop_ends_a_process_with_sigterm() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = sleeper();
        let pid = child.id().expect("running");
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(open_fds(pid).is_some_and(|n| n >= 1));
        match stop(&mut child, Duration::from_secs(10)).await {
            Stopped::Exited(status) => assert_eq!(status.signal(), Some(Signal::TERM.as_raw())),
            other => panic!("{other:?}"),
        }
        assert_eq!(rss_kib(pid), None, "gone");
    }

    #[tokio::test]
    async fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        use tokio::io::AsyncBufReadExt;
        // An ignored signal stays ignored across exec.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 30"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh");
        // Until the trap is in place SIGTERM would end it: wait for the word.
        let stdout = child.stdout.take().expect("piped");
        let line = tokio::io::BufReader::new(stdout).lines().next_line().await;
        assert_eq!(line.expect("read").as_deref(), Some("ready"));
        let stopped = stop(&mut child, Duration::from_millis(300)).await;
        assert!(matches!(stopped, Stopped::Killed), "{stopped:?}");
    }
}
