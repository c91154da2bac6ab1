//! Fuzz target `runtime_message`: see `atp_reliability::fuzz::runtime_message` for what it drives
//! and what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    atp_reliability::fuzz::runtime_message(data);
});
