//! Fuzz the server's decoder of client frames: never panics; whatever decodes re-encodes to
//! something that decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = blindpost_wire::decode_client(data) {
        let again = blindpost_wire::decode_client(&blindpost_wire::encode(&frame))
            .expect("a re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
