//! What the load tool (`blindpost-bench`) needs from a real client, and nothing else: the
//! route material of a chat (so the tool can post and receive on the wire itself during its
//! measured window), a pool of application messages encrypted ahead of time (with the ratchet
//! steps persisted, exactly as [`Client::send`] would), and a check that received ciphertexts
//! decrypt through the real receive path.
//!
//! Not for applications: a pre-encrypted message posted later than its epoch is refused by
//! the server, and posting it twice makes receivers drop the replay. Nothing here changes how
//! the client behaves otherwise.

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;

use crate::error::{Error, Result};
use crate::mls;
use crate::payload::{AppMessage, Body};
use crate::{Client, now_secs, random_bytes};

/// Everything needed to post to a chat and to receive from it on the wire, for the chat's
/// current epoch.
#[derive(Debug, Clone)]
pub struct BenchRoute {
    /// The MLS group id (the server's group id).
    pub group_id: Vec<u8>,
    /// The group's current epoch.
    pub epoch: u64,
    /// The current epoch's posting token.
    pub posting_token: Vec<u8>,
    /// Our delivery queue for this chat.
    pub queue_id: Vec<u8>,
    /// That queue's receive secret.
    pub receive_secret: Vec<u8>,
    /// The highest sequence number of that queue already processed locally.
    pub last_seq: u64,
}

impl Client {
    /// The route material of a chat (`@user`, `#id-prefix` or a group name) at its current
    /// epoch.
    pub fn bench_route(&self, target: &str) -> Result<BenchRoute> {
        let gid = self.resolve(target)?;
        let provider = self.store.provider();
        let group = self
            .store
            .take_group(&GroupId::from_slice(&gid))?
            .ok_or_else(|| Error::NotAMember(target.to_string()))?;
        let queue_id = mls::leaf_route(&group, group.own_leaf_index())
            .ok_or_else(|| Error::Mls("our leaf names no delivery queue".into()))?;
        let queue = self
            .store
            .queues()?
            .into_iter()
            .find(|q| q.id == queue_id)
            .ok_or_else(|| Error::Mls("our delivery queue is not in the profile".into()))?;
        let route = BenchRoute {
            group_id: gid,
            epoch: group.epoch().as_u64(),
            posting_token: mls::posting_token(&group, &provider)?,
            last_seq: self.store.queue_last_seq(&queue_id)?.unwrap_or(0),
            queue_id,
            receive_secret: queue.receive_secret,
        };
        self.store.keep_group(group);
        Ok(route)
    }

    /// Encrypt `n` text messages of `text_len` bytes each for a chat, in order, and return
    /// the serialized MLS messages (what a `Post` carries). The ratchet steps are committed to
    /// the profile in one transaction before this returns, as for a real send.
    pub fn bench_encrypt(&self, target: &str, n: usize, text_len: usize) -> Result<Vec<Vec<u8>>> {
        let gid = self.resolve(target)?;
        let profile = self.load_profile()?;
        self.store.tx(|s| {
            let provider = s.provider();
            let mut group = s
                .take_group(&GroupId::from_slice(&gid))?
                .ok_or_else(|| Error::NotAMember(target.to_string()))?;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                // Sealed as a real send is (with the epoch view); not counted (ctr 0), since
                // the bench posts outside the client's own send counter.
                let mut app = AppMessage {
                    id: hex::encode(random_bytes::<16>()),
                    sent_at: now_secs(),
                    body: Body::Text {
                        text: "x".repeat(text_len),
                    },
                    auth: None,
                    ctr: 0,
                    root: None,
                };
                let msg = crate::ops::seal_app(&mut group, &provider, &profile.signer, &mut app)?;
                out.push(msg.tls_serialize_detached().map_err(Error::mls)?);
            }
            s.keep_group(group);
            Ok(out)
        })
    }

    /// Process received queue payloads of one chat through the real receive path (decrypt,
    /// verify, store the item) in one transaction, in the order given (ratchet generations must
    /// not go backwards). Returns how many became new text messages of that chat; a payload
    /// that does not decrypt or verify counts as not opened.
    pub fn bench_open(&self, target: &str, payloads: &[Vec<u8>]) -> Result<usize> {
        let gid = self.resolve(target)?;
        let me = self.username()?.ok_or(Error::NotSetUp)?;
        let count = |s: &crate::store::Store| -> Result<usize> {
            Ok(s.history(&gid)?
                .iter()
                .filter(|i| i.kind == "message")
                .count())
        };
        self.store.tx(|s| {
            let before = count(s)?;
            for p in payloads {
                if let Err(e) = s.savepoint(|s| crate::sync::process_one(s, &me, p)) {
                    tracing::warn!(error = %e, "a benchmark payload did not open");
                }
            }
            Ok(count(s)? - before)
        })
    }
}

/// A profile's local store opened on its own, for benchmarks that run openmls directly against
/// the client's real persistence (SQLite in WAL mode with `synchronous=FULL`, openmls's state
/// through `openmls_sqlite_storage` with the client's codec, groups kept in memory between
/// operations as the client keeps them), one transaction per operation as the client does.
/// Not a client: it holds no profile, server or chats.
pub struct BenchStore {
    store: crate::store::Store,
}

/// The openmls provider over a [`BenchStore`].
pub type BenchProvider<'c> = crate::store::Provider<'c>;

impl BenchStore {
    /// Open (creating if needed) a store in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        Ok(Self {
            store: crate::store::Store::open(dir)?,
        })
    }

    /// Run `f` with the provider inside one transaction, committed when it returns `Ok`.
    pub fn tx<T>(&self, f: impl FnOnce(&BenchProvider<'_>) -> Result<T>) -> Result<T> {
        self.store.tx(|s| f(&s.provider()))
    }

    /// Run `f` on a stored group inside one transaction, committed when it returns `Ok`, the
    /// group taken from memory and kept there as the client does (loaded from the store only
    /// when it is not in memory or another connection changed the store).
    pub fn with_group<T>(
        &self,
        gid: &GroupId,
        f: impl FnOnce(&BenchProvider<'_>, &mut MlsGroup) -> Result<T>,
    ) -> Result<T> {
        self.store.tx(|s| {
            let mut group = s
                .take_group(gid)?
                .ok_or_else(|| Error::Mls("group not stored".into()))?;
            let out = f(&s.provider(), &mut group)?;
            s.keep_group(group);
            Ok(out)
        })
    }
}
