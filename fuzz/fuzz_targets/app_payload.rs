//! Fuzz the parser of a decrypted, padded application payload: never panics; whatever parses
//! survives padding and parsing again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = blindpost_client::fuzzing::app_payload(data) {
        let again = blindpost_client::fuzzing::app_payload(&m.to_padded_bytes());
        assert_eq!(again, Some(m));
    }
});
