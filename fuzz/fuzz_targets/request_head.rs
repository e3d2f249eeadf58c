//! Fuzz target: see [`adtrack_fuzz::request_head`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| adtrack_fuzz::request_head(data));
