//! Owner resolution and fingerprints over a fuzzed object graph (src/resolution.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    signal_gateway_fuzz::resolution::check_resolution(signal_gateway_fuzz::runtime(), data)
});
