//! Entry points for the fuzz targets (`fuzz/`) and the hostile-server tests: each runs the
//! very code the client runs on bytes from outside (directory entries, key packages, padded
//! application payloads, queued MLS messages, packed values read from the profile's file), and
//! [`LiveGroup`] is a real three-member group whose member "alice" processes whatever it is
//! handed, as a receive would. Hidden from the documented API; not for front ends.

use std::path::Path;

use blindpost_wire::{QueueMessage, SignedDirectoryEntry};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use prost::Message as _;

use crate::error::{Error, Result};
use crate::mls::{self, Suite};
use crate::payload::{AppMessage, Body};
use crate::store::Store;

/// Check a protobuf-encoded signed directory entry as a lookup of `username` does.
pub fn directory_entry(username: &str, bytes: &[u8]) -> Result<()> {
    let signed = SignedDirectoryEntry::decode(bytes)
        .map_err(|_| Error::BadServerReply("malformed signed entry".into()))?;
    crate::ops::verify_entry(username, &signed).map(|_| ())
}

/// Parse a decrypted, padded application payload.
pub fn app_payload(bytes: &[u8]) -> Option<AppMessage> {
    AppMessage::from_padded_bytes(bytes)
}

/// Pack a value as the profile store does before writing it (`None`: stored as it is).
pub fn nil_pack(raw: &[u8]) -> Option<Vec<u8>> {
    crate::nilpack::pack(raw)
}

/// Unpack a stored value as the profile store does when it starts with the packed marker;
/// `None` for a damaged one.
pub fn nil_unpack(packed: &[u8]) -> Option<Vec<u8>> {
    crate::nilpack::unpack(packed).ok()
}

/// Checks key packages as ones claimed from the server are checked (against a fixed
/// signature key, so the parsing and verification paths are what runs).
pub struct KeyPackageChecker(Store);

impl KeyPackageChecker {
    /// A checker with its store in `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        Ok(Self(Store::open(dir)?))
    }

    /// Check `bytes` as a key package of "bob".
    pub fn check(&self, bytes: &[u8]) -> Result<()> {
        mls::check_key_package(&self.0.provider(), bytes, Suite::Classic, "bob", &[0; 32])
            .map(|_| ())
    }
}

/// Which sending member of a [`LiveGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The group's creator.
    Bob,
    /// The third member.
    Carol,
}

/// One of our clients, reduced to its MLS state and store, on the classic suite with our
/// configuration: what the interoperability test pits against another MLS implementation.
pub struct Peer {
    name: &'static str,
    store: Store,
    signer: SignatureKeyPair,
    ctr: u64,
}

/// The queue id every [`Peer`] reads (one per store).
const PEER_QUEUE: [u8; 16] = [1; 16];

impl Peer {
    /// A new member named `name`, with its store under `dir`.
    pub fn new(dir: &Path, name: &'static str) -> Result<Self> {
        let store = Store::open(&dir.join(name))?;
        let signer = SignatureKeyPair::new(Suite::Classic.ciphersuite().signature_algorithm())
            .map_err(Error::mls)?;
        signer
            .store(store.provider().storage())
            .map_err(Error::mls)?;
        store.set("username", name.as_bytes())?;
        store.add_queue(&PEER_QUEUE, &[0; 32], &[0; 32])?;
        Ok(Self {
            name,
            store,
            signer,
            ctr: 0,
        })
    }

    /// The public signature key of this member's leaf.
    pub fn signature_key(&self) -> Vec<u8> {
        self.signer.public().to_vec()
    }

    /// A key package as we publish it (route and invite extensions), as bare TLS bytes.
    pub fn key_package_bytes(&self, queue: u8) -> Result<Vec<u8>> {
        mls::create_key_package(
            &self.store.provider(),
            &self.signer,
            self.credential(),
            Suite::Classic,
            &[queue; 16],
            &[queue; 32],
            false,
        )
    }

    /// Create a group with our group configuration.
    pub fn create_group(&self, gid: &[u8]) -> Result<()> {
        mls::create_group(
            &self.store.provider(),
            &self.signer,
            self.credential(),
            Suite::Classic,
            gid,
            &PEER_QUEUE,
        )?;
        self.store.ensure_chat(gid, None, 0)
    }

    /// Check `key_package` (bare TLS bytes) as a claimed one of `username` under
    /// `signature_key`, add it, apply the commit; returns (commit, Welcome).
    pub fn add(
        &self,
        gid: &[u8],
        key_package: &[u8],
        username: &str,
        signature_key: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let provider = self.store.provider();
        let checked = mls::check_key_package(
            &provider,
            key_package,
            Suite::Classic,
            username,
            signature_key,
        )?;
        let mut group = self.group(&GroupId::from_slice(gid))?;
        let (commit, welcome, _) = group
            .add_members(&provider, &self.signer, &[checked.key_package])
            .map_err(Error::mls)?;
        group.merge_pending_commit(&provider).map_err(Error::mls)?;
        Ok((
            commit.tls_serialize_detached().map_err(Error::mls)?,
            welcome.tls_serialize_detached().map_err(Error::mls)?,
        ))
    }

    /// Process one queued message exactly as a receive does.
    pub fn receive(&self, payload: &[u8]) -> Result<()> {
        let seq = self.store.queue_last_seq(&PEER_QUEUE)?.unwrap_or(0) + 1;
        let m = QueueMessage {
            seq,
            payload: payload.to_vec(),
        };
        crate::sync::process_messages(&self.store, self.name, &PEER_QUEUE, &[m])
    }

    /// An application message carrying `text`, exactly as a client sends it.
    pub fn send(&mut self, gid: &[u8], text: &str) -> Result<Vec<u8>> {
        self.ctr += 1;
        let mut app = AppMessage {
            id: hex::encode(crate::random_bytes::<16>()),
            sent_at: 0,
            body: Body::Text {
                text: text.to_string(),
            },
            auth: None,
            ctr: self.ctr,
            root: None,
        };
        let provider = self.store.provider();
        let mut group = self.group(&GroupId::from_slice(gid))?;
        let out = crate::ops::seal_app(&mut group, &provider, &self.signer, &mut app)?;
        out.tls_serialize_detached().map_err(Error::mls)
    }

    /// A commit updating our own leaf, applied at once.
    pub fn commit_update(&self, gid: &[u8]) -> Result<Vec<u8>> {
        let provider = self.store.provider();
        let mut group = self.group(&GroupId::from_slice(gid))?;
        let bundle = group
            .self_update(&provider, &self.signer, LeafNodeParameters::default())
            .map_err(Error::mls)?;
        group.merge_pending_commit(&provider).map_err(Error::mls)?;
        bundle
            .into_commit()
            .tls_serialize_detached()
            .map_err(Error::mls)
    }

    /// The group's current epoch and epoch authenticator in our view.
    pub fn epoch_authenticator(&self, gid: &[u8]) -> Result<(u64, Vec<u8>)> {
        let group = self.group(&GroupId::from_slice(gid))?;
        Ok((
            group.epoch().as_u64(),
            group.epoch_authenticator().as_slice().to_vec(),
        ))
    }

    /// The members in our view, sorted.
    pub fn members(&self, gid: &[u8]) -> Result<Vec<String>> {
        let group = self.group(&GroupId::from_slice(gid))?;
        let mut m: Vec<String> = group
            .members()
            .map(|m| mls::identity(&m.credential))
            .collect();
        m.sort();
        Ok(m)
    }

    /// Every item shown to this member in a group, as (kind, sender, text).
    pub fn items(&self, gid: &[u8]) -> Result<Vec<(String, String, Option<String>)>> {
        Ok(self
            .store
            .history(gid)?
            .into_iter()
            .map(|r| (r.kind, r.sender, r.text))
            .collect())
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.name.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    fn key_package(&self, queue: u8) -> Result<KeyPackage> {
        let provider = self.store.provider();
        let bytes = mls::create_key_package(
            &provider,
            &self.signer,
            self.credential(),
            Suite::Classic,
            &[queue; 16],
            &[queue; 32],
            false,
        )?;
        Ok(mls::check_key_package(
            &provider,
            &bytes,
            Suite::Classic,
            self.name,
            self.signer.public(),
        )?
        .key_package)
    }

    fn group(&self, gid: &GroupId) -> Result<MlsGroup> {
        self.store
            .take_group(gid)?
            .ok_or_else(|| Error::Mls("no such group".into()))
    }
}

/// A real group of alice, bob and carol on the classic suite with our configuration, each in
/// its own store under a directory. Alice is the receiver under test.
pub struct LiveGroup {
    alice: Peer,
    bob: Peer,
    carol: Peer,
    gid: GroupId,
    queue: Vec<u8>,
    next_seq: u64,
    welcome: Vec<u8>,
}

impl LiveGroup {
    /// Bob creates the group and adds alice and carol, who join from the Welcome.
    pub fn new(dir: &Path) -> Result<Self> {
        let alice = Peer::new(dir, "alice")?;
        let bob = Peer::new(dir, "bob")?;
        let carol = Peer::new(dir, "carol")?;
        let queue = PEER_QUEUE.to_vec();
        let kps = vec![alice.key_package(1)?, carol.key_package(3)?];
        let gid = GroupId::from_slice(&[7; 32]);
        let provider = bob.store.provider();
        let mut group = mls::create_group(
            &provider,
            &bob.signer,
            bob.credential(),
            Suite::Classic,
            gid.as_slice(),
            &[2; 16],
        )?;
        let (_, welcome, _) = group
            .add_members(&provider, &bob.signer, &kps)
            .map_err(Error::mls)?;
        group.merge_pending_commit(&provider).map_err(Error::mls)?;
        let welcome = welcome.tls_serialize_detached().map_err(Error::mls)?;
        let mut live = Self {
            alice,
            bob,
            carol,
            gid,
            queue,
            next_seq: 0,
            welcome: welcome.clone(),
        };
        live.deliver(std::slice::from_ref(&welcome))?;
        live.deliver_to_carol(&welcome)?;
        Ok(live)
    }

    fn member(&mut self, who: Who) -> &mut Peer {
        match who {
            Who::Bob => &mut self.bob,
            Who::Carol => &mut self.carol,
        }
    }

    /// Hand alice one batch of queued messages, with fresh sequence numbers in this order.
    pub fn deliver(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        let messages: Vec<QueueMessage> = payloads
            .iter()
            .map(|p| {
                self.next_seq += 1;
                QueueMessage {
                    seq: self.next_seq,
                    payload: p.clone(),
                }
            })
            .collect();
        crate::sync::process_messages(&self.alice.store, "alice", &self.queue, &messages)
    }

    /// Hand carol one message (she keeps up with the group as alice's peer).
    pub fn deliver_to_carol(&mut self, payload: &[u8]) -> Result<()> {
        let seq = self.carol.store.queue_last_seq(&self.queue)?.unwrap_or(0) + 1;
        let m = QueueMessage {
            seq,
            payload: payload.to_vec(),
        };
        crate::sync::process_messages(&self.carol.store, "carol", &self.queue, &[m])
    }

    /// An application message from `who` carrying `text`, exactly as a client sends it.
    pub fn send(&mut self, who: Who, text: &str) -> Result<Vec<u8>> {
        let gid = self.gid.clone();
        let m = self.member(who);
        m.ctr += 1;
        let mut app = AppMessage {
            id: hex::encode(crate::random_bytes::<16>()),
            sent_at: 0,
            body: Body::Text {
                text: text.to_string(),
            },
            auth: None,
            ctr: m.ctr,
            root: None,
        };
        let provider = m.store.provider();
        let mut group = m.group(&gid)?;
        let out = crate::ops::seal_app(&mut group, &provider, &m.signer, &mut app)?;
        out.tls_serialize_detached().map_err(Error::mls)
    }

    /// An application message from `who` whose decrypted payload is `plaintext` verbatim.
    pub fn send_raw(&mut self, who: Who, plaintext: &[u8]) -> Result<Vec<u8>> {
        let gid = self.gid.clone();
        let m = self.member(who);
        let provider = m.store.provider();
        let mut group = m.group(&gid)?;
        let out = group
            .create_message(&provider, &m.signer, plaintext)
            .map_err(Error::mls)?;
        out.tls_serialize_detached().map_err(Error::mls)
    }

    /// A commit by `who` updating its own leaf, applied at once on its side (so a commit not
    /// delivered to the others forks them off).
    pub fn commit_update(&mut self, who: Who) -> Result<Vec<u8>> {
        let gid = self.gid.clone();
        let m = self.member(who);
        let provider = m.store.provider();
        let mut group = m.group(&gid)?;
        let bundle = group
            .self_update(&provider, &m.signer, LeafNodeParameters::default())
            .map_err(Error::mls)?;
        group.merge_pending_commit(&provider).map_err(Error::mls)?;
        bundle
            .into_commit()
            .tls_serialize_detached()
            .map_err(Error::mls)
    }

    /// The group's current GroupInfo with its ratchet tree, signed by bob: what an outsider
    /// would need for an external commit, as if it had leaked.
    pub fn leaked_group_info(&self) -> Result<Vec<u8>> {
        let group = self.bob.group(&self.gid)?;
        group
            .export_group_info(self.bob.store.provider().crypto(), &self.bob.signer, true)
            .map_err(Error::mls)?
            .tls_serialize_detached()
            .map_err(Error::mls)
    }

    /// The Welcome alice and carol joined from (for replaying it).
    pub fn welcome(&self) -> Vec<u8> {
        self.welcome.clone()
    }

    /// The group id.
    pub fn group_id(&self) -> &[u8] {
        self.gid.as_slice()
    }

    /// Alice's epoch of the group.
    pub fn alice_epoch(&self) -> Result<u64> {
        Ok(self.alice.group(&self.gid)?.epoch().as_u64())
    }

    /// The members in alice's view.
    pub fn alice_members(&self) -> Result<Vec<String>> {
        let group = self.alice.group(&self.gid)?;
        let mut m: Vec<String> = group
            .members()
            .map(|m| mls::identity(&m.credential))
            .collect();
        m.sort();
        Ok(m)
    }

    /// Everything alice has been shown, as (kind, sender, text).
    pub fn alice_items(&self) -> Result<Vec<(String, String, Option<String>)>> {
        Ok(self
            .alice
            .store
            .history(self.gid.as_slice())?
            .into_iter()
            .map(|r| (r.kind, r.sender, r.text))
            .collect())
    }

    /// The texts of alice's message items, in the order stored.
    pub fn alice_texts(&self) -> Result<Vec<String>> {
        Ok(self
            .alice_items()?
            .into_iter()
            .filter(|(k, _, _)| k == "message")
            .filter_map(|(_, _, t)| t)
            .collect())
    }

    /// The kinds of alice's alarm items (`gap`, `fork`), in the order raised.
    pub fn alice_alarms(&self) -> Result<Vec<String>> {
        Ok(self
            .alice_items()?
            .into_iter()
            .map(|(k, _, _)| k)
            .filter(|k| k == "gap" || k == "fork")
            .collect())
    }

    /// Parse bytes as an MLS message (for tests that rewrite one).
    pub fn parses_as_mls(bytes: &[u8]) -> bool {
        MlsMessageIn::tls_deserialize_exact(bytes).is_ok()
    }
}
