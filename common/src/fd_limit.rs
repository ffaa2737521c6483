//! The open-file limit. A process starts with the soft limit its parent gave it, often 1024,
//! while the hard limit above it is usually far higher; every connection a service holds is a
//! file descriptor, so at the soft limit the listener's accept fails (EMFILE) long before its
//! own connection cap is reached. At start-up each process raises its soft limit to the hard
//! one, as it may without privileges, and a service says when even that is less than its
//! settings let it open.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors a service holds besides the connections its caps count: its listeners, the
/// runtime's epoll and wake-up handles, its connections to a backend, files being read, the
/// standard streams.
pub const RESERVE: u64 = 64;

/// The soft open-file limit before and after [`raise`]. None stands for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: Option<u64>,
    pub now: Option<u64>,
}

/// Raises the soft open-file limit to the hard one. On failure the limit is left as it was and
/// reported as is in both fields.
pub fn raise() -> OpenFiles {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let now = if before != limit.maximum && setrlimit(Resource::Nofile, raised).is_ok() {
        getrlimit(Resource::Nofile).current
    } else {
        before
    };
    OpenFiles { before, now }
}

/// [`raise`], then a line saying the limit, at warn level if it is below `connections` (what
/// the service's caps allow open at once, every listener together) plus [`RESERVE`]: past it,
/// connections are refused as accept errors before the caps are reached.
pub fn raise_for(connections: u64) -> OpenFiles {
    let files = raise();
    let needed = connections.saturating_add(RESERVE);
    let shown = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match files.now {
        Some(now) if now < needed => tracing::warn!(
            open_files = now,
            raised_from = %shown(files.before),
            needed,
            "the open-file limit (ulimit -n) is below what the connection caps allow: \
             connections past it are refused as accept errors; raise the hard limit or lower \
             MAX_CONNECTIONS"
        ),
        _ => tracing::info!(
            open_files = %shown(files.now),
            raised_from = %shown(files.before),
            "open-file limit"
        ),
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        // Starts this test process low, as a parent with `ulimit -S -n 256` would leave it.
        let hard = getrlimit(Resource::Nofile).maximum;
        let low = Rlimit {
            current: Some(256),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, low).expect("lowering the soft limit is always allowed");
        let files = raise();
        assert_eq!(files.before, Some(256));
        assert_eq!(files.now, hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        // Raising again changes nothing.
        assert_eq!(
            raise(),
            OpenFiles {
                before: hard,
                now: hard
            }
        );
    }
}
