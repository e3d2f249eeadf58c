//! Fuzz target: see [`adtrack_fuzz::batch_body`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| adtrack_fuzz::batch_body(data));
