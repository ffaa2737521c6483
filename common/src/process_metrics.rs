//! The `process_*` series every Prometheus client library exports, read from `/proc/self` at
//! each scrape: resident memory, CPU time, open and allowed file descriptors, start time and
//! threads. Written by hand because the exporter we use has no process collector; the names,
//! units and types are the ones dashboards expect. Off Linux, nothing is written.

use std::fmt::Write;

/// Appends the process series to a scrape.
pub fn render(text: &mut String) {
    #[cfg(target_os = "linux")]
    if let Some(process) = linux::read() {
        let series = [
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                process.virtual_bytes,
            ),
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                process.cpu_seconds,
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                process.max_fds,
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch in seconds.",
                process.start_time_seconds,
            ),
            (
                "process_threads",
                "gauge",
                "Number of OS threads in the process.",
                process.threads,
            ),
        ];
        for (name, kind, help, value) in series {
            if let Some(value) = value {
                let _ = write!(
                    text,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = text;
}

#[cfg(target_os = "linux")]
mod linux {
    /// The kernel's clock ticks per second for the times in `/proc/<pid>/stat`: `USER_HZ`, fixed
    /// at 100 in the Linux user-space ABI on every architecture we build for.
    const USER_HZ: f64 = 100.0;

    #[derive(Debug, Default)]
    pub(super) struct Process {
        pub(super) resident_bytes: Option<f64>,
        pub(super) virtual_bytes: Option<f64>,
        pub(super) cpu_seconds: Option<f64>,
        pub(super) open_fds: Option<f64>,
        pub(super) max_fds: Option<f64>,
        pub(super) start_time_seconds: Option<f64>,
        pub(super) threads: Option<f64>,
    }

    pub(super) fn read() -> Option<Process> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        };
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces: the
        // first of them is field 3 of proc(5).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|t| t.trim().parse::<f64>().ok())
        });
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
            });
        Some(Process {
            resident_bytes: kib("VmRSS:").map(|k| k * 1024.0),
            virtual_bytes: kib("VmSize:").map(|k| k * 1024.0),
            cpu_seconds: field(14)
                .zip(field(15))
                .map(|(user, system)| (user + system) / USER_HZ),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as f64),
            max_fds,
            start_time_seconds: boot_time
                .zip(field(22))
                .map(|(boot, ticks)| boot + ticks / USER_HZ),
            threads: kib("Threads:"),
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_series_describe_this_process() {
        let mut text = String::new();
        super::render(&mut text);
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} vs {now}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
