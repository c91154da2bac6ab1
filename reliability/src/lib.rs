//! Reliability and security proof of atp-rs (issue 9): the logic of the
//! fuzz targets, and the tools the wire, soak and fault tests share — a
//! keep-alive raw HTTP/1.1 client, a TCP proxy that cuts connections, child
//! processes to kill, RSS sampling and the soak driver.
//!
//! What was tried and what held is in `docs/RELIABILITY.md`; the commands:
//!
//! ```sh
//! cargo test -p atp-reliability                      # the fast ones (also in `cargo test --workspace`, not in `cargo test`)
//! cargo run --release -p atp-reliability --bin soak -- --target axum --requests 1000000
//! cargo run --release -p atp-reliability --bin fuzz-random -- --target engine --seconds 60
//! cd fuzz && cargo +nightly fuzz run -O engine -- -max_total_time=600
//! ```

pub mod fuzz;
pub mod http;
pub mod node;
pub mod node_cli;
pub mod proxy;
pub mod soak;

/// The resident set size of process `pid` in KiB (Linux: `/proc`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
