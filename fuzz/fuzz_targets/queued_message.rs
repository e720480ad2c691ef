//! Fuzz one queued message as a receive processes it (the path in the client's `sync.rs`),
//! delivered to a member of a live three-member group: never panics, never lets anyone
//! outside the group in.
#![no_main]

use std::cell::RefCell;

use blindpost_client::fuzzing::LiveGroup;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static GROUP: RefCell<(tempfile::TempDir, LiveGroup)> = RefCell::new({
        let dir = tempfile::tempdir().expect("temp dir");
        let live = LiveGroup::new(dir.path()).expect("the group sets up");
        (dir, live)
    });
}

fuzz_target!(|data: &[u8]| {
    GROUP.with(|g| {
        let (_, live) = &mut *g.borrow_mut();
        // Only local-store failures may surface; a bad message is skipped.
        live.deliver(&[data.to_vec()]).expect("a bad message is skipped, not an error");
        let members = live.alice_members().expect("alice is still in the group");
        assert_eq!(members, ["alice", "bob", "carol"]);
    });
});
