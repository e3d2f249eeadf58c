//! Fuzz target: see [`adtrack_fuzz::query`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| adtrack_fuzz::query(data));
