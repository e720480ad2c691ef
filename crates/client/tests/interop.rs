//! Conformance with RFC 9420: an independent MLS implementation (mls-rs) and our client share
//! groups on the classic suite with our real configuration — our route (0xff42, leaf) and
//! invite (0xff43, key package) extensions and capabilities, basic credentials, the
//! ciphertext-only wire-format policy and the ratchet tree in the Welcome. Each side joins the
//! other's group from a Welcome; both agree on the epoch authenticator after every commit;
//! application messages and commits flow both ways through our real receive path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use blindpost_client::fuzzing::Peer;
use mls_rs::client_builder::{MlsConfig, PaddingMode};
use mls_rs::extension::ExtensionType;
use mls_rs::group::ReceivedMessage;
use mls_rs::identity::SigningIdentity;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules, EncryptionOptions};
use mls_rs::{
    CipherSuite, CipherSuiteProvider, Client, CryptoProvider, Extension, ExtensionList, Group,
    MlsMessage,
};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

const ROUTE: u16 = 0xff42;
const INVITE: u16 = 0xff43;
const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// An mls-rs client configured to meet ours: it understands our two extensions, puts the
/// ratchet tree in Welcomes and encrypts commits (our members accept only ciphertext).
fn rs_client(name: &str) -> (Client<impl MlsConfig>, Vec<u8>) {
    let crypto = RustCryptoProvider::default();
    let cs = crypto.cipher_suite_provider(SUITE).unwrap();
    let (secret, public) = cs.signature_key_generate().unwrap();
    let identity = SigningIdentity::new(
        BasicCredential::new(name.as_bytes().to_vec()).into_credential(),
        public.clone(),
    );
    let rules = DefaultMlsRules::new()
        .with_commit_options(CommitOptions::new().with_ratchet_tree_extension(true))
        .with_encryption_options(EncryptionOptions::new(true, PaddingMode::None));
    let client = Client::builder()
        .crypto_provider(crypto)
        .identity_provider(BasicIdentityProvider::new())
        .extension_types([ExtensionType::from(ROUTE), ExtensionType::from(INVITE)])
        .mls_rules(rules)
        .signing_identity(identity, secret, SUITE)
        .build();
    (client, public.as_bytes().to_vec())
}

/// Our leaf extension (route: a 16-byte queue id).
fn rs_leaf_extensions() -> ExtensionList {
    let mut l = ExtensionList::new();
    l.set(Extension::new(ExtensionType::from(ROUTE), vec![9; 16]));
    l
}

/// Our key-package extension (invite: queue id and send token).
fn rs_key_package_extensions() -> ExtensionList {
    let mut l = ExtensionList::new();
    l.set(Extension::new(ExtensionType::from(INVITE), vec![9; 48]));
    l
}

/// Wrap a bare key package as an MLSMessage (version 1, wire format mls_key_package).
fn as_mls_message(key_package: &[u8]) -> MlsMessage {
    let mut b = vec![0, 1, 0, 5];
    b.extend_from_slice(key_package);
    MlsMessage::from_bytes(&b).unwrap()
}

fn assert_same_epoch<C: MlsConfig>(ours: &Peer, gid: &[u8], theirs: &Group<C>) {
    let (epoch, auth) = ours.epoch_authenticator(gid).unwrap();
    assert_eq!(epoch, theirs.current_epoch(), "both at the same epoch");
    assert_eq!(
        auth,
        theirs.epoch_authenticator().unwrap().as_bytes(),
        "both derive the same epoch authenticator at epoch {epoch}"
    );
}

/// What mls-rs decrypted, which must be one of our padded application payloads.
fn rs_text<C: MlsConfig>(group: &mut Group<C>, bytes: &[u8]) -> String {
    let msg = MlsMessage::from_bytes(bytes).unwrap();
    let ReceivedMessage::ApplicationMessage(app) = group.process_incoming_message(msg).unwrap()
    else {
        panic!("expected an application message");
    };
    let app = blindpost_client::fuzzing::app_payload(app.data()).expect("our payload");
    match serde_json::to_value(&app).unwrap()["text"].as_str() {
        Some(t) => t.to_string(),
        None => panic!("not a text message"),
    }
}

/// A padded application payload from mls-rs, in our format.
fn rs_send<C: MlsConfig>(group: &mut Group<C>, text: &str) -> Vec<u8> {
    let payload =
        serde_json::json!({"id": hex_id(text), "sent_at": 1, "type": "text", "text": text});
    let mut bytes = serde_json::to_vec(&payload).unwrap();
    bytes.resize(256, b' ');
    group
        .encrypt_application_message(&bytes, Vec::new())
        .unwrap()
        .to_bytes()
        .unwrap()
}

fn hex_id(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn texts(peer: &Peer, gid: &[u8]) -> Vec<String> {
    peer.items(gid)
        .unwrap()
        .into_iter()
        .filter(|(k, _, _)| k == "message")
        .filter_map(|(_, _, t)| t)
        .collect()
}

#[test]
fn mls_rs_joins_our_group_and_both_sides_talk_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut alice = Peer::new(dir.path(), "alice").unwrap();
    let (rs, rs_key) = rs_client("rsbob");
    let gid = [5u8; 32];
    alice.create_group(&gid).unwrap();

    // mls-rs publishes a key package with our extensions; our checks accept it.
    let kp = rs
        .generate_key_package_message(rs_key_package_extensions(), rs_leaf_extensions(), None)
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(kp[..4], [0, 1, 0, 5], "an MLSMessage holding a key package");
    let (_commit, welcome) = alice.add(&gid, &kp[4..], "rsbob", &rs_key).unwrap();

    let (mut bob, _) = rs
        .join_group(None, &MlsMessage::from_bytes(&welcome).unwrap(), None)
        .unwrap();
    assert_same_epoch(&alice, &gid, &bob);
    assert_eq!(alice.members(&gid).unwrap(), ["alice", "rsbob"]);

    // Application messages both ways, through our real send and receive paths.
    let m = alice.send(&gid, "hello from openmls").unwrap();
    assert_eq!(rs_text(&mut bob, &m), "hello from openmls");
    alice
        .receive(&rs_send(&mut bob, "hello from mls-rs"))
        .unwrap();
    assert_eq!(texts(&alice, &gid), ["hello from mls-rs"]);

    // Commits both ways; after each, both derive the same epoch authenticator.
    let out = bob.commit(Vec::new()).unwrap();
    bob.apply_pending_commit().unwrap();
    alice
        .receive(&out.commit_message.to_bytes().unwrap())
        .unwrap();
    assert_same_epoch(&alice, &gid, &bob);

    let c = alice.commit_update(&gid).unwrap();
    let ReceivedMessage::Commit(_) = bob
        .process_incoming_message(MlsMessage::from_bytes(&c).unwrap())
        .unwrap()
    else {
        panic!("expected a commit");
    };
    assert_same_epoch(&alice, &gid, &bob);

    let m = alice.send(&gid, "after two commits").unwrap();
    assert_eq!(rs_text(&mut bob, &m), "after two commits");
    alice.receive(&rs_send(&mut bob, "still here")).unwrap();
    assert_eq!(texts(&alice, &gid), ["hello from mls-rs", "still here"]);
}

#[test]
fn our_client_joins_an_mls_rs_group_from_its_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut alice = Peer::new(dir.path(), "alice").unwrap();
    let (rs, _) = rs_client("rsbob");
    let mut bob = rs
        .create_group(ExtensionList::new(), rs_leaf_extensions(), None)
        .unwrap();
    let gid = bob.group_id().to_vec();

    // Our published key package, with our extensions, added by mls-rs.
    let kp = as_mls_message(&alice.key_package_bytes(3).unwrap());
    let out = bob
        .commit_builder()
        .add_member(kp)
        .unwrap()
        .build()
        .unwrap();
    bob.apply_pending_commit().unwrap();
    let welcome = out.welcome_messages[0].to_bytes().unwrap();

    // We join through our real receive path.
    alice.receive(&welcome).unwrap();
    assert_eq!(alice.members(&gid).unwrap(), ["alice", "rsbob"]);
    assert_same_epoch(&alice, &gid, &bob);

    alice.receive(&rs_send(&mut bob, "welcome aboard")).unwrap();
    assert_eq!(texts(&alice, &gid), ["welcome aboard"]);
    let m = alice.send(&gid, "thanks").unwrap();
    assert_eq!(rs_text(&mut bob, &m), "thanks");

    let c = alice.commit_update(&gid).unwrap();
    bob.process_incoming_message(MlsMessage::from_bytes(&c).unwrap())
        .unwrap();
    assert_same_epoch(&alice, &gid, &bob);
    let out = bob.commit(Vec::new()).unwrap();
    bob.apply_pending_commit().unwrap();
    alice
        .receive(&out.commit_message.to_bytes().unwrap())
        .unwrap();
    assert_same_epoch(&alice, &gid, &bob);
    alice.receive(&rs_send(&mut bob, "two epochs on")).unwrap();
    assert_eq!(texts(&alice, &gid), ["welcome aboard", "two epochs on"]);
}
