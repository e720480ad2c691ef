//! Stateful fuzzing of a live group: the input is a script of what a hostile server does —
//! members send and commit, and the server delivers, reorders, drops, duplicates, mangles or
//! invents messages for alice. Never panics; nobody outside the group gets in; alice never
//! shows more messages than were sent.
#![no_main]

use blindpost_client::fuzzing::{LiveGroup, Who};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 512 {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut g = LiveGroup::new(dir.path()).expect("the group sets up");
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut sent = 0usize;
    let mut bytes = data.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let who = if op & 0x80 == 0 { Who::Bob } else { Who::Carol };
        match op % 10 {
            0 => {
                if let Ok(m) = g.send(who, &format!("t{arg}")) {
                    pending.push(m);
                    sent += 1;
                }
            }
            1 => {
                if let Ok(c) = g.commit_update(who) {
                    if who == Who::Bob {
                        let _ = g.deliver_to_carol(&c);
                    }
                    pending.push(c);
                }
            }
            2 => g.deliver(&pending.drain(..).collect::<Vec<_>>()).expect("store ok"),
            3 => {
                let batch: Vec<Vec<u8>> = pending.drain(..).rev().collect();
                g.deliver(&batch).expect("store ok");
            }
            4 => {
                if let Some(m) = pending.last_mut() {
                    let i = usize::from(arg) % m.len().max(1);
                    if let Some(b) = m.get_mut(i) {
                        *b ^= bytes.next().unwrap_or(1) | 1;
                    }
                }
            }
            5 => {
                let n = usize::from(arg % 32);
                let raw: Vec<u8> = bytes.by_ref().take(n).collect();
                if let Ok(m) = g.send_raw(who, &raw) {
                    pending.push(m);
                }
            }
            6 => {
                if !pending.is_empty() {
                    let i = usize::from(arg) % pending.len();
                    pending.remove(i);
                }
            }
            7 => {
                if let Some(m) = pending.last().cloned() {
                    pending.push(m);
                }
            }
            8 => {
                let n = usize::from(arg % 64);
                let raw: Vec<u8> = bytes.by_ref().take(n).collect();
                g.deliver(&[raw]).expect("store ok");
            }
            _ => {
                if let Some(m) = pending.first().cloned() {
                    g.deliver(&[m]).expect("store ok");
                }
            }
        }
    }
    g.deliver(&pending).expect("store ok");
    let members = g.alice_members().expect("alice is still in the group");
    assert_eq!(members, ["alice", "bob", "carol"]);
    assert!(g.alice_texts().expect("history").len() <= sent);
});
