//! Key transparency end to end, against the real binaries: `verify` reports verified directory
//! proofs and records confirmations, `audit` verifies the whole history, and a hostile
//! operator who tampers with the stored directory (substituting a key, adding a device,
//! rewriting an old epoch, showing a client another root) is detected, with nothing
//! encrypted to the substituted key. Every member credential a client sees in a Welcome or
//! an Add is checked against the directory, and one it does not vouch for is shown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::Path;

use blindpost_wire::{DIRECTORY_SIGNATURE_CONTEXT, Device, DirectoryEntry, SignedDirectoryEntry};
use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use rusqlite::{Connection, params};
use serde_json::Value;
use util::{Server, User, of_kind};

fn db(data: &Path) -> Connection {
    Connection::open(data.join("blindpost.sqlite3")).unwrap()
}

/// What a hostile operator does to publish a value of its choosing under `username`: queue it
/// as if registered (skipping the identity checks); the server publishes it at start.
fn forge_entry(data: &Path, username: &str, entry: &DirectoryEntry, signer: &SigningKey) {
    let bytes = entry.encode_to_vec();
    let mut msg = DIRECTORY_SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(&bytes);
    let signed = SignedDirectoryEntry {
        signature: signer.sign(&msg).to_bytes().to_vec(),
        entry: bytes,
    };
    db(data)
        .execute(
            "INSERT INTO kt_pending (username, version, entry, signature) VALUES (?1, 99, ?2, ?3)",
            params![username, signed.entry, signed.signature],
        )
        .unwrap();
}

/// The entry the directory currently stores for `username` (from the plain users table).
fn stored_entry(data: &Path, username: &str) -> DirectoryEntry {
    let entry: Vec<u8> = db(data)
        .query_row(
            "SELECT entry FROM users WHERE username = ?1",
            [username],
            |r| r.get(0),
        )
        .unwrap();
    DirectoryEntry::decode(entry.as_slice()).unwrap()
}

/// Re-signs epoch `epoch`'s root with the server's own key after replacing its hash, as an
/// operator holding the key could.
fn rewrite_root(data: &Path, epoch: i64) {
    let key: [u8; 32] = std::fs::read(data.join("server-signing.key"))
        .unwrap()
        .try_into()
        .unwrap();
    let key = SigningKey::from_bytes(&key);
    let vrf = akd_vrf_public(&std::fs::read(data.join("directory-vrf.key")).unwrap());
    let forged_hash = [0x66u8; 32];
    let sig = key.sign(&blindpost_wire::root_signature_message(
        epoch as u64,
        &forged_hash,
        &vrf,
    ));
    db(data)
        .execute(
            "UPDATE kt_roots SET root_hash = ?2, signature = ?3 WHERE epoch = ?1",
            params![epoch, &forged_hash[..], &sig.to_bytes()[..]],
        )
        .unwrap();
}

/// The VRF public key of a VRF secret key file's contents, derived as the server does.
fn akd_vrf_public(secret: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("directory-vrf.key"), secret).unwrap();
    std::fs::write(dir.path().join("server-signing.key"), [7u8; 32]).unwrap();
    blindpost_server::kt::ServerKeys::load_or_create(dir.path())
        .unwrap()
        .vrf_public()
        .to_vec()
}

#[test]
fn verify_reports_a_verified_directory_proof_and_records_confirmation() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let _bob = User::setup(&server, "bob");
    let v = &alice.json(&["verify", "@bob"])[0];
    assert_eq!(v["directory_verified"], true);
    assert_eq!(v["confirmed"], false);
    assert_eq!(v["safety_number"].as_str().unwrap().len(), 60);
    let v = &alice.json(&["verify", "@bob", "--confirm"])[0];
    assert_eq!(v["confirmed"], true);
    let v = &alice.json(&["verify", "@bob"])[0];
    assert_eq!(v["confirmed"], true, "the confirmation is remembered");
    let text = alice.ok(&["verify", "@bob"]);
    assert!(text.contains("directory proof: verified"), "{text}");
    assert!(
        text.contains('█') || text.contains('▀') || text.contains('▄'),
        "a QR code is drawn"
    );
}

#[test]
fn audit_verifies_every_epoch_without_an_account() {
    let server = Server::start();
    User::setup(&server, "alice");
    User::setup(&server, "bob");
    let auditor = User::fresh("auditor");
    let out = auditor.ok(&["audit", "--server", &server.url]);
    assert!(out.contains("CONSISTENT"), "{out}");
    let report = &auditor.json(&["audit", "--server", &server.url])[0];
    assert_eq!(report["consistent"], true);
    assert!(
        report["latest_epoch"].as_u64().unwrap() >= 2,
        "one epoch per registration"
    );
}

#[test]
fn hostile_server_rewriting_an_old_epoch_fails_the_audit() {
    let mut server = Server::start();
    User::setup(&server, "alice");
    User::setup(&server, "bob");
    server.restart_with(|data| rewrite_root(data, 1));
    let auditor = User::fresh("auditor");
    let err = auditor.fails(&["audit", "--server", &server.url]);
    assert!(err.contains("INCONSISTENT"), "{err}");
}

#[test]
fn hostile_server_substituting_an_identity_key_is_caught_by_both_sides() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    bob.ok(&["verify", "@alice", "--confirm"]);
    server.restart_with(|data| {
        // The operator's own identity key, with alice's device list: a valid-looking entry.
        let attacker = SigningKey::from_bytes(&[9u8; 32]);
        let mut entry = stored_entry(data, "alice");
        entry.identity_key = attacker.verifying_key().to_bytes().to_vec();
        entry.version = 99;
        forge_entry(data, "alice", &entry, &attacker);
    });
    // Bob confirmed alice: sending to her is blocked, nothing is encrypted to the new key.
    let err = bob.fails(&["send", "@alice", "secret"]);
    assert!(err.contains("identity key changed"), "{err}");
    // Alice's own history check raises the alarm on her next sync.
    let err = alice.fails(&["receive"]);
    assert!(err.contains("KEY DIRECTORY ALARM"), "{err}");
    assert!(err.contains("none of your devices published"), "{err}");
}

#[test]
fn hostile_server_adding_a_device_is_caught_and_nothing_is_sent() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    server.restart_with(|data| {
        // A ghost device in alice's list. The operator cannot sign with alice's identity key.
        let mut entry = stored_entry(data, "alice");
        entry.devices.push(Device {
            signature_key: vec![1; 32],
            box_id: vec![2; 16],
        });
        entry.version = 99;
        forge_entry(data, "alice", &entry, &SigningKey::from_bytes(&[9u8; 32]));
    });
    let err = bob.fails(&["send", "@alice", "secret"]);
    assert!(err.contains("signature does not verify"), "{err}");
    assert!(
        bob.ok(&["chats"]).trim().is_empty(),
        "no chat was created with the ghost"
    );
    let err = alice.fails(&["receive"]);
    assert!(err.contains("KEY DIRECTORY ALARM"), "{err}");
}

#[test]
fn hostile_server_showing_a_client_another_root_is_caught() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    User::setup(&server, "bob");
    alice.ok(&["verify", "@bob"]);
    // The latest epoch now has another root than the one alice saw.
    server.restart_with(|data| {
        let latest: i64 = db(data)
            .query_row("SELECT max(epoch) FROM kt_roots", [], |r| r.get(0))
            .unwrap();
        rewrite_root(data, latest);
    });
    let err = alice.fails(&["verify", "@bob"]);
    assert!(err.contains("KEY DIRECTORY ALARM"), "{err}");
    assert!(err.contains("two different directories"), "{err}");
}

/// `group members --json` as (username, verified).
fn verdicts(user: &User, group: &str) -> Vec<(String, bool)> {
    user.json(&["group", "members", group])
        .iter()
        .map(|m| {
            (
                m["username"].as_str().unwrap().to_string(),
                m["verified"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn subjects(items: &[Value], kind: &str) -> Vec<String> {
    of_kind(items, kind)
        .iter()
        .map(|i| i["subject"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_member_credential_in_a_welcome_or_an_add_is_verified_against_the_directory() {
    let server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    let carol = User::setup(&server, "carol");
    User::setup(&server, "dave");
    alice.ok(&["group", "create", "team", "@bob", "@carol"]);
    // Bob joins from the Welcome: alice and carol in its tree are checked.
    let items = bob.receive();
    assert_eq!(of_kind(&items, "joined").len(), 1, "{items:?}");
    assert!(of_kind(&items, "unverified_member").is_empty(), "{items:?}");
    let all =
        |v: &[&str]| -> Vec<(String, bool)> { v.iter().map(|u| (u.to_string(), true)).collect() };
    assert_eq!(verdicts(&bob, "team"), all(&["alice", "bob", "carol"]));
    // The adder's own adds were checked when it claimed their key packages.
    assert_eq!(verdicts(&alice, "team"), all(&["alice", "bob", "carol"]));
    // An Add in someone else's commit is checked too.
    alice.ok(&["group", "add", "team", "@dave"]);
    let items = carol.receive();
    assert!(of_kind(&items, "unverified_member").is_empty(), "{items:?}");
    assert_eq!(
        verdicts(&carol, "team"),
        all(&["alice", "bob", "carol", "dave"])
    );
    let out = bob.run(&["send", "team", "hi"]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("vouch"),
        "no warning when every member verifies"
    );
}

#[test]
fn hostile_server_whose_directory_does_not_list_a_members_key_makes_it_unverified() {
    let mut server = Server::start();
    let alice = User::setup(&server, "alice");
    let bob = User::setup(&server, "bob");
    User::setup(&server, "carol");
    let dave = User::setup(&server, "dave");
    alice.ok(&["group", "create", "team", "@bob"]);
    bob.receive();
    alice.ok(&["group", "add", "team", "@carol"]);
    // The operator replaces carol's directory value with its own identity key and device:
    // a validly signed entry that does not list the MLS key carol is in the group with.
    server.restart_with(|data| {
        let attacker = SigningKey::from_bytes(&[9u8; 32]);
        let mut entry = stored_entry(data, "carol");
        entry.identity_key = attacker.verifying_key().to_bytes().to_vec();
        entry.devices[0].signature_key = vec![1; 32];
        entry.version = 99;
        forge_entry(data, "carol", &entry, &attacker);
    });
    // Bob sees carol in alice's Add: the directory does not vouch for her key.
    let items = bob.receive();
    assert_eq!(subjects(&items, "member_added"), ["carol"], "{items:?}");
    assert_eq!(
        subjects(&items, "unverified_member"),
        ["carol"],
        "{items:?}"
    );
    let text = of_kind(&items, "unverified_member")[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("does not list"), "{text}");
    assert_eq!(
        verdicts(&bob, "team"),
        [
            ("alice".to_string(), true),
            ("bob".to_string(), true),
            ("carol".to_string(), false)
        ]
    );
    let human = bob.ok(&["group", "members", "team"]);
    assert!(human.contains("@carol (UNVERIFIED"), "{human}");
    // Told once: the item is not repeated on the next receive.
    assert!(of_kind(&bob.receive(), "unverified_member").is_empty());
    // Sending is not blocked, but never silent.
    let out = bob.run(&["send", "team", "hello"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not vouch for: @carol"), "{err}");

    // Dave, following live, joins from a Welcome whose tree holds carol's key: the same
    // verdict, from the follow loop (his "ready" shows he is past the catch-up).
    let follow = dave.follow();
    alice.ok(&["send", "@dave", "ready"]);
    assert_eq!(follow.texts(1), ["ready"]);
    alice.ok(&["group", "add", "team", "@dave"]);
    let items = follow.items_until("unverified_member");
    drop(follow);
    assert_eq!(of_kind(&items, "joined").len(), 1, "{items:?}");
    assert_eq!(
        subjects(&items, "unverified_member"),
        ["carol"],
        "{items:?}"
    );
    assert_eq!(
        verdicts(&dave, "team"),
        [
            ("alice".to_string(), true),
            ("bob".to_string(), true),
            ("carol".to_string(), false),
            ("dave".to_string(), true)
        ]
    );
}

#[test]
fn nodes_on_one_postgres_database_serve_one_directory_and_one_auditable_history() {
    let Some(db) = util::PgDatabase::create(
        "transparency::nodes_on_one_postgres_database_serve_one_directory",
    ) else {
        return;
    };
    let mut one = Server::start_on(&db);
    let two = Server::start_on(&db);

    // Registered through node 1; once `setup` returned, node 2 proves it.
    let alice = User::setup_on(&[&one, &two], "alice");
    let bob = User::setup(&two, "bob");
    let seen_by_bob = &bob.json(&["verify", "@alice"])[0];
    assert_eq!(seen_by_bob["directory_verified"], true);

    // Registrations on both nodes at once each land in an epoch both nodes prove.
    let urls = [one.url.clone(), two.url.clone()];
    let users: Vec<User> = std::thread::scope(|s| {
        let setups: Vec<_> = (0..6)
            .map(|i| {
                let url = &urls[i % 2];
                s.spawn(move || {
                    let name = format!("user{i}");
                    let u = User::fresh(&name);
                    u.ok(&["setup", "--server", url, "--username", &name]);
                    u
                })
            })
            .collect();
        setups.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, u) in users.iter().enumerate() {
        let v = &u.json(&["verify", "@alice"])[0];
        assert_eq!(v["directory_verified"], true, "user{i}");
        assert_eq!(v["identity_key"], seen_by_bob["identity_key"], "user{i}");
        let v = &bob.json(&["verify", &format!("@user{i}")])[0];
        assert_eq!(v["directory_verified"], true, "bob verifies user{i}");
    }

    // Alice pinned the server key through node 1; with node 1 gone she verifies through node 2
    // against that pin: both nodes sign with the one key in the database.
    one.kill();
    let v = &alice.json(&["verify", "@bob"])[0];
    assert_eq!(v["directory_verified"], true);
    assert_eq!(v["identity_key"].as_str().map(str::len), Some(64));

    // The whole history, published by whichever node won each epoch, audits as one.
    let auditor = User::fresh("auditor");
    let report = &auditor.json(&["audit", "--server", &two.url])[0];
    assert_eq!(report["consistent"], true, "{report}");
    assert!(report["latest_epoch"].as_u64().unwrap() >= 2, "{report}");
}
