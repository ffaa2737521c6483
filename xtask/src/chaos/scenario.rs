//! What each scenario does to replica B, the order they run in, and how long a run's phases
//! last; apart so that the run, the load and the plot can all name them.

use std::time::Duration;

/// How long each phase lasts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Phases {
    pub(super) before: Duration,
    pub(super) fault: Duration,
    pub(super) after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scenario {
    Kill,
    Freeze,
    Slow,
    Blackhole,
    Restart,
}

pub(super) const SCENARIOS: [Scenario; 5] = [
    Scenario::Kill,
    Scenario::Freeze,
    Scenario::Slow,
    Scenario::Blackhole,
    Scenario::Restart,
];

impl Scenario {
    pub(super) fn what(self) -> &'static str {
        match self {
            Scenario::Kill => "killed (SIGKILL)",
            Scenario::Freeze => "frozen (SIGSTOP), then thawed",
            Scenario::Slow => "200 ms slower each way",
            Scenario::Blackhole => "blackholed (packets dropped), then restored",
            Scenario::Restart => "restarted (SIGTERM, started again)",
        }
    }
}
