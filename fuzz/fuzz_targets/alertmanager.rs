//! Alertmanager webhook bodies -> `signal::alertmanager::parse` (invariants: src/invariants.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signal_gateway_fuzz::invariants::check_alertmanager(data));
