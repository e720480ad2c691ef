//! The storage seam: the [`Store`] and [`DirectoryStore`] traits every backend implements,
//! the records they take and return, and [`StoreError`]. Not for: validation of client input
//! (the service does it before calling a store) or anything backend-specific; no backend's
//! types appear here, so a PostgreSQL backend can implement the same traits.
//!
//! Contract of every backend:
//! - each method is atomic: all of its effects commit together, or none do;
//! - a method returns success only after its effects are durable;
//! - checks that must be atomic with their write (epoch compare-and-set, credential checks of
//!   a commit or post, one-time key-package claims) happen inside the method and fail with
//!   [`StoreError::Refused`];
//! - writes record the current [`Day`] of the backend's clock, never a finer time.
//!
//! Backends: [`sqlite`] (embedded, the default) and [`postgres`] (shared by many nodes).

pub mod postgres;
pub mod sqlite;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::Refusal;
use crate::types::{BoxId, Day, GroupId, MessageId, QueueId, SecretHash};

/// Smallest payload stored once for several queues (`payloads`); a smaller one is copied into
/// each queue's message row. Sharing costs every acknowledgement of such a row an update (and
/// the last one a delete) of the `payloads` row; with 674-byte group messages to 999 queues
/// that made fan-out slower than copying (BENCHMARKS.md), while commits and Welcomes of
/// hundreds of KB are what copies made expensive.
pub const SHARE_FROM_BYTES: usize = 4096;

/// Message ids a group's row holds (`groups.recent_posts`) before they move, together, to
/// one row of `posted_chunks`. Why: ids are random, so writing each post's id to a table keyed
/// by it wrote (and, once the table outgrew the cache, read) a random B-tree page per post, the
/// largest cost of a post; the group row is read and written by every post anyway, and a
/// chunk is appended at the end of its group's key range (ARCHITECTURE.md, "Idempotency keys").
pub const RECENT_POSTS: usize = 32;

/// How many of a group's latest chunks of moved ids (`posted_chunks`) a resend is looked up
/// in: its last 32,768 posts (with the [`RECENT_POSTS`] in its row), within retention. Why a
/// bound: a chunk is found by scanning the group's range, so an unbounded lookup cost
/// O(the group's traffic over the retention period) per resend, and any member (or a client
/// that never sets `Post.fresh_id`) could make every post cost that. A resend of an older
/// post is stored again, which the group's members drop as a repeated ciphertext.
pub const RESEND_CHUNKS: i64 = 1024;

/// [`offsets::MODULUS`] as a SQL literal, for `concat!`.
macro_rules! offset_modulus {
    () => {
        "4611686018427387904"
    };
}
pub(crate) use offset_modulus;

/// A queue's pending payload bytes as SQL over its row `q` (both backends): its running total
/// less that of its oldest pending message, modulo ([`offsets`]).
macro_rules! pending_bytes {
    () => {
        concat!(
            "(q.appended_bytes - COALESCE((SELECT m.start_offset FROM messages m
               WHERE m.queue_id = q.id ORDER BY m.seq LIMIT 1), q.appended_bytes) + ",
            $crate::store::offset_modulus!(),
            ") % ",
            $crate::store::offset_modulus!()
        )
    };
}
pub(crate) use pending_bytes;

/// A queue's pending payload bytes, for its byte limit, without summing its messages and
/// without a write per acknowledgement. The queue row holds `appended_bytes`, a running total
/// of the payload bytes appended to it; each message row holds `start_offset`, that total
/// just before it. Messages only ever go as a prefix of their queue (acknowledgement up to a
/// sequence number, retention oldest first, deletion of the queue), so the pending bytes are
/// `appended_bytes − start_offset` of the oldest pending message (0 if none): one row and one
/// index seek, and the append's own `UPDATE` of the queue row keeps the total.
///
/// The total starts at a random offset ([`random_base`]) and counts modulo [`MODULUS`], so
/// neither number says how much a queue ever received: only differences mean anything, and
/// those are sums of pending messages' lengths, which the `messages` rows show anyway
/// (SEIZURE.md). Both backends read the pending bytes with [`pending_bytes!`]; each keeps the
/// total in its own append statement; [`offset_modulus!`] is the modulus as a SQL literal.
pub(crate) mod offsets {
    use super::StoreError;

    /// Totals and offsets count modulo 2^62: the sum of one plus a payload length, or the
    /// difference of two plus the modulus, never overflows a 64-bit SQL integer.
    pub const MODULUS: i64 = 1 << 62;

    /// A random starting total for a new queue, in `0..MODULUS`.
    pub fn random_base() -> Result<i64, StoreError> {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b)
            .map_err(|e| StoreError::Backend(format!("OS random source: {e}")))?;
        Ok(i64::from_le_bytes(b) & (MODULUS - 1))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_sql_literal_is_the_modulus_and_bases_fall_below_it() {
            assert_eq!(offset_modulus!().parse::<i64>().unwrap(), MODULUS);
            for _ in 0..64 {
                let base = random_base().unwrap();
                assert!((0..MODULUS).contains(&base));
            }
        }
    }
}

/// What a post or commit reads of its group's row, once its epoch and posting token passed
/// (both backends' `check_group`).
pub(crate) struct GroupRow {
    pub epoch: u64,
    /// The group's latest message ids ([`recent_posts`]).
    pub recent: Vec<u8>,
    /// The counter of the group's latest chunk of moved ids (`posted_chunks.n`).
    pub posted_n: i64,
}

/// The stored form of a group's latest message ids: up to [`RECENT_POSTS`] ids of
/// [`MessageId::LEN`](crate::types::MessageId::LEN) bytes, oldest first. One place for the
/// layout both backends store, in the group row and in each `posted_chunks` row alike. A post
/// is a duplicate if its id is here or in one of its group's chunks.
pub(crate) mod recent_posts {
    use super::RECENT_POSTS;
    use crate::types::MessageId;

    const ID_LEN: usize = MessageId::LEN;

    /// Whether `id` is among the ids in `stored` (a trailing partial id is ignored). Compares
    /// whole ids only: a match across two ids' boundary does not count.
    pub fn contains(stored: &[u8], id: &MessageId) -> bool {
        stored.chunks_exact(ID_LEN).any(|c| c == id.as_bytes())
    }

    /// Records `id`: the value to store next and, when `stored` was full, the ids that must
    /// move to a chunk of their own (all of them, in the same layout, so the next value holds
    /// `id` alone).
    pub fn record<'a>(stored: &'a [u8], id: &MessageId) -> (Vec<u8>, Option<&'a [u8]>) {
        let whole = stored.len() / ID_LEN * ID_LEN;
        if whole >= RECENT_POSTS * ID_LEN {
            return (id.as_bytes().to_vec(), Some(&stored[..whole]));
        }
        let mut next = Vec::with_capacity(whole + ID_LEN);
        next.extend_from_slice(&stored[..whole]);
        next.extend_from_slice(id.as_bytes());
        (next, None)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn id(n: u8) -> MessageId {
            MessageId::new([n; ID_LEN])
        }

        #[test]
        fn a_full_window_hands_over_every_id_and_starts_again_with_the_new_one() {
            let mut stored = Vec::new();
            for n in 0..RECENT_POSTS as u8 {
                assert!(!contains(&stored, &id(n)));
                stored = {
                    let (next, moved) = record(&stored, &id(n));
                    assert!(moved.is_none(), "not full before id {n}");
                    next
                };
                assert!(contains(&stored, &id(n)));
            }
            let (next, moved) = record(&stored, &id(200));
            let moved: Vec<&[u8]> = moved.expect("full").chunks(ID_LEN).collect();
            assert_eq!(moved.len(), RECENT_POSTS);
            for n in 0..RECENT_POSTS as u8 {
                assert_eq!(moved[usize::from(n)], id(n).as_bytes());
                assert!(!contains(&next, &id(n)));
            }
            assert_eq!(next, id(200).as_bytes());
        }

        #[test]
        fn an_id_spanning_two_stored_ids_is_not_found() {
            let (stored, _) = record(&[], &id(1));
            let (stored, _) = record(&stored, &id(2));
            let mut straddling = [1; ID_LEN];
            straddling[ID_LEN / 2..].fill(2);
            assert!(stored.windows(ID_LEN).any(|w| w == straddling));
            assert!(!contains(&stored, &MessageId::new(straddling)));
        }

        #[test]
        fn a_damaged_value_loses_only_its_partial_id() {
            let (mut stored, _) = record(&[], &id(1));
            stored.extend_from_slice(&[2; 5]);
            assert!(contains(&stored, &id(1)));
            let (next, moved) = record(&stored, &id(3));
            assert!(moved.is_none());
            assert_eq!(next.len(), 2 * ID_LEN);
            assert!(contains(&next, &id(1)) && contains(&next, &id(3)));
        }
    }
}

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The operation is refused given the stored state; nothing was changed.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The backend failed (I/O, corruption, …); nothing was acknowledged.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The backend's disk (or its configured size) is full; nothing was acknowledged. Writes
    /// succeed again once space is freed.
    #[error("storage full: {0}")]
    Full(String),
    /// The store is closed or its writer has stopped.
    #[error("the store is closed")]
    Closed,
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The future a store method returns: boxed so the traits stay object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// A queue to create.
#[derive(Debug, Clone)]
pub struct NewQueue {
    /// Its id.
    pub id: QueueId,
    /// SHA-256 of its receive secret.
    pub receive_secret_hash: SecretHash,
    /// SHA-256 of its send token.
    pub send_token_hash: SecretHash,
}

/// A queue named with the hash of its send token, as a route to add to a group.
#[derive(Debug, Clone, Copy)]
pub struct RouteGrant {
    /// The queue.
    pub queue_id: QueueId,
    /// SHA-256 of the send token the client showed.
    pub send_token_hash: SecretHash,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence number in its queue (from 1, strictly increasing).
    pub seq: u64,
    /// The opaque payload.
    pub payload: Vec<u8>,
}

/// A page of a queue's pending messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    /// Messages in sequence order.
    pub messages: Vec<StoredMessage>,
    /// Whether more pending messages follow the last one.
    pub more: bool,
}

/// How much one fetch may return. At least one message is returned when any is pending, even
/// if it alone exceeds `max_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimit {
    /// Most messages.
    pub max_messages: u32,
    /// Most payload bytes in total.
    pub max_bytes: usize,
}

/// A group to create.
#[derive(Debug, Clone)]
pub struct NewGroup {
    /// Its id.
    pub id: GroupId,
    /// Its current epoch.
    pub epoch: u64,
    /// SHA-256 of that epoch's posting token.
    pub posting_token_hash: SecretHash,
    /// Its first routes (distinct queues); each send token is checked.
    pub routes: Vec<RouteGrant>,
}

/// A commit to apply (see `blindpost_wire::Commit` for the semantics).
#[derive(Debug, Clone)]
pub struct CommitOp {
    /// The group.
    pub group_id: GroupId,
    /// The epoch the commit starts from (compare-and-set).
    pub epoch: u64,
    /// SHA-256 of the posting token the client showed.
    pub posting_token_hash: SecretHash,
    /// The MLS commit, appended to every current route.
    pub commit: Vec<u8>,
    /// SHA-256 of the next epoch's posting token.
    pub next_posting_token_hash: SecretHash,
    /// Routes to add (distinct queues).
    pub add_routes: Vec<RouteGrant>,
    /// Routes to drop (ids that are not routes are ignored).
    pub remove_routes: Vec<QueueId>,
    /// The Welcome, appended to each added route; `None` appends nothing.
    pub welcome: Option<Vec<u8>>,
    /// Most routes the group may have afterwards (`LimitExceeded(GroupRoutes)` beyond).
    pub max_routes: usize,
    /// Most pending payload bytes a queue may hold after an append (`LimitExceeded(QueueBytes)`
    /// beyond). Routes this commit removes are exempt, so a full queue cannot block its own
    /// removal.
    pub max_queue_bytes: u64,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The group's epoch after the commit.
    pub epoch: u64,
    /// Every queue a message was appended to.
    pub appended: Vec<QueueId>,
}

/// A post to fan out.
#[derive(Debug, Clone)]
pub struct PostOp {
    /// The group.
    pub group_id: GroupId,
    /// The epoch the message was encrypted in.
    pub epoch: u64,
    /// SHA-256 of the posting token the client showed.
    pub posting_token_hash: SecretHash,
    /// The idempotency key.
    pub message_id: MessageId,
    /// The client says no earlier post of this id can have been stored (`Post.fresh_id`):
    /// the id is compared with the group's latest ids only, not looked up in its chunks.
    pub fresh_id: bool,
    /// The payload (shared: the hub hands the same bytes to subscribers after the commit).
    pub payload: Arc<[u8]>,
    /// Most pending payload bytes a queue may hold after the append; a post that would pass it
    /// on any route is refused whole (`LimitExceeded(QueueBytes)`).
    pub max_queue_bytes: u64,
    /// Routes not to append to: the queues the posting connection has authenticated, when the
    /// post asked to skip them (`Post.skip_subscribed`). Usually empty or one queue, but a
    /// connection may hold thousands, so it is a set (each route is looked up once), and the
    /// connection's own, shared: copying 4,096 queue ids into a new set took 87 µs a post.
    pub skip: Arc<HashSet<QueueId>>,
}

/// Where one append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Appended {
    /// The queue.
    pub queue: QueueId,
    /// The message's sequence number in it.
    pub seq: u64,
}

/// What a post did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posted {
    /// Stored in these queues.
    Stored {
        /// Every queue the payload was appended to, with the sequence number it got there
        /// (so subscribers can be handed the payload without reading it back).
        appended: Vec<Appended>,
    },
    /// The message id was seen before; nothing was stored.
    Duplicate,
}

/// Key packages to add to a box (creating it on first publish).
#[derive(Debug, Clone)]
pub struct PublishOp {
    /// The box.
    pub box_id: BoxId,
    /// SHA-256 of the box secret the client showed.
    pub secret_hash: SecretHash,
    /// One-time packages to append.
    pub key_packages: Vec<Vec<u8>>,
    /// A new last-resort package, replacing the stored one.
    pub last_resort: Option<Vec<u8>>,
    /// Most one-time packages the box may hold afterwards.
    pub max_one_time: usize,
}

/// What a box holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageCount {
    /// One-time packages left.
    pub one_time: u32,
    /// Whether a last-resort package is stored.
    pub has_last_resort: bool,
}

/// A claimed key package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKeyPackage {
    /// The serialized package.
    pub data: Vec<u8>,
    /// Whether it is the box's last-resort package (which stays stored).
    pub last_resort: bool,
}

/// Cut-off days for retention: rows from days strictly before these are deleted.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    /// Messages stored before this day are deleted.
    pub messages_before: Day,
    /// Post idempotency keys recorded before this day are deleted.
    pub posted_ids_before: Day,
}

/// What retention deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expired {
    /// Messages deleted.
    pub messages: u64,
    /// Post idempotency keys deleted.
    pub posted_ids: u64,
}

/// A directory entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// The username.
    pub username: String,
    /// The identity public key the entry is signed by.
    pub identity_key: [u8; 32],
    /// The entry's version.
    pub version: u64,
    /// The serialized, signed entry.
    pub entry: Vec<u8>,
    /// The signature over it.
    pub signature: Vec<u8>,
}

/// Queues, groups, messages and key-package boxes.
pub trait Store: Send + Sync + 'static {
    /// Creates a queue. Refused with `Conflict` if the id exists.
    fn create_queue(&self, queue: NewQueue) -> StoreFuture<'_, ()>;

    /// Checks a queue's receive secret and returns its head sequence number (the highest
    /// assigned so far, 0 if none). Refused with `NotFound` or `Forbidden`.
    fn authenticate_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, u64>;

    /// Pending messages with sequence numbers above `after_seq`, oldest first. A queue that
    /// does not exist has none.
    fn fetch(
        &self,
        queue_id: QueueId,
        after_seq: u64,
        limit: FetchLimit,
    ) -> StoreFuture<'_, Fetched>;

    /// Deletes the queue's messages with sequence numbers up to `up_to_seq`.
    fn ack(&self, queue_id: QueueId, up_to_seq: u64) -> StoreFuture<'_, ()>;

    /// Deletes a queue, its messages and its routes. Refused with `NotFound` or `Forbidden`.
    fn delete_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, ()>;

    /// Creates a group with its first routes. Refused with `Conflict`, or `NotFound` /
    /// `Forbidden` for a route.
    fn create_group(&self, group: NewGroup) -> StoreFuture<'_, ()>;

    /// Applies the one commit of an epoch, atomically (see [`CommitOp`]). Refused with
    /// `NotFound`, `StaleEpoch`, `Forbidden`, `LimitExceeded` (routes, or a queue is full).
    fn commit(&self, commit: CommitOp) -> StoreFuture<'_, Committed>;

    /// Fans a post out to every route, idempotently by message id. Refused with `NotFound`,
    /// `StaleEpoch`, `Forbidden`, `LimitExceeded` (a route's queue is full).
    fn post(&self, post: PostOp) -> StoreFuture<'_, Posted>;

    /// Creates or tops up a key-package box. Refused with `Forbidden` (another secret) or
    /// `LimitExceeded`.
    fn publish_key_packages(&self, publish: PublishOp) -> StoreFuture<'_, KeyPackageCount>;

    /// Takes a one-time package (deleting it) or else the last-resort one. Never hands out a
    /// one-time package twice. Refused with `NotFound`.
    fn claim_key_package(&self, box_id: BoxId) -> StoreFuture<'_, ClaimedKeyPackage>;

    /// Counts a box's packages after checking its secret. Refused with `NotFound`, `Forbidden`.
    fn key_package_status(
        &self,
        box_id: BoxId,
        secret_hash: SecretHash,
    ) -> StoreFuture<'_, KeyPackageCount>;

    /// Deletes expired messages and idempotency keys.
    fn expire(&self, expiry: Expiry) -> StoreFuture<'_, Expired>;

    /// Succeeds when the store can read and write.
    fn health_check(&self) -> StoreFuture<'_, ()>;

    /// Finishes every pending write, then stops accepting operations (they fail `Closed`).
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// One akd tree record (the aZKS head or a tree node), keyed by akd's full binary id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkdNodeRow {
    /// akd's `get_full_binary_id()` of the record.
    pub key: Vec<u8>,
    /// The record, encoded by `kt::codec`.
    pub data: Vec<u8>,
}

/// One value state of an akd label: the value a username took at an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkdValueRow {
    /// The akd label (the username's bytes).
    pub label: Vec<u8>,
    /// The epoch the value was published in.
    pub epoch: u64,
    /// The label's version at that epoch (from 1).
    pub version: u64,
    /// The value state, encoded by `kt::codec`.
    pub data: Vec<u8>,
}

/// A published epoch's root as signed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRoot {
    /// The epoch.
    pub epoch: u64,
    /// The akd root hash.
    pub root_hash: [u8; 32],
    /// The server's Ed25519 signature over `blindpost_wire::root_signature_message`.
    pub signature: Vec<u8>,
}

/// A directory entry accepted by [`DirectoryStore::register_user`] and not yet published in
/// a key-transparency epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    /// The username.
    pub username: String,
    /// The entry's version.
    pub version: u64,
    /// The serialized, signed entry.
    pub entry: Vec<u8>,
    /// The signature over it.
    pub signature: Vec<u8>,
}

/// The server's two long-term secrets as a store shared by several nodes keeps them.
/// Deliberately not `Debug`: secrets are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKeys {
    /// The directory's VRF secret key.
    pub vrf: [u8; 32],
    /// The Ed25519 secret key that signs epoch roots.
    pub signing: [u8; 32],
}

/// Exclusion between server nodes sharing one store, held while an epoch is published
/// (exclusive) or a proof is made (shared); released on drop. Empty for a store only one
/// process opens, where the directory's in-process lock is enough.
pub struct EpochLock(Option<Box<dyn Send + Sync>>);

impl EpochLock {
    /// No lock: the store has a single node.
    pub fn single_node() -> Self {
        Self(None)
    }

    /// A lock released when `held` is dropped.
    pub fn held(held: Box<dyn Send + Sync>) -> Self {
        Self(Some(held))
    }

    /// Whether this lock excludes other nodes (false for a single-node store).
    pub fn is_shared_store(&self) -> bool {
        self.0.is_some()
    }
}

/// Storage of the key-transparency directory: akd's records, the signed epoch roots, and
/// the registrations waiting for the next epoch. Backend-neutral, so akd's `Database` trait
/// is implemented once (`kt::AkdStorage`) over any backend that implements this.
pub trait TransparencyStore: Send + Sync + 'static {
    /// Writes akd records (insert or replace), all in one transaction.
    fn akd_write(&self, nodes: Vec<AkdNodeRow>, values: Vec<AkdValueRow>) -> StoreFuture<'_, ()>;

    /// The tree records with these keys that exist (in no particular order).
    fn akd_nodes(&self, keys: Vec<Vec<u8>>) -> StoreFuture<'_, Vec<AkdNodeRow>>;

    /// Every value state of one label, oldest epoch first.
    fn akd_values(&self, label: Vec<u8>) -> StoreFuture<'_, Vec<AkdValueRow>>;

    /// Registrations not yet published, at most `limit`, oldest first.
    fn pending_entries(&self, limit: usize) -> StoreFuture<'_, Vec<PendingEntry>>;

    /// Records a published epoch's signed root (if the publication made a new epoch) and
    /// forgets the pending registrations it published (each by username and version: a newer
    /// one stays pending), atomically.
    fn finish_epoch(
        &self,
        root: Option<EpochRoot>,
        published: Vec<(String, u64)>,
    ) -> StoreFuture<'_, ()>;

    /// The signed root of an epoch, if it was published.
    fn epoch_root(&self, epoch: u64) -> StoreFuture<'_, Option<EpochRoot>>;

    /// The signed root of the latest published epoch, if any.
    fn latest_root(&self) -> StoreFuture<'_, Option<EpochRoot>>;

    /// For a store several nodes share: stores `candidate` as the server's keys unless keys
    /// are stored already (first node wins), and returns the stored keys, so every node signs
    /// with the same key. `None` for a store only one process opens (SQLite): the node keeps
    /// its keys in files in its data directory.
    fn shared_keys(&self, candidate: StoredKeys) -> StoreFuture<'_, Option<StoredKeys>>;

    /// Takes the directory's lock among nodes: `exclusive` to publish an epoch (or create the
    /// directory), shared to make a proof, so no node proves from a half-published epoch.
    fn epoch_lock(&self, exclusive: bool) -> StoreFuture<'_, EpochLock>;
}

/// The username directory. Kept apart from [`Store`] so key transparency can replace it
/// behind the same methods.
pub trait DirectoryStore: Send + Sync + 'static {
    /// The stored entry for a username, if any.
    fn lookup_user(&self, username: String) -> StoreFuture<'_, Option<UserRecord>>;

    /// Stores an entry: a new username, or an update of one with the same identity key and a
    /// higher version, and queues it for the next key-transparency epoch
    /// ([`TransparencyStore::pending_entries`]) in the same transaction. Refused with `Conflict(UsernameTaken)` or
    /// `Conflict(VersionNotIncreased)`.
    fn register_user(&self, record: UserRecord) -> StoreFuture<'_, ()>;
}
