//! The conformance suite against `atp-axum` (axum), over real HTTP.

use std::sync::OnceLock;

use atp_conformance::{serve_fixture, server::Framework};

/// The shared server of this test binary, started once.
fn base_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| serve_fixture(Framework::Axum).expect("the axum server starts"))
        .clone()
}

atp_conformance::conformance_tests!(base_url());
