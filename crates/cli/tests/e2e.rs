//! End-to-end: the real `blindpostd` and the real `blindpost` binary, driven through the
//! README's walk-through — 1:1 both ways, groups (create/add/remove/leave), offline delivery
//! across a restart, concurrent follow + send, epoch races, and errors users see; and three
//! nodes on one PostgreSQL database, one killed mid-traffic (skipped without PostgreSQL).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::Stdio;
use std::time::Duration;

use util::{Server, User, of_kind, pending_for, texts};

#[test]
fn one_to_one_chat_works_both_ways_and_each_item_is_shown_once() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");

    alice.ok(&["send", "@bob", "hello bob"]);
    let items = bob.receive();
    let msgs = of_kind(&items, "message");
    assert_eq!(msgs.len(), 1, "{items:?}");
    assert_eq!(msgs[0]["text"], "hello bob");
    assert_eq!(msgs[0]["from"], "alice");
    assert_eq!(msgs[0]["chat"], "@alice");
    assert!(msgs[0]["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(msgs[0]["sent_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        bob.receive().is_empty(),
        "a second receive shows nothing new"
    );

    bob.ok(&["send", "@alice", "hi"]);
    assert_eq!(alice.receive_texts(), vec!["hi"]);

    // Both sides talk in the same single chat.
    let alice_chats = alice.json(&["chats"]);
    assert_eq!(alice_chats.len(), 1, "{alice_chats:?}");
    assert_eq!(alice_chats[0]["chat"], "@bob");
    let history = texts(&alice.json(&["history", "@bob"]));
    assert_eq!(history, vec!["hello bob", "hi"]);

    // Stdin bodies.
    let mut child = alice
        .command(&["send", "--stdin", "@bob"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\nsecond line\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(bob.receive_texts(), vec!["from stdin\nsecond line"]);
}

/// The epoch the server holds for the only group it has.
fn only_group_epoch(server: &Server) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        server.data_dir().join("blindpost.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row("SELECT epoch FROM groups", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_member_who_joined_replaces_its_key_package_leaf_once_before_its_first_post() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "hello bob"]);
    assert_eq!(bob.receive_texts(), vec!["hello bob"]);
    let joined = only_group_epoch(&server);

    bob.ok(&["send", "@alice", "hi"]);
    assert_eq!(
        only_group_epoch(&server),
        joined + 1,
        "bob's first post comes after a commit of his own"
    );
    bob.ok(&["send", "@alice", "again"]);
    alice.ok(&["send", "@bob", "both read"]);
    assert_eq!(
        only_group_epoch(&server),
        joined + 1,
        "once only, and alice's leaf came from her own commit"
    );
    assert_eq!(alice.receive_texts(), vec!["hi", "again"]);
    assert_eq!(bob.receive_texts(), vec!["both read"]);
}

#[test]
fn a_message_is_not_echoed_to_the_senders_own_queue() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "one"]);
    assert_eq!(bob.receive_texts(), vec!["one"]);
    assert!(alice.receive().is_empty());
    // `send` authenticates alice's queues on its connection before posting, so the post
    // skips her own route: nothing waits for her on the server, no echo hash is kept.
    alice.ok(&["send", "@bob", "two"]);
    assert_eq!(pending_for(server.data_dir(), alice.dir()), 0);
    let echoes: i64 = rusqlite::Connection::open(alice.dir().join("blindpost.sqlite3"))
        .unwrap()
        .query_row("SELECT count(*) FROM bp_echo", [], |r| r.get(0))
        .unwrap();
    assert_eq!(echoes, 0);
    assert_eq!(bob.receive_texts(), vec!["two"]);
    assert!(alice.receive().is_empty());
}

#[test]
fn a_group_larger_than_the_claim_burst_is_created_by_waiting_for_the_claim_limit() {
    // One claim per connection at once, refilled every half second: creating a group of four
    // meets the limit twice. The refused claims wait and ask again instead of failing.
    let server = Server::start_configured("claim_burst = 1\nclaims_per_minute = 120\n");
    let alice = User::setup(&server, "alice");
    let others: Vec<User> = ["bob", "carol", "dave"]
        .into_iter()
        .map(|n| User::setup(&server, n))
        .collect();
    alice.ok(&["group", "create", "crowd", "@bob", "@carol", "@dave"]);
    alice.ok(&["send", "crowd", "all here"]);
    for u in &others {
        assert_eq!(u.receive_texts(), vec!["all here"], "{}", u.name);
    }
}

#[test]
fn group_membership_changes_reach_everyone_and_removed_members_read_nothing_after() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    let carol = User::setup(&server, "carol");
    let dave = User::setup(&server, "dave");

    alice.ok(&["group", "create", "team", "@bob", "@carol"]);
    alice.ok(&["send", "team", "hello team"]);
    for u in [&bob, &carol] {
        let items = u.receive();
        assert_eq!(of_kind(&items, "joined").len(), 1, "{items:?}");
        assert_eq!(texts(&items), vec!["hello team"], "{}", u.name);
        assert!(items.iter().all(|i| i["chat"] == "team"), "{items:?}");
    }

    alice.ok(&["group", "remove", "team", "@carol"]);
    alice.ok(&["send", "team", "after carol left"]);
    let carol_items = carol.receive();
    let removed = of_kind(&carol_items, "member_removed");
    assert_eq!(removed.len(), 1, "{carol_items:?}");
    assert_eq!(removed[0]["subject"], "carol");
    assert!(
        texts(&carol_items).is_empty(),
        "carol read after removal: {carol_items:?}"
    );
    let err = carol.fails(&["send", "team", "let me in"]);
    assert!(err.contains("not a member"), "{err}");

    alice.ok(&["group", "add", "team", "@dave"]);
    alice.ok(&["send", "team", "welcome dave"]);
    let dave_items = dave.receive();
    assert_eq!(of_kind(&dave_items, "joined").len(), 1);
    assert_eq!(texts(&dave_items), vec!["welcome dave"]);
    assert!(
        dave_items.iter().all(|i| i["chat"] == "team"),
        "{dave_items:?}"
    );

    let bob_items = bob.receive();
    assert_eq!(texts(&bob_items), vec!["after carol left", "welcome dave"]);
    let kinds: Vec<&str> = bob_items
        .iter()
        .filter(|i| i["kind"] != "message")
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["member_removed", "member_added"],
        "{bob_items:?}"
    );

    // Bob leaves; the next member to act commits it and everyone is told.
    bob.ok(&["group", "leave", "team"]);
    let members: Vec<String> = alice
        .json(&["group", "members", "team"])
        .iter()
        .map(|m| m["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, vec!["alice", "dave"]);
    let left = alice.receive();
    assert_eq!(of_kind(&left, "member_left").len(), 1, "{left:?}");
    assert_eq!(of_kind(&left, "member_left")[0]["subject"], "bob");
    alice.ok(&["send", "team", "bye bob"]);
    let dave_items = dave.receive();
    assert_eq!(
        of_kind(&dave_items, "member_left").len(),
        1,
        "{dave_items:?}"
    );
    assert_eq!(texts(&dave_items), vec!["bye bob"]);
    assert!(texts(&bob.receive()).is_empty(), "bob read after leaving");
    bob.fails(&["send", "team", "still here?"]);
}

/// A follower that commits while it follows (the leave of a member, which the next member
/// to act commits) keeps receiving: reading its queue after its commit does not subscribe the
/// queue again, which would turn its pushes off.
#[test]
fn a_follower_that_commits_keeps_receiving_pushes() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    let carol = User::setup(&server, "carol");
    alice.ok(&["group", "create", "team", "@bob", "@carol"]);
    assert_eq!(of_kind(&bob.receive(), "joined").len(), 1);
    assert_eq!(of_kind(&carol.receive(), "joined").len(), 1);
    let follow = bob.follow();
    carol.ok(&["group", "leave", "team"]);
    let items = follow.items_until("member_left");
    assert_eq!(of_kind(&items, "member_left").len(), 1, "{items:?}");
    alice.ok(&["send", "team", "after the leave"]);
    assert_eq!(follow.texts(1), vec!["after the leave"]);
}

#[test]
fn messages_to_an_offline_user_survive_a_server_restart() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "one"]);
    alice.ok(&["send", "@bob", "two"]);
    server.restart();
    alice.ok(&["send", "@bob", "three"]);
    server.restart();
    assert_eq!(bob.receive_texts(), vec!["one", "two", "three"]);
}

#[test]
fn follow_and_send_on_one_profile_at_the_same_time() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "first"]);

    let follow = bob.follow();

    // While bob follows, bob also sends from another process, and alice sends more.
    bob.ok(&["send", "@alice", "bob while following"]);
    for i in 0..3 {
        alice.ok(&["send", "@bob", &format!("live {i}")]);
    }
    let seen = follow.texts(4);
    drop(follow);
    assert_eq!(seen, vec!["first", "live 0", "live 1", "live 2"]);
    assert_eq!(alice.receive_texts(), vec!["bob while following"]);
}

#[test]
fn concurrent_commits_are_rebased_and_both_land() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    let carol = User::setup(&server, "carol");
    let dave = User::setup(&server, "dave");
    alice.ok(&["group", "create", "race", "@bob"]);
    bob.receive();

    let a = alice.command(&["group", "add", "race", "@carol"]).output();
    let b = bob.command(&["group", "add", "race", "@dave"]).spawn();
    let a = a.unwrap();
    let b = b.unwrap().wait_with_output().unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));

    let members = |u: &User| -> Vec<String> {
        u.json(&["group", "members", "race"])
            .iter()
            .map(|m| m["username"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(members(&alice), vec!["alice", "bob", "carol", "dave"]);
    assert_eq!(members(&bob), vec!["alice", "bob", "carol", "dave"]);
    alice.ok(&["send", "race", "all here"]);
    for u in [&bob, &carol, &dave] {
        assert_eq!(u.receive_texts(), vec!["all here"], "{}", u.name);
    }
}

#[test]
fn users_get_one_line_errors_and_nonzero_status() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");

    let err = alice.fails(&["send", "@nobody", "hi"]);
    assert!(err.contains("unknown user @nobody"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let err = alice.fails(&["send", "nogroup", "hi"]);
    assert!(err.contains("no chat named"), "{err}");

    let taken = User::fresh("mallory");
    let err = taken.fails(&["setup", "--server", &server.url, "--username", "alice"]);
    assert!(err.contains("taken"), "{err}");

    let err = alice.fails(&["send", "@bob"]);
    assert!(err.contains("nothing to send"), "{err}");

    server.stop();
    let err = alice.fails(&["send", "@alice2", "hi"]);
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn both_sides_see_the_same_safety_number() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    let a = alice.json(&["verify", "@bob"]);
    let b = bob.json(&["verify", "@alice"]);
    let (a, b) = (&a[0]["safety_number"], &b[0]["safety_number"]);
    assert_eq!(a, b);
    assert_eq!(a.as_str().unwrap().len(), 60);
}

#[test]
fn follow_reconnects_after_the_server_restarts() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    alice.ok(&["send", "@bob", "before"]);
    let follow = bob.follow();
    // The catch-up: the "joined" item, then the message.
    assert_eq!(follow.texts(1), vec!["before"]);
    server.restart();
    alice.ok(&["send", "@bob", "after restart"]);
    let seen = follow.texts(1);
    drop(follow);
    assert_eq!(seen, vec!["after restart"]);
}

/// Claims `n` key packages from a box over a raw connection (as a drainer would); returns
/// whether each was the last-resort one.
fn claim_raw(server: &Server, box_id: &[u8], n: usize) -> Vec<bool> {
    use blindpost_wire::response::Body;
    use blindpost_wire::server_frame::Kind;
    use blindpost_wire::{ClaimKeyPackage, ClientFrame, Request, decode_server, encode};
    use tokio_tungstenite::tungstenite::{Message, connect};
    let (mut ws, _) = connect(format!("{}/v1/ws", server.url)).unwrap();
    (0..n as u64)
        .map(|id| {
            let frame = ClientFrame {
                id,
                request: Some(Request::ClaimKeyPackage(ClaimKeyPackage {
                    box_id: box_id.to_vec(),
                })),
            };
            ws.send(Message::binary(encode(&frame))).unwrap();
            loop {
                if let Message::Binary(b) = ws.read().unwrap()
                    && let Some(Kind::Response(r)) = decode_server(&b).unwrap().kind
                {
                    match r.body {
                        Some(Body::KeyPackage(k)) => return k.last_resort,
                        other => panic!("claim failed: {other:?}"),
                    }
                }
            }
        })
        .collect()
}

#[test]
fn a_drained_box_serves_the_last_resort_until_its_owner_tops_up() {
    let server = Server::start();
    let bob = User::setup(&server, "bob");
    let box_id: Vec<u8> = rusqlite::Connection::open(bob.dir().join("blindpost.sqlite3"))
        .unwrap()
        .query_row(
            "SELECT value FROM bp_profile WHERE key = 'box_id'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Someone drains bob's one-time packages: then only the last resort is served, repeatedly.
    let drained = claim_raw(&server, &box_id, 12);
    let one_time = drained.iter().filter(|lr| !**lr).count();
    assert!(
        one_time > 0 && drained[one_time..].iter().all(|lr| *lr),
        "{drained:?}"
    );
    assert!(drained.ends_with(&[true, true]), "{drained:?}");
    // Bob's next sync tops the box up: one-time packages are served again.
    bob.receive();
    assert_eq!(claim_raw(&server, &box_id, 1), [false]);
    // And a chat made through the drained-then-refilled box works.
    let alice = User::setup(&server, "alice");
    alice.ok(&["send", "@bob", "after the drain"]);
    assert_eq!(bob.receive_texts(), ["after the drain"]);
}
#[test]
fn the_classic_suite_is_selectable_and_mixing_suites_is_a_clear_error() {
    let server = Server::start();
    let setup = |name: &str, suite: &str| {
        let u = User::fresh(name);
        u.ok(&[
            "setup",
            "--server",
            &server.url,
            "--username",
            name,
            "--ciphersuite",
            suite,
        ]);
        u
    };
    let alice = setup("alice", "classic");
    let bob = setup("bob", "classic");
    let carol = setup("carol", "pq");
    alice.ok(&["send", "@bob", "classic hello"]);
    assert_eq!(bob.receive_texts(), vec!["classic hello"]);
    let err = alice.fails(&["send", "@carol", "hi"]);
    assert!(err.contains("ciphersuite"), "{err}");
    let err = User::fresh("dave").fails(&[
        "setup",
        "--server",
        &server.url,
        "--username",
        "dave",
        "--ciphersuite",
        "rot13",
    ]);
    assert!(err.contains("unknown ciphersuite"), "{err}");
    drop(carol);
}

/// Each text of `acked` exactly once in `delivered`, and no text delivered twice.
fn assert_exactly_once(who: &str, acked: &[String], delivered: &[String]) {
    for text in acked {
        let n = delivered.iter().filter(|d| *d == text).count();
        assert_eq!(
            n, 1,
            "{who} got {text:?} {n} times; delivered: {delivered:?}"
        );
    }
    let mut unique = delivered.to_vec();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        delivered.len(),
        "{who}: duplicates in {delivered:?}"
    );
}

#[test]
fn three_nodes_on_postgres_lose_nothing_when_one_is_killed() {
    let Some(db) =
        util::PgDatabase::create("e2e::three_nodes_on_postgres_lose_nothing_when_one_is_killed")
    else {
        return;
    };
    let a = Server::start_on(&db);
    let b = Server::start_on(&db);
    let mut c = Server::start_on(&db);
    // Each user tries a different node first: alice uses a, bob c, carol b.
    let alice = User::setup_on(&[&a, &b, &c], "alice");
    let bob = User::setup_on(&[&c, &a, &b], "bob");
    let carol = User::setup_on(&[&b, &c, &a], "carol");
    assert_eq!(
        bob.ok(&["servers", "list"]),
        format!("{}\n{}\n{}\n", c.url, a.url, b.url)
    );

    alice.ok(&["send", "@bob", "hello"]);
    alice.ok(&["group", "create", "team", "@bob", "@carol"]);
    let mut bob_follow = bob.follow();
    let mut carol_follow = carol.follow();
    assert!(
        bob_follow.wait_for(&["hello".to_string()], Duration::from_secs(30)),
        "bob's follower (node c) did not catch up: {:?}",
        bob_follow.items
    );

    // A post accepted on node a is pushed to bob's connection on node c.
    alice.ok(&["send", "@bob", "pushed across nodes"]);
    assert!(
        bob_follow.wait_for(
            &["pushed across nodes".to_string()],
            Duration::from_secs(10)
        ),
        "no cross-node push: {:?}",
        bob_follow.items
    );

    // Traffic through all three nodes at once: bob sends through node c from one thread while
    // alice sends through node a; node c (bob's sends and bob's follower) dies by SIGKILL
    // while bob's sends are in flight. Only acknowledged sends (exit 0) count; a send cut off
    // by the kill may or may not have been stored, and may show up — but never twice.
    let mut to_bob = vec!["hello".to_string(), "pushed across nodes".to_string()];
    let mut from_alice_team = Vec::new();
    let from_bob_team = std::thread::scope(|scope| {
        let (acked_tx, acked_rx) = std::sync::mpsc::channel();
        let bob = &bob;
        let bob_sends = scope.spawn(move || {
            let mut acked = Vec::new();
            for i in 0..10 {
                let t = format!("team {i} from bob");
                if bob.run(&["send", "team", &t]).status.success() {
                    acked.push(t);
                    let _ = acked_tx.send(());
                }
            }
            acked
        });
        for i in 0..8 {
            if i == 2 {
                // Kill node c once bob has sent a few messages through it.
                for _ in 0..3 {
                    acked_rx.recv_timeout(Duration::from_secs(60)).unwrap();
                }
                c.kill();
            }
            let dm = format!("dm {i}");
            if alice.run(&["send", "@bob", &dm]).status.success() {
                to_bob.push(dm);
            }
            let t = format!("team {i} from alice");
            if alice.run(&["send", "team", &t]).status.success() {
                from_alice_team.push(t);
            }
        }
        bob_sends.join().unwrap()
    });
    // Node a never went down: all of alice's sends went through. Bob's moved on to node a.
    assert_eq!(to_bob.len(), 10);
    assert_eq!(from_alice_team.len(), 8);
    assert!(
        from_bob_team.len() >= 9,
        "bob's sends did not fail over: {from_bob_team:?}"
    );

    // The followers reconnect to a live node and get everything by push or catch-up.
    let bob_wants: Vec<String> = to_bob.iter().chain(&from_alice_team).cloned().collect();
    let carol_wants: Vec<String> = from_alice_team
        .iter()
        .chain(&from_bob_team)
        .cloned()
        .collect();
    assert!(
        bob_follow.wait_for(&bob_wants, Duration::from_secs(60)),
        "bob's follower lost messages after node c died: {:?}",
        texts(&bob_follow.items)
    );
    assert!(
        carol_follow.wait_for(&carol_wants, Duration::from_secs(60)),
        "carol's follower lost messages after node c died: {:?}",
        texts(&carol_follow.items)
    );

    // Exactly once: what the followers printed plus anything a later receive shows.
    for (user, follower, wants) in [
        (&bob, bob_follow, bob_wants),
        (&carol, carol_follow, carol_wants),
    ] {
        let mut delivered = texts(&follower.stop());
        delivered.extend(user.receive_texts());
        assert_exactly_once(&user.name, &wants, &delivered);
    }
    let alice_got = alice.receive_texts();
    assert_exactly_once("alice", &from_bob_team, &alice_got);
}

#[test]
fn server_settings_are_stored_listed_without_passwords_shared_as_a_link_and_v_tells_the_way() {
    let server = Server::start();
    let pin = format!("sha256:{}", "ab".repeat(32));
    let alice = User::fresh("alice");
    alice.ok(&["setup", "--server", &server.url, "--username", "alice"]);
    // Relays carry TLS to the server, so a ws:// server cannot have one.
    let err = alice.fails(&[
        "servers",
        "add",
        "ws://127.0.0.1:1",
        "--relay",
        "wss://r.invalid/r",
    ]);
    assert!(err.contains("must be wss://"), "{err}");
    alice.ok(&[
        "servers",
        "add",
        "wss://node2.invalid/secret",
        "--relay",
        "wss://relay.invalid/r",
        "--relay-pin",
        &pin,
        "--server-pin",
        &pin,
        "--proxy",
        "socks5h://tor:hunter2@127.0.0.1:9050",
        "--sni",
        "front.invalid",
    ]);
    let listed = alice.json(&["servers", "list"]);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["relays"], serde_json::json!([]));
    assert_eq!(listed[1]["relays"][0]["url"], "wss://relay.invalid/r");
    assert_eq!(listed[1]["relays"][0]["pins"][0], pin.as_str());
    assert_eq!(listed[1]["url"], "wss://node2.invalid/secret");
    assert_eq!(listed[1]["pins"][0], pin.as_str());
    assert_eq!(listed[1]["proxy"], "socks5h://tor:***@127.0.0.1:9050");
    assert_eq!(listed[1]["sni"], "front.invalid");
    let shown = alice.ok(&["servers", "list", "--json"]);
    assert!(!shown.contains("hunter2"), "{shown}");

    let shared = alice.ok(&["servers", "share"]);
    let link = shared.lines().next().unwrap();
    assert!(link.starts_with("blindpost://connect?server="), "{link}");
    assert!(
        link.contains("wss://node2.invalid/secret") && link.contains("relay=wss://relay.invalid/r")
    );
    assert!(
        !shared.contains("hunter2") && !shared.contains("9050"),
        "{shared}"
    );
    assert!(shared.lines().count() > 5, "a QR code follows the link");

    // Another device sets up from a link.
    let bob = User::fresh("bob");
    let link = format!("blindpost://connect?server={}", server.url);
    bob.ok(&["setup", "--server-link", &link, "--username", "bob"]);
    alice.ok(&["send", "@bob", "linked"]);
    let out = bob.run(&["-v", "receive", "--json"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "blindpost: connected to {}/v1/ws directly",
            server.url
        )),
        "{said}"
    );

    let err = User::fresh("carol").fails(&[
        "setup",
        "--server",
        &server.url,
        "--relay-pin",
        &pin,
        "--username",
        "carol",
    ]);
    assert!(err.contains("--relay-pin"), "{err}");
}
