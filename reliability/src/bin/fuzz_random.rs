//! `fuzz-random`: a bounded mutation fuzzer on stable Rust, for machines
//! without `cargo fuzz` — the same target functions as `fuzz/`, fed
//! mutations (bit flips, byte and token insertions, deletions, splices) of
//! the seed corpus for a fixed time. A failing input is saved under
//! `fuzz/artifacts/<target>/` and the run exits non-zero.
//!
//! ```sh
//! cargo run --release -p atp-reliability --bin fuzz-random -- --target engine --seconds 60
//! ```

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    process::ExitCode,
    time::{Duration, Instant},
};

use atp_reliability::fuzz::{self, Rng};
use clap::Parser;

/// Fuzzes one target with mutations of its seed corpus, for a bounded time.
#[derive(Debug, Parser)]
#[command(name = "fuzz-random")]
struct Cli {
    /// engine, runtime_message or llm_calls.
    #[arg(long)]
    target: String,
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The random seed (the time when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// The longest input.
    #[arg(long, default_value_t = 4096)]
    max_len: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !fuzz::TARGETS.contains(&cli.target.as_str()) {
        eprintln!(
            "unknown target {:?}: use one of {:?}",
            cli.target,
            fuzz::TARGETS
        );
        return ExitCode::FAILURE;
    }
    let dir = fuzz::corpus_dir(&cli.target);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }) | 1;
    let mut rng = Rng::new(seed);
    let limit = Duration::from_secs(cli.seconds);
    let started = Instant::now();
    let mut execs = 0u64;
    // The seeds first, as they are.
    let seeds = corpus.clone();
    for s in &seeds {
        fuzz::run(&cli.target, s);
        execs += 1;
    }
    while started.elapsed() < limit {
        let mut input = corpus[rng.below(corpus.len())].clone();
        fuzz::mutate(&mut rng, &mut input, &corpus, cli.max_len);
        let target = cli.target.clone();
        let data = input.clone();
        let outcome = catch_unwind(AssertUnwindSafe(move || fuzz::run(&target, &data)));
        execs += 1;
        if outcome.is_err() {
            let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/artifacts")
                .join(&cli.target);
            let _ = std::fs::create_dir_all(&out);
            let file = out.join(format!("crash-{seed:x}-{execs}"));
            let _ = std::fs::write(&file, &input);
            eprintln!(
                "fuzz-random: {} failed after {execs} executions; input saved to {}",
                cli.target,
                file.display()
            );
            return ExitCode::FAILURE;
        }
        // Keep a few mutants as new parents, so that depth accumulates.
        if rng.below(64) == 0 && corpus.len() < 4096 {
            corpus.push(input);
        }
    }
    println!(
        "fuzz-random: target {} — {execs} executions in {:.1} s, seed {seed:#x}, no failure",
        cli.target,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
