//! `atp-bench micro`: the tables of the criterion benchmarks of
//! `atp-registry` (`cargo bench -p atp-registry-benches`), read from criterion's
//! `estimates.json` files, with the derived numbers the targets are about.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// One benchmark's median and the 95 % confidence interval of the median,
/// in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    median: f64,
    low: f64,
    high: f64,
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Every `…/new/benchmark.json` under `dir`, by full id
/// (`group/function[/parameter]`).
fn collect(dir: &Path, out: &mut BTreeMap<String, Estimate>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let (Some(bench), Some(est)) = (
                read_json(&path.join("benchmark.json")),
                read_json(&path.join("estimates.json")),
            ) else {
                continue;
            };
            let Some(id) = bench["full_id"].as_str() else {
                continue;
            };
            let m = &est["median"];
            if let (Some(median), Some(low), Some(high)) = (
                m["point_estimate"].as_f64(),
                m["confidence_interval"]["lower_bound"].as_f64(),
                m["confidence_interval"]["upper_bound"].as_f64(),
            ) {
                out.insert(id.to_owned(), Estimate { median, low, high });
            }
        } else if path
            .file_name()
            .is_some_and(|n| n != "base" && n != "report")
        {
            collect(&path, out);
        }
    }
}

fn time(ns: f64) -> String {
    if ns >= 1_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1_000.0 {
        format!("{:.3} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// The directory criterion writes to: `$CARGO_TARGET_DIR/criterion`, else
/// `target/criterion` here or in a parent directory.
pub fn default_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("criterion");
    }
    let mut dir = std::env::current_dir().unwrap_or_default();
    loop {
        let candidate = dir.join("target").join("criterion");
        if candidate.is_dir() || !dir.pop() {
            return candidate;
        }
    }
}

/// The tables, or why there are none.
pub fn tables(dir: &Path) -> Result<String, String> {
    let mut all = BTreeMap::new();
    collect(dir, &mut all);
    if all.is_empty() {
        return Err(format!(
            "no criterion results under {}: run `cargo bench -p atp-registry-benches` first",
            dir.display()
        ));
    }
    let mut out = String::from("| benchmark | median | 95 % CI of the median |\n|---|---:|---:|\n");
    for (id, e) in &all {
        let _ = writeln!(
            out,
            "| `{id}` | {} | {} – {} |",
            time(e.median),
            time(e.low),
            time(e.high)
        );
    }
    let get = |id: &str| all.get(id).map(|e| e.median);
    out.push('\n');
    if let (Some(post), Some(bare), Some(block_on)) = (
        get("engine/post_hello_world/1s_timeout"),
        get("engine/bare_work"),
        get("engine/block_on_ready"),
    ) {
        let overhead = post - bare - block_on;
        let _ = writeln!(
            out,
            "- Engine overhead per call (`post_hello_world/1s_timeout` − `bare_work` − `block_on_ready`): {} (target < 2 µs: {}).",
            time(overhead),
            if overhead < 2_000.0 {
                "met"
            } else {
                "**missed**"
            }
        );
    }
    for series in ["get_client", "engine_begin", "get_client_rotating"] {
        if let (Some(one), Some(big)) = (
            get(&format!("lookup/{series}/1")),
            get(&format!("lookup/{series}/100000")),
        ) {
            let ratio = big / one;
            let _ = writeln!(
                out,
                "- `lookup/{series}`: 100,000 toolkits / 1 toolkit = {ratio:.3}{}.",
                if series == "get_client_rotating" {
                    String::new()
                } else {
                    format!(
                        " (target within 10 %: {})",
                        if ratio <= 1.10 { "met" } else { "**missed**" }
                    )
                }
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_layout() {
        let dir = std::env::temp_dir().join(format!("atp-bench-micro-{}", std::process::id()));
        let new = dir.join("engine").join("bare_work").join("new");
        fs::create_dir_all(&new).expect("mkdir");
        fs::write(
            new.join("benchmark.json"),
            r#"{"full_id": "engine/bare_work"}"#,
        )
        .expect("write");
        fs::write(
            new.join("estimates.json"),
            r#"{"median": {"point_estimate": 335.5, "confidence_interval": {"lower_bound": 330.0, "upper_bound": 340.0}}}"#,
        )
        .expect("write");
        let text = tables(&dir).expect("tables");
        assert!(text.contains("| `engine/bare_work` | 335.5 ns | 330.0 ns – 340.0 ns |"));
        fs::remove_dir_all(&dir).expect("cleanup");
        assert!(tables(&dir).is_err());
    }
}
