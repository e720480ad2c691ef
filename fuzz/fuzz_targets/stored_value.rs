//! Fuzz the profile store's nil packing (`nilpack`): unpacking any bytes (a damaged or
//! tampered profile file) never panics and never allocates past its limit; whatever packs,
//! unpacks to exactly what it was.
#![no_main]

use blindpost_client::fuzzing::{nil_pack, nil_unpack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nil_unpack(data);
    if let Some(packed) = nil_pack(data) {
        assert_eq!(nil_unpack(&packed).as_deref(), Some(data));
    }
});
