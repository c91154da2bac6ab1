//! The libFuzzer targets of `fuzz/`, built and run on stable Rust: no
//! nightly, no `cargo fuzz`. Opt-in, with `ATP_LIBFUZZER=1` (`.ci/run` sets
//! it): the build alone takes ~5 minutes on a 2-core machine, too long for
//! every `cargo test`. Without it each test says, loudly, that it was
//! skipped and how to run it, and passes (`fuzz/`'s committed corpus is
//! replayed on every `cargo test` by `corpus.rs` all the same).
//!
//! The `fuzz/` crate is built as `cargo fuzz build -s none` builds it
//! (release, `line-tables-only` debug info, SanitizerCoverage through
//! `-Cpasses=sancov-module` and its `-Cllvm-args`, `--cfg fuzzing`, debug
//! assertions and overflow checks, one codegen unit, an explicit `--target`
//! so that the flags miss build scripts and proc-macros), without a
//! sanitizer, which needs nightly. The build has a target directory of its
//! own, `fuzz/target/` (the outer one is locked by this `cargo test`, and
//! its artifacts are built with other flags).
//!
//! Then each target runs for a short, bounded time (`ATP_LIBFUZZER_SECONDS`,
//! 15 by default) on a copy of its committed seeds (`fuzz/corpus/<target>/seed-*`)
//! in a fresh directory, so that the repository's corpus does not grow. It
//! must exit 0 having executed at least [`MIN_RUNS`] inputs and every seed.
//! A crash input stays in that directory, named in the failure.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::Instant,
};

use atp_reliability::fuzz::{self, TARGETS};

/// The variable that turns the libFuzzer build and runs on.
const ENABLE: &str = "ATP_LIBFUZZER";

/// Seconds each target runs unless `ATP_LIBFUZZER_SECONDS` says otherwise.
const SECONDS: u64 = 15;

/// Fewest inputs a short run must execute (the seeds and mutations of them;
/// on the project's 2-core machine the slowest target executes ~10 times as
/// many in 15 s).
const MIN_RUNS: u64 = 1_000;

/// The flags `cargo fuzz build -s none` gives rustc (cargo-fuzz 0.13,
/// `src/project.rs`), all stable: SanitizerCoverage for libFuzzer's
/// guidance (8-bit counters, the PC table, comparison tracing), the `fuzzing`
/// cfg, no branch folding, debug assertions (and overflow checks), one
/// codegen unit. `-sanitizer-coverage-stack-depth` is added on Linux.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Ccodegen-units=1",
];

/// Variables of this process that would change the nested build: flags
/// meant for the outer one, another target directory or target, the outer
/// cargo's jobserver.
const REMOVED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("reliability/ is in the repository")
        .to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The last `lines` lines of `text`.
fn tail(text: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The host's target triple, as the cargo that runs the build reports it.
fn host_triple() -> String {
    let out = Command::new(cargo())
        .arg("-vV")
        .output()
        .expect("cargo -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
        .expect("cargo -vV names the host")
}

/// Builds the four targets once per test process; their directory, or why
/// the build failed.
fn built() -> &'static Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let repo = repo();
        let fuzz_dir = repo.join("fuzz");
        let target_dir = fuzz_dir.join("target");
        let triple = host_triple();
        let mut flags = RUSTFLAGS.join(" ");
        if triple.contains("-linux-") {
            flags.push_str(" -Cllvm-args=-sanitizer-coverage-stack-depth");
        }
        let mut cmd = Command::new(cargo());
        cmd.current_dir(&fuzz_dir)
            .arg("build")
            .arg("--release")
            .args(["--config", "profile.release.debug=\"line-tables-only\""])
            .arg("--manifest-path")
            .arg(fuzz_dir.join("Cargo.toml"))
            .args(["--target", &triple])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg("--bins");
        for var in REMOVED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", &flags);
        let started = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("{cmd:?} did not start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building fuzz/ failed ({}), RUSTFLAGS={flags:?}:\n{}",
                out.status,
                tail(&out.stderr, 60)
            ));
        }
        let bins = target_dir.join(&triple).join("release");
        println!(
            "built fuzz/ ({}) in {:.1} s into {}",
            TARGETS.join(", "),
            started.elapsed().as_secs_f64(),
            bins.display()
        );
        Ok(bins)
    })
}

/// What libFuzzer's final report (`-print_final_stats=1`) says.
#[derive(Debug, Default)]
struct Stats {
    runs: Option<u64>,
    /// The last status line (`#N DONE cov: … ft: … corp: …`).
    done: Option<String>,
}

fn stats(stderr: &str) -> Stats {
    let mut s = Stats::default();
    for line in stderr.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            s.runs = n.trim().parse().ok();
        }
        if line.starts_with('#') && line.contains("DONE") {
            s.done = Some(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    s
}

/// The crash, timeout, leak or out-of-memory inputs libFuzzer left in `dir`.
fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        ["crash-", "timeout-", "leak-", "oom-"]
                            .iter()
                            .any(|k| n.starts_with(k))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Whether [`ENABLE`] is `1`; when it is unset (or `0`), says so loudly,
/// past the test harness's capture, with how to turn it on. Any other
/// value is a mistake, not a reason to skip quietly.
fn enabled(target: &str) -> bool {
    match std::env::var(ENABLE) {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!(
                "{ENABLE}={v:?}: set it to 1 to build and run the libFuzzer targets, or unset it"
            )
        }
        _ => {
            // One write, past the test harness's capture, so that the
            // line stays whole beside the harness's own output.
            let line = format!(
                "SKIPPED: libFuzzer target {target}: {ENABLE} is not 1. Run it with \
                 `{ENABLE}=1 cargo test -p atp-reliability --test reliability -- libfuzzer:: --nocapture` \
                 (builds fuzz/ with SanitizerCoverage, ~5 min on 2 cores, then runs each \
                 target ATP_LIBFUZZER_SECONDS={SECONDS} s); `.ci/run` sets it\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            false
        }
    }
}

fn run(target: &str) {
    if !enabled(target) {
        return;
    }
    let bins = match built() {
        Ok(bins) => bins,
        Err(why) => panic!("{why}"),
    };
    let seconds: u64 = std::env::var("ATP_LIBFUZZER_SECONDS")
        .ok()
        .map(|s| s.parse().expect("ATP_LIBFUZZER_SECONDS is a number"))
        .unwrap_or(SECONDS);

    // A fresh working directory: the corpus libFuzzer grows (a copy of the
    // committed seeds) and the artifact prefix.
    let work = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("libfuzzer")
        .join(format!("{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let corpus = work.join("corpus");
    std::fs::create_dir_all(&corpus).expect("a fresh corpus directory");
    let seeds = fuzz::load_corpus(target);
    assert!(
        seeds.len() >= 5,
        "the seed corpus of {target} is missing ({})",
        fuzz::corpus_dir(target).display()
    );
    for (path, data) in &seeds {
        let name = path.file_name().expect("a seed file has a name");
        std::fs::write(corpus.join(name), data).expect("a seed is copied");
    }

    let bin = bins.join(target);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", work.display()))
        .arg(&corpus);
    let started = Instant::now();
    let Output { status, stderr, .. } = cmd
        .output()
        .unwrap_or_else(|e| panic!("{} did not start: {e}", bin.display()));
    let elapsed = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&stderr);
    let st = stats(&text);
    let found = artifacts(&work);
    let failure = || {
        format!(
            "libFuzzer target {target} ({cmd:?}): {status}, {st:?}\n\
             artifacts (reproduce with `{} <file>`): {found:?}\n\
             --- last lines of its stderr ---\n{}",
            bin.display(),
            tail(&stderr, 50)
        )
    };
    assert!(status.success() && found.is_empty(), "{}", failure());
    let runs = st
        .runs
        .unwrap_or_else(|| panic!("no final stats: {}", failure()));
    assert!(
        runs >= MIN_RUNS && runs >= seeds.len() as u64,
        "only {runs} executions: {}",
        failure()
    );
    println!(
        "libFuzzer {target}: {runs} executions in {elapsed:.1} s ({:.0}/s) from {} seeds; {}",
        runs as f64 / elapsed,
        seeds.len(),
        st.done.as_deref().unwrap_or("")
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn engine_under_libfuzzer() {
    run("engine");
}

#[test]
fn runtime_message_under_libfuzzer() {
    run("runtime_message");
}

#[test]
fn llm_calls_under_libfuzzer() {
    run("llm_calls");
}

#[test]
fn server_http_under_libfuzzer() {
    run("server_http");
}

/// Every target of `fuzz/` has its test above (run with `ATP_LIBFUZZER=1`).
#[test]
fn every_cargo_fuzz_target_is_run() {
    let manifest = std::fs::read_to_string(repo().join("fuzz/Cargo.toml")).unwrap();
    let bins = manifest.matches("[[bin]]").count();
    assert_eq!(bins, TARGETS.len(), "{manifest}");
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "{manifest}"
        );
    }
}
