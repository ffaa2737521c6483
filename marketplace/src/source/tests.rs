use super::*;

#[test]
fn the_queue_is_too_slow_only_while_calls_recently_waited_the_whole_bound() {
    let bound = Duration::from_millis(250);
    let waits = RecentWait::new();
    let t0 = Instant::now();
    assert!(!waits.too_slow(bound, t0), "nobody has waited yet");
    waits.left(bound, t0);
    assert!(waits.too_slow(bound, t0 + Duration::from_millis(100)));
    // Nobody has left for the bound's length: an idle queue is not a slow one.
    assert!(!waits.too_slow(bound, t0 + Duration::from_millis(300)));
    waits.left(Duration::from_millis(20), t0 + Duration::from_millis(310));
    assert!(!waits.too_slow(bound, t0 + Duration::from_millis(320)));
}

#[test]
fn backoff_windows_grow_and_are_capped() {
    for _ in 0..200 {
        assert!(backoff(1) <= BACKOFF_BASE * 2);
        assert!(backoff(2) <= BACKOFF_BASE * 4);
        assert!(backoff(30) <= BACKOFF_MAX);
    }
    let spread: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(3)).collect();
    assert!(spread.len() > 10, "jittered, not fixed: {spread:?}");
}

#[tokio::test]
async fn a_call_given_up_by_its_page_still_runs_to_its_end() {
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let (finished, done) = tokio::sync::oneshot::channel();
    let call = RunToEnd::new(async move {
        let _ = wait.await;
        let _ = finished.send("ran to the end");
    });
    // The page gives up while the call waits on its backend.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), call)
            .await
            .is_err()
    );
    let _ = go.send(());
    let end = tokio::time::timeout(Duration::from_secs(5), done).await;
    assert_eq!(end.ok().and_then(Result::ok), Some("ran to the end"));

    // Waited for, it answers in the caller's own task.
    assert_eq!(RunToEnd::new(async { 7 }).await.ok(), Some(7));
}

#[tokio::test]
async fn a_call_that_panics_is_an_error_and_is_not_run_again() {
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = polls.clone();
    let call = RunToEnd::new(async move {
        counted.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        panic!("a bug in the call");
    });
    assert!(call.await.is_err());
    tokio::task::yield_now().await;
    assert_eq!(polls.load(Ordering::Relaxed), 1);
}
