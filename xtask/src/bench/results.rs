//! What a benchmark run records (every load run, and the whole run as written to JSON) and the
//! summary table's rows computed from it; apart so the run, the report and the checks share it.

use std::collections::BTreeMap;

use loadgen::report::Report;
use serde::Serialize;

use super::overload;

/// A load run and the peak RSS of the server under it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Measured {
    pub(super) case: String,
    pub(super) round: u32,
    pub(super) report: Report,
    pub(super) peak_rss_kib: Option<u64>,
    /// CPU the servers behind the case (the marketplace and recommendations for the page) spent
    /// per successful call, in µs: what the load generator's own cost cannot move.
    #[serde(default)]
    pub(super) server_cpu_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Results {
    pub(super) date: String,
    pub(super) machine: String,
    pub(super) args: String,
    pub(super) binaries_bytes: BTreeMap<String, u64>,
    pub(super) ready_ms: BTreeMap<String, f64>,
    pub(super) idle_rss_kib: BTreeMap<String, u64>,
    /// TLS handshakes recommendations completed during the page runs, and the pages served
    /// meanwhile: no handshake per request.
    pub(super) backend_handshakes: f64,
    pub(super) pages: u64,
    pub(super) runs: Vec<Measured>,
    pub(super) sweep: Vec<Measured>,
    pub(super) summary: Vec<Row>,
    pub(super) overload: overload::Overload,
}

/// One line of the table: a case next to its floor.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Row {
    pub(super) what: String,
    pub(super) throughput: f64,
    pub(super) floor_throughput: f64,
    /// The median over rounds of this round's throughput over the baseline's in the same round,
    /// and the lowest and highest of those ratios: how far the noise moved it.
    pub(super) ratio: f64,
    pub(super) ratio_low: f64,
    pub(super) ratio_high: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) floor_p99_ms: f64,
    pub(super) errors: u64,
    pub(super) target: String,
    /// The median over rounds of the baseline's server CPU per call over this case's: the same
    /// comparison by what the servers spent rather than by what the load generator measured.
    /// Where the two differ by more than 0.05 the run was disturbed (or the generator limited
    /// one side).
    pub(super) cpu_ratio: Option<f64>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn summarize(runs: &[Measured], case: &str, floor: &str, what: &str, target: &str) -> Option<Row> {
    let pick = |name: &str| -> Vec<&Measured> { runs.iter().filter(|m| m.case == name).collect() };
    let (ours, base) = (pick(case), pick(floor));
    if ours.is_empty() || base.is_empty() {
        return None;
    }
    let med = |ms: &[&Measured], f: fn(&Report) -> f64| {
        let mut v: Vec<f64> = ms.iter().map(|m| f(&m.report)).collect();
        median(&mut v)
    };
    // Each round's pair was measured within the same round, a few runs apart at most, so its
    // ratio is freer of the machine's drift than a ratio of medians taken minutes apart.
    let mut ratios: Vec<f64> = ours
        .iter()
        .filter_map(|m| {
            let b = base.iter().find(|b| b.round == m.round)?;
            Some(m.report.throughput / b.report.throughput.max(1e-9))
        })
        .collect();
    let ratio = median(&mut ratios);
    let mut cpu_ratios: Vec<f64> = ours
        .iter()
        .filter_map(|m| {
            let b = base.iter().find(|b| b.round == m.round)?;
            Some(b.server_cpu_us? / m.server_cpu_us?.max(1e-9))
        })
        .collect();
    let cpu_ratio = (!cpu_ratios.is_empty()).then(|| median(&mut cpu_ratios));
    Some(Row {
        what: what.into(),
        throughput: med(&ours, |r| r.throughput),
        floor_throughput: med(&base, |r| r.throughput),
        ratio,
        ratio_low: ratios.iter().copied().fold(ratio, f64::min),
        ratio_high: ratios.iter().copied().fold(ratio, f64::max),
        p50_ms: med(&ours, |r| r.latency_ms.p50),
        p99_ms: med(&ours, |r| r.latency_ms.p99),
        floor_p99_ms: med(&base, |r| r.latency_ms.p99),
        errors: ours.iter().map(|m| m.report.error_count()).sum(),
        target: target.into(),
        cpu_ratio,
    })
}

/// The table's rows: each case against its floor, with its target.
pub(super) fn summary(runs: &[Measured], big: u32) -> Vec<Row> {
    let big_catalog = format!("Recommend, {big} books vs 9");
    [
        (
            "recommend_mtls",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, as shipped (JSON log)",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_text_log",
            "floor_grpc_mtls",
            "Recommend, mutual TLS, text log",
            "≥ 0.9× floor",
        ),
        (
            "recommend_plain",
            "floor_grpc_plain",
            "Recommend, plaintext",
            "≥ 0.9× floor",
        ),
        (
            "recommend_mtls_every_call",
            "floor_grpc_mtls",
            "Recommend with a line per call (LOG_SAMPLE=1)",
            "(its cost)",
        ),
        (
            "page",
            "floor_chain",
            "Page end to end vs its chain floor",
            "≥ 0.9× chain floor",
        ),
        (
            "page",
            "floor_chain_real",
            "Page vs a chain floor over the same recommendations (the marketplace's own cost)",
            "(its cost)",
        ),
        (
            "page",
            "floor_page",
            "Page end to end (mTLS to the backend)",
            "p99 ≤ 5 ms at 32",
        ),
        (
            "page",
            "original_page",
            "Page end to end vs the original (Python)",
            "≥ 25×",
        ),
        (
            "recommend_mtls_big_catalog",
            "recommend_mtls",
            big_catalog.as_str(),
            "≥ 0.9×",
        ),
    ]
    .into_iter()
    .filter_map(|(case, floor, what, target)| summarize(runs, case, floor, what, target))
    .collect()
}
