//! Waiting for something to happen: for a test to go on when it has, not after a guess at how
//! long it takes. A probe looks once; [`eventually`] looks again until it says done, and fails
//! the test, naming what it waited for and what the probe last saw, once its time is up.

use std::{
    fmt::Display,
    time::{Duration, Instant},
};

/// How often [`eventually`] looks.
pub const EVERY: Duration = Duration::from_millis(100);

/// What one look of a probe found: done (`true`, `Some(value)`, `Ok(value)`) or not yet
/// (`false`, `None`, or `Err` with what it saw instead, for the failure message).
pub trait Outcome {
    /// What the wait returns once done.
    type Value;

    /// The value if done; if not, what the probe saw, when it says.
    fn done(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();

    fn done(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;

    fn done(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;

    fn done(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Polls `probe` every 100 ms until it is done, and returns what it found (nothing for a `bool`
/// probe, the value of a `Some` or an `Ok`). Fails the test, naming `what` and the last `Err`,
/// once `within` has passed.
pub async fn eventually<O: Outcome>(
    what: &str,
    within: Duration,
    probe: impl AsyncFnMut() -> O,
) -> O::Value {
    eventually_every(what, within, EVERY, probe).await
}

/// [`eventually`], looking every `every`: for a wait that measures how soon something happens,
/// or whose probe is itself part of the test's traffic.
pub async fn eventually_every<O: Outcome>(
    what: &str,
    within: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await.done() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            match seen {
                Some(seen) => panic!("{what}: not within {within:?}; {seen}"),
                None => panic!("{what}: not within {within:?}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_wait_returns_what_the_probe_found_once_it_is_done() {
        let mut looks = 0;
        let found = eventually_every("the third look", Duration::from_secs(5), SOON, async || {
            looks += 1;
            if looks == 3 {
                Ok(looks)
            } else {
                Err("not yet")
            }
        })
        .await;
        assert_eq!(found, 3);
        let found = eventually("a value", Duration::from_secs(5), async || Some("value")).await;
        assert_eq!(found, "value");
        eventually("true", Duration::from_secs(5), async || true).await;
    }

    #[tokio::test]
    #[should_panic(expected = "a value: not within 50ms; look ")]
    async fn a_wait_that_runs_out_names_what_it_waited_for_and_what_was_seen() {
        let mut looks = 0;
        let within = Duration::from_millis(50);
        eventually_every("a value", within, Duration::from_millis(10), async || {
            looks += 1;
            Err::<(), _>(format!("look {looks}"))
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "true: not within 10ms")]
    async fn a_probe_that_says_nothing_fails_with_what_it_waited_for() {
        eventually("true", Duration::from_millis(10), async || false).await;
    }
}
