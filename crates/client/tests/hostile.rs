//! A hostile server double at the level of queued messages: a real three-member group whose
//! member alice receives whatever a lying server chooses to hand her — replays, duplicates,
//! reorderings, drops, withheld commits (forks), forged and external commits, garbage — through
//! the same processing a receive runs. Each test asserts: nothing accepted twice, nothing
//! forged accepted, gaps and forks told to the user as alarm items, and recovery once the
//! server behaves. (The relay-level version with the real binaries is in the CLI's tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use blindpost_client::fuzzing::{LiveGroup, Who};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

fn group() -> (tempfile::TempDir, LiveGroup) {
    let dir = tempfile::tempdir().unwrap();
    let live = LiveGroup::new(dir.path()).unwrap();
    (dir, live)
}

const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// An outsider with its own crypto provider and credential.
fn outsider(name: &str) -> (OpenMlsRustCrypto, SignatureKeyPair, CredentialWithKey) {
    let provider = OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::new(SUITE.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let cred = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (provider, signer, cred)
}

#[test]
fn replayed_messages_and_welcomes_are_not_accepted_twice() {
    let (_d, mut g) = group();
    let m1 = g.send(Who::Bob, "one").unwrap();
    g.deliver(std::slice::from_ref(&m1)).unwrap();
    let epoch = g.alice_epoch().unwrap();
    // The server replays the message (under new sequence numbers), alone and in a batch.
    g.deliver(std::slice::from_ref(&m1)).unwrap();
    g.deliver(&[m1.clone(), m1.clone()]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["one"]);
    // A replayed commit from an old epoch changes nothing.
    let c = g.commit_update(Who::Bob).unwrap();
    g.deliver(std::slice::from_ref(&c)).unwrap();
    assert_eq!(g.alice_epoch().unwrap(), epoch + 1);
    g.deliver(&[c]).unwrap();
    assert_eq!(g.alice_epoch().unwrap(), epoch + 1);
    // A replayed Welcome does not reset the group to the epoch it was made in.
    g.deliver(&[g.welcome()]).unwrap();
    assert_eq!(g.alice_epoch().unwrap(), epoch + 1);
    assert_eq!(g.alice_alarms().unwrap(), Vec::<String>::new());
    assert_eq!(g.alice_members().unwrap(), ["alice", "bob", "carol"]);
}

#[test]
fn duplicates_in_one_batch_are_shown_once() {
    let (_d, mut g) = group();
    let m = g.send(Who::Bob, "dup").unwrap();
    let n = g.send(Who::Carol, "other").unwrap();
    g.deliver(&[m.clone(), n.clone(), m, n]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["dup", "other"]);
    assert_eq!(g.alice_alarms().unwrap(), Vec::<String>::new());
}

#[test]
fn messages_reordered_within_a_batch_all_arrive_without_an_alarm() {
    let (_d, mut g) = group();
    let msgs: Vec<Vec<u8>> = (1..=4)
        .map(|i| g.send(Who::Bob, &format!("m{i}")).unwrap())
        .collect();
    let reversed: Vec<Vec<u8>> = msgs.into_iter().rev().collect();
    g.deliver(&reversed).unwrap();
    let mut texts = g.alice_texts().unwrap();
    texts.sort();
    assert_eq!(texts, ["m1", "m2", "m3", "m4"]);
    assert_eq!(g.alice_alarms().unwrap(), Vec::<String>::new());
}

#[test]
fn a_dropped_message_is_reported_as_a_gap_and_later_messages_still_arrive() {
    let (_d, mut g) = group();
    let a = g.send(Who::Bob, "a").unwrap();
    let _dropped = g.send(Who::Bob, "b").unwrap();
    let c = g.send(Who::Bob, "c").unwrap();
    g.deliver(&[a]).unwrap();
    g.deliver(&[c]).unwrap();
    assert_eq!(g.alice_alarms().unwrap(), ["gap"]);
    let gap = g
        .alice_items()
        .unwrap()
        .into_iter()
        .find(|(k, _, _)| k == "gap")
        .unwrap();
    assert_eq!(gap.1, "bob");
    assert!(gap.2.unwrap().starts_with("1 message(s) from bob"));
    // The server behaves again: no further alarm, messages flow.
    let d = g.send(Who::Bob, "d").unwrap();
    g.deliver(&[d]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["a", "c", "d"]);
    assert_eq!(g.alice_alarms().unwrap(), ["gap"]);
}

#[test]
fn a_withheld_commit_is_reported_and_the_group_recovers_when_it_is_delivered() {
    let (_d, mut g) = group();
    let commit = g.commit_update(Who::Bob).unwrap();
    g.deliver_to_carol(&commit).unwrap();
    // Alice does not get the commit, then gets a message from the epoch it started.
    let lost = g.send(Who::Carol, "after the commit").unwrap();
    g.deliver(&[lost]).unwrap();
    assert_eq!(g.alice_alarms().unwrap(), ["gap"]);
    assert_eq!(g.alice_texts().unwrap(), Vec::<String>::new());
    // The server behaves: the commit arrives late, and the group works again for alice.
    g.deliver(&[commit]).unwrap();
    let next = g.send(Who::Carol, "back").unwrap();
    g.deliver(&[next]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["back"]);
    assert_eq!(g.alice_alarms().unwrap(), ["gap"]);
}

#[test]
fn a_fork_is_reported_and_messages_from_our_branch_still_arrive() {
    let (_d, mut g) = group();
    let epoch = g.alice_epoch().unwrap();
    // The server accepts bob's commit for alice and carol's rival commit for carol.
    let bobs = g.commit_update(Who::Bob).unwrap();
    let _carols = g.commit_update(Who::Carol).unwrap();
    g.deliver(&[bobs]).unwrap();
    assert_eq!(g.alice_epoch().unwrap(), epoch + 1);
    // Carol, on the other branch of the same epoch, writes: alice cannot read it and says why.
    let forked = g.send(Who::Carol, "from the other branch").unwrap();
    g.deliver(&[forked]).unwrap();
    assert_eq!(g.alice_alarms().unwrap(), ["fork"]);
    let ok = g.send(Who::Bob, "same branch").unwrap();
    g.deliver(&[ok]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["same branch"]);
    assert_eq!(g.alice_alarms().unwrap(), ["fork"]);
}

#[test]
fn an_external_commit_is_refused_even_with_a_leaked_group_info() {
    let (_d, mut g) = group();
    let epoch = g.alice_epoch().unwrap();
    let MlsMessageBodyIn::GroupInfo(info) =
        MlsMessageIn::tls_deserialize_exact(g.leaked_group_info().unwrap())
            .unwrap()
            .extract()
    else {
        panic!("a GroupInfo was exported");
    };
    let (provider, signer, cred) = outsider("mallory");
    // openmls itself would accept this commit (it is valid MLS): the refusal is ours.
    #[allow(deprecated)]
    let (_, commit, _) = MlsGroup::join_by_external_commit(
        &provider,
        &signer,
        None,
        info,
        &MlsGroupJoinConfig::default(),
        None,
        None,
        &[],
        cred,
    )
    .unwrap();
    g.deliver(&[commit.tls_serialize_detached().unwrap()])
        .unwrap();
    assert_eq!(g.alice_members().unwrap(), ["alice", "bob", "carol"]);
    assert_eq!(g.alice_epoch().unwrap(), epoch);
    // The group goes on.
    let m = g.send(Who::Bob, "still us").unwrap();
    g.deliver(&[m]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["still us"]);
}

#[test]
fn an_external_join_proposal_changes_nothing() {
    let (_d, mut g) = group();
    let epoch = g.alice_epoch().unwrap();
    let (provider, signer, cred) = outsider("mallory");
    let kp = KeyPackage::builder()
        .build(SUITE, &provider, &signer, cred)
        .unwrap()
        .key_package()
        .clone();
    let proposal = JoinProposal::new::<<OpenMlsRustCrypto as OpenMlsProvider>::StorageProvider>(
        kp,
        GroupId::from_slice(g.group_id()),
        GroupEpoch::from(epoch),
        &signer,
    )
    .unwrap();
    g.deliver(&[proposal.tls_serialize_detached().unwrap()])
        .unwrap();
    // Even when a member later commits, mallory is not in the group.
    let c = g.commit_update(Who::Bob).unwrap();
    g.deliver(&[c]).unwrap();
    assert_eq!(g.alice_members().unwrap(), ["alice", "bob", "carol"]);
}

#[test]
fn a_forged_add_by_a_non_member_is_not_accepted() {
    let (_d, mut g) = group();
    let epoch = g.alice_epoch().unwrap();
    // Mallory builds her own group under the same id, brings it to alice's epoch, and adds
    // dave: once as a plaintext commit, once encrypted under her own keys.
    for policy in [
        PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
        PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
    ] {
        let (provider, signer, cred) = outsider("mallory");
        let (dave_p, dave_s, dave_c) = outsider("dave");
        let dave_kp = KeyPackage::builder()
            .build(SUITE, &dave_p, &dave_s, dave_c)
            .unwrap()
            .key_package()
            .clone();
        let mut fake = MlsGroup::builder()
            .with_group_id(GroupId::from_slice(g.group_id()))
            .ciphersuite(SUITE)
            .with_wire_format_policy(policy)
            .build(&provider, &signer, cred)
            .unwrap();
        while fake.epoch().as_u64() < epoch {
            fake.self_update(&provider, &signer, LeafNodeParameters::default())
                .unwrap();
            fake.merge_pending_commit(&provider).unwrap();
        }
        let (commit, _, _) = fake.add_members(&provider, &signer, &[dave_kp]).unwrap();
        g.deliver(&[commit.tls_serialize_detached().unwrap()])
            .unwrap();
        assert_eq!(g.alice_members().unwrap(), ["alice", "bob", "carol"]);
        assert_eq!(g.alice_epoch().unwrap(), epoch);
    }
    let m = g.send(Who::Bob, "still us").unwrap();
    g.deliver(&[m]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["still us"]);
}

#[test]
fn garbage_and_mangled_messages_are_skipped_without_harm() {
    let (_d, mut g) = group();
    let good = g.send(Who::Bob, "good").unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        good[..good.len() / 2].to_vec(),
        flipped,
        b"not mls at all".to_vec(),
    ];
    g.deliver(&garbage).unwrap();
    // A payload that decrypts but is not our JSON is skipped too.
    let raw = g.send_raw(Who::Bob, b"{\"id\":1").unwrap();
    g.deliver(&[raw]).unwrap();
    // The mangled copy was the same ratchet generation: the real one still decrypts.
    g.deliver(&[good]).unwrap();
    assert_eq!(g.alice_texts().unwrap(), ["good"]);
    assert_eq!(g.alice_members().unwrap(), ["alice", "bob", "carol"]);
}
