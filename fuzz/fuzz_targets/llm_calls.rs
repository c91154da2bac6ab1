//! Fuzz target `llm_calls`: see `atp_reliability::fuzz::llm_calls` for what it drives
//! and what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    atp_reliability::fuzz::llm_calls(data);
});
