//! Runs the conformance suite against a running ATP server that serves the
//! fixture:
//!
//! ```text
//! atp-conformance --url http://127.0.0.1:PORT
//! ```
//!
//! Prints one line per case, then `N passed, M failed`; exits non-zero
//! when a case failed.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;

/// Runs the ATP conformance suite against a server that serves the
/// conformance fixture under /atp.
#[derive(Parser)]
#[command(name = "atp-conformance", version)]
struct Args {
    /// The server's base URL, e.g. http://127.0.0.1:8000 (the fixture is
    /// under its /atp).
    #[arg(long)]
    url: String,
    /// Run only the cases whose name contains this text (repeatable).
    #[arg(long = "case", value_name = "TEXT")]
    cases: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("can not start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let cases: Vec<_> = atp_conformance::all_cases()
        .into_iter()
        .filter(|(name, _)| {
            args.cases.is_empty() || args.cases.iter().any(|c| name.contains(c.as_str()))
        })
        .collect();
    let width = cases.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let (mut passed, mut failed) = (0usize, 0usize);
    for (name, case) in cases {
        let started = Instant::now();
        let outcome = runtime.block_on(case(args.url.clone()));
        let took = started.elapsed();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("pass  {name:<width$}  {}", millis(took));
            }
            Err(reason) => {
                failed += 1;
                let reason = reason.replace('\n', "\n      ");
                println!("FAIL  {name:<width$}  {}  {reason}", millis(took));
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn millis(d: Duration) -> String {
    format!("{:>6} ms", d.as_millis())
}
