//! The protobuf messages of the protocol, declared with `prost` derives (no `.proto` build
//! step). Field tags are the wire contract: never reuse or renumber one.

use prost::{Enumeration, Message, Oneof};

/// A frame from client to server: one request with its id.
#[derive(Clone, PartialEq, Message)]
pub struct ClientFrame {
    /// Client-chosen request id, echoed in the response.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The request. A frame without one is answered with `Malformed`.
    #[prost(
        oneof = "Request",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23"
    )]
    pub request: Option<Request>,
}

/// Every request a client can make.
#[derive(Clone, PartialEq, Oneof)]
pub enum Request {
    /// Create a queue. Answer: [`response::Body::Ok`].
    #[prost(message, tag = "2")]
    CreateQueue(CreateQueue),
    /// Prove a queue's receive secret on this connection, optionally asking for pushes.
    /// Answer: [`response::Body::Subscribed`].
    #[prost(message, tag = "3")]
    Subscribe(Subscribe),
    /// Read pending messages of a subscribed queue. Answer: [`response::Body::Messages`].
    #[prost(message, tag = "4")]
    Fetch(Fetch),
    /// Acknowledge (delete) messages of a subscribed queue. Answer: `Ok`.
    #[prost(message, tag = "5")]
    Ack(Ack),
    /// Delete a queue, its messages and its routes. Answer: `Ok`.
    #[prost(message, tag = "6")]
    DeleteQueue(DeleteQueue),
    /// Create or top up a key-package box. Answer: [`response::Body::KeyPackageCount`].
    #[prost(message, tag = "7")]
    PublishKeyPackages(PublishKeyPackages),
    /// Take one key package from a box. Answer: [`response::Body::KeyPackage`].
    #[prost(message, tag = "8")]
    ClaimKeyPackage(ClaimKeyPackage),
    /// How many one-time packages a box still holds. Answer: `KeyPackageCount`.
    #[prost(message, tag = "9")]
    KeyPackageStatus(KeyPackageStatus),
    /// Claim or update a username. Answer: `Ok`.
    #[prost(message, tag = "10")]
    RegisterUser(RegisterUser),
    /// Look a username up. Answer: [`response::Body::User`].
    #[prost(message, tag = "11")]
    LookupUser(LookupUser),
    /// Create a group's routing record. Answer: `Ok`.
    #[prost(message, tag = "12")]
    CreateGroup(CreateGroup),
    /// Submit the one commit of an epoch. Answer: [`response::Body::Committed`].
    #[prost(message, tag = "13")]
    Commit(Commit),
    /// Post an application message or proposal to a group. Answer: `Ok`.
    #[prost(message, tag = "14")]
    Post(Post),
    /// Keep-alive / round-trip probe. Answer: `Ok`.
    #[prost(message, tag = "15")]
    Ping(Ping),
    /// Stop pushes for a queue on this connection. Answer: `Ok`.
    #[prost(message, tag = "16")]
    Unsubscribe(Unsubscribe),
    /// Look a username up in the key-transparency directory, with proof.
    /// Answer: [`response::Body::DirectoryLookupProof`].
    #[prost(message, tag = "20")]
    DirectoryLookup(DirectoryLookup),
    /// Every value a username has had, with proof. Answer:
    /// [`response::Body::DirectoryHistoryProof`].
    #[prost(message, tag = "21")]
    DirectoryHistory(DirectoryHistory),
    /// The append-only proof from one epoch to the next. Answer:
    /// [`response::Body::DirectoryAuditProof`].
    #[prost(message, tag = "22")]
    DirectoryAudit(DirectoryAudit),
    /// The latest signed directory root. Answer: [`response::Body::SignedRoot`].
    #[prost(message, tag = "23")]
    DirectoryRoot(DirectoryRoot),
}

/// Create a queue with a client-chosen random id. The server stores only the two hashes;
/// whoever later shows the receive secret may read and acknowledge, whoever shows the send
/// token may add the queue to a group's routes. No owner is recorded.
/// Errors: `Conflict` if the id exists, `InvalidArgument` on wrong lengths.
#[derive(Clone, PartialEq, Message)]
pub struct CreateQueue {
    /// Random id, [`crate::QUEUE_ID_LEN`] bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// SHA-256 of the receive secret.
    #[prost(bytes = "vec", tag = "2")]
    pub receive_secret_hash: Vec<u8>,
    /// SHA-256 of the send token.
    #[prost(bytes = "vec", tag = "3")]
    pub send_token_hash: Vec<u8>,
}

/// Authenticate a queue on this connection by its receive secret (SHA-256 compared in
/// constant time). Later `Fetch`, `Ack` and `Unsubscribe` for this queue on this connection
/// need no secret. With `push`, the server then pushes, in sequence order, every message with
/// a sequence number above `after_seq` and each new one as it is stored.
/// Errors: `NotFound` (no such queue), `Forbidden` (wrong secret), `LimitExceeded` (too many
/// subscriptions on this connection).
#[derive(Clone, PartialEq, Message)]
pub struct Subscribe {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// The receive secret, [`crate::SECRET_LEN`] bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub receive_secret: Vec<u8>,
    /// Whether to push messages to this connection.
    #[prost(bool, tag = "3")]
    pub push: bool,
    /// Push only messages with a sequence number above this one.
    #[prost(uint64, tag = "4")]
    pub after_seq: u64,
}

/// Stop pushes for a queue on this connection (it stays authenticated).
#[derive(Clone, PartialEq, Message)]
pub struct Unsubscribe {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
}

/// Read up to `limit` pending (unacknowledged) messages with sequence numbers above
/// `after_seq`, oldest first. `limit` 0 or above [`crate::limits::MAX_FETCH_MESSAGES`] means
/// that maximum. Errors: `Forbidden` if the queue is not authenticated on this connection.
#[derive(Clone, PartialEq, Message)]
pub struct Fetch {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// Exclusive lower bound of sequence numbers.
    #[prost(uint64, tag = "2")]
    pub after_seq: u64,
    /// Most messages to return.
    #[prost(uint32, tag = "3")]
    pub limit: u32,
}

/// Delete every message of the queue with sequence number ≤ `up_to_seq`. Acknowledging
/// what is already gone is not an error. Errors: `Forbidden` if not authenticated.
#[derive(Clone, PartialEq, Message)]
pub struct Ack {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// Inclusive upper bound of sequence numbers to delete.
    #[prost(uint64, tag = "2")]
    pub up_to_seq: u64,
    /// When set, a successful ack is not answered (an error still is, under the frame's id):
    /// a receiver acking every push need not read an answer per message. Losing an ack only
    /// means redelivery, which receivers skip by sequence number.
    #[prost(bool, tag = "3")]
    pub quiet: bool,
}

/// Delete a queue, its pending messages and every group route to it. Errors: `NotFound`,
/// `Forbidden` (wrong receive secret).
#[derive(Clone, PartialEq, Message)]
pub struct DeleteQueue {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// Its receive secret.
    #[prost(bytes = "vec", tag = "2")]
    pub receive_secret: Vec<u8>,
}

/// Create a key-package box (first publish: the server stores SHA-256 of `box_secret`) or
/// add to it (later publishes must show the same secret, else `Forbidden`). One-time packages
/// are appended; `last_resort`, when non-empty, replaces the box's last-resort package.
/// Errors: `TooLarge` / `LimitExceeded` past the limits, `Forbidden`.
#[derive(Clone, PartialEq, Message)]
pub struct PublishKeyPackages {
    /// Random box id, [`crate::BOX_ID_LEN`] bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub box_id: Vec<u8>,
    /// The box owner's secret, [`crate::SECRET_LEN`] bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub box_secret: Vec<u8>,
    /// Serialized one-time MLS KeyPackages (opaque to the server).
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub key_packages: Vec<Vec<u8>>,
    /// Serialized last-resort KeyPackage; empty keeps the current one.
    #[prost(bytes = "vec", tag = "4")]
    pub last_resort: Vec<u8>,
}

/// Take one key package: a one-time package (deleted as it is handed out; never handed out
/// twice) while any is left, else the last-resort package (never deleted). Errors:
/// `NotFound` (no box, or an empty box without a last-resort package), `RateLimited`.
#[derive(Clone, PartialEq, Message)]
pub struct ClaimKeyPackage {
    /// The box.
    #[prost(bytes = "vec", tag = "1")]
    pub box_id: Vec<u8>,
}

/// Ask how many one-time packages remain. Errors: `NotFound`, `Forbidden`.
#[derive(Clone, PartialEq, Message)]
pub struct KeyPackageStatus {
    /// The box.
    #[prost(bytes = "vec", tag = "1")]
    pub box_id: Vec<u8>,
    /// The box secret.
    #[prost(bytes = "vec", tag = "2")]
    pub box_secret: Vec<u8>,
}

/// What the directory stores under a username: the account's identity key and its devices.
/// Serialized with protobuf and signed, as [`SignedDirectoryEntry`].
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryEntry {
    /// The username this entry is for (signed, so an entry cannot be moved to another name).
    #[prost(string, tag = "1")]
    pub username: String,
    /// Ed25519 identity public key, 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    /// The account's devices.
    #[prost(message, repeated, tag = "3")]
    pub devices: Vec<Device>,
    /// Strictly increasing with every update of the entry.
    #[prost(uint64, tag = "4")]
    pub version: u64,
}

/// One device of an account.
#[derive(Clone, PartialEq, Message)]
pub struct Device {
    /// The device's MLS signature public key (the key in its MLS credentials).
    #[prost(bytes = "vec", tag = "1")]
    pub signature_key: Vec<u8>,
    /// The device's key-package box.
    #[prost(bytes = "vec", tag = "2")]
    pub box_id: Vec<u8>,
}

/// A directory entry with the identity key's Ed25519 signature over
/// [`DIRECTORY_SIGNATURE_CONTEXT`] followed by `entry`.
#[derive(Clone, PartialEq, Message)]
pub struct SignedDirectoryEntry {
    /// The serialized [`DirectoryEntry`].
    #[prost(bytes = "vec", tag = "1")]
    pub entry: Vec<u8>,
    /// Ed25519 signature, 64 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

/// Domain-separation prefix of directory-entry signatures.
pub const DIRECTORY_SIGNATURE_CONTEXT: &[u8] = b"blindpost directory entry v1\0";

/// Claim a username (first come, first served) or update it. The server checks the username
/// is valid, the entry names it, and the signature verifies under the entry's identity key;
/// an update must keep the stored identity key and raise the version. Errors: `Conflict`
/// (taken by another identity key, or version not increased), `InvalidArgument`,
/// `Forbidden` (bad signature).
#[derive(Clone, PartialEq, Message)]
pub struct RegisterUser {
    /// The signed entry.
    #[prost(message, optional, tag = "1")]
    pub entry: Option<SignedDirectoryEntry>,
}

/// Look a username up. Errors: `NotFound`.
#[derive(Clone, PartialEq, Message)]
pub struct LookupUser {
    /// The username.
    #[prost(string, tag = "1")]
    pub username: String,
}

/// Domain-separation label of the key-transparency directory's hashes (akd's `DomainLabel`).
/// Server and clients must agree on it.
pub const KT_DOMAIN_LABEL: &[u8] = b"blindpost key transparency v1";

/// Domain-separation prefix of the server's signature over an epoch's root.
pub const KT_ROOT_SIGNATURE_CONTEXT: &[u8] = b"blindpost directory root v1\0";

/// The bytes the server signs for an epoch: [`KT_ROOT_SIGNATURE_CONTEXT`], the epoch
/// (8 bytes, big-endian), the root hash, then the directory's VRF public key.
pub fn root_signature_message(epoch: u64, root_hash: &[u8], vrf_public_key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        KT_ROOT_SIGNATURE_CONTEXT.len() + 8 + root_hash.len() + vrf_public_key.len(),
    );
    m.extend_from_slice(KT_ROOT_SIGNATURE_CONTEXT);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(root_hash);
    m.extend_from_slice(vrf_public_key);
    m
}

/// The root hash of one published directory epoch, signed by the server's Ed25519 key.
/// Clients pin `server_key` on first contact and refuse roots signed by any other key.
#[derive(Clone, PartialEq, Message)]
pub struct SignedRoot {
    /// The epoch (0 is the empty directory).
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// akd root hash, 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub root_hash: Vec<u8>,
    /// The directory's VRF public key, 32 bytes (lookup proofs are checked with it).
    #[prost(bytes = "vec", tag = "3")]
    pub vrf_public_key: Vec<u8>,
    /// The server's Ed25519 signing public key, 32 bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub server_key: Vec<u8>,
    /// Ed25519 signature over [`root_signature_message`], 64 bytes.
    #[prost(bytes = "vec", tag = "5")]
    pub signature: Vec<u8>,
}

/// Look a username up in the key-transparency directory. The answer carries akd's lookup
/// proof (its value is the serialized [`SignedDirectoryEntry`]) for the latest epoch and that
/// epoch's signed root. Errors: `InvalidArgument`, `NotFound` (never registered).
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryLookup {
    /// The username.
    #[prost(string, tag = "1")]
    pub username: String,
}

/// Answer to `DirectoryLookup`.
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryLookupProof {
    /// The root the proof is against.
    #[prost(message, optional, tag = "1")]
    pub root: Option<SignedRoot>,
    /// akd `LookupProof`, in akd's protobuf encoding.
    #[prost(bytes = "vec", tag = "2")]
    pub proof: Vec<u8>,
}

/// Every value a username has had (most recent [`crate::limits::MAX_HISTORY_VALUES`]), with
/// akd's key-history proof against the latest epoch. A client checks its own username's
/// history on each sync. Errors: `InvalidArgument`, `NotFound`.
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryHistory {
    /// The username.
    #[prost(string, tag = "1")]
    pub username: String,
}

/// Answer to `DirectoryHistory`.
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryHistoryProof {
    /// The root the proof is against.
    #[prost(message, optional, tag = "1")]
    pub root: Option<SignedRoot>,
    /// akd `HistoryProof`, in akd's protobuf encoding.
    #[prost(bytes = "vec", tag = "2")]
    pub proof: Vec<u8>,
}

/// The append-only proof that epoch `epoch` extends epoch `epoch - 1`, with both signed
/// roots. Anyone may ask; no account is needed. Errors: `InvalidArgument` (epoch 0),
/// `NotFound` (not published yet).
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryAudit {
    /// The later epoch, at least 1.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
}

/// Answer to `DirectoryAudit`.
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryAuditProof {
    /// The root of `epoch - 1`.
    #[prost(message, optional, tag = "1")]
    pub start: Option<SignedRoot>,
    /// The root of `epoch`.
    #[prost(message, optional, tag = "2")]
    pub end: Option<SignedRoot>,
    /// akd `SingleAppendOnlyProof`, in akd's protobuf encoding.
    #[prost(bytes = "vec", tag = "3")]
    pub proof: Vec<u8>,
}

/// Ask for the latest signed directory root. Anyone may ask.
#[derive(Clone, PartialEq, Message)]
pub struct DirectoryRoot {}

/// A queue to add to a group's routes, shown with its send token.
#[derive(Clone, PartialEq, Message)]
pub struct Route {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// Its send token (the server compares SHA-256 of it with the stored hash).
    #[prost(bytes = "vec", tag = "2")]
    pub send_token: Vec<u8>,
}

/// Create a group's routing record at `epoch`, with the hash of that epoch's posting token and
/// its first routes (usually the creator's own queue). Errors: `Conflict` (id exists),
/// `NotFound` (a route's queue does not exist), `Forbidden` (a wrong send token).
#[derive(Clone, PartialEq, Message)]
pub struct CreateGroup {
    /// Random id, [`crate::GROUP_ID_LEN`] bytes (the MLS group id).
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The current MLS epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// SHA-256 of the epoch's posting token.
    #[prost(bytes = "vec", tag = "3")]
    pub posting_token_hash: Vec<u8>,
    /// The first routes.
    #[prost(message, repeated, tag = "4")]
    pub routes: Vec<Route>,
}

/// The one commit of `epoch`, accepted by atomic compare-and-set on the group's epoch.
///
/// In one transaction the server: checks the epoch (else `StaleEpoch` with the current epoch)
/// and the posting token (else `Forbidden`); checks every added route's send token; appends
/// `commit` to every current route (removed ones included, so a removed member learns of its
/// removal); drops `remove_routes` (ids that are not routes are ignored); adds `add_routes`
/// and appends `welcome` (if non-empty) to each of them; sets the epoch to `epoch + 1` and the
/// posting-token hash to `next_posting_token_hash`. Only then does it answer `Committed`.
#[derive(Clone, PartialEq, Message)]
pub struct Commit {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The epoch the commit starts from.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// The posting token of `epoch`.
    #[prost(bytes = "vec", tag = "3")]
    pub posting_token: Vec<u8>,
    /// The MLS commit message.
    #[prost(bytes = "vec", tag = "4")]
    pub commit: Vec<u8>,
    /// SHA-256 of the posting token of `epoch + 1`.
    #[prost(bytes = "vec", tag = "5")]
    pub next_posting_token_hash: Vec<u8>,
    /// Queues of members this commit adds.
    #[prost(message, repeated, tag = "6")]
    pub add_routes: Vec<Route>,
    /// Queues of members this commit removes.
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub remove_routes: Vec<Vec<u8>>,
    /// The MLS Welcome for the added members.
    #[prost(bytes = "vec", tag = "8")]
    pub welcome: Vec<u8>,
}

/// Post an MLS application message or proposal to every route of a group. Idempotent by
/// `message_id`: a repeat of an id the group has seen is answered `Ok` and not stored again
/// (see `fresh_id` for how far back "seen" reaches).
/// Errors: `StaleEpoch` (the group is at another epoch; carries it), `Forbidden` (wrong
/// posting token), `NotFound`.
#[derive(Clone, PartialEq, Message)]
pub struct Post {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    /// The epoch the message was encrypted in.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// The posting token of `epoch`.
    #[prost(bytes = "vec", tag = "3")]
    pub posting_token: Vec<u8>,
    /// Client-chosen random id, [`crate::MESSAGE_ID_LEN`] bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub message_id: Vec<u8>,
    /// The MLS message.
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    /// When set, the message is not appended to routes this connection has subscribed to
    /// (`Subscribe`, with or without push): the poster's own queue, whose echo the poster
    /// would only skip. A poster that sets it gets no echo of this post. The server learns
    /// nothing new: it already sees which queues the connection reads.
    #[prost(bool, tag = "6")]
    pub skip_subscribed: bool,
    /// Set when no earlier post of `message_id` can have been stored: it was never sent, or
    /// every earlier send of it was refused. The server then compares the id only with the
    /// group's latest ids, not with the ids the group posted before them (a scan of the
    /// group's stored ids). Leave it unset on a resend whose earlier answer was lost: that
    /// post is a duplicate if it was stored within the group's last 32,768 posts and the
    /// retention period. A client that sets it wrongly can only get its own message stored
    /// twice.
    #[prost(bool, tag = "7")]
    pub fresh_id: bool,
}

/// Keep-alive.
#[derive(Clone, PartialEq, Message)]
pub struct Ping {}

/// A frame from server to client.
#[derive(Clone, PartialEq, Message)]
pub struct ServerFrame {
    /// A response or a push.
    #[prost(oneof = "server_frame::Kind", tags = "1, 2")]
    pub kind: Option<server_frame::Kind>,
}

/// The kinds of [`ServerFrame`].
pub mod server_frame {
    use prost::Oneof;

    /// A response to a request, or a push.
    #[derive(Clone, PartialEq, Oneof)]
    pub enum Kind {
        /// The answer to one request.
        #[prost(message, tag = "1")]
        Response(super::Response),
        /// Messages for a subscribed queue.
        #[prost(message, tag = "2")]
        Push(super::Push),
    }
}

/// The answer to the request with the same `id` (0 for a frame that could not be decoded).
#[derive(Clone, PartialEq, Message)]
pub struct Response {
    /// The request id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The result.
    #[prost(
        oneof = "response::Body",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22, 23"
    )]
    pub body: Option<response::Body>,
}

/// The bodies of [`Response`].
pub mod response {
    use prost::Oneof;

    /// A response body.
    #[derive(Clone, PartialEq, Oneof)]
    pub enum Body {
        /// The request failed.
        #[prost(message, tag = "2")]
        Error(super::Error),
        /// The request succeeded and has nothing to return.
        #[prost(message, tag = "3")]
        Ok(super::Ping),
        /// Answer to `Subscribe`.
        #[prost(message, tag = "4")]
        Subscribed(super::Subscribed),
        /// Answer to `Fetch`.
        #[prost(message, tag = "5")]
        Messages(super::Messages),
        /// Answer to `ClaimKeyPackage`.
        #[prost(message, tag = "6")]
        KeyPackage(super::KeyPackage),
        /// Answer to `PublishKeyPackages` and `KeyPackageStatus`.
        #[prost(message, tag = "7")]
        KeyPackageCount(super::KeyPackageCount),
        /// Answer to `LookupUser`.
        #[prost(message, tag = "8")]
        User(super::SignedDirectoryEntry),
        /// Answer to `Commit`.
        #[prost(message, tag = "9")]
        Committed(super::Committed),
        /// Answer to `DirectoryLookup`.
        #[prost(message, tag = "20")]
        DirectoryLookupProof(super::DirectoryLookupProof),
        /// Answer to `DirectoryHistory`.
        #[prost(message, tag = "21")]
        DirectoryHistoryProof(super::DirectoryHistoryProof),
        /// Answer to `DirectoryAudit`.
        #[prost(message, tag = "22")]
        DirectoryAuditProof(super::DirectoryAuditProof),
        /// Answer to `DirectoryRoot`.
        #[prost(message, tag = "23")]
        SignedRoot(super::SignedRoot),
    }
}

/// Why a request failed.
#[derive(Clone, PartialEq, Message)]
pub struct Error {
    /// Machine-readable code.
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// Human-readable reason (never contains secrets or payloads).
    #[prost(string, tag = "2")]
    pub message: String,
    /// With `StaleEpoch`: the group's current epoch.
    #[prost(uint64, tag = "3")]
    pub current_epoch: u64,
}

/// Error codes. Grouped by fault: the client's frame (1–3), the client's request given the
/// server's state (4–8), the server (9–10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// Not set (never sent on purpose).
    Unspecified = 0,
    /// The frame did not decode, or a required field is missing.
    Malformed = 1,
    /// The frame or a field is larger than the limits allow.
    TooLarge = 2,
    /// A field has an invalid value (wrong id length, bad username, …).
    InvalidArgument = 3,
    /// The queue, group, box or user does not exist.
    NotFound = 4,
    /// A secret, token or signature did not match.
    Forbidden = 5,
    /// The id or username is taken, or an update conflicts with what is stored.
    Conflict = 6,
    /// The group is at another epoch (see `current_epoch`): catch up and retry.
    StaleEpoch = 7,
    /// Too many requests, or a per-connection limit is reached.
    LimitExceeded = 8,
    /// The server failed (storage error, …); the request may be retried.
    Internal = 9,
    /// The server is shutting down or overloaded; retry later.
    Unavailable = 10,
}

/// Answer to `Subscribe`.
#[derive(Clone, PartialEq, Message)]
pub struct Subscribed {
    /// The highest sequence number the queue has assigned so far (0 if none).
    #[prost(uint64, tag = "1")]
    pub head_seq: u64,
}

/// One message stored in a queue.
#[derive(Clone, PartialEq, Message)]
pub struct QueueMessage {
    /// Sequence number, strictly increasing per queue, starting at 1.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The opaque payload (an MLS message).
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// Answer to `Fetch`.
#[derive(Clone, PartialEq, Message)]
pub struct Messages {
    /// Messages in sequence order.
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<QueueMessage>,
    /// Whether more pending messages follow the last one returned.
    #[prost(bool, tag = "2")]
    pub more: bool,
}

/// Answer to `ClaimKeyPackage`.
#[derive(Clone, PartialEq, Message)]
pub struct KeyPackage {
    /// The serialized KeyPackage.
    #[prost(bytes = "vec", tag = "1")]
    pub key_package: Vec<u8>,
    /// Whether it is the box's last-resort package.
    #[prost(bool, tag = "2")]
    pub last_resort: bool,
}

/// How many one-time packages a box holds.
#[derive(Clone, PartialEq, Message)]
pub struct KeyPackageCount {
    /// One-time packages left.
    #[prost(uint32, tag = "1")]
    pub one_time: u32,
    /// Whether a last-resort package is stored.
    #[prost(bool, tag = "2")]
    pub has_last_resort: bool,
}

/// Answer to `Commit`.
#[derive(Clone, PartialEq, Message)]
pub struct Committed {
    /// The group's epoch after the commit.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
}

/// Messages pushed for a subscribed queue, in sequence order.
#[derive(Clone, PartialEq, Message)]
pub struct Push {
    /// The queue.
    #[prost(bytes = "vec", tag = "1")]
    pub queue_id: Vec<u8>,
    /// The messages.
    #[prost(message, repeated, tag = "2")]
    pub messages: Vec<QueueMessage>,
}

impl Response {
    /// A response carrying an error.
    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::error_with_epoch(id, code, message, 0)
    }

    /// A `StaleEpoch`-style error carrying the group's current epoch.
    pub fn error_with_epoch(
        id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        current_epoch: u64,
    ) -> Self {
        Self {
            id,
            body: Some(response::Body::Error(Error {
                code: code as i32,
                message: message.into(),
                current_epoch,
            })),
        }
    }

    /// A bare success.
    pub fn ok(id: u64) -> Self {
        Self {
            id,
            body: Some(response::Body::Ok(Ping {})),
        }
    }
}

impl From<Response> for ServerFrame {
    fn from(r: Response) -> Self {
        Self {
            kind: Some(server_frame::Kind::Response(r)),
        }
    }
}

impl From<Push> for ServerFrame {
    fn from(p: Push) -> Self {
        Self {
            kind: Some(server_frame::Kind::Push(p)),
        }
    }
}
