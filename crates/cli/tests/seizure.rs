//! The seizure drill: a realistic scenario through the real `blindpostd` and `blindpost`
//! (four users, 1:1 chats and a group, a removal and an add, some mail delivered and some
//! pending), then everything the server has written — every file of its data directory
//! (database, WAL, shared memory) read raw as well as through SQL, and its log captured at
//! debug level — is searched for what SEIZURE.md says is never there: message texts, group
//! names (random markers per run), client addresses, secrets, timestamps finer than a day, a
//! username next to a queue its owner uses in a conversation. Also: application messages are
//! stored in size buckets. Not for: the schema's documentation (see the server's
//! `tests/seizure.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod util;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use util::{Server, User};

/// The server listens on this loopback address; clients reach it from 127.0.0.1, so the
/// client address is told apart from the server's own (which its start-up line names).
const SERVER_IP: &str = "127.0.0.3";
const CLIENT_IP: &str = "127.0.0.1";

fn marker(what: &str) -> String {
    let mut b = [0u8; 12];
    getrandom(&mut b);
    format!("{what}{}", hex(&b))
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn offsets(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Every file the server wrote, by name.
fn seize(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A profile's own queues (id, receive secret, send token) and its chats' group ids.
fn profile(user: &User) -> (Vec<[Vec<u8>; 3]>, Vec<Vec<u8>>) {
    let db = rusqlite::Connection::open(user.dir().join("blindpost.sqlite3")).unwrap();
    let mut q = db
        .prepare("SELECT id, receive_secret, send_token FROM bp_queues")
        .unwrap();
    let queues = q
        .query_map([], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?]))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut g = db.prepare("SELECT group_id FROM bp_chats").unwrap();
    let groups = g
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (queues, groups)
}

#[test]
fn a_seized_server_yields_only_what_seizure_md_lists() {
    let server = Server::start_logged(SERVER_IP, "debug");
    {
        // Precondition of the address check: a client's address is not the server's.
        let probe = std::net::TcpStream::connect(&server.addr).unwrap();
        assert_eq!(probe.local_addr().unwrap().ip().to_string(), CLIENT_IP);
    }
    let names = ["alice", "bob", "carol", "dave"];
    let [alice, bob, carol, dave] = names.map(|n| User::setup(&server, n));
    let mut texts = Vec::new();
    let mut say = |who: &User, target: &str, what: &str| {
        let text = marker(what);
        who.ok(&["send", target, &text]);
        texts.push(text);
    };
    let team = marker("team");

    // 1:1, answered; the answer stays pending for alice.
    say(&alice, "@bob", "hello-bob-");
    bob.receive();
    say(&bob, "@alice", "hi-alice-");
    // A group; carol reads, is removed; dave is added; the group talks on.
    alice.ok(&["group", "create", &team, "@bob", "@carol"]);
    say(&alice, &team, "welcome-team-");
    carol.receive();
    alice.ok(&["group", "remove", &team, "@carol"]);
    alice.ok(&["group", "add", &team, "@dave"]);
    say(&alice, &team, "after-change-");
    dave.receive();
    say(&dave, &team, "dave-here-");
    bob.receive();
    // Another 1:1, left pending: its texts have different lengths within one bucket, and one
    // long text in the next bucket.
    // (Short enough that each, with the gossiped key-directory root, the epoch view and the
    // message counter every message carries, fits 256 B.)
    let short_lengths = [1usize, 10, 20];
    for len in short_lengths {
        let text = format!("{}{}", marker("p"), "x".repeat(len));
        dave.ok(&["send", "@carol", &text]);
        texts.push(text);
    }
    let long = format!("{}{}", marker("long"), "y".repeat(400));
    dave.ok(&["send", "@carol", &long]);
    texts.push(long);

    // Seize while it runs (WAL and all), then read the log.
    let files = seize(server.data_dir());
    let log = server.log();
    let db = rusqlite::Connection::open_with_flags(
        server.data_dir().join("blindpost.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();

    // What is on disk is exactly the files SEIZURE.md lists.
    let listed: HashSet<&str> = [
        "blindpost.sqlite3",
        "blindpost.sqlite3-wal",
        "blindpost.sqlite3-shm",
        "directory-vrf.key",
        "server-signing.key",
    ]
    .into();
    for name in files.keys() {
        assert!(listed.contains(name.as_str()), "unlisted file {name}");
    }
    assert!(!log.is_empty(), "the debug log was captured");
    assert!(
        contains(&log, b"connection opened"),
        "debug lines are in the log"
    );

    let mut everything: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    everything.push(("log", &log));

    // No message text, no group name: not in any file, not in the log.
    for (name, bytes) in &everything {
        for t in texts.iter().chain([&team]) {
            let m = &t.as_bytes()[..t.len().min(28)];
            assert!(!contains(bytes, m), "{name} holds the marker {t}");
        }
    }

    // No client address anywhere; the log names only the server's own listening address.
    for (name, bytes) in &everything {
        assert!(
            !contains(bytes, CLIENT_IP.as_bytes()),
            "{name} holds the client's address"
        );
    }
    let text = String::from_utf8_lossy(&log);
    for word in text.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
        let parts: Vec<&str> = word.split('.').collect();
        if parts.len() == 4 && parts.iter().all(|p| p.parse::<u8>().is_ok()) {
            assert_eq!(word, SERVER_IP, "the log holds an address: {word}");
        }
    }

    // No secret: the receive secret of any queue (the server keeps only its hash), in raw
    // bytes or hex, neither on disk nor in the log. A send token travels in its key package,
    // which is public while unclaimed (SEIZURE.md); once the package is claimed and the queue
    // routed, the token must be gone from every file too.
    let users = [&alice, &bob, &carol, &dave];
    let profiles: Vec<_> = users.iter().map(|u| profile(u)).collect();
    let routes: Vec<(Vec<u8>, Vec<u8>)> = db
        .prepare("SELECT group_id, queue_id FROM routes")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let routed: HashSet<&[u8]> = routes.iter().map(|(_, q)| q.as_slice()).collect();
    let last_resort_queues: Vec<Vec<u8>> = db
        .prepare("SELECT last_resort FROM key_package_boxes")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (queues, _) in &profiles {
        for [id, receive, send] in queues {
            let in_last_resort = last_resort_queues.iter().any(|lr| contains(lr, id));
            let mut secrets = vec![("receive secret", receive)];
            if routed.contains(id.as_slice()) && !in_last_resort {
                secrets.push(("send token", send));
            }
            for (kind, secret) in secrets {
                for (name, bytes) in &everything {
                    assert!(!contains(bytes, secret), "{name} holds a {kind}");
                    assert!(
                        !contains(bytes, hex(secret).as_bytes()),
                        "{name} holds a {kind} in hex"
                    );
                }
            }
        }
    }

    // No timestamp finer than a day: every integer stored is a day number, a counter or a
    // version — none is a time in seconds or milliseconds near now — and the log has no times.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let near = |v: i64| (v - now).abs() < 3 * 86_400 || (v / 1000 - now).abs() < 3 * 86_400;
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for table in &tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = stmt.column_count();
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for (c, column) in names.iter().enumerate().take(columns) {
                // A blob may hold a binary time (MLS uses 8-byte big-endian seconds); only key
                // packages may (their lifetime, SEIZURE.md).
                let key_package = matches!(
                    (table.as_str(), column.as_str()),
                    ("key_packages", "data") | ("key_package_boxes", "last_resort")
                );
                if let Ok(blob) = row.get::<_, Vec<u8>>(c)
                    && !key_package
                {
                    for w in blob.windows(8) {
                        let v = i64::from_be_bytes(w.try_into().unwrap());
                        assert!(
                            v.abs_diff(now) >= 3 * 86_400,
                            "{table}.{column} holds a binary time"
                        );
                    }
                }
                if let Ok(v) = row.get::<_, i64>(c) {
                    assert!(!near(v), "{table}.{column} holds a time: {v}");
                    if column.ends_with("day") {
                        assert!((v - now / 86_400).abs() <= 1, "{table}.{column} = {v}");
                    }
                }
            }
        }
    }
    let today = {
        // Civil date of `now`, to look for it in text form.
        let days = now / 86_400;
        let (y, m, d) = civil(days);
        format!("{y:04}-{m:02}-{d:02}")
    };
    for (name, bytes) in &everything {
        assert!(!contains(bytes, today.as_bytes()), "{name} holds a date");
    }
    for line in text.lines() {
        let clock = line.as_bytes().windows(8).any(|w| {
            w[2] == b':' && w[5] == b':' && w.iter().all(|c| c.is_ascii_digit() || *c == b':')
        });
        assert!(!clock, "the log holds a time of day: {line}");
    }

    // No username next to a queue its owner uses in a conversation: no database page (in the
    // database file or a WAL frame) holds both a queue that is a route of a group and its
    // owner's username. (Pages of different tables may sit side by side; rows of one page
    // belong to one table, which is what a link would need.)
    let page_size: usize = db.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    let page_of = |file: &str, offset: usize| -> usize {
        if file.ends_with("-wal") {
            // 32-byte WAL header, then frames of a 24-byte header and one page.
            offset.saturating_sub(32) / (24 + page_size)
        } else {
            offset / page_size
        }
    };
    let mut checked = 0;
    for (user, (queues, groups)) in users.iter().zip(&profiles) {
        assert!(!groups.is_empty());
        for [queue, _, _] in queues {
            if !routed.contains(queue.as_slice()) {
                continue; // a key package's queue nobody has used: no conversation to link
            }
            checked += 1;
            for (name, bytes) in &files {
                let name_pages: HashSet<usize> = offsets(bytes, user.name.as_bytes())
                    .into_iter()
                    .map(|at| page_of(name, at))
                    .collect();
                for at in offsets(bytes, queue) {
                    assert!(
                        !name_pages.contains(&page_of(name, at)),
                        "{name}: {}'s conversation queue shares a page with the username",
                        user.name
                    );
                }
            }
        }
    }
    assert!(
        checked >= 7,
        "the scenario routed too few queues ({checked})"
    );

    // Padding: the pending texts from dave to carol are stored in size buckets. The three short
    // ones (different lengths, one bucket) take identical space; the long one is larger.
    // Carol has not received yet: her queue in the chat is the one dave's group routes to.
    let (_, dave_groups) = &profiles[3];
    let carol_queue = routes
        .iter()
        .find(|(g, q)| dave_groups.contains(g) && profiles[2].0.iter().any(|[id, _, _]| id == q))
        .map(|(_, q)| q.clone())
        .expect("dave's chat routes to a queue of carol's");
    let sizes: Vec<i64> = db
        .prepare(
            "SELECT CASE WHEN shared IS NULL THEN length(payload)
                 ELSE (SELECT length(data) FROM payloads WHERE id = shared) END
             FROM messages WHERE queue_id = ?1 ORDER BY seq",
        )
        .unwrap()
        .query_map([&carol_queue], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let last4 = &sizes[sizes.len() - 4..];
    assert_eq!(
        (last4[0], last4[0]),
        (last4[1], last4[2]),
        "different short texts, one stored size: {sizes:?}"
    );
    assert!(
        last4[3] > last4[0],
        "the long text is in a larger bucket: {sizes:?}"
    );
    eprintln!(
        "seizure drill: {} files, {} log bytes, {} markers, {} routed queues checked, pending \
         sizes to carol {sizes:?}",
        files.len(),
        log.len(),
        texts.len() + 1,
        checked
    );
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
