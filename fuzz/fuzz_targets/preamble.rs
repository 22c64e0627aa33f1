//! The L4 stream preamble and the UDP flow datagram header. The property
//! checked, beyond "no panic", is `weft_tests::fuzz::preamble`
//! (tests/src/fuzz.rs); `cargo test` runs it too, as a short seeded mutation
//! smoke (tests/tests/fuzz_smoke.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weft_tests::fuzz::preamble(data);
});
