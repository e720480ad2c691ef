//! The client killed mid-receive: `blindpost receive` is killed with SIGKILL at random moments
//! while it works through a backlog, round after round. Afterwards its store holds every
//! message exactly once (nothing it acknowledged is missing, nothing unacknowledged was lost on
//! the server), and no message was printed to the user twice across all the runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use util::{Server, User, pending_for, texts};

/// Backlogs sent; each is worked through under repeated kills.
const BATCHES: usize = 15;
/// Messages per backlog.
const PER_BATCH: usize = 5;
/// Kills per backlog.
const KILLS: usize = 3;

/// A small xorshift generator seeded from the clock (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Messages in a client profile's store (read directly, without catching up).
fn stored_messages(profile: &Path) -> usize {
    let db = rusqlite::Connection::open(profile.join("blindpost.sqlite3")).unwrap();
    db.query_row(
        "SELECT count(*) FROM bp_items WHERE kind = 'message'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as usize
}

/// The complete JSON lines a (possibly killed) run printed.
fn printed(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn receive_killed_at_random_moments_loses_nothing_and_shows_nothing_twice() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "hello"]);
    let mut shown: Vec<String> = texts(&bob.receive());
    let mut sent = vec!["hello".to_string()];
    let mut killed_mid_run = 0;
    // Kills that struck after the run had stored (part of) the backlog: between storing and
    // acknowledging, or between acknowledging and printing.
    let mut killed_after_storing = 0;
    // Read both sides' databases directly (the CLI's `history` would catch up first).
    let stored = || stored_messages(bob.dir());
    let pending = || pending_for(server.data_dir(), bob.dir());
    // The kill delay is drawn from a window that closes in on the moment a run stores its
    // backlog (kills before it shrink the window from below, finished runs from above), so
    // many kills land in the interesting part: storing, acknowledging, printing.
    let (mut lo, mut hi) = (0u64, 400_000u64); // microseconds

    for batch in 0..BATCHES {
        for i in 0..PER_BATCH {
            let text = format!("b{batch}m{i}");
            alice.ok(&["send", "@bob", &text]);
            sent.push(text);
        }
        for _ in 0..KILLS {
            let before = stored();
            let mut child = bob
                .command(&["receive", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let delay = lo + rng.below(hi - lo + 1);
            std::thread::sleep(Duration::from_micros(delay));
            let running = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let after = stored();
            // Every message sent is in bob's store or still on the server.
            let on_server = pending();
            assert!(
                after + on_server >= sent.len(),
                "seed {seed}: {after} stored + {on_server} pending < {} sent",
                sent.len()
            );
            assert!(after <= sent.len(), "seed {seed}: more stored than sent");
            if running {
                killed_mid_run += 1;
                if after > before {
                    killed_after_storing += 1;
                }
            }
            if !running || after > before {
                hi = delay.max(lo + 3_000);
            } else {
                lo = delay.min(hi.saturating_sub(3_000));
            }
            shown.extend(texts(&printed(&out.stdout)));
        }
        // A run left to finish.
        shown.extend(bob.receive_texts());
    }

    // No message reached the user twice.
    let unique: HashSet<&String> = shown.iter().collect();
    assert_eq!(
        unique.len(),
        shown.len(),
        "seed {seed}: duplicates in {shown:?}"
    );
    // The store has every message, once.
    let history = texts(&bob.json(&["history", "@alice"]));
    let mut h = history.clone();
    h.sort();
    let mut s = sent.clone();
    s.sort();
    assert_eq!(h, s, "seed {seed}: history {history:?}");
    // The server holds nothing more for bob.
    assert!(bob.receive().is_empty(), "seed {seed}");
    eprintln!(
        "client-crash: {} messages, {} kill rounds, {killed_mid_run} killed mid-run, \
         {killed_after_storing} after storing, seed {seed}",
        sent.len(),
        BATCHES * KILLS
    );
}
