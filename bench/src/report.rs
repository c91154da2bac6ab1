//! Medians over repeated runs and the Markdown tables.

use std::{collections::BTreeMap, fmt::Write as _};

use atp_conformance::server::Framework;

use crate::{load::LoadResult, servers::Mode, targets::Target};

/// The median of some numbers (the mean of the middle two for an even
/// count); `None` for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// One target's medians over its runs.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Server CPU time per request, µs.
    pub cpu_us: Option<f64>,
    /// Of which in user space, µs.
    pub user_us: Option<f64>,
    /// Of which in the kernel, µs.
    pub sys_us: Option<f64>,
    /// Server peak RSS under load, bytes.
    pub rss: Option<f64>,
    /// Failed requests over all runs (errors and non-2xx).
    pub failures: u64,
    /// What the rest of the machine used, % of one CPU (median of the
    /// runs used).
    pub interference: Option<f64>,
    /// Runs the medians are of.
    pub used: usize,
    /// Runs made.
    pub total: usize,
}

/// Runs during which the rest of the machine used more than this (% of
/// one CPU) are left out of the medians when quieter runs exist.
pub const MAX_INTERFERENCE: f64 = 10.0;

impl Summary {
    /// The medians of the quiet runs of `runs` (all of them when none was
    /// quiet).
    pub fn of(all: &[LoadResult]) -> Option<Summary> {
        let quiet: Vec<&LoadResult> = all
            .iter()
            .filter(|r| {
                r.interference_percent()
                    .is_none_or(|p| p <= MAX_INTERFERENCE)
            })
            .collect();
        let runs: Vec<&LoadResult> = if quiet.is_empty() {
            all.iter().collect()
        } else {
            quiet
        };
        Some(Summary {
            rps: median(runs.iter().map(|r| r.rps()))?,
            p50_ms: median(runs.iter().map(|r| r.percentile_ms(50.0)))?,
            p99_ms: median(runs.iter().map(|r| r.percentile_ms(99.0)))?,
            cpu_us: median(runs.iter().filter_map(|r| r.cpu_us_per_request())),
            user_us: median(
                runs.iter()
                    .filter_map(|r| r.cpu_split_us_per_request().map(|s| s.0)),
            ),
            sys_us: median(
                runs.iter()
                    .filter_map(|r| r.cpu_split_us_per_request().map(|s| s.1)),
            ),
            rss: median(
                runs.iter()
                    .filter_map(|r| r.server_peak_rss.map(|b| b as f64)),
            ),
            failures: all.iter().map(|r| r.errors + r.bad_status).sum(),
            interference: median(runs.iter().filter_map(|r| r.interference_percent())),
            used: runs.len(),
            total: all.len(),
        })
    }
}

/// Mebibytes, with one decimal.
pub fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1024.0 * 1024.0))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// The tables of the `http` benchmark.
pub fn http_tables(order: &[Target], results: &BTreeMap<String, Vec<LoadResult>>) -> String {
    let mut out = String::new();
    let summaries: Vec<(Target, Summary)> = order
        .iter()
        .filter_map(|t| Some((*t, Summary::of(results.get(&t.to_string())?)?)))
        .collect();
    let find = |t: Target| summaries.iter().find(|(x, _)| *x == t).map(|(_, s)| *s);

    let _ = writeln!(
        out,
        "| server | req/s | p50 ms | p99 ms | server CPU µs/req | user | kernel | peak RSS MiB | failed | others' CPU % | runs used |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (t, s) in &summaries {
        let _ = writeln!(
            out,
            "| {t} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {}/{} |",
            s.rps,
            s.p50_ms,
            s.p99_ms,
            opt(s.cpu_us, 2),
            opt(s.user_us, 2),
            opt(s.sys_us, 2),
            s.rss.map_or_else(|| "–".into(), mib),
            s.failures,
            opt(s.interference, 0),
            s.used,
            s.total
        );
    }

    let frameworks: Vec<Framework> = Framework::ALL
        .into_iter()
        .filter(|fw| {
            find(Target::Rust(*fw, Mode::Atp)).is_some()
                && find(Target::Rust(*fw, Mode::Bare)).is_some()
        })
        .collect();
    if !frameworks.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| framework | req/s adapter / bare (≥ 0.95) | p99 adapter / bare (≤ 1.10) | CPU µs/req adapter − bare | CPU adapter / bare |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for fw in frameworks {
            let (Some(a), Some(b)) = (
                find(Target::Rust(fw, Mode::Atp)),
                find(Target::Rust(fw, Mode::Bare)),
            ) else {
                continue;
            };
            let rps = a.rps / b.rps;
            let p99 = a.p99_ms / b.p99_ms;
            let cpu_diff = a.cpu_us.zip(b.cpu_us).map(|(a, b)| a - b);
            let cpu_ratio = a.cpu_us.zip(b.cpu_us).map(|(a, b)| a / b);
            let _ = writeln!(
                out,
                "| {fw} | {rps:.3} ({}) | {p99:.3} ({}) | {} | {} |",
                verdict(rps >= 0.95),
                verdict(p99 <= 1.10),
                opt(cpu_diff, 2),
                opt(cpu_ratio, 3),
            );
        }
    }

    let best_python = [Target::FastApi, Target::Django]
        .into_iter()
        .filter_map(|t| Some((t, find(t)?)))
        .max_by(|a, b| a.1.rps.total_cmp(&b.1.rps));
    if let Some((py, p)) = best_python {
        let _ = writeln!(out);
        let _ = writeln!(out, "Best Python reference: {py}, {:.0} req/s.", p.rps);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| Rust adapter | req/s Rust / Python (≥ 15) | CPU µs/req Python / Rust | user-space CPU µs/req Python / Rust |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for fw in Framework::ALL {
            let Some(r) = find(Target::Rust(fw, Mode::Atp)) else {
                continue;
            };
            let ratio = r.rps / p.rps;
            let cpu = p.cpu_us.zip(r.cpu_us).map(|(p, r)| p / r);
            let user = p.user_us.zip(r.user_us).map(|(p, r)| p / r);
            let _ = writeln!(
                out,
                "| atp-{fw} | {ratio:.1} ({}) | {} | {} |",
                verdict(ratio >= 15.0),
                opt(cpu, 1),
                opt(user, 1)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
    }
}
