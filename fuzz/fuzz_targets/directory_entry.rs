//! Fuzz the check of a signed directory entry as a lookup receives it: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blindpost_client::fuzzing::directory_entry("bob", data);
});
