//! Kubernetes Event bodies -> `signal::event::parse` (invariants: src/invariants.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signal_gateway_fuzz::invariants::check_event(data));
