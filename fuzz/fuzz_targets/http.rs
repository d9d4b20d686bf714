//! The signals API of a whole gateway on the embedded backend, over loopback (src/http.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| signal_gateway_fuzz::http::check_http(signal_gateway_fuzz::runtime(), data));
