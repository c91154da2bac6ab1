//! End-to-end tests of `atp-server` over real sockets on loopback: Rust and
//! Python toolkits and LLM clients as peers.

mod cli;
mod common;
mod faults;
mod keys;
mod oauth;
mod python;
mod routing;
mod runtime;
