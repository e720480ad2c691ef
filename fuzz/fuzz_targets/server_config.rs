//! Fuzz the server's TOML configuration parser and validation: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) =
            blindpost_server::Config::from_toml(text, std::path::Path::new("fuzz.toml"))
    {
        let _ = config.validate();
    }
});
