//! Fuzz the server-link parser (`blindpost://connect?…`, pasted or scanned from a QR code by
//! a user, so hostile): never panics, and whatever it accepts prints back to itself.
#![no_main]

use blindpost_wire::link::ServerLink;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(link) = ServerLink::parse(text) {
        assert_eq!(ServerLink::parse(&link.to_uri()), Ok(link));
    }
});
