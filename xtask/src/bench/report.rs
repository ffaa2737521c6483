//! The results as Markdown and as a picture (the overload section and its curve are rendered
//! in `overload`, beside the run they describe).

use std::fmt::Write as _;

use super::{
    measure::SWEEP,
    overload,
    results::{Measured, Results},
};

pub(super) fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Measured {} on {} ({}).\n", r.date, r.machine, r.args);
    let _ = writeln!(
        md,
        "| Case | Throughput (ok/s) | Baseline (ok/s) | Ratio (lowest–highest round) | By server CPU per call | p50 ms | p99 ms | Baseline p99 ms | Errors | Target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &r.summary {
        let cpu = row.cpu_ratio.map_or("–".to_owned(), |c| {
            // The two ways of comparing disagree: the run was disturbed, or the generator
            // limited one side.
            let flag = if (c - row.ratio).abs() > 0.05 {
                " (!)"
            } else {
                ""
            };
            format!("{c:.2}×{flag}")
        });
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2}× ({:.2}–{:.2}) | {cpu} | {:.3} | {:.3} | {:.3} | {} | {} |",
            row.what,
            row.throughput,
            row.floor_throughput,
            row.ratio,
            row.ratio_low,
            row.ratio_high,
            row.p50_ms,
            row.p99_ms,
            row.floor_p99_ms,
            row.errors,
            row.target
        );
    }
    let _ = writeln!(
        md,
        "\nLatency against concurrency (closed loop; p99 ms, throughput ok/s):\n"
    );
    let _ = writeln!(
        md,
        "| Concurrency | Page p99 | Page ok/s | Floor page p99 | Floor page ok/s | Recommend mTLS p99 | Recommend ok/s |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for c in SWEEP {
        let get = |case: &str| {
            r.sweep
                .iter()
                .find(|m| m.case == case && m.report.concurrency == c)
        };
        let cell = |m: Option<&Measured>| {
            m.map_or("–|–".to_owned(), |m| {
                format!("{:.3}|{:.0}", m.report.latency_ms.p99, m.report.throughput)
            })
        };
        let _ = writeln!(
            md,
            "| {c} | {} | {} | {} |",
            cell(get("page")),
            cell(get("floor_page")),
            cell(get("recommend_mtls"))
        );
    }
    let _ = writeln!(md, "\n| Process | Ready after exec (ms) | Idle RSS (MiB) |");
    let _ = writeln!(md, "|---|---:|---:|");
    let names: std::collections::BTreeSet<&String> =
        r.ready_ms.keys().chain(r.idle_rss_kib.keys()).collect();
    for name in names {
        let ready = r
            .ready_ms
            .get(name)
            .map_or("–".into(), |ms| format!("{ms:.1}"));
        let rss = r
            .idle_rss_kib
            .get(name)
            .map_or("–".into(), |k| format!("{:.1}", *k as f64 / 1024.0));
        let _ = writeln!(md, "| {name} | {ready} | {rss} |");
    }
    let peak = |case: &str| {
        r.runs
            .iter()
            .filter(|m| m.case == case)
            .filter_map(|m| m.peak_rss_kib)
            .max()
    };
    let _ = writeln!(
        md,
        "\nPeak RSS under load: recommendations {:.1} MiB, marketplace {:.1} MiB.",
        peak("recommend_mtls").unwrap_or(0) as f64 / 1024.0,
        peak("page").unwrap_or(0) as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "TLS handshakes completed by recommendations during the page runs: {:.0}, for {} pages.",
        r.backend_handshakes, r.pages
    );
    let sizes: Vec<String> = r
        .binaries_bytes
        .iter()
        .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / 1_048_576.0))
        .collect();
    let _ = writeln!(md, "Release binaries (stripped): {}.", sizes.join(", "));
    overload::markdown(&mut md, &r.overload);
    md
}

/// Throughput of each case next to its baseline, as horizontal bars; below, p99 latency against
/// concurrency for the page, its floor and Recommend, as lines.
pub(super) fn svg(r: &Results) -> String {
    let rows = &r.summary;
    let (width, bar_h, gap, left) = (760.0, 16.0, 14.0, 300.0);
    let bars_end = 40.0 + rows.len() as f64 * (2.0 * bar_h + gap);
    let (plot_top, plot_h) = (bars_end + 50.0, 200.0);
    let height = plot_top + plot_h + 50.0;
    let max = rows
        .iter()
        .flat_map(|row| [row.throughput, row.floor_throughput])
        .fold(1.0_f64, f64::max);
    let scale = (width - left - 120.0) / max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">Throughput (ok/s): ours (dark) against the baseline (light), {}</text>\n",
        r.date
    );
    for (i, row) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (2.0 * bar_h + gap);
        let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\">{}</text>",
            y + bar_h + 4.0,
            escape(&row.what)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#7a3b1d\"/>",
            row.throughput * scale
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{:.0} ({:.2}×)</text>",
            left + row.throughput * scale + 6.0,
            y + 12.0,
            row.throughput,
            row.ratio
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#d9b8a6\"/>",
            y + bar_h,
            row.floor_throughput * scale
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{:.0}</text>",
            left + row.floor_throughput * scale + 6.0,
            y + bar_h + 12.0,
            row.floor_throughput
        );
    }
    latency_lines(&mut s, r, plot_top, plot_h);
    s.push_str("</svg>\n");
    s
}

/// The concurrency sweep's p99 latencies as one line per case, concurrency evenly spaced.
fn latency_lines(s: &mut String, r: &Results, top: f64, h: f64) {
    let (left, w) = (70.0, 520.0);
    let series = [
        ("page", "Page", "#7a3b1d"),
        ("floor_page", "Floor page", "#d9b8a6"),
        ("recommend_mtls", "Recommend, mTLS", "#2f5d8a"),
    ];
    let p99 = |case: &str, c: usize| {
        r.sweep
            .iter()
            .find(|m| m.case == case && m.report.concurrency == c)
            .map(|m| m.report.latency_ms.p99)
    };
    let max = series
        .iter()
        .flat_map(|(case, _, _)| SWEEP.iter().filter_map(|c| p99(case, *c)))
        .fold(1.0_f64, f64::max);
    let x = |i: usize| left + i as f64 * w / (SWEEP.len() - 1) as f64;
    let y = |ms: f64| top + h - ms / max * h;
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"{}\" font-size=\"14\">p99 latency (ms) against concurrency</text>",
        top - 20.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#888\"/>",
        top + h,
        left + w,
        top + h,
        top + h
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.1}</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
        left - 6.0,
        top + 4.0,
        left - 6.0,
        top + h + 4.0
    );
    for (i, c) in SWEEP.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{c}</text>",
            x(i),
            top + h + 18.0
        );
    }
    for (n, (case, label, colour)) in series.iter().enumerate() {
        let points: Vec<String> = SWEEP
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some(format!("{:.1},{:.1}", x(i), y(p99(case, *c)?))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            points.join(" ")
        );
        let ly = top + 10.0 + n as f64 * 18.0;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{colour}\"/>\n<text x=\"{}\" y=\"{}\">{label}</text>",
            left + w + 20.0,
            ly - 4.0,
            left + w + 40.0,
            ly
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">concurrent callers</text>",
        left + w / 2.0,
        top + h + 36.0
    );
}
