//! The official MCP conformance suite against the fixture's
//! `mcp_conformance` toolkit, served at `/mcp/mcp_conformance` by each
//! adapter: one test per adapter (see [`atp_conformance::mcp_official`]
//! for where the suite comes from, and when it is skipped).

use atp_conformance::{mcp_official, serve_fixture, server::Framework};

fn official_suite(framework: Framework) {
    let base = serve_fixture(framework).expect("the server starts");
    // `localhost`, not 127.0.0.1: dns-rebinding-protection sends its good
    // request with the URL's host, and expects a loopback name.
    let port = base.rsplit(':').next().expect("a port");
    let url = format!("http://localhost:{port}/mcp/mcp_conformance");
    mcp_official::run(&framework.to_string(), &url);
}

#[test]
fn mcp_official_axum() {
    official_suite(Framework::Axum);
}

#[test]
fn mcp_official_actix() {
    official_suite(Framework::Actix);
}

#[test]
fn mcp_official_rocket() {
    official_suite(Framework::Rocket);
}
