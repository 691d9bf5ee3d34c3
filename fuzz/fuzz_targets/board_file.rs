//! libFuzzer entry for `omcb_fuzz_targets::board_file` (see its docs for the input and checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| omcb_fuzz_targets::board_file(data));
