use super::*;

#[test]
fn counters_histograms_and_build_info_render_in_prometheus_text() {
    let metrics = Metrics::new("demo", "1.2.3");
    metrics
        .counter("demo_total", &[("code", "OK")])
        .increment(2);
    metrics
        .histogram("demo_seconds", &[("route", "/")])
        .record(0.003);
    let text = metrics.render();
    assert!(text.contains("demo_total{code=\"OK\"} 2"), "{text}");
    assert!(
        text.contains("demo_seconds_bucket{route=\"/\",le=\"0.005\"} 1"),
        "a histogram, not a summary: {text}"
    );
    assert!(
        text.contains("demo_seconds_bucket{route=\"/\",le=\"0.0025\"} 0"),
        "{text}"
    );
    assert!(
        text.contains(
            "bookstore_build_info{service=\"demo\",version=\"1.2.3\",revision=\"unknown\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn two_registries_do_not_share_counts() {
    let (a, b) = (Metrics::new("a", "0"), Metrics::new("b", "0"));
    a.counter("x_total", &[]).increment(1);
    assert!(a.render().contains("x_total 1"));
    assert!(!b.render().contains("x_total"));
}

/// How many `# TYPE` lines name `family`.
fn type_lines(text: &str, family: &str) -> usize {
    let prefix = format!("# TYPE {family} ");
    text.lines().filter(|l| l.starts_with(&prefix)).count()
}

#[test]
fn a_scopes_series_carry_its_label_in_the_same_family_as_the_parents() {
    let metrics = Metrics::new("demo", "0");
    metrics
        .counter("bookstore_backend_calls_total", &[])
        .increment(1);
    let a = metrics.scope("addr", "10.0.0.1:50051");
    a.counter("bookstore_backend_calls_total", &[]).increment(2);
    a.histogram(
        "grpc_client_handling_seconds",
        &[("grpc_method", "Recommend")],
    )
    .record(0.003);
    let b = metrics.scope("addr", "10.0.0.2:50051");
    b.counter("bookstore_backend_calls_total", &[]).increment(3);
    let text = metrics.render();
    for family in [
        "bookstore_backend_calls_total",
        "grpc_client_handling_seconds",
        "process_open_fds",
    ] {
        assert_eq!(
            type_lines(&text, family),
            1,
            "{family} in one block:\n{text}"
        );
    }
    let block = text
        .split("\n\n")
        .find(|b| b.contains("# TYPE bookstore_backend_calls_total"))
        .expect("the family");
    for sample in [
        "bookstore_backend_calls_total 1",
        "bookstore_backend_calls_total{addr=\"10.0.0.1:50051\"} 2",
        "bookstore_backend_calls_total{addr=\"10.0.0.2:50051\"} 3",
    ] {
        assert!(block.lines().any(|l| l == sample), "{sample}:\n{block}");
    }
    assert!(
        text.contains(
            "grpc_client_handling_seconds_bucket{addr=\"10.0.0.1:50051\",grpc_method=\"Recommend\",le=\"0.005\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("# HELP grpc_client_handling_seconds "),
        "{text}"
    );
    assert!(!text.contains("bookstore_build_info{addr"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_retired_scope_is_rendered_for_a_while_then_dropped_unless_taken_back() {
    let keep = Duration::from_secs(300);
    let metrics = Metrics::new("demo", "0");
    let gone = metrics.scope("addr", "gone");
    gone.counter("x_total", &[]).increment(1);
    let back = metrics.scope("addr", "back");
    back.counter("x_total", &[]).increment(1);
    metrics.retire("addr", "gone", keep);
    metrics.retire("addr", "back", keep);

    tokio::time::advance(keep - Duration::from_secs(1)).await;
    let text = metrics.render();
    assert!(text.contains("x_total{addr=\"gone\"} 1"), "{text}");
    metrics
        .scope("addr", "back")
        .counter("x_total", &[])
        .increment(1);

    tokio::time::advance(Duration::from_secs(2)).await;
    let text = metrics.render();
    assert!(!text.contains("addr=\"gone\""), "dropped: {text}");
    assert!(
        text.contains("x_total{addr=\"back\"} 2"),
        "taken back, its count kept: {text}"
    );
    assert_eq!(metrics.scopes.lock().expect("lock").len(), 1);
}
