//! The official MCP conformance suite (`@modelcontextprotocol/conformance`,
//! pinned to 0.1.16) against an MCP endpoint serving the fixture's
//! `mcp_conformance` toolkit: each adapter's (`tests/tests/conformance/mcp_official.rs`)
//! and atp-server's (its e2e tests). One `conformance server --url …
//! --scenario …` process per scenario. See docs/MCP-CONFORMANCE.md.
//!
//! Where the suite is: `ATP_MCP_CONFORMANCE_DIR`, a directory whose
//! `node_modules/.bin` has `node` (22 or newer) and `conformance`
//! (`npm install node@22 @modelcontextprotocol/conformance@0.1.16` there).
//! Skipped, loudly, when it is unset or incomplete — unless
//! `ATP_REQUIRE_MCP=1`, when that fails the tests instead: `.ci/run`
//! installs the suite and sets both, so that CI cannot pass without it.

use std::{
    ffi::OsString,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The suite's directory (see the module's documentation).
const DIR: &str = "ATP_MCP_CONFORMANCE_DIR";

/// Set to `1`, a missing suite (or Python MCP client) fails the tests
/// instead of skipping them.
pub const REQUIRE: &str = "ATP_REQUIRE_MCP";

/// The scenarios run, in this order: the 0.1.16 suite's server scenarios
/// for tools, logging and the transport (its `active` suite less the
/// resources, prompts, completion, sampling, elicitation and SSE-polling
/// ones, which need features a toolkit does not have, plus the pending
/// `json-schema-2020-12`).
const SCENARIOS: [&str; 14] = [
    "server-initialize",
    "ping",
    "logging-set-level",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "json-schema-2020-12",
    "dns-rebinding-protection",
];

/// How long one scenario may take (each takes about 1.5 s, mostly Node's
/// start-up).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether `ATP_REQUIRE_MCP=1` (for every MCP test that needs software
/// from outside: the suite, the Python client); any other non-empty value
/// but `0` is a mistake, and panics.
pub fn required() -> bool {
    match std::env::var(REQUIRE) {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!("{REQUIRE}={v:?}: set it to 1 to require the MCP suites, or unset it")
        }
        _ => false,
    }
}

/// The suite's `node_modules/.bin`, when it can run here; says so loudly
/// when not, and panics instead when [`REQUIRE`] is `1`.
fn suite_bin() -> Option<PathBuf> {
    let why = match std::env::var_os(DIR).filter(|d| !d.is_empty()) {
        None => format!("{DIR} is not set"),
        Some(dir) => {
            let bin = Path::new(&dir).join("node_modules").join(".bin");
            match check_suite(&bin) {
                Ok(()) => return Some(bin),
                Err(e) => format!("{DIR}={}: {e}", Path::new(&dir).display()),
            }
        }
    };
    let what = format!(
        "official MCP conformance suite: {why}; install it with `npm install --no-audit --no-fund \
         node@22 @modelcontextprotocol/conformance@0.1.16` in a directory and set {DIR} to it"
    );
    if required() {
        panic!("{REQUIRE}=1, so not skipped: {what}");
    }
    // Written to the real stderr, past the test harness's capture, in one
    // write so that the line stays whole beside the harness's output.
    let line = format!("*** SKIPPED: {what} (with {REQUIRE}=1 this fails instead)\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    None
}

/// Whether `bin` has a `conformance` and a `node` of version 22 or newer.
fn check_suite(bin: &Path) -> Result<(), String> {
    for tool in ["node", "conformance"] {
        if !bin.join(tool).exists() {
            return Err(format!("no {}", bin.join(tool).display()));
        }
    }
    let out = Command::new(bin.join("node"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} did not start: {e}", bin.join("node").display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("`node --version` said {version:?}"))?;
    if major < 22 {
        return Err(format!("node {version}: the suite needs Node 22 or newer"));
    }
    Ok(())
}

/// `PATH` with `bin` first (`conformance` starts with
/// `#!/usr/bin/env node`).
fn path_with(bin: &Path) -> OsString {
    let mut dirs = vec![bin.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries have no separator")
}

/// `s` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs the [`SCENARIOS`] against the MCP endpoint at `url` (which should
/// name `localhost`: dns-rebinding-protection sends its good request with
/// the URL's host, and expects a loopback name), `label` naming it in the
/// output; prints a line per scenario and panics, with the failures'
/// output, when any fails. Returns whether the suite ran (`false`: it is
/// not installed, and said so; see the module's documentation).
pub fn run(label: &str, url: &str) -> bool {
    let Some(bin) = suite_bin() else {
        return false;
    };
    let path = path_with(&bin);
    let mut failures = Vec::new();
    for scenario in SCENARIOS {
        let started = Instant::now();
        let run = crate::process::run_bounded(
            Command::new(bin.join("conformance"))
                .args(["server", "--url", url, "--scenario", scenario])
                .env("PATH", &path)
                .env("NO_COLOR", "1")
                .env("FORCE_COLOR", "0"),
            SCENARIO_TIMEOUT,
        );
        let output = strip_ansi(&format!("{}{}", run.stdout, run.stderr));
        // "Passed: 1/1, 0 failed, 0 warnings"
        let score = output
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("Passed: "))
            .unwrap_or("no score")
            .to_owned();
        let verdict = match run.status {
            Some(s) if s.success() => "ok  ",
            Some(_) => "FAIL",
            None => "TIME",
        };
        println!(
            "mcp-official {label:<6} {verdict} {scenario:<30} {score} ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        if verdict != "ok  " {
            let why = match run.status {
                Some(s) => format!("{s}"),
                None => format!("no answer within {SCENARIO_TIMEOUT:?}"),
            };
            failures.push(format!("--- {scenario} ({why}):\n{output}"));
        }
    }
    println!(
        "mcp-official {label}: {} passed, {} failed (of {}) against {url}",
        SCENARIOS.len() - failures.len(),
        failures.len(),
        SCENARIOS.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} official MCP conformance scenarios failed on {label} ({url}):\n{}",
        failures.len(),
        SCENARIOS.len(),
        failures.join("\n")
    );
    true
}
