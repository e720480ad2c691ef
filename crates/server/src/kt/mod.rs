//! Key transparency: the username directory as an akd directory in the server's store, the
//! server's keys, epoch publication, and the proofs clients and auditors ask for.
//! Not for: the first-come-first-served rules of usernames (the `DirectoryStore` enforces them
//! before an entry is queued here) or wire framing (the service does it).
//!
//! **Publication.** `DirectoryStore::register_user` stores an entry and queues it
//! (`kt_pending`) in one transaction. [`Transparency::run_publisher`] publishes everything
//! queued as one akd epoch, signs the new root and records it while forgetting what it
//! published (one transaction), on demand ([`Transparency::publish_soon`], which a
//! registration awaits, so concurrent registrations share an epoch) and on a schedule.
//! Lookups and publication exclude each other (`epoch_lock` in this process, and
//! `TransparencyStore::epoch_lock` between nodes sharing a PostgreSQL database), so every
//! proof is against an epoch whose signed root is stored, and one node publishes at a time.
//! With a shared store nothing of the tree is cached: every proof reads the epoch the last
//! publishing node (any node) left.
//!
//! **Lookup answers** are kept per epoch (`LookupCache`): a proof for a name at an epoch
//! never changes, and when a large group forms every member looks up every other member, so
//! the same proofs are asked for hundreds of times within seconds.

pub mod codec;
pub mod keys;
pub mod storage;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akd::configuration::DomainLabel;
use akd::storage::StorageManager;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, Directory, EpochHash, HistoryParams};
use blindpost_wire::limits::MAX_HISTORY_VALUES;
use blindpost_wire::{SignedDirectoryEntry, SignedRoot, root_signature_message};
use ed25519_dalek::Signer;
use prost::Message as _;
use protobuf::Message as _;
use tokio::sync::{Notify, RwLock, watch};

use crate::store::{EpochRoot, StoreError, TransparencyStore};
pub use keys::{KeyError, ServerKeys};
pub use storage::AkdStorage;

/// akd's domain separation for blindpost (see `blindpost_wire::KT_DOMAIN_LABEL`).
#[derive(Clone, Copy, Debug)]
pub struct BlindpostLabel;

impl DomainLabel for BlindpostLabel {
    fn domain_label() -> &'static [u8] {
        blindpost_wire::KT_DOMAIN_LABEL
    }
}

/// The akd configuration server and clients share.
pub type KtConfig = akd::ExperimentalConfiguration<BlindpostLabel>;

/// The akd directory type the server runs.
pub type KtDirectory = Directory<KtConfig, AkdStorage, keys::VrfKey>;

/// Most queued registrations one epoch publishes. Bounds the epoch's append-only proof
/// (about 0.7 MB per 1,000 updates on 100,000 names, BENCHMARKS.md) well under the frame limit.
pub const MAX_EPOCH_UPDATES: usize = 2_000;

/// Most bytes of lookup answers kept for the current epoch; the cache starts over when full.
const LOOKUP_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// How long a registration waits for the epoch that publishes it.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// Why a key-directory operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KtError {
    /// A key file could not be read or written.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// akd failed.
    #[error("akd: {0}")]
    Akd(String),
    /// The label was never published.
    #[error("no such username in the directory")]
    NotFound,
    /// The epoch was never published.
    #[error("no such epoch")]
    NoEpoch,
    /// The publisher did not publish in time (or stopped).
    #[error("the directory did not publish in time")]
    NotPublished,
}

fn akd_err(e: akd::errors::AkdError) -> KtError {
    KtError::Akd(e.to_string())
}

/// The key-transparency directory of one server.
pub struct Transparency {
    directory: KtDirectory,
    store: Arc<dyn TransparencyStore>,
    keys: ServerKeys,
    /// Held for writing while an epoch is published and its root recorded; for reading while
    /// a proof is made.
    epoch_lock: RwLock<()>,
    /// Publication requests made so far.
    requested: AtomicU64,
    /// The request count the last successful publication covered.
    covered: watch::Sender<u64>,
    wake: Notify,
    lookups: Mutex<LookupCache>,
}

/// Lookup answers (the proof, or `None` for a name not in the directory) for one epoch.
/// Everything here is what any client may ask for; it only saves making the proof again.
#[derive(Default)]
struct LookupCache {
    epoch: u64,
    root: Option<SignedRoot>,
    answers: HashMap<String, Option<Vec<u8>>>,
    bytes: usize,
}

impl LookupCache {
    fn get(&self, epoch: u64, username: &str) -> Option<Result<(SignedRoot, Vec<u8>), KtError>> {
        if self.epoch != epoch {
            return None;
        }
        let root = self.root.clone()?;
        match self.answers.get(username)? {
            Some(proof) => Some(Ok((root, proof.clone()))),
            None => Some(Err(KtError::NotFound)),
        }
    }

    fn put(&mut self, root: &SignedRoot, username: &str, proof: Option<&[u8]>) {
        let size = username.len() + proof.map_or(0, <[u8]>::len);
        if self.epoch != root.epoch || self.bytes + size > LOOKUP_CACHE_BYTES {
            *self = Self {
                epoch: root.epoch,
                root: Some(root.clone()),
                ..Self::default()
            };
        }
        self.bytes += size;
        self.answers
            .insert(username.to_string(), proof.map(<[u8]>::to_vec));
    }
}

impl Transparency {
    /// Opens the directory over `store`, loading (or creating, mode 0600) the server's keys in
    /// `data_dir`, and signs the current epoch's root if it is not signed yet (the empty
    /// directory's epoch 0 on first start, or an epoch whose signing a crash interrupted).
    pub async fn open(store: Arc<dyn TransparencyStore>, data_dir: &Path) -> Result<Self, KtError> {
        // Every node of a shared store starts here at once: one creates the directory (and
        // signs epoch 0) while the others wait.
        let _nodes = store.epoch_lock(true).await?;
        let (keys, manager) = match store.shared_keys(ServerKeys::fresh()?).await? {
            // Several nodes: another node's publication changes the tree under us, so no node
            // caches it (ARCHITECTURE.md, "Key transparency across nodes").
            Some(stored) => (
                ServerKeys::from_stored(&stored)?,
                StorageManager::new_no_cache(AkdStorage::new(Arc::clone(&store))),
            ),
            // One node: five minutes of caching, at most 256 MiB; the tree's top stays in memory.
            None => (
                ServerKeys::load_or_create(data_dir)?,
                StorageManager::new(
                    AkdStorage::new(Arc::clone(&store)),
                    Some(Duration::from_secs(300)),
                    Some(256 * 1024 * 1024),
                    Some(Duration::from_secs(60)),
                ),
            ),
        };
        let directory = Directory::new(manager, keys.vrf(), AzksParallelismConfig::default())
            .await
            .map_err(akd_err)?;
        let (covered, _) = watch::channel(0);
        let kt = Self {
            directory,
            store,
            keys,
            epoch_lock: RwLock::new(()),
            requested: AtomicU64::new(0),
            covered,
            wake: Notify::new(),
            lookups: Mutex::new(LookupCache::default()),
        };
        let EpochHash(epoch, hash) = kt.directory.get_epoch_hash().await.map_err(akd_err)?;
        if kt.store.epoch_root(epoch).await?.is_none() {
            kt.store
                .finish_epoch(Some(kt.sign(epoch, hash)), Vec::new())
                .await?;
        }
        Ok(kt)
    }

    /// The server's Ed25519 public key (what clients pin).
    pub fn server_key(&self) -> [u8; 32] {
        self.keys.signing().verifying_key().to_bytes()
    }

    fn sign(&self, epoch: u64, root_hash: [u8; 32]) -> EpochRoot {
        let message = root_signature_message(epoch, &root_hash, &self.keys.vrf_public());
        EpochRoot {
            epoch,
            root_hash,
            signature: self.keys.signing().sign(&message).to_bytes().to_vec(),
        }
    }

    fn to_wire(&self, root: EpochRoot) -> SignedRoot {
        SignedRoot {
            epoch: root.epoch,
            root_hash: root.root_hash.to_vec(),
            vrf_public_key: self.keys.vrf_public().to_vec(),
            server_key: self.server_key().to_vec(),
            signature: root.signature,
        }
    }

    async fn signed_root(&self, epoch: u64) -> Result<SignedRoot, KtError> {
        let root = self
            .store
            .epoch_root(epoch)
            .await?
            .ok_or(KtError::NoEpoch)?;
        Ok(self.to_wire(root))
    }

    /// Publishes every queued registration as one epoch (nothing if none is queued) and
    /// returns the new epoch.
    pub async fn publish_pending(&self) -> Result<Option<u64>, KtError> {
        let _epoch = self.epoch_lock.write().await;
        let _nodes = self.store.epoch_lock(true).await?;
        let pending = self.store.pending_entries(MAX_EPOCH_UPDATES).await?;
        if pending.is_empty() {
            return Ok(None);
        }
        // akd refuses duplicate labels in one epoch: the highest version of each name wins.
        let mut latest: HashMap<&str, &crate::store::PendingEntry> = HashMap::new();
        for p in &pending {
            let keep = latest
                .get(p.username.as_str())
                .is_none_or(|q| q.version < p.version);
            if keep {
                latest.insert(&p.username, p);
            }
        }
        let updates = latest
            .values()
            .map(|p| {
                let value = SignedDirectoryEntry {
                    entry: p.entry.clone(),
                    signature: p.signature.clone(),
                }
                .encode_to_vec();
                (AkdLabel(p.username.as_bytes().to_vec()), AkdValue(value))
            })
            .collect();
        let EpochHash(before, _) = self.directory.get_epoch_hash().await.map_err(akd_err)?;
        let EpochHash(epoch, hash) = self.directory.publish(updates).await.map_err(akd_err)?;
        let published = pending
            .iter()
            .map(|p| (p.username.clone(), p.version))
            .collect();
        // akd makes no epoch when every value is unchanged (e.g. one republished after a
        // crash): then there is no new root, only the queue to clear.
        let new_epoch = epoch > before;
        let root = new_epoch.then(|| self.sign(epoch, hash));
        self.store.finish_epoch(root, published).await?;
        if !new_epoch {
            return Ok(None);
        }
        tracing::info!(epoch, updates = latest.len(), "published directory epoch");
        Ok(Some(epoch))
    }

    /// Asks the publisher for an epoch covering everything queued so far and waits for it.
    pub async fn publish_soon(&self) -> Result<(), KtError> {
        let wanted = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = self.covered.subscribe();
        self.wake.notify_one();
        match tokio::time::timeout(PUBLISH_WAIT, covered.wait_for(|c| *c >= wanted)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KtError::NotPublished),
        }
    }

    /// Publishes on request and every `interval`, until `stop` is set. A failed publication
    /// is retried (its registrations stay queued).
    pub async fn run_publisher(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let target = self.requested.load(Ordering::SeqCst);
            match self.publish_pending().await {
                Ok(_) => {
                    self.covered.send_replace(target);
                }
                Err(e) => {
                    tracing::error!(error = %e, "directory publication failed; will retry");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = crate::stopped(&mut stop) => return,
                    }
                }
            }
            if self.requested.load(Ordering::SeqCst) > target {
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
                () = crate::stopped(&mut stop) => return,
            }
        }
    }

    /// akd's lookup proof for `username` (protobuf-encoded) and the signed root it is for.
    pub async fn lookup(&self, username: &str) -> Result<(SignedRoot, Vec<u8>), KtError> {
        let _epoch = self.epoch_lock.read().await;
        let _nodes = self.store.epoch_lock(false).await?;
        let EpochHash(current, _) = self.directory.get_epoch_hash().await.map_err(akd_err)?;
        if let Some(answer) = self.cached_lookups().get(current, username) {
            return answer;
        }
        let label = AkdLabel(username.as_bytes().to_vec());
        let (proof, EpochHash(epoch, _)) = match self.directory.lookup(label).await {
            Ok(found) => found,
            Err(akd::errors::AkdError::Storage(akd::errors::StorageError::NotFound(_))) => {
                let root = self.signed_root(current).await?;
                self.cached_lookups().put(&root, username, None);
                return Err(KtError::NotFound);
            }
            Err(e) => return Err(akd_err(e)),
        };
        let bytes = akd::proto::specs::types::LookupProof::from(&proof)
            .write_to_bytes()
            .map_err(|e| KtError::Akd(e.to_string()))?;
        let root = self.signed_root(epoch).await?;
        self.cached_lookups().put(&root, username, Some(&bytes));
        Ok((root, bytes))
    }

    fn cached_lookups(&self) -> std::sync::MutexGuard<'_, LookupCache> {
        // A panic while holding this lock leaves at worst a partly filled map of valid answers.
        self.lookups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// akd's key-history proof for `username` (its most recent values) and the signed root.
    pub async fn history(&self, username: &str) -> Result<(SignedRoot, Vec<u8>), KtError> {
        let _epoch = self.epoch_lock.read().await;
        let _nodes = self.store.epoch_lock(false).await?;
        let label = AkdLabel(username.as_bytes().to_vec());
        let params = HistoryParams::MostRecent(MAX_HISTORY_VALUES);
        let (proof, EpochHash(epoch, _)) = match self.directory.key_history(&label, params).await {
            Ok(found) => found,
            Err(akd::errors::AkdError::Storage(akd::errors::StorageError::NotFound(_))) => {
                return Err(KtError::NotFound);
            }
            Err(e) => return Err(akd_err(e)),
        };
        let bytes = akd::proto::specs::types::HistoryProof::from(&proof)
            .write_to_bytes()
            .map_err(|e| KtError::Akd(e.to_string()))?;
        Ok((self.signed_root(epoch).await?, bytes))
    }

    /// The append-only proof from `epoch - 1` to `epoch`, with both signed roots.
    pub async fn audit(&self, epoch: u64) -> Result<(SignedRoot, SignedRoot, Vec<u8>), KtError> {
        let _epoch = self.epoch_lock.read().await;
        let _nodes = self.store.epoch_lock(false).await?;
        let start = epoch.checked_sub(1).ok_or(KtError::NoEpoch)?;
        let end_root = self.signed_root(epoch).await?;
        let start_root = self.signed_root(start).await?;
        let proof = self.directory.audit(start, epoch).await.map_err(akd_err)?;
        let single = proof
            .proofs
            .first()
            .ok_or_else(|| KtError::Akd("empty append-only proof".into()))?;
        let bytes = akd::proto::specs::types::SingleAppendOnlyProof::from(single)
            .write_to_bytes()
            .map_err(|e| KtError::Akd(e.to_string()))?;
        Ok((start_root, end_root, bytes))
    }

    /// The latest signed root.
    pub async fn latest_root(&self) -> Result<SignedRoot, KtError> {
        let _epoch = self.epoch_lock.read().await;
        let _nodes = self.store.epoch_lock(false).await?;
        let root = self.store.latest_root().await?.ok_or(KtError::NoEpoch)?;
        Ok(self.to_wire(root))
    }
}
