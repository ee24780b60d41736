#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qforge_fuzz::block_decoders(data));
