use super::*;

/// Feeds `watch` one window of `let_in` and `refused` requests spread evenly from `from`,
/// and says whether the last refusal had to wait.
fn window(watch: &StormWatch, from: Instant, let_in: u64, refused: u64) -> Option<Duration> {
    let all = let_in + refused;
    let step = StormWatch::WINDOW / u32::try_from(all.max(1)).unwrap_or(u32::MAX);
    let mut wait = None;
    for i in 0..all {
        let at = from + step * u32::try_from(i).unwrap_or(u32::MAX);
        if i < let_in {
            watch.let_in(at);
        } else {
            wait = watch.refused(at);
        }
    }
    wait
}

fn windows(
    watch: &StormWatch,
    epoch: Instant,
    first: u32,
    counts: &[(u64, u64)],
) -> Vec<Option<Duration>> {
    (first..)
        .zip(counts)
        .map(|(n, (let_in, refused))| {
            window(watch, epoch + StormWatch::WINDOW * n, *let_in, *refused)
        })
        .collect()
}

const PROBE: Option<Duration> = Some(PROBE_DELAY);

#[test]
fn clients_that_slow_down_with_the_probe_get_the_room() {
    let epoch = Instant::now();
    let watch = StormWatch::new(epoch);
    // 2,000 pages and 9,000 refusals a window (45,000 a second, 4.5 for each page, as 256
    // connections were measured): two such windows start a probe; the refusals slowed,
    // they fall to 400 in its window, and the room opens.
    let seen = windows(
        &watch,
        epoch,
        0,
        &[(2_000, 9_000), (2_000, 9_000), (2_000, 400), (3_600, 0)],
    );
    assert_eq!(seen, [None, None, PROBE, None]);
    let open = epoch + StormWatch::WINDOW * 4;
    assert!(watch.room_open(open));
    // While the room serves, it stays open past its hold.
    watch.served_from_room(open);
    let later = open + StormWatch::HOLD - Duration::from_millis(1);
    assert!(watch.room_open(later));
    // A request that waits it out closes it, and no probe starts for the cooldown.
    watch.waited_out(later);
    assert!(!watch.room_open(later));
    let seen = windows(&watch, epoch, 30, &[(2_000, 9_000); 10]);
    assert_eq!(seen, [None; 10]);
}

#[test]
fn arrivals_that_do_not_slow_down_with_the_probe_get_no_room() {
    let epoch = Instant::now();
    let watch = StormWatch::new(epoch);
    // A dip of the CPU in an open loop: stormy for two windows; during the probe the
    // refusals come as often as before, so no room, and no probe for the cooldown.
    let seen = windows(
        &watch,
        epoch,
        0,
        &[
            (1_000, 4_500),
            (1_000, 4_500),
            (1_000, 4_400),
            (1_000, 4_500),
        ],
    );
    assert_eq!(seen, [None, None, PROBE, None]);
    assert!(!watch.room_open(epoch + StormWatch::WINDOW * 4));
    let seen = windows(&watch, epoch, 4, &[(1_000, 4_500); 20]);
    assert_eq!(seen, [None; 20]);
}

#[test]
fn a_violent_storm_is_probed_at_once_and_otherwise_its_refusals_wait() {
    let epoch = Instant::now();
    let watch = StormWatch::new(epoch);
    // 200 pages and 12,000 refusals a window (60,000 a second): a probe at once; during
    // the cooldown after one that found an open loop, each refusal waits.
    let seen = windows(
        &watch,
        epoch,
        0,
        &[(200, 12_000), (200, 12_000), (200, 12_000), (200, 12_000)],
    );
    assert_eq!(seen, [None, PROBE, Some(STORM_DELAY), Some(STORM_DELAY)]);
}

#[test]
fn an_open_loop_past_the_peak_is_refused_at_once() {
    let epoch = Instant::now();
    let watch = StormWatch::new(epoch);
    // Twice the peak: as many refused as let in, thousands a second; then a moment when the
    // CPU served a third of that (as measured once at twice the peak).
    let counts = [(3_000, 3_000), (3_000, 3_000), (999, 4_483), (3_000, 3_000)];
    let seen = windows(&watch, epoch, 0, &counts);
    assert_eq!(seen, [None; 4]);
}

#[test]
fn a_few_refusals_are_no_storm_even_alone() {
    let epoch = Instant::now();
    let watch = StormWatch::new(epoch);
    // Everything refused, but 900 a second.
    let seen = windows(&watch, epoch, 0, &[(0, 180); 5]);
    assert_eq!(seen, [None; 5]);
}
