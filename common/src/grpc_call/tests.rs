use super::*;

#[test]
fn grpc_timeouts_parse_as_the_spec_writes_them() {
    let parse = |s: &'static str| parse_grpc_timeout(Some(&HeaderValue::from_static(s)));
    assert_eq!(parse("1000m"), Some(Duration::from_secs(1)));
    assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
    assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
    assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
    assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
    for bad in ["", "m", "100", "123456789m", "-1m", "1.5S", "10x", "+1S"] {
        assert_eq!(parse(bad), None, "{bad:?}");
    }
    assert_eq!(parse_grpc_timeout(None), None);
}

#[test]
fn a_timeout_written_as_grpc_timeout_reads_back_no_longer() {
    for timeout in [
        Duration::from_micros(1),
        Duration::from_millis(1500),
        Duration::from_secs(99),
        Duration::from_secs(101),
        Duration::from_secs(3 * 24 * 3600),
    ] {
        let written = grpc_timeout_value(timeout);
        let read = parse_grpc_timeout(Some(&written)).expect("a valid value");
        assert!(read <= timeout, "{timeout:?} became {written:?}");
        assert!(
            timeout - read < Duration::from_secs(60),
            "{timeout:?}: {written:?}"
        );
    }
    assert_eq!(grpc_timeout_value(Duration::from_millis(250)), "250000u");
}

#[test]
fn codes_carry_the_go_names_dashboards_use() {
    assert_eq!(code_name(Code::Ok), "OK");
    assert_eq!(code_name(Code::Cancelled), "Canceled");
    assert_eq!(code_name(Code::DeadlineExceeded), "DeadlineExceeded");
    assert_eq!(code_name(Code::Unavailable), "Unavailable");
}

#[test]
fn unknown_paths_do_not_become_label_values() {
    const METHODS: &[KnownMethod] = &[KnownMethod {
        path: "/Recommendations/Recommend",
        kind: "unary",
    }];
    let series = CallSeries::new(
        &CLIENT,
        Metrics::new("t", "0"),
        METHODS,
        Sampling::default(),
    );
    assert_eq!(
        series.labels(series.slot("/Recommendations/Recommend")),
        ("unary", "Recommendations", "Recommend")
    );
    assert_eq!(
        series.labels(series.slot("/Evil/\u{1b}[31m")),
        ("unknown", "unknown", "unknown")
    );
}
