//! Fuzz target `server_http`: see `atp_reliability::fuzz::server_http` for
//! what it drives and what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    atp_reliability::fuzz::server_http(data);
});
