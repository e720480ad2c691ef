//! Fuzz the check of a key package as claimed from the server: never panics.
#![no_main]

use blindpost_client::fuzzing::KeyPackageChecker;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static CHECKER: (tempfile::TempDir, KeyPackageChecker) = {
        let dir = tempfile::tempdir().expect("temp dir");
        let checker = KeyPackageChecker::new(dir.path()).expect("store opens");
        (dir, checker)
    };
}

fuzz_target!(|data: &[u8]| {
    CHECKER.with(|(_, c)| {
        let _ = c.check(data);
    });
});
