//! The three adapters give the same answers to the same requests
//! (docs/PROTOCOL.md §1: "the adapters disagree with each other on any row of §3"
//! must never happen), bodies compared as JSON.

use atp_conformance::{agreement, serve_fixture, server::Framework};

#[test]
fn adapters_agree() {
    let servers: Vec<(String, String)> = Framework::ALL
        .iter()
        .map(|&f| (f.to_string(), serve_fixture(f).expect("the server starts")))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = runtime.block_on(agreement::compare(&servers)) {
        panic!("{e}");
    }
}
