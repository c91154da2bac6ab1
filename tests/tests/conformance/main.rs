//! The conformance tests, one test binary (one link, and its tests run in
//! parallel): the case suite against each adapter over real HTTP
//! (`axum::`, `actix::`, `rocket::`), the adapters' agreement with each
//! other, the suite's own pieces (`internals::`), the official MCP software against each adapter's MCP endpoint,
//! and `#[tool]` against the builder (`macro_parity::`). `cargo test -p atp-conformance --test conformance -- axum::`
//! runs one part.

mod actix;
mod agreement;
mod axum;
mod internals;
mod macro_parity;
mod mcp_official;
mod mcp_python;
mod rocket;
