//! The domain logic of every request: validates lengths and limits, hashes secrets, verifies
//! directory signatures, calls the store, and wakes subscribers of the queues a write touched.
//! Not for: connection state (see `session`) or bytes on the socket (see `ws`); the store does
//! the checks that must be atomic with a write.

use std::collections::HashSet;
use std::sync::Arc;

use crate::kt::{KtError, Transparency};
use blindpost_wire::limits::{
    MAX_DEVICES, MAX_DIRECTORY_ENTRY_BYTES, MAX_FETCH_MESSAGES, MAX_GROUP_ROUTES,
    MAX_KEY_PACKAGE_BYTES, MAX_KEY_PACKAGES_PER_BOX, MAX_PAYLOAD_BYTES, valid_username,
};
use blindpost_wire::{
    ClaimKeyPackage, Commit, CreateGroup, CreateQueue, DIRECTORY_SIGNATURE_CONTEXT, DeleteQueue,
    DirectoryAudit, DirectoryAuditProof, DirectoryEntry, DirectoryHistory, DirectoryHistoryProof,
    DirectoryLookup, DirectoryLookupProof, KeyPackageStatus, LookupUser, Post, PublishKeyPackages,
    RegisterUser, Route, SignedDirectoryEntry, SignedRoot,
};
use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::{BadRequest, Credential, Entity, Limit, Refusal, ServerFault, ServiceError};
use crate::hub::Hub;
use crate::rate::{KeyedLimiter, TokenBucket};
use crate::store::{
    ClaimedKeyPackage, CommitOp, DirectoryStore, Expired, Expiry, FetchLimit, Fetched,
    KeyPackageCount, NewGroup, NewQueue, PostOp, Posted, PublishOp, RouteGrant, Store, StoreError,
    UserRecord,
};
use crate::types::{BoxId, Day, GroupId, MessageId, QueueId, SecretHash};

/// The result of a service call.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Most payload bytes one fetch or push carries, so the answering frame stays within
/// `MAX_FRAME_BYTES` (a single message larger than this is still sent, alone).
pub const BATCH_BYTES: usize = MAX_PAYLOAD_BYTES;

/// Longest device signature key accepted in a directory entry.
const MAX_DEVICE_KEY_BYTES: usize = 1024;

/// The service's share of the configured limits (see `Config` for each one's meaning).
#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    /// `Config::max_queue_bytes`.
    pub max_queue_bytes: u64,
    /// `Config::max_group_routes`.
    pub max_group_routes: usize,
    /// `Config::box_claims_per_hour`.
    pub box_claims_per_hour: u32,
    /// `Config::box_claim_burst`.
    pub box_claim_burst: u32,
}

impl ServiceLimits {
    /// The limits of a configuration.
    pub fn from_config(config: &crate::Config) -> Self {
        Self {
            max_queue_bytes: config.max_queue_bytes,
            max_group_routes: config.max_group_routes as usize,
            box_claims_per_hour: config.box_claims_per_hour,
            box_claim_burst: config.box_claim_burst,
        }
    }
}

/// Acknowledgements being written after their answer, at most (see [`Service::ack_soon`]).
pub const ACKS_IN_FLIGHT: usize = 4096;

/// Most key-package boxes whose claim rate is tracked at once (~100 bytes each).
const TRACKED_BOXES: usize = 100_000;

/// The post office's rules over a store, a directory and the wake-up hub.
pub struct Service {
    store: Arc<dyn Store>,
    directory: Arc<dyn DirectoryStore>,
    transparency: Arc<Transparency>,
    hub: Arc<Hub>,
    limits: ServiceLimits,
    box_claims: KeyedLimiter<BoxId>,
    acks_in_flight: Arc<Semaphore>,
}

/// A directory entry whose signature has been verified; only [`verify_entry`] makes one, so
/// nothing unverified can reach the directory.
#[derive(Debug)]
pub struct VerifiedEntry(UserRecord);

impl Service {
    /// A service over these parts.
    pub fn new(
        store: Arc<dyn Store>,
        directory: Arc<dyn DirectoryStore>,
        transparency: Arc<Transparency>,
        hub: Arc<Hub>,
        limits: ServiceLimits,
    ) -> Self {
        let per_sec = f64::from(limits.box_claims_per_hour) / 3600.0;
        Self {
            store,
            directory,
            transparency,
            hub,
            limits,
            box_claims: KeyedLimiter::new(
                TokenBucket::new(limits.box_claim_burst, per_sec),
                TRACKED_BOXES,
            ),
            acks_in_flight: Arc::new(Semaphore::new(ACKS_IN_FLIGHT)),
        }
    }

    /// The wake-up hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// `CreateQueue`.
    pub async fn create_queue(&self, req: &CreateQueue) -> ServiceResult<()> {
        let queue = NewQueue {
            id: QueueId::parse(&req.queue_id)?,
            receive_secret_hash: SecretHash::parse(
                "receive secret hash",
                &req.receive_secret_hash,
            )?,
            send_token_hash: SecretHash::parse("send token hash", &req.send_token_hash)?,
        };
        Ok(self.store.create_queue(queue).await?)
    }

    /// Authenticates a queue by its receive secret (the core of `Subscribe`); returns the
    /// queue and its head sequence number.
    pub async fn authenticate_queue(
        &self,
        queue_id: &[u8],
        receive_secret: &[u8],
    ) -> ServiceResult<(QueueId, u64)> {
        let queue = QueueId::parse(queue_id)?;
        let secret = SecretHash::of_secret("receive secret", receive_secret)?;
        let head = self.store.authenticate_queue(queue, secret).await?;
        Ok((queue, head))
    }

    /// Pending messages of a queue the caller has authenticated. `limit` 0 or above the
    /// maximum means the maximum.
    pub async fn fetch(
        &self,
        queue: QueueId,
        after_seq: u64,
        limit: u32,
    ) -> ServiceResult<Fetched> {
        let max_messages = if limit == 0 || limit > MAX_FETCH_MESSAGES {
            MAX_FETCH_MESSAGES
        } else {
            limit
        };
        let limit = FetchLimit {
            max_messages,
            max_bytes: BATCH_BYTES,
        };
        Ok(self.store.fetch(queue, after_seq, limit).await?)
    }

    /// Acknowledges (deletes) messages of a queue the caller has authenticated. Returns once
    /// the deletion is under way rather than committed: losing it in a crash only delivers the
    /// messages again, which clients skip by sequence number, so the acknowledging connection
    /// need not wait for a commit (and its pushes do not queue behind one). At most
    /// [`ACKS_IN_FLIGHT`] run at once; [`Service::finish_acks`] waits for them at shutdown.
    pub async fn ack_soon(&self, queue: QueueId, up_to_seq: u64) -> ServiceResult<()> {
        let permit = Arc::clone(&self.acks_in_flight)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Err(e) = store.ack(queue, up_to_seq).await {
                tracing::warn!(error = %e, "an acknowledgement was not stored; its messages will be delivered again");
            }
            drop(permit);
        });
        Ok(())
    }

    /// Waits until every acknowledgement taken by [`Service::ack_soon`] has been written.
    pub async fn finish_acks(&self) {
        let _ = self
            .acks_in_flight
            .acquire_many(ACKS_IN_FLIGHT as u32)
            .await;
    }

    /// `DeleteQueue`; returns the deleted queue.
    pub async fn delete_queue(&self, req: &DeleteQueue) -> ServiceResult<QueueId> {
        let queue = QueueId::parse(&req.queue_id)?;
        let secret = SecretHash::of_secret("receive secret", &req.receive_secret)?;
        self.store.delete_queue(queue, secret).await?;
        Ok(queue)
    }

    /// `PublishKeyPackages`.
    pub async fn publish_key_packages(
        &self,
        req: PublishKeyPackages,
    ) -> ServiceResult<KeyPackageCount> {
        let box_id = BoxId::parse(&req.box_id)?;
        let secret_hash = SecretHash::of_secret("box secret", &req.box_secret)?;
        if req.key_packages.len() > MAX_KEY_PACKAGES_PER_BOX {
            return Err(Refusal::LimitExceeded(Limit::KeyPackages).into());
        }
        for kp in &req.key_packages {
            check_bytes("key package", kp, MAX_KEY_PACKAGE_BYTES)?;
        }
        let last_resort = if req.last_resort.is_empty() {
            None
        } else {
            check_bytes(
                "last-resort key package",
                &req.last_resort,
                MAX_KEY_PACKAGE_BYTES,
            )?;
            Some(req.last_resort)
        };
        let op = PublishOp {
            box_id,
            secret_hash,
            key_packages: req.key_packages,
            last_resort,
            max_one_time: MAX_KEY_PACKAGES_PER_BOX,
        };
        Ok(self.store.publish_key_packages(op).await?)
    }

    /// `ClaimKeyPackage`, within the box's claim rate (the per-connection rate limit is the
    /// session's).
    pub async fn claim_key_package(
        &self,
        req: &ClaimKeyPackage,
    ) -> ServiceResult<ClaimedKeyPackage> {
        let box_id = BoxId::parse(&req.box_id)?;
        if !self.box_claims.try_take(box_id, Instant::now()) {
            return Err(Refusal::LimitExceeded(Limit::BoxClaimRate).into());
        }
        Ok(self.store.claim_key_package(box_id).await?)
    }

    /// `KeyPackageStatus`.
    pub async fn key_package_status(
        &self,
        req: &KeyPackageStatus,
    ) -> ServiceResult<KeyPackageCount> {
        let box_id = BoxId::parse(&req.box_id)?;
        let secret_hash = SecretHash::of_secret("box secret", &req.box_secret)?;
        Ok(self.store.key_package_status(box_id, secret_hash).await?)
    }

    /// `RegisterUser`.
    pub async fn register_user(&self, req: RegisterUser) -> ServiceResult<()> {
        let signed = req
            .entry
            .ok_or_else(|| BadRequest::Malformed("RegisterUser carries no entry".into()))?;
        let VerifiedEntry(record) = verify_entry(signed)?;
        self.directory.register_user(record).await?;
        // Durable and queued; answer once an epoch makes it visible to lookups.
        Ok(self.transparency.publish_soon().await?)
    }

    /// `DirectoryLookup`.
    pub async fn directory_lookup(
        &self,
        req: &DirectoryLookup,
    ) -> ServiceResult<DirectoryLookupProof> {
        if !valid_username(&req.username) {
            return Err(invalid_username());
        }
        let (root, proof) = self.transparency.lookup(&req.username).await?;
        Ok(DirectoryLookupProof {
            root: Some(root),
            proof,
        })
    }

    /// `DirectoryHistory`.
    pub async fn directory_history(
        &self,
        req: &DirectoryHistory,
    ) -> ServiceResult<DirectoryHistoryProof> {
        if !valid_username(&req.username) {
            return Err(invalid_username());
        }
        let (root, proof) = self.transparency.history(&req.username).await?;
        Ok(DirectoryHistoryProof {
            root: Some(root),
            proof,
        })
    }

    /// `DirectoryAudit`.
    pub async fn directory_audit(
        &self,
        req: &DirectoryAudit,
    ) -> ServiceResult<DirectoryAuditProof> {
        if req.epoch == 0 {
            return Err(BadRequest::InvalidArgument("epoch 0 has no predecessor".into()).into());
        }
        let (start, end, proof) = self.transparency.audit(req.epoch).await?;
        Ok(DirectoryAuditProof {
            start: Some(start),
            end: Some(end),
            proof,
        })
    }

    /// `DirectoryRoot`.
    pub async fn directory_root(&self) -> ServiceResult<SignedRoot> {
        Ok(self.transparency.latest_root().await?)
    }

    /// `LookupUser`.
    pub async fn lookup_user(&self, req: &LookupUser) -> ServiceResult<SignedDirectoryEntry> {
        if !valid_username(&req.username) {
            return Err(invalid_username());
        }
        let record = self
            .directory
            .lookup_user(req.username.clone())
            .await?
            .ok_or(Refusal::NotFound(Entity::User))?;
        Ok(SignedDirectoryEntry {
            entry: record.entry,
            signature: record.signature,
        })
    }

    /// `CreateGroup`.
    pub async fn create_group(&self, req: &CreateGroup) -> ServiceResult<()> {
        let group = NewGroup {
            id: GroupId::parse(&req.group_id)?,
            epoch: req.epoch,
            posting_token_hash: SecretHash::parse("posting token hash", &req.posting_token_hash)?,
            routes: route_grants(&req.routes)?,
        };
        if group.routes.len() > self.limits.max_group_routes {
            return Err(Refusal::LimitExceeded(Limit::GroupRoutes).into());
        }
        Ok(self.store.create_group(group).await?)
    }

    /// `Commit`; returns the group's new epoch.
    pub async fn commit(&self, req: Commit) -> ServiceResult<u64> {
        let group_id = GroupId::parse(&req.group_id)?;
        let posting_token_hash = SecretHash::of_secret("posting token", &req.posting_token)?;
        let next_posting_token_hash =
            SecretHash::parse("next posting token hash", &req.next_posting_token_hash)?;
        check_payload("commit", &req.commit)?;
        let welcome = if req.welcome.is_empty() {
            None
        } else {
            check_bytes("welcome", &req.welcome, MAX_PAYLOAD_BYTES)?;
            Some(req.welcome)
        };
        let add_routes = route_grants(&req.add_routes)?;
        if req.remove_routes.len() > MAX_GROUP_ROUTES {
            return Err(Refusal::LimitExceeded(Limit::GroupRoutes).into());
        }
        let remove_routes = req
            .remove_routes
            .iter()
            .map(|id| QueueId::parse(id))
            .collect::<Result<Vec<_>, _>>()?;
        let op = CommitOp {
            group_id,
            epoch: req.epoch,
            posting_token_hash,
            commit: req.commit,
            next_posting_token_hash,
            add_routes,
            remove_routes,
            welcome,
            max_routes: self.limits.max_group_routes,
            max_queue_bytes: self.limits.max_queue_bytes,
        };
        let committed = self.store.commit(op).await?;
        self.hub.notify(&committed.appended);
        Ok(committed.epoch)
    }

    /// `Post`; `skip` are the routes not to append to (see [`PostOp::skip`]).
    pub async fn post(&self, req: Post, skip: Arc<HashSet<QueueId>>) -> ServiceResult<()> {
        let op = PostOp {
            group_id: GroupId::parse(&req.group_id)?,
            epoch: req.epoch,
            posting_token_hash: SecretHash::of_secret("posting token", &req.posting_token)?,
            message_id: MessageId::parse(&req.message_id)?,
            fresh_id: req.fresh_id,
            payload: {
                check_payload("payload", &req.payload)?;
                Arc::from(req.payload)
            },
            max_queue_bytes: self.limits.max_queue_bytes,
            skip,
        };
        let payload = Arc::clone(&op.payload);
        match self.store.post(op).await? {
            // Committed: subscribers get the payload as it is, without reading it back.
            Posted::Stored { appended } => self.hub.deliver(&appended, &payload),
            Posted::Duplicate => {}
        }
        Ok(())
    }

    /// Deletes messages older than `retention_days` and idempotency keys older than
    /// `posted_id_days`, counted back from `today`.
    pub async fn expire(
        &self,
        today: Day,
        retention_days: u32,
        posted_id_days: u32,
    ) -> ServiceResult<Expired> {
        let expiry = Expiry {
            messages_before: today - Day::from(retention_days),
            posted_ids_before: today - Day::from(posted_id_days),
        };
        Ok(self.store.expire(expiry).await?)
    }

    /// Whether the store answers reads and writes.
    pub async fn healthy(&self) -> bool {
        self.store.health_check().await.is_ok()
    }
}

impl From<KtError> for ServiceError {
    fn from(e: KtError) -> Self {
        match e {
            KtError::NotFound => Refusal::NotFound(Entity::User).into(),
            KtError::NoEpoch => Refusal::NotFound(Entity::Epoch).into(),
            KtError::Store(s) => s.into(),
            KtError::NotPublished => ServerFault::Unavailable.into(),
            other => ServerFault::Directory(other.to_string()).into(),
        }
    }
}

/// Checks a directory entry: size, shape, username, identity key, and the identity key's
/// signature over `DIRECTORY_SIGNATURE_CONTEXT || entry`.
pub fn verify_entry(signed: SignedDirectoryEntry) -> ServiceResult<VerifiedEntry> {
    check_bytes("directory entry", &signed.entry, MAX_DIRECTORY_ENTRY_BYTES)?;
    let entry = DirectoryEntry::decode(signed.entry.as_slice())
        .map_err(|e| BadRequest::Malformed(format!("directory entry: {e}")))?;
    if !valid_username(&entry.username) {
        return Err(invalid_username());
    }
    if entry.devices.len() > MAX_DEVICES {
        return Err(BadRequest::InvalidArgument(format!(
            "an entry lists at most {MAX_DEVICES} devices"
        ))
        .into());
    }
    for device in &entry.devices {
        BoxId::parse(&device.box_id)?;
        if device.signature_key.is_empty() || device.signature_key.len() > MAX_DEVICE_KEY_BYTES {
            return Err(BadRequest::InvalidArgument("device signature key length".into()).into());
        }
    }
    let identity_key = <[u8; 32]>::try_from(entry.identity_key.as_slice())
        .map_err(|_| BadRequest::InvalidArgument("identity key must be 32 bytes".into()))?;
    let key = VerifyingKey::from_bytes(&identity_key).map_err(|_| {
        BadRequest::InvalidArgument("identity key is not an Ed25519 public key".into())
    })?;
    let signature = Signature::from_slice(&signed.signature)
        .map_err(|_| BadRequest::InvalidArgument("signature must be 64 bytes".into()))?;
    let mut message = Vec::with_capacity(DIRECTORY_SIGNATURE_CONTEXT.len() + signed.entry.len());
    message.extend_from_slice(DIRECTORY_SIGNATURE_CONTEXT);
    message.extend_from_slice(&signed.entry);
    key.verify_strict(&message, &signature)
        .map_err(|_| Refusal::Forbidden(Credential::Signature))?;
    Ok(VerifiedEntry(UserRecord {
        username: entry.username,
        identity_key,
        version: entry.version,
        entry: signed.entry,
        signature: signed.signature,
    }))
}

fn invalid_username() -> ServiceError {
    BadRequest::InvalidArgument(
        "a username is 2-32 bytes of a-z, 0-9, '_', '-', '.', starting with a letter or digit"
            .into(),
    )
    .into()
}

/// Parses routes, hashing each send token; duplicates of a queue collapse into one.
fn route_grants(routes: &[Route]) -> ServiceResult<Vec<RouteGrant>> {
    if routes.len() > MAX_GROUP_ROUTES {
        return Err(Refusal::LimitExceeded(Limit::GroupRoutes).into());
    }
    let mut grants: Vec<RouteGrant> = Vec::with_capacity(routes.len());
    let mut seen = std::collections::HashSet::with_capacity(routes.len());
    for route in routes {
        let grant = RouteGrant {
            queue_id: QueueId::parse(&route.queue_id)?,
            send_token_hash: SecretHash::of_secret("send token", &route.send_token)?,
        };
        if seen.insert(grant.queue_id) {
            grants.push(grant);
        }
    }
    Ok(grants)
}

/// A payload must be non-empty and within `MAX_PAYLOAD_BYTES`.
fn check_payload(what: &'static str, bytes: &[u8]) -> Result<(), BadRequest> {
    check_bytes(what, bytes, MAX_PAYLOAD_BYTES)
}

fn check_bytes(what: &'static str, bytes: &[u8], limit: usize) -> Result<(), BadRequest> {
    if bytes.is_empty() {
        return Err(BadRequest::InvalidArgument(format!("{what} is empty")));
    }
    if bytes.len() > limit {
        return Err(BadRequest::TooLarge {
            what,
            len: bytes.len(),
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blindpost_wire::Device;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(key: &SigningKey, entry: &DirectoryEntry) -> SignedDirectoryEntry {
        let bytes = entry.encode_to_vec();
        let mut msg = DIRECTORY_SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(&bytes);
        SignedDirectoryEntry {
            entry: bytes,
            signature: key.sign(&msg).to_bytes().to_vec(),
        }
    }

    fn entry(key: &SigningKey, name: &str) -> DirectoryEntry {
        DirectoryEntry {
            username: name.into(),
            identity_key: key.verifying_key().to_bytes().to_vec(),
            devices: vec![Device {
                signature_key: vec![1; 32],
                box_id: vec![2; 16],
            }],
            version: 1,
        }
    }

    #[test]
    fn a_correctly_signed_entry_verifies() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let v = verify_entry(signed(&key, &entry(&key, "alice"))).unwrap();
        assert_eq!(v.0.username, "alice");
        assert_eq!(v.0.identity_key, key.verifying_key().to_bytes());
    }

    #[test]
    fn a_signature_by_another_key_is_forbidden() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let err = verify_entry(signed(&other, &entry(&key, "alice"))).unwrap_err();
        assert!(matches!(
            err,
            ServiceError::Refused(Refusal::Forbidden(Credential::Signature))
        ));
    }

    #[test]
    fn a_signature_without_the_context_is_forbidden() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let bytes = entry(&key, "alice").encode_to_vec();
        let s = SignedDirectoryEntry {
            signature: key.sign(&bytes).to_bytes().to_vec(),
            entry: bytes,
        };
        assert!(matches!(
            verify_entry(s),
            Err(ServiceError::Refused(Refusal::Forbidden(_)))
        ));
    }

    #[test]
    fn bad_usernames_and_shapes_are_invalid_arguments() {
        let key = SigningKey::from_bytes(&[7; 32]);
        for e in [
            entry(&key, "Alice"),
            DirectoryEntry {
                devices: vec![Device::default(); MAX_DEVICES + 1],
                ..entry(&key, "alice")
            },
            DirectoryEntry {
                identity_key: vec![1; 31],
                ..entry(&key, "alice")
            },
        ] {
            let err = verify_entry(signed(&key, &e)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ServiceError::BadRequest(BadRequest::InvalidArgument(_))
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn payload_checks_refuse_empty_and_oversized() {
        assert!(matches!(
            check_payload("p", &[]),
            Err(BadRequest::InvalidArgument(_))
        ));
        assert!(matches!(
            check_bytes("p", &[0; 5], 4),
            Err(BadRequest::TooLarge {
                len: 5,
                limit: 4,
                ..
            })
        ));
        assert!(check_bytes("p", &[0; 4], 4).is_ok());
    }

    #[test]
    fn duplicate_routes_collapse_and_tokens_are_hashed() {
        let r = Route {
            queue_id: vec![1; 16],
            send_token: vec![2; 32],
        };
        let grants = route_grants(&[r.clone(), r]).unwrap();
        assert_eq!(grants.len(), 1);
        assert_eq!(
            grants[0].send_token_hash,
            SecretHash::of_secret("t", &[2; 32]).unwrap()
        );
    }
}
