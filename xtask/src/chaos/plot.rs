//! The SVG of every run's timeline, a panel each with the fault shaded; apart from the table,
//! which `run` and the entry point write.

use std::fmt::Write as _;

use loadgen::report::Interval;

use super::{
    run::{INTERVAL, Run},
    scenario::Phases,
};

/// Every run as a panel: pages answered 200 a second (blue), failed pages a second (red), and
/// the p99 in ms (orange, on its own scale), the fault shaded.
pub(super) fn plot(runs: &[Run], phases: Phases) -> String {
    let (width, panel, gap) = (760.0, 150.0, 40.0);
    let height = (panel + gap) * runs.len() as f64 + 20.0;
    let total = (phases.before + phases.fault + phases.after).as_secs_f64();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    for (n, run) in runs.iter().enumerate() {
        let top = 20.0 + n as f64 * (panel + gap);
        let (left, right) = (50.0, width - 60.0);
        let x = |s: f64| left + (right - left) * (s / total).clamp(0.0, 1.0);
        let max_rate = run
            .timeline
            .iter()
            .map(|i| (i.ok + i.failed) as f64 / INTERVAL.as_secs_f64())
            .fold(1.0, f64::max)
            * 1.25;
        let max_p99 = run.timeline.iter().map(|i| i.p99_ms).fold(1.0, f64::max);
        let y = |v: f64, max: f64| top + panel - panel * (v / max).clamp(0.0, 1.0);
        let _ = write!(
            svg,
            r##"<text x="{left}" y="{}" font-weight="bold">Replica B {}</text><rect x="{}" y="{top}" width="{}" height="{panel}" fill="#eee"/><line x1="{left}" y1="{}" x2="{right}" y2="{}" stroke="#999"/>"##,
            top - 6.0,
            run.scenario.what(),
            x(run.fault_at.as_secs_f64()),
            x(run.fault_end.as_secs_f64()) - x(run.fault_at.as_secs_f64()),
            top + panel,
            top + panel,
        );
        let line = |value: &dyn Fn(&Interval) -> f64, max: f64, colour: &str| {
            let points: Vec<String> = run
                .timeline
                .iter()
                .map(|i| {
                    format!(
                        "{:.1},{:.1}",
                        x(i.at_s + INTERVAL.as_secs_f64() / 2.0),
                        y(value(i), max)
                    )
                })
                .collect();
            format!(
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            )
        };
        svg.push_str(&line(
            &|i| i.ok as f64 / INTERVAL.as_secs_f64(),
            max_rate,
            "#1f77b4",
        ));
        svg.push_str(&line(
            &|i| i.failed as f64 / INTERVAL.as_secs_f64(),
            max_rate,
            "#d62728",
        ));
        svg.push_str(&line(&|i| i.p99_ms, max_p99, "#ff7f0e"));
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#1f77b4">{max_rate:.0}/s</text><text x="{}" y="{}" fill="#ff7f0e">p99 {max_p99:.0} ms</text><text x="{right}" y="{}" text-anchor="end">{total:.0} s</text>"##,
            left - 4.0,
            top + 10.0,
            right + 4.0,
            top + 10.0,
            top + panel + 14.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}
