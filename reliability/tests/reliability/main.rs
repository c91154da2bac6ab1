//! The fast reliability tests, one test binary (one link, and its tests
//! run in parallel): the fuzz corpus replayed (`corpus::`), faults with
//! real processes killed (`faults::`), the opt-in libFuzzer runs
//! (`libfuzzer::`), property tests (`properties::`), a short soak
//! (`soak::`), bad WebSocket frames (`websocket::`) and bad input over the
//! wire (`wire::`). `secrets` is a binary of its own: it installs the
//! process's global log subscriber. `cargo test -p atp-reliability --test
//! reliability -- faults::` runs one part.

mod common;
mod corpus;
mod faults;
mod libfuzzer;
mod properties;
mod soak;
mod websocket;
mod wire;
