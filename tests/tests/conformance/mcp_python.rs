//! The official Python MCP client (PyPI `mcp`) against the fixture's
//! `conformance` toolkit served as an MCP server at `/mcp/conformance` by
//! each adapter: one test per adapter, running `tests/python/mcp_client.py`
//! (initialize, tools/list, echo, add, fail, secure without and with an
//! `Authorization: Bearer` token, an unknown tool).
//!
//! Skipped, loudly, when `python3 -c 'import mcp'` fails — unless
//! `ATP_REQUIRE_MCP=1`, when that fails the tests instead: `.ci/run`
//! installs the package (`python3 -m pip install mcp`) and sets it, so that
//! CI cannot pass without it.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use atp_conformance::{
    mcp_official::{REQUIRE, required},
    serve_fixture,
    server::Framework,
};

/// How long the script may take (it takes well under a second).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The token sent as `Authorization: Bearer …` to `secure`.
const TOKEN: &str = "python-mcp-token-1234";

/// Whether the `mcp` package can be imported; says so loudly when not, and
/// panics instead when [`REQUIRE`] is `1`.
fn python_mcp() -> bool {
    let why = match Command::new("python3")
        .args(["-c", "import mcp, mcp.client.streamable_http"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{}: {}", out.status, last_line(&out.stderr)),
        Err(e) => format!("python3 did not start: {e}"),
    };
    let what = format!(
        "official Python MCP client: `python3 -c 'import mcp'` failed ({why}); \
         install it with `python3 -m pip install mcp`"
    );
    if required() {
        panic!("{REQUIRE}=1, so not skipped: {what}");
    }
    // Written to the real stderr, past the test harness's capture, in one
    // write so that the line stays whole beside the harness's output.
    let line = format!("*** SKIPPED: {what} (with {REQUIRE}=1 this fails instead)\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// The last non-blank line of `bytes`, trimmed.
fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// What the script did: its exit status (`None` when it ran out of time,
/// and was killed), its stdout and its stderr.
fn run_script(url: &str) -> (Option<ExitStatus>, String, String) {
    let script: PathBuf = [env!("CARGO_MANIFEST_DIR"), "python", "mcp_client.py"]
        .iter()
        .collect();
    let run = atp_conformance::process::run_bounded(
        Command::new("python3")
            .arg(&script)
            .args([url, TOKEN])
            .env("PYTHONUNBUFFERED", "1"),
        SCRIPT_TIMEOUT,
    );
    (run.status, run.stdout, run.stderr)
}

/// Runs the script against the fixture served by `framework`.
fn python_client(framework: Framework) {
    if !python_mcp() {
        return;
    }
    let base = serve_fixture(framework).expect("the server starts");
    // `localhost`: the MCP endpoints accept loopback hosts only.
    let port = base.rsplit(':').next().expect("a port");
    let url = format!("http://localhost:{port}/mcp/conformance");
    let (status, stdout, stderr) = run_script(&url);
    let passed = status.is_some_and(|s| s.success()) && stdout.lines().any(|l| l == "ALL OK");
    for line in stdout.lines() {
        println!("mcp-python {framework:<6} {line}");
    }
    assert!(
        passed,
        "the Python MCP client failed against {framework} ({url}): {}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
        match status {
            Some(s) => s.to_string(),
            None => format!("no end within {SCRIPT_TIMEOUT:?}"),
        }
    );
}

#[test]
fn mcp_python_axum() {
    python_client(Framework::Axum);
}

#[test]
fn mcp_python_actix() {
    python_client(Framework::Actix);
}

#[test]
fn mcp_python_rocket() {
    python_client(Framework::Rocket);
}
