//! End-to-end tests of `atp-server` over real sockets on loopback: Rust and
//! Python toolkits and LLM clients as peers.

mod admin;
mod api_keys;
mod apps;
mod audit;
mod cli;
mod cluster;
mod cluster_faults;
mod common;
mod failover_runtime;
mod faults;
#[allow(dead_code)] // Shared by path with the console's browser tests, which use all of it.
mod hooks;
mod infra;
mod keys;
mod limits;
mod llm_parity;
mod mcp;
mod metrics;
mod oauth;
mod oauth_provider;
mod pg_webhooks;
mod postgres;
mod python;
mod python_parity;
mod routing;
mod runtime;
mod runtime_parity;
mod secrets;
mod store;
mod streaming;
mod traces;
mod webhooks;
