//! The user-facing operations: setup, send, group create/add/remove/leave, follow, verify.
//! Each runs as a [`Session`]: profile lock held, connected, caught up. Commits and posts are
//! prepared and persisted in one local transaction *before* they are sent (so a crash can
//! never reuse a ratchet secret or forget a commit the server accepted), then confirmed.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blindpost_wire::{
    ClaimKeyPackage, Commit, CreateGroup, CreateQueue, DIRECTORY_SIGNATURE_CONTEXT, DirectoryEntry,
    DirectoryHistory, DirectoryLookup, DirectoryRoot, ErrorCode, KeyPackageStatus, Post,
    PublishKeyPackages, RegisterUser, Request, Route, SignedDirectoryEntry, SignedRoot, limits,
    limits::MAX_PAYLOAD_BYTES, response,
};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use prost::Message as _;

use crate::error::{Error, Result};
use crate::kt::{self, VerifiedRoot};
use crate::mls::{self, CheckedKeyPackage, Suite, identity, sha256};
use crate::payload::{AppMessage, Body, epoch_digest};
use crate::safety::SafetyNumber;
use crate::signer::DeviceSigner;
use crate::store::{ItemRow, MemberCheck, MemberState, ProfileLock};
use crate::sync::{be_u64, merge_own_commit};
use crate::transport::{Connection, Endpoint, Route as NetRoute, ServerSettings, memo, order};
use crate::{Client, Item, KEY_PACKAGE_LOW_WATER, KEY_PACKAGE_TARGET, now_secs, random_bytes};

/// How often one operation retries after losing an epoch race before giving up.
const MAX_ATTEMPTS: usize = 8;

/// How long a refused key-package claim waits before asking again. The server's default claim
/// rate per connection refills one claim a second after a burst of 20.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// Longest one claim waits for the server's rate limits (a box's default limit refills one
/// claim a minute): past it, the refusal is the answer.
const CLAIM_PATIENCE: Duration = Duration::from_secs(75);

/// What a profile knows about itself.
pub(crate) struct Profile {
    pub(crate) username: String,
    /// Servers, tried in turn (see [`Client::connect`]).
    pub(crate) servers: Vec<ServerSettings>,
    pub(crate) suite: Suite,
    pub(crate) signer: DeviceSigner,
    pub(crate) identity: SigningKey,
}

impl Profile {
    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.username.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }
}

/// One operation in progress: lock held, connection open.
pub(crate) struct Session<'a> {
    pub(crate) client: &'a Client,
    pub(crate) conn: Connection,
    pub(crate) profile: Profile,
    lock: Option<ProfileLock>,
    /// Queues authenticated (`Subscribe`) on this connection: a post skips them
    /// (`Post.skip_subscribed`), so a post to a group whose route is among them gets no echo.
    pub(crate) subscribed: HashSet<Vec<u8>>,
}

/// What a commit does.
enum Change<'a> {
    Add(&'a [CheckedKeyPackage]),
    Remove(Vec<String>),
    PendingProposals,
    /// Fresh keys for our own leaf (and our path), nothing else.
    SelfUpdate,
}

/// Splits additions into commits that fit in a frame. A commit carries every new member's key
/// package and its Welcome the whole ratchet tree, so a large group (a post-quantum one above
/// several hundred members) is built in several commits. The first batch is everyone; a batch
/// whose commit is too large is halved; the next batch starts at the size that last fitted
/// (the tree only grows).
#[derive(Debug)]
struct Batches {
    /// Additions committed so far.
    done: usize,
    /// Size of the next batch.
    take: usize,
    len: usize,
}

impl Batches {
    fn new(len: usize) -> Self {
        Self {
            done: 0,
            take: len,
            len,
        }
    }

    /// The next batch, or `None` once everything is committed.
    fn next(&self) -> Option<std::ops::Range<usize>> {
        (self.done < self.len).then(|| self.done..self.done + self.take)
    }

    /// The batch from [`Batches::next`] was committed.
    fn committed(&mut self) {
        self.done += self.take;
        self.take = self.take.min(self.len - self.done);
    }

    /// The batch was too large: halves it, or returns false if it was one addition.
    fn halve(&mut self) -> bool {
        if self.take <= 1 {
            return false;
        }
        self.take = self.take.div_ceil(2);
        true
    }
}

/// A commit prepared and persisted locally, ready to send.
struct PreparedCommit {
    request: Commit,
    hash: Vec<u8>,
}

impl Client {
    pub(crate) fn load_profile(&self) -> Result<Profile> {
        let s = &self.store;
        let (Some(username), Some(suite), Some(sig_pub), Some(id_secret)) = (
            s.get_str("username")?,
            s.get_str("suite")?,
            s.get("signature_public")?,
            s.get("identity_secret")?,
        ) else {
            return Err(Error::NotSetUp);
        };
        let suite = Suite::from_name(&suite)
            .ok_or_else(|| Error::Mls(format!("unknown suite {suite:?} in profile")))?;
        let provider = s.provider();
        let signer = SignatureKeyPair::read(
            provider.storage(),
            &sig_pub,
            suite.ciphersuite().signature_algorithm(),
        )
        .map(DeviceSigner::new)
        .ok_or_else(|| Error::Mls("the device signature key is missing from the profile".into()))?;
        let id_bytes: [u8; 32] = id_secret
            .as_slice()
            .try_into()
            .map_err(|_| Error::Mls("corrupt identity key in profile".into()))?;
        let servers = self.server_settings()?;
        if servers.is_empty() {
            return Err(Error::NotSetUp);
        }
        Ok(Profile {
            username,
            servers,
            suite,
            signer,
            identity: SigningKey::from_bytes(&id_bytes),
        })
    }

    /// Lock, connect and catch up.
    async fn session(&self) -> Result<Session<'_>> {
        let lock = ProfileLock::acquire(&self.dir)?;
        let profile = self.load_profile()?;
        let conn = self.connect(&profile.servers).await?;
        let mut session = Session {
            client: self,
            conn,
            profile,
            lock: Some(lock),
            subscribed: HashSet::new(),
        };
        session.settle().await?;
        Ok(session)
    }

    /// Connects to the first server of `servers` that answers, starting with the preferred
    /// one and going round the list once; the one that answered becomes preferred. Each
    /// server is tried on each of its paths (direct, relays), the one that last worked first,
    /// and the path that worked is remembered in the profile. A refused certificate or
    /// invalid settings stop the search at once.
    pub(crate) async fn connect(&self, servers: &[ServerSettings]) -> Result<Connection> {
        let start = self.preferred_server.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..servers.len() {
            let index = (start + i) % servers.len();
            let endpoint = Endpoint::parse(&servers[index])?;
            let remembered = self.remembered_route(&servers[index].url)?;
            for path in order(&endpoint, remembered.as_deref()) {
                match Connection::open(&endpoint, path).await {
                    Ok((conn, route)) => {
                        self.preferred_server.store(index, Ordering::Relaxed);
                        self.remember_route(&servers[index].url, &memo(&endpoint, path))?;
                        self.observe(&route);
                        return Ok(conn);
                    }
                    Err(Error::Unreachable(reason)) => {
                        tracing::info!(%reason, "path failed; trying the next");
                        failures.push(reason);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    /// Makes the server after the preferred one preferred (its connection dropped).
    pub(crate) fn rotate_server(&self) {
        self.preferred_server.fetch_add(1, Ordering::Relaxed);
    }

    /// Create the profile: identity and device keys, a key-package box, and the username.
    /// `servers` are nodes of one deployment, tried in turn whenever one does not answer.
    /// Each server's settings (pins, proxy, relays, …) are checked and stored with it.
    pub async fn setup<S: Clone + Into<ServerSettings>>(
        &self,
        servers: &[S],
        username: &str,
        suite: Suite,
    ) -> Result<()> {
        let servers: Vec<ServerSettings> = servers
            .iter()
            .map(|s| s.clone().into().normalized())
            .collect();
        let _lock = ProfileLock::acquire(&self.dir)?;
        if let Some(name) = self.store.get_str("username")? {
            return Err(Error::AlreadySetUp(name));
        }
        if !limits::valid_username(username) {
            return Err(Error::InvalidUsername(username.to_string()));
        }
        if servers.is_empty() {
            return Err(Error::Invalid("name at least one server".into()));
        }
        for (i, server) in servers.iter().enumerate() {
            server.check()?;
            if servers[..i].iter().any(|s| s.url == server.url) {
                return Err(Error::Invalid(format!(
                    "server URL {:?} is listed twice",
                    server.url
                )));
            }
        }
        let mut conn = self.connect(&servers).await?;
        let signer =
            SignatureKeyPair::new(suite.ciphersuite().signature_algorithm()).map_err(Error::mls)?;
        let identity = SigningKey::from_bytes(&random_bytes::<32>());
        let box_id = random_bytes::<16>().to_vec();
        let box_secret = random_bytes::<32>().to_vec();
        self.store.tx(|s| {
            signer.store(s.provider().storage()).map_err(Error::mls)?;
            s.set("signature_public", signer.public())?;
            s.set("identity_secret", identity.as_bytes())?;
            s.set("box_id", &box_id)?;
            s.set("box_secret", &box_secret)?;
            s.set("suite", suite.name().as_bytes())
        })?;
        self.store_servers(&servers)?;
        let profile = Profile {
            username: username.to_string(),
            servers,
            suite,
            signer: DeviceSigner::new(signer),
            identity,
        };
        let entry = DirectoryEntry {
            username: username.to_string(),
            identity_key: profile.identity.verifying_key().to_bytes().to_vec(),
            devices: vec![blindpost_wire::Device {
                signature_key: profile.signer.public().to_vec(),
                box_id: box_id.clone(),
            }],
            version: 1,
        };
        let entry_bytes = entry.encode_to_vec();
        let mut signed_msg = DIRECTORY_SIGNATURE_CONTEXT.to_vec();
        signed_msg.extend_from_slice(&entry_bytes);
        let signature = ed25519_dalek::Signer::sign(&profile.identity, &signed_msg);
        publish_key_packages(self, &mut conn, &profile, KEY_PACKAGE_TARGET, true).await?;
        let signed = SignedDirectoryEntry {
            entry: entry_bytes,
            signature: signature.to_bytes().to_vec(),
        };
        let published_value = signed.encode_to_vec();
        match conn
            .call(Request::RegisterUser(RegisterUser {
                entry: Some(signed),
            }))
            .await
        {
            Ok(_) => {}
            Err(Error::Server {
                code: ErrorCode::Conflict,
                ..
            }) => return Err(Error::UsernameTaken(username.to_string())),
            Err(e) => return Err(e),
        }
        // First contact: pin the server's root-signing key (trust on first use), and remember
        // the value we published so our own history check can tell it from a forged one.
        let body = conn.call(Request::DirectoryRoot(DirectoryRoot {})).await?;
        let response::Body::SignedRoot(root) = body else {
            return Err(Error::BadServerReply(
                "root request answered with something else".into(),
            ));
        };
        let root = kt::verify_root(Some(&root), None)?;
        self.store.tx(|s| {
            s.set("server_key", &root.server_key)?;
            record_published(s, &published_value)?;
            // Only a registered profile counts as set up.
            s.set("username", username.as_bytes())
        })?;
        conn.close().await;
        Ok(())
    }

    /// Catch up on everything pending; new items become available from
    /// [`Client::take_new_items`].
    pub async fn receive(&self) -> Result<()> {
        let session = self.session().await?;
        session.conn.close().await;
        Ok(())
    }

    /// Send a text message to a chat (`@user` creates the 1:1 chat on first use).
    pub async fn send(&self, target: &str, text: &str) -> Result<Item> {
        let mut session = self.session().await?;
        let gid = match self.resolve(target) {
            Ok(gid) => gid,
            Err(Error::UnknownChat(_)) if target.starts_with('@') => {
                let peer = &target[1..];
                session.create_chat(None, &[peer.to_string()]).await?
            }
            Err(e) => return Err(e),
        };
        session.ensure_member(&gid, target)?;
        if let Some(peer) = self.store.chat(&gid)?.and_then(|c| c.peer) {
            session.ensure_confirmed_key_unchanged(&peer).await?;
        }
        let app = session
            .post_app(
                &gid,
                Body::Text {
                    text: text.to_string(),
                },
            )
            .await?;
        session.conn.close().await;
        let item = self
            .items_from_rows(vec![ItemRow {
                id: app.id,
                group_id: gid,
                sender: session.profile.username.clone(),
                kind: "message".into(),
                text: Some(text.to_string()),
                subject: None,
                sent_at: app.sent_at,
            }])?
            .pop();
        item.ok_or_else(|| Error::Mls("sent item vanished".into()))
    }

    /// Create a named group with the given members (usernames without `@`).
    pub async fn create_group(&self, name: &str, members: &[String]) -> Result<String> {
        if name.is_empty() || name.starts_with('@') || name.starts_with('#') {
            return Err(Error::Invalid(
                "a group name must not be empty or start with '@' or '#'".into(),
            ));
        }
        let mut session = self.session().await?;
        let gid = session.create_chat(Some(name), members).await?;
        session.conn.close().await;
        Ok(hex::encode(gid))
    }

    /// Add members to a group.
    pub async fn add_members(&self, target: &str, members: &[String]) -> Result<()> {
        let mut session = self.session().await?;
        let gid = self.resolve(target)?;
        session.ensure_member(&gid, target)?;
        let current = self.member_list(&gid)?;
        for m in members {
            if current.iter().any(|c| &c.username == m) {
                return Err(Error::Invalid(format!(
                    "@{m} is already a member of {target}"
                )));
            }
        }
        let kps = session.claim_all(members).await?;
        session.add(&gid, &kps).await?;
        let name = self.store.chat(&gid)?.and_then(|c| c.name);
        session.post_app(&gid, Body::Meta { name }).await?;
        session.conn.close().await;
        Ok(())
    }

    /// Remove members from a group.
    pub async fn remove_members(&self, target: &str, members: &[String]) -> Result<()> {
        let mut session = self.session().await?;
        let gid = self.resolve(target)?;
        session.ensure_member(&gid, target)?;
        let current = self.member_list(&gid)?;
        for m in members {
            if m == &session.profile.username {
                return Err(Error::Invalid("use `group leave` to leave a group".into()));
            }
            if !current.iter().any(|c| &c.username == m) {
                return Err(Error::Invalid(format!("@{m} is not a member of {target}")));
            }
        }
        session
            .commit(&gid, Change::Remove(members.to_vec()))
            .await?;
        session.conn.close().await;
        Ok(())
    }

    /// Leave a group: ask the others to remove us; stop showing its messages.
    pub async fn leave(&self, target: &str) -> Result<()> {
        let mut session = self.session().await?;
        let gid = self.resolve(target)?;
        session.ensure_member(&gid, target)?;
        session.post_leave(&gid).await?;
        let me = session.profile.username.clone();
        self.store.tx(|s| {
            s.set_chat_inactive(&gid)?;
            s.add_item(
                &ItemRow {
                    id: format!("{}-left-{}", hex::encode(&gid[..12]), now_secs()),
                    group_id: gid.clone(),
                    sender: me.clone(),
                    kind: "member_left".into(),
                    text: None,
                    subject: Some(me.clone()),
                    sent_at: now_secs(),
                },
                true,
            )
        })?;
        session.conn.close().await;
        Ok(())
    }

    /// Receive continuously: catch up, then hand each batch of new items to `on_items` as it
    /// arrives, until `timeout` (if any) passes. Returns `Ok` at the timeout. If the first
    /// connection fails, that is the error; a connection lost later is re-established (with
    /// back-off) and catching up resumes where the store says it stopped.
    pub async fn follow(
        &self,
        timeout: Option<Duration>,
        mut on_items: impl FnMut(Vec<Item>),
    ) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut connected_once = false;
        let mut backoff = Duration::from_millis(250);
        loop {
            match self
                .follow_connection(deadline, &mut on_items, &mut connected_once)
                .await
            {
                Err(Error::Unreachable(reason)) if connected_once => {
                    tracing::info!(%reason, "connection lost; reconnecting");
                    // The node may be gone: try the next one first.
                    self.rotate_server();
                    let pause = match deadline {
                        Some(d) => backoff.min(d.saturating_duration_since(Instant::now())),
                        None => backoff,
                    };
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(());
                    }
                }
                other => return other,
            }
        }
    }

    async fn follow_connection(
        &self,
        deadline: Option<Instant>,
        on_items: &mut impl FnMut(Vec<Item>),
        connected_once: &mut bool,
    ) -> Result<()> {
        let profile = self.load_profile()?;
        let conn = self.connect(&profile.servers).await?;
        *connected_once = true;
        let mut session = Session {
            client: self,
            conn,
            profile,
            lock: Some(ProfileLock::acquire(&self.dir)?),
            subscribed: HashSet::new(),
        };
        session.settle().await?;
        on_items(self.take_new_items()?);
        let mut subscribed = HashSet::new();
        loop {
            // Subscribe queues created since (by us or by another process on this profile).
            for q in self.store.queues()? {
                if !subscribed.contains(&q.id) && session.subscribe(&q, true).await? {
                    subscribed.insert(q.id.clone());
                }
            }
            session.unlock();
            let tick = Duration::from_secs(1);
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(tick),
                None => tick,
            };
            let push = tokio::time::timeout(wait, session.conn.next_push()).await;
            session.relock()?;
            // A timeout only means nothing arrived this tick.
            if let Ok(push) = push {
                let push = push?;
                if !subscribed.contains(&push.queue_id) {
                    return Err(Error::BadServerReply(
                        "a push for a queue we did not subscribe to".into(),
                    ));
                }
                session.process_batch(&push.queue_id, &push.messages)?;
                if let Some(max) = push.messages.iter().map(|m| m.seq).max() {
                    session.ack(&push.queue_id, max).await?;
                }
                session.check_pending_members().await?;
                session.commit_pending_proposals().await?;
            }
            on_items(self.take_new_items()?);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                session.conn.close().await;
                return Ok(());
            }
        }
    }

    /// The safety number with `username`, from directory lookups whose proofs verified, and
    /// what the profile records about it. `action` may record that the users compared it
    /// ([`VerifyAction::Confirm`]) or accept a changed key ([`VerifyAction::AcceptChange`]).
    pub async fn verify_contact(
        &self,
        username: &str,
        action: VerifyAction,
    ) -> Result<Verification> {
        let mut session = self.session().await?;
        let me = session.profile.username.clone();
        let own = session.lookup(&me).await?;
        if own.identity_key != session.profile.identity.verifying_key().to_bytes() {
            return Err(Error::DirectoryAlarm(format!(
                "the directory lists a different identity key for you (@{me}): the server may be \
                 impersonating you"
            )));
        }
        let peer = session.lookup(username).await?;
        session.conn.close().await;
        let key = format!("confirmed/{username}");
        let recorded = self.store.get(&key)?;
        let key_changed = recorded
            .as_deref()
            .is_some_and(|k| k != peer.identity_key.as_slice());
        match action {
            VerifyAction::Show => {}
            VerifyAction::Confirm if key_changed => {
                return Err(Error::KeyChanged(username.to_string()));
            }
            VerifyAction::Confirm => self.store.set(&key, &peer.identity_key)?,
            VerifyAction::AcceptChange => self.store.delete(&key)?,
        }
        let confirmed = self.store.get(&key)?.as_deref() == Some(peer.identity_key.as_slice());
        Ok(Verification {
            safety: SafetyNumber::new((&me, &own.identity_key), (username, &peer.identity_key)),
            directory_verified: true,
            confirmed,
            key_changed: key_changed && !confirmed && action != VerifyAction::AcceptChange,
        })
    }
}

/// What `verify` should record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyAction {
    /// Only show.
    Show,
    /// Record that the users compared the safety number and it matched.
    Confirm,
    /// Accept that a confirmed contact's key changed (unblocks sending; not confirmed).
    AcceptChange,
}

/// The result of `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The safety number.
    pub safety: SafetyNumber,
    /// Whether both identity keys came from directory proofs that verified against a root
    /// signed by the pinned server key (a failure is an error, so this is true when returned).
    pub directory_verified: bool,
    /// Whether the users confirmed this safety number (for the current key).
    pub confirmed: bool,
    /// Whether the peer's key differs from the one the users confirmed.
    pub key_changed: bool,
}

/// The verdict of [`audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The latest epoch; every epoch from 1 to it was proven to extend its predecessor.
    pub latest_epoch: u64,
    /// The key that signed every root, hex.
    pub server_key: String,
    /// The latest root hash, hex.
    pub root_hash: String,
}

/// Audits a server's whole directory history (no account needed): fetches every epoch's
/// signed root and append-only proof and verifies each root's signature (all by one key, or
/// by `pinned` when given), that consecutive answers agree on each root, and that every
/// epoch extends the previous one. Any inconsistency is [`Error::DirectoryAlarm`]. The
/// server is reached as `server` says (pins, proxy, relays); `on_connect` is told the way.
pub async fn audit(
    server: &ServerSettings,
    pinned: Option<[u8; 32]>,
    on_connect: impl FnOnce(&NetRoute),
) -> Result<AuditReport> {
    let endpoint = Endpoint::parse(server)?;
    let mut failures = Vec::new();
    let mut opened = None;
    for path in order(&endpoint, None) {
        match Connection::open(&endpoint, path).await {
            Ok(o) => {
                opened = Some(o);
                break;
            }
            Err(Error::Unreachable(reason)) => failures.push(reason),
            Err(e) => return Err(e),
        }
    }
    let Some((mut conn, route)) = opened else {
        return Err(Error::Unreachable(failures.join("; ")));
    };
    on_connect(&route);
    let body = conn.call(Request::DirectoryRoot(DirectoryRoot {})).await?;
    let response::Body::SignedRoot(latest) = body else {
        return Err(Error::BadServerReply(
            "root request answered with something else".into(),
        ));
    };
    let latest = kt::verify_root(Some(&latest), pinned.as_ref())?;
    let key = latest.server_key;
    let mut previous: Option<VerifiedRoot> = None;
    for epoch in 1..=latest.epoch {
        let body = conn
            .call(Request::DirectoryAudit(blindpost_wire::DirectoryAudit {
                epoch,
            }))
            .await?;
        let response::Body::DirectoryAuditProof(answer) = body else {
            return Err(Error::BadServerReply(
                "audit answered with something else".into(),
            ));
        };
        let start = kt::verify_root(answer.start.as_ref(), Some(&key))?;
        let end = kt::verify_root(answer.end.as_ref(), Some(&key))?;
        if start.epoch + 1 != epoch || end.epoch != epoch {
            return Err(Error::DirectoryAlarm(format!(
                "asked for epoch {epoch}, the server proved {} → {}",
                start.epoch, end.epoch
            )));
        }
        if let Some(prev) = &previous
            && prev.root_hash != start.root_hash
        {
            return Err(Error::DirectoryAlarm(format!(
                "the server gave two different roots for epoch {}",
                start.epoch
            )));
        }
        kt::verify_audit_step(&start, &end, &answer.proof).await?;
        previous = Some(end);
    }
    if let Some(last) = &previous
        && last.root_hash != latest.root_hash
    {
        return Err(Error::DirectoryAlarm(format!(
            "the server gave two different roots for epoch {}",
            latest.epoch
        )));
    }
    conn.close().await;
    Ok(AuditReport {
        latest_epoch: latest.epoch,
        server_key: hex::encode(key),
        root_hash: hex::encode(latest.root_hash),
    })
}

impl Session<'_> {
    /// Let other processes on this profile work while we wait on the network.
    fn unlock(&mut self) {
        self.lock = None;
    }

    fn relock(&mut self) -> Result<()> {
        self.lock = Some(ProfileLock::acquire(&self.client.dir)?);
        Ok(())
    }

    /// Catch up and finish what others asked of us (commit pending leave requests).
    pub(crate) async fn settle(&mut self) -> Result<()> {
        self.check_own_history().await?;
        self.sync_queues().await?;
        self.commit_pending_proposals().await?;
        self.top_up_key_packages().await
    }

    async fn commit_pending_proposals(&mut self) -> Result<()> {
        for chat in self.client.store.chats()? {
            if !chat.active {
                continue;
            }
            let store = &self.client.store;
            let Some(group) = store.take_group(&GroupId::from_slice(&chat.group_id))? else {
                continue;
            };
            let pending = group.is_active() && group.pending_proposals().next().is_some();
            store.keep_group(group);
            if pending {
                self.commit(&chat.group_id, Change::PendingProposals)
                    .await?;
            }
        }
        Ok(())
    }

    async fn top_up_key_packages(&mut self) -> Result<()> {
        let (Some(box_id), Some(box_secret)) = (
            self.client.store.get("box_id")?,
            self.client.store.get("box_secret")?,
        ) else {
            return Ok(());
        };
        let body = self
            .conn
            .call(Request::KeyPackageStatus(KeyPackageStatus {
                box_id,
                box_secret,
            }))
            .await?;
        let response::Body::KeyPackageCount(count) = body else {
            return Err(Error::BadServerReply(
                "status answered with something else".into(),
            ));
        };
        if count.one_time < KEY_PACKAGE_LOW_WATER {
            let n = KEY_PACKAGE_TARGET.saturating_sub(count.one_time as usize);
            publish_key_packages(
                self.client,
                &mut self.conn,
                &self.profile,
                n,
                !count.has_last_resort,
            )
            .await?;
        }
        Ok(())
    }

    fn ensure_member(&self, gid: &[u8], target: &str) -> Result<()> {
        match self.client.store.chat(gid)? {
            Some(c) if c.active => Ok(()),
            _ => Err(Error::NotAMember(target.to_string())),
        }
    }

    /// Look a user up in the key-transparency directory: the root must verify under the
    /// pinned server key and be consistent with every root seen before, the akd proof must
    /// verify against it, and the entry must be signed by its identity key and name the user.
    pub(crate) async fn lookup(&mut self, username: &str) -> Result<DirectoryEntry> {
        if !limits::valid_username(username) {
            return Err(Error::InvalidUsername(username.to_string()));
        }
        let body = match self
            .conn
            .call(Request::DirectoryLookup(DirectoryLookup {
                username: username.to_string(),
            }))
            .await
        {
            Err(Error::Server {
                code: ErrorCode::NotFound,
                ..
            }) => return Err(Error::UnknownUser(username.to_string())),
            other => other?,
        };
        let response::Body::DirectoryLookupProof(answer) = body else {
            return Err(Error::BadServerReply(
                "lookup answered with something else".into(),
            ));
        };
        let root = self.accept_root(answer.root.as_ref())?;
        let signed = kt::verify_lookup(username, &root, &answer.proof)?;
        verify_entry(username, &signed)
    }

    /// Checks every member credential seen but not yet checked (recorded by `sync` while
    /// processing Welcomes and commits) against the directory: the username must have a
    /// verified lookup whose device list holds the credential's MLS signature key. A member
    /// the directory does not vouch for becomes an `unverified_member` item. Only a failure to
    /// ask (network, local store) is an error; the check then stays pending for next time.
    pub(crate) async fn check_pending_members(&mut self) -> Result<()> {
        let pending = self.client.store.pending_member_checks()?;
        let mut looked_up: Vec<(String, Result<DirectoryEntry, String>)> = Vec::new();
        for check in pending {
            let known = looked_up.iter().position(|(u, _)| u == &check.username);
            let i = match known {
                Some(i) => i,
                None => {
                    let answer = match self.lookup(&check.username).await {
                        Ok(entry) => Ok(entry),
                        Err(
                            e @ (Error::UnknownUser(_)
                            | Error::InvalidUsername(_)
                            | Error::DirectoryAlarm(_)
                            | Error::BadServerReply(_)),
                        ) => Err(e.to_string()),
                        Err(e) => return Err(e),
                    };
                    looked_up.push((check.username.clone(), answer));
                    looked_up.len() - 1
                }
            };
            let user = &check.username;
            let failure = match &looked_up[i].1 {
                Ok(entry)
                    if entry
                        .devices
                        .iter()
                        .any(|d| d.signature_key == check.signature_key) =>
                {
                    None
                }
                Ok(_) => Some(format!(
                    "the key directory does not list @{user}'s MLS key in this chat among \
                     @{user}'s devices"
                )),
                Err(why) => Some(format!(
                    "the key directory does not vouch for @{user}'s key in this chat: {why}"
                )),
            };
            self.client.store.tx(|s| {
                let Some(reason) = &failure else {
                    return s.set_member_state(&check, MemberState::Verified);
                };
                s.set_member_state(&check, MemberState::Unverified)?;
                s.add_item(
                    &ItemRow {
                        id: format!(
                            "unverified-{}-{}",
                            hex::encode(&check.group_id[..12.min(check.group_id.len())]),
                            hex::encode(&sha256(&check.signature_key)[..12])
                        ),
                        group_id: check.group_id.clone(),
                        sender: user.clone(),
                        kind: "unverified_member".into(),
                        text: Some(format!(
                            "UNVERIFIED MEMBER @{user}: {reason}; whoever holds that key can \
                             read this chat"
                        )),
                        subject: Some(user.clone()),
                        sent_at: now_secs(),
                    },
                    false,
                )?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Refuses to go on if `username`'s safety number was confirmed for another key than the
    /// directory now shows.
    fn check_confirmed(&self, username: &str, entry: &DirectoryEntry) -> Result<()> {
        match self.client.store.get(&format!("confirmed/{username}"))? {
            Some(k) if k != entry.identity_key => Err(Error::KeyChanged(username.to_string())),
            _ => Ok(()),
        }
    }

    /// Looks a confirmed contact up and refuses if their key changed (no lookup otherwise).
    async fn ensure_confirmed_key_unchanged(&mut self, username: &str) -> Result<()> {
        if self
            .client
            .store
            .get(&format!("confirmed/{username}"))?
            .is_none()
        {
            return Ok(());
        }
        let entry = self.lookup(username).await?;
        self.check_confirmed(username, &entry)
    }

    /// Verifies a root under the pinned key and checks it against the newest root this
    /// profile has seen: the same epoch must have the same hash (else the server forked the
    /// directory), and epochs never go back. Remembers it if newer.
    fn accept_root(&self, root: Option<&SignedRoot>) -> Result<VerifiedRoot> {
        let pinned: Option<[u8; 32]> = self
            .client
            .store
            .get("server_key")?
            .and_then(|k| k.as_slice().try_into().ok());
        let root = kt::verify_root(root, pinned.as_ref())?;
        check_root_against_seen(&self.client.store, &root)?;
        Ok(root)
    }

    /// Checks every value our username has had in the directory was published by one of
    /// our devices (our identity key signs each; we remember each we registered).
    pub(crate) async fn check_own_history(&mut self) -> Result<()> {
        let me = self.profile.username.clone();
        let body = self
            .conn
            .call(Request::DirectoryHistory(DirectoryHistory {
                username: me.clone(),
            }))
            .await?;
        let response::Body::DirectoryHistoryProof(answer) = body else {
            return Err(Error::BadServerReply(
                "history answered with something else".into(),
            ));
        };
        let root = self.accept_root(answer.root.as_ref())?;
        let values = kt::verify_history(&me, &root, &answer.proof)?;
        if values.is_empty() {
            return Err(Error::DirectoryAlarm(format!(
                "the directory shows no value for your own username @{me}"
            )));
        }
        let published = self.client.store.get("kt_published")?.unwrap_or_default();
        for v in &values {
            let hash = sha256(&v.value);
            if !published.chunks(32).any(|h| h == hash.as_slice()) {
                return Err(Error::DirectoryAlarm(format!(
                    "your username @{me} had a value at directory epoch {} (version {}) that \
                     none of your devices published",
                    v.epoch, v.version
                )));
            }
        }
        Ok(())
    }

    /// Claim one key package for every device of every user, checked against the directory.
    async fn claim_all(&mut self, users: &[String]) -> Result<Vec<CheckedKeyPackage>> {
        let mut out = Vec::new();
        for (i, user) in users.iter().enumerate() {
            if user == &self.profile.username {
                return Err(Error::Invalid("you are already a member".into()));
            }
            if users[..i].contains(user) {
                return Err(Error::Invalid(format!("@{user} is listed twice")));
            }
            let entry = self.lookup(user).await?;
            self.check_confirmed(user, &entry)?;
            for device in &entry.devices {
                let body = match self.claim(&device.box_id).await {
                    Err(Error::Server {
                        code: ErrorCode::NotFound,
                        ..
                    }) => {
                        return Err(Error::Invalid(format!(
                            "@{user} has no key packages left on the server"
                        )));
                    }
                    other => other?,
                };
                let response::Body::KeyPackage(kp) = body else {
                    return Err(Error::BadServerReply(
                        "claim answered with something else".into(),
                    ));
                };
                let provider = self.client.store.provider();
                out.push(mls::check_key_package(
                    &provider,
                    &kp.key_package,
                    self.profile.suite,
                    user,
                    &device.signature_key,
                )?);
            }
        }
        Ok(out)
    }

    /// Claims one key package from `box_id`. A claim refused for a rate limit (the only limit
    /// a claim can meet: per connection, per box, or requests per second) waits and asks
    /// again, for up to [`CLAIM_PATIENCE`]: a group of more than the server's claim burst is
    /// created more slowly, not refused halfway through its claims.
    async fn claim(&mut self, box_id: &[u8]) -> Result<response::Body> {
        let started = Instant::now();
        loop {
            let answer = self
                .conn
                .call(Request::ClaimKeyPackage(ClaimKeyPackage {
                    box_id: box_id.to_vec(),
                }))
                .await;
            match answer {
                Err(Error::Server {
                    code: ErrorCode::LimitExceeded,
                    ..
                }) if started.elapsed() < CLAIM_PATIENCE => tokio::time::sleep(CLAIM_RETRY).await,
                other => return other,
            }
        }
    }

    /// Create a queue on the server and remember it; returns (id, send token).
    async fn new_queue(&mut self) -> Result<(Vec<u8>, Vec<u8>)> {
        new_queue(self.client, &mut self.conn).await
    }

    /// Create a chat: a new group with `members`, named (group) or not (1:1).
    async fn create_chat(&mut self, name: Option<&str>, members: &[String]) -> Result<Vec<u8>> {
        if members.is_empty() {
            return Err(Error::Invalid(
                "a chat needs at least one other member".into(),
            ));
        }
        let kps = self.claim_all(members).await?;
        let (queue_id, send_token) = self.new_queue().await?;
        let gid = random_bytes::<32>().to_vec();
        let peer = if name.is_none() {
            members.first().map(String::as_str)
        } else {
            None
        };
        let token_hash = self.client.store.tx(|s| {
            let provider = s.provider();
            let group = mls::create_group(
                &provider,
                &self.profile.signer,
                self.profile.credential(),
                self.profile.suite,
                &gid,
                &queue_id,
            )?;
            s.ensure_chat(&gid, peer, now_secs())?;
            s.set_chat_name(&gid, name)?;
            Ok(sha256(&mls::posting_token(&group, &provider)?))
        })?;
        self.conn
            .call(Request::CreateGroup(CreateGroup {
                group_id: gid.clone(),
                epoch: 0,
                posting_token_hash: token_hash,
                routes: vec![Route {
                    queue_id,
                    send_token,
                }],
            }))
            .await?;
        self.add(&gid, &kps).await?;
        self.post_app(
            &gid,
            Body::Meta {
                name: name.map(str::to_string),
            },
        )
        .await?;
        Ok(gid)
    }

    /// Adds everyone in `kps`, in as few commits as fit in a frame (see [`Batches`]).
    async fn add(&mut self, gid: &[u8], kps: &[CheckedKeyPackage]) -> Result<()> {
        let mut batches = Batches::new(kps.len());
        while let Some(batch) = batches.next() {
            match self.commit(gid, Change::Add(&kps[batch])).await {
                Ok(()) => batches.committed(),
                Err(Error::CommitTooLarge(_)) if batches.halve() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Submit a commit, rebasing and retrying when another member's commit wins the epoch.
    async fn commit(&mut self, gid: &[u8], change: Change<'_>) -> Result<()> {
        for _ in 0..MAX_ATTEMPTS {
            let prepared = self.prepare_commit(gid, &change)?;
            match self.conn.call(Request::Commit(prepared.request)).await {
                Ok(_) => {
                    let me = self.profile.username.clone();
                    // What the user asked for is shown by the command itself; what we did
                    // on others' behalf (committing a leave) is news for the next receive.
                    let shown = !matches!(change, Change::PendingProposals | Change::SelfUpdate);
                    if shown {
                        self.client.store.show_echo(&prepared.hash);
                    }
                    // The commit is in our own queue now, behind any message of the old epoch
                    // posted before it, and we keep no past epoch's keys
                    // (`mls::MAX_PAST_EPOCHS`): read the queue, which applies the commit at
                    // its echo, after those. If reading fails, the commit stays pending for
                    // the next catch-up to apply the same way.
                    self.drain_own_route(gid).await?;
                    return self.client.store.tx(|s| {
                        let mut group = load_group(s, gid)?;
                        if group.pending_commit().is_some() {
                            // No echo (a server withholding our own commit from us): apply
                            // it anyway; messages of the old epoch after it are unreadable.
                            s.take_shown_echo(&prepared.hash);
                            merge_own_commit(s, &mut group, &me, &prepared.hash, shown)?;
                        }
                        s.keep_group(group);
                        Ok(())
                    });
                }
                Err(e) if matches!(e, Error::Unreachable(_)) => {
                    // Outcome unknown: the pending commit stays; the next catch-up either
                    // sees it echoed (accepted) or sees another commit (void).
                    return Err(e);
                }
                Err(e) => {
                    self.client.store.tx(|s| {
                        s.take_echo(&prepared.hash)?;
                        let mut group = load_group(s, gid)?;
                        group
                            .clear_pending_commit(s.provider().storage())
                            .map_err(Error::mls)?;
                        s.keep_group(group);
                        Ok(())
                    })?;
                    if !e.is_stale_epoch() {
                        return Err(e);
                    }
                    self.sync_queues().await?;
                }
            }
        }
        Err(Error::Invalid(
            "gave up: the group changed too often while committing; try again".into(),
        ))
    }

    fn prepare_commit(&self, gid: &[u8], change: &Change<'_>) -> Result<PreparedCommit> {
        self.client.store.tx(|s| {
            let provider = s.provider();
            let mut group = load_caught_up_group(s, gid)?;
            let epoch = group.epoch().as_u64();
            let posting_token = mls::posting_token(&group, &provider)?;
            let signer = &self.profile.signer;
            let (commit, welcome, add_routes) = match change {
                Change::Add(kps) => {
                    let packages: Vec<KeyPackage> =
                        kps.iter().map(|k| k.key_package.clone()).collect();
                    let (c, w, _) = group
                        .add_members(&provider, signer, &packages)
                        .map_err(Error::mls)?;
                    let routes = kps
                        .iter()
                        .map(|k| Route {
                            queue_id: k.queue_id.clone(),
                            send_token: k.send_token.clone(),
                        })
                        .collect();
                    (c, Some(w), routes)
                }
                Change::Remove(users) => {
                    let leaves: Vec<LeafNodeIndex> = group
                        .members()
                        .filter(|m| users.contains(&identity(&m.credential)))
                        .map(|m| m.index)
                        .collect();
                    if leaves.is_empty() {
                        return Err(Error::Invalid("none of them is a member".into()));
                    }
                    let (c, w, _) = group
                        .remove_members(&provider, signer, &leaves)
                        .map_err(Error::mls)?;
                    (c, w, Vec::new())
                }
                Change::PendingProposals => {
                    let (c, w, _) = group
                        .commit_to_pending_proposals(&provider, signer)
                        .map_err(Error::mls)?;
                    (c, w, Vec::new())
                }
                Change::SelfUpdate => {
                    let (c, w, _) = group
                        .self_update(&provider, signer, LeafNodeParameters::default())
                        .map_err(Error::mls)?
                        .into_messages();
                    (c, w, Vec::new())
                }
            };
            let staged = group
                .pending_commit()
                .ok_or_else(|| Error::Mls("commit was not staged".into()))?;
            let next = mls::next_posting_token(staged, &provider)?;
            let remove_routes = staged
                .remove_proposals()
                .filter_map(|r| mls::leaf_route(&group, r.remove_proposal().removed()))
                .collect();
            let commit = commit.tls_serialize_detached().map_err(Error::mls)?;
            let welcome = match welcome {
                Some(w) => w.tls_serialize_detached().map_err(Error::mls)?,
                None => Vec::new(),
            };
            let hash = sha256(&commit);
            let request = Commit {
                group_id: gid.to_vec(),
                epoch,
                posting_token,
                commit,
                next_posting_token_hash: sha256(&next),
                add_routes,
                remove_routes,
                welcome,
            };
            // Refused before anything is kept: the transaction rolls the pending commit back.
            let len = request.encoded_len();
            if !blindpost_wire::request_fits(len)
                || request.commit.len() > MAX_PAYLOAD_BYTES
                || request.welcome.len() > MAX_PAYLOAD_BYTES
            {
                return Err(Error::CommitTooLarge(len));
            }
            s.add_echo(&hash)?;
            s.keep_group(group);
            Ok(PreparedCommit { request, hash })
        })
    }

    /// Encrypt and post an application message, re-encrypting after catching up if the group
    /// moved on.
    async fn post_app(&mut self, gid: &[u8], body: Body) -> Result<AppMessage> {
        self.refresh_joined_leaf(gid).await?;
        let message_id = random_bytes::<16>();
        // Our counter in this group; consumed only once a post succeeds (a post whose outcome
        // is unknown may reuse it, which receivers take as a late message, not a gap).
        let ctr_key = format!("send_ctr/{}", hex::encode(gid));
        let ctr = self.client.store.get(&ctr_key)?.map_or(0, |v| be_u64(&v)) + 1;
        for _ in 0..MAX_ATTEMPTS {
            let mut app = AppMessage {
                id: hex::encode(message_id),
                sent_at: now_secs(),
                body: body.clone(),
                root: newest_seen_root(&self.client.store)?,
                auth: None,
                ctr,
            };
            let result = self
                .post_mls(gid, &message_id, |group, provider, signer| {
                    seal_app(group, provider, signer, &mut app)
                })
                .await;
            match result {
                Ok(()) => {
                    self.client.store.tx(|s| {
                        s.set(&ctr_key, &ctr.to_be_bytes())?;
                        if let Body::Text { text } = &app.body {
                            s.add_item(
                                &ItemRow {
                                    id: app.id.clone(),
                                    group_id: gid.to_vec(),
                                    sender: self.profile.username.clone(),
                                    kind: "message".into(),
                                    text: Some(text.clone()),
                                    subject: None,
                                    sent_at: app.sent_at,
                                },
                                true,
                            )?;
                        }
                        Ok(())
                    })?;
                    return Ok(app);
                }
                Err(e) if e.is_stale_epoch() => self.sync_queues().await?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid(
            "gave up: the group changed too often while sending; try again".into(),
        ))
    }

    /// Before our first post in a group we joined, replace the leaf we joined with (made with
    /// our key package, which may have waited on the server for days) by fresh keys in a
    /// commit of our own: post-compromise security from our first word, and our path in the
    /// tree filled, so later commits encrypt to one node there instead of to every leaf below
    /// it. On the first post rather than on joining, so the members of a large new group do
    /// not all race to commit at once. In a group where that commit does not fit in a frame
    /// (a sparse post-quantum tree of thousands of leaves) we post without it, and do not try
    /// again there; other members' commits fill the tree.
    async fn refresh_joined_leaf(&mut self, gid: &[u8]) -> Result<()> {
        let store = &self.client.store;
        let Some(group) = store.take_group(&GroupId::from_slice(gid))? else {
            return Ok(());
        };
        let joined_leaf = group.is_active()
            && group.own_leaf_node().is_some_and(|l| {
                matches!(
                    l.leaf_node_source(),
                    openmls::treesync::LeafNodeSource::KeyPackage(_)
                )
            });
        store.keep_group(group);
        // A self-update too large for a frame takes seconds to build: not again in this group.
        let too_large = format!("leaf_refresh_too_large/{}", hex::encode(gid));
        if !joined_leaf || store.get(&too_large)?.is_some() {
            return Ok(());
        }
        match self.commit(gid, Change::SelfUpdate).await {
            Err(Error::CommitTooLarge(len)) => {
                tracing::info!(
                    len,
                    "own-leaf update too large for a frame; posting without it"
                );
                store.set(&too_large, &[])
            }
            other => other,
        }
    }

    /// Ask the group to remove us.
    async fn post_leave(&mut self, gid: &[u8]) -> Result<()> {
        let message_id = random_bytes::<16>();
        for _ in 0..MAX_ATTEMPTS {
            let result = self
                .post_mls(gid, &message_id, |group, provider, signer| {
                    group.leave_group(provider, signer).map_err(Error::mls)
                })
                .await;
            match result {
                Err(e) if e.is_stale_epoch() => self.sync_queues().await?,
                other => return other,
            }
        }
        Err(Error::Invalid(
            "gave up: the group changed too often; try again".into(),
        ))
    }

    /// Build an MLS message in a transaction (persisting the ratchet step), then post it.
    async fn post_mls(
        &mut self,
        gid: &[u8],
        message_id: &[u8],
        build: impl FnOnce(
            &mut MlsGroup,
            &crate::store::Provider<'_>,
            &DeviceSigner,
        ) -> Result<MlsMessageOut>,
    ) -> Result<()> {
        let (epoch, posting_token, payload, skip) = self.client.store.tx(|s| {
            let provider = s.provider();
            let mut group = load_caught_up_group(s, gid)?;
            let out = build(&mut group, &provider, &self.profile.signer)?;
            let payload = out.tls_serialize_detached().map_err(Error::mls)?;
            // Our route authenticated on this connection: the server skips it, nothing
            // echoes. Otherwise the echo comes back (maybe to another process) and is skipped.
            let skip = mls::leaf_route(&group, group.own_leaf_index())
                .is_some_and(|q| self.subscribed.contains(&q));
            if !skip {
                s.add_echo(&sha256(&payload))?;
            }
            let epoch = group.epoch().as_u64();
            let posting_token = mls::posting_token(&group, &provider)?;
            s.keep_group(group);
            Ok((epoch, posting_token, payload, skip))
        })?;
        let hash = sha256(&payload);
        let result = self
            .conn
            .call(Request::Post(Post {
                group_id: gid.to_vec(),
                epoch,
                posting_token,
                message_id: message_id.to_vec(),
                payload,
                skip_subscribed: skip,
                // The client never resends a post whose answer it lost (it reports the
                // failure; sending again encrypts anew under a new id), and a post refused for
                // a stale epoch was not stored, so the id is always fresh.
                fresh_id: true,
            }))
            .await;
        if let Err(e) = &result
            && !skip
            && !matches!(e, Error::Unreachable(_))
        {
            // Definitely not stored: it will never echo back.
            self.client.store.take_echo(&hash)?;
        }
        result.map(|_| ())
    }
}

impl Client {
    /// Current members of a group, from local MLS state.
    pub(crate) fn member_list(&self, gid: &[u8]) -> Result<Vec<crate::Member>> {
        let me = self.store.get_str("username")?.unwrap_or_default();
        let my_key = self.store.get("signature_public")?.unwrap_or_default();
        let Some(group) = self.store.take_group(&GroupId::from_slice(gid))? else {
            return Ok(Vec::new());
        };
        let listed: Vec<_> = if group.is_active() {
            group.members().collect()
        } else {
            Vec::new()
        };
        self.store.keep_group(group);
        let mut members = Vec::new();
        for m in listed {
            let check = MemberCheck {
                group_id: gid.to_vec(),
                username: identity(&m.credential),
                signature_key: m.signature_key,
            };
            // Our own leaf is ours (and our username's history is checked every session); a
            // leaf naming us with another key is someone else and needs the directory's word.
            let me = check.username == me && check.signature_key == my_key;
            members.push(crate::Member {
                verified: me || self.store.member_verified(&check)?,
                me,
                username: check.username,
            });
        }
        members.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(members)
    }
}

/// Stamp `app` with our view of the group (epoch and authenticator digest) and encrypt it.
pub(crate) fn seal_app(
    group: &mut MlsGroup,
    provider: &crate::store::Provider<'_>,
    signer: &impl openmls_traits::signatures::Signer,
    app: &mut AppMessage,
) -> Result<MlsMessageOut> {
    app.auth = Some(epoch_digest(group.epoch_authenticator().as_slice()));
    group
        .create_message(provider, signer, &app.to_padded_bytes())
        .map_err(Error::mls)
}

pub(crate) fn load_group(store: &crate::store::Store, gid: &[u8]) -> Result<MlsGroup> {
    store
        .take_group(&GroupId::from_slice(gid))?
        .ok_or_else(|| Error::NotAMember(format!("#{}", hex::encode(&gid[..4.min(gid.len())]))))
}

/// Load a group to change it, right after catching up: a commit of ours still pending then
/// was never accepted (its echo would have merged it), so it is discarded.
fn load_caught_up_group(store: &crate::store::Store, gid: &[u8]) -> Result<MlsGroup> {
    let mut group = load_group(store, gid)?;
    if group.pending_commit().is_some() {
        group
            .clear_pending_commit(store.provider().storage())
            .map_err(Error::mls)?;
    }
    Ok(group)
}

async fn new_queue(client: &Client, conn: &mut Connection) -> Result<(Vec<u8>, Vec<u8>)> {
    let id = random_bytes::<16>().to_vec();
    let receive_secret = random_bytes::<32>().to_vec();
    let send_token = random_bytes::<32>().to_vec();
    conn.call(Request::CreateQueue(CreateQueue {
        queue_id: id.clone(),
        receive_secret_hash: sha256(&receive_secret),
        send_token_hash: sha256(&send_token),
    }))
    .await?;
    client.store.add_queue(&id, &receive_secret, &send_token)?;
    Ok((id, send_token))
}

/// Create `n` one-time key packages (and a last-resort one if asked), each with a fresh
/// queue, and publish them to our box.
async fn publish_key_packages(
    client: &Client,
    conn: &mut Connection,
    profile: &Profile,
    n: usize,
    last_resort: bool,
) -> Result<()> {
    let mut packages = Vec::with_capacity(n);
    let mut last = Vec::new();
    for i in 0..n + usize::from(last_resort) {
        let (queue_id, send_token) = new_queue(client, conn).await?;
        let is_last_resort = i == n;
        let provider = client.store.provider();
        let kp = client.store.tx(|_| {
            mls::create_key_package(
                &provider,
                &profile.signer,
                profile.credential(),
                profile.suite,
                &queue_id,
                &send_token,
                is_last_resort,
            )
        })?;
        if is_last_resort {
            last = kp;
        } else {
            packages.push(kp);
        }
    }
    let (Some(box_id), Some(box_secret)) =
        (client.store.get("box_id")?, client.store.get("box_secret")?)
    else {
        return Err(Error::NotSetUp);
    };
    conn.call(Request::PublishKeyPackages(PublishKeyPackages {
        box_id,
        box_secret,
        key_packages: packages,
        last_resort: last,
    }))
    .await?;
    Ok(())
}

/// Remembers a directory value our devices published (SHA-256, appended to `kt_published`).
fn record_published(store: &crate::store::Store, value: &[u8]) -> Result<()> {
    let mut all = store.get("kt_published")?.unwrap_or_default();
    all.extend_from_slice(&sha256(value));
    store.set("kt_published", &all)
}

/// The newest root seen is stored as `kt_root` (8-byte big-endian epoch, then the hash).
fn check_root_against_seen(store: &crate::store::Store, root: &VerifiedRoot) -> Result<()> {
    if let Some(seen) = store.get("kt_root")?
        && seen.len() == 40
    {
        let mut e = [0u8; 8];
        e.copy_from_slice(&seen[..8]);
        let seen_epoch = u64::from_be_bytes(e);
        let seen_hash = &seen[8..];
        if root.epoch == seen_epoch && root.root_hash.as_slice() != seen_hash {
            return Err(Error::DirectoryAlarm(format!(
                "the server showed two different directories for epoch {seen_epoch}"
            )));
        }
        if root.epoch < seen_epoch {
            return Err(Error::DirectoryAlarm(format!(
                "the directory went back from epoch {seen_epoch} to {}",
                root.epoch
            )));
        }
        if root.epoch == seen_epoch {
            return Ok(());
        }
    }
    let mut bytes = root.epoch.to_be_bytes().to_vec();
    bytes.extend_from_slice(&root.root_hash);
    store.set(&format!("kt_root/{}", root.epoch), &root.root_hash)?;
    store.set("kt_root", &bytes)
}

/// The newest root this profile has seen, for gossip.
fn newest_seen_root(store: &crate::store::Store) -> Result<Option<crate::payload::SeenRoot>> {
    Ok(store.get("kt_root")?.filter(|b| b.len() == 40).map(|b| {
        let mut e = [0u8; 8];
        e.copy_from_slice(&b[..8]);
        crate::payload::SeenRoot {
            epoch: u64::from_be_bytes(e),
            hash: hex::encode(&b[8..]),
        }
    }))
}

/// Compares a member's gossiped root with the one we saw for that epoch, if we saw one:
/// a difference means the server showed us different directories.
pub(crate) fn gossip_conflict(
    store: &crate::store::Store,
    theirs: &crate::payload::SeenRoot,
) -> Result<bool> {
    Ok(store
        .get(&format!("kt_root/{}", theirs.epoch))?
        .is_some_and(|mine| hex::encode(mine) != theirs.hash))
}

/// Decode a signed directory entry and check it names `username` and verifies under its
/// identity key.
pub(crate) fn verify_entry(
    username: &str,
    signed: &SignedDirectoryEntry,
) -> Result<DirectoryEntry> {
    let bad = |why: &str| Error::BadServerReply(format!("directory entry of @{username}: {why}"));
    if signed.entry.len() > limits::MAX_DIRECTORY_ENTRY_BYTES {
        return Err(bad("too large"));
    }
    let entry = DirectoryEntry::decode(signed.entry.as_slice()).map_err(|_| bad("malformed"))?;
    if entry.username != username {
        return Err(bad("names another user"));
    }
    let key_bytes: [u8; 32] = entry
        .identity_key
        .as_slice()
        .try_into()
        .map_err(|_| bad("identity key has the wrong length"))?;
    let key = VerifyingKey::from_bytes(&key_bytes).map_err(|_| bad("invalid identity key"))?;
    let sig_bytes: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| bad("signature has the wrong length"))?;
    let mut msg = DIRECTORY_SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(&signed.entry);
    key.verify_strict(&msg, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| bad("signature does not verify"))?;
    if entry.devices.is_empty() || entry.devices.len() > limits::MAX_DEVICES {
        return Err(bad("lists no devices or too many"));
    }
    Ok(entry)
}

#[cfg(test)]
mod gossip_tests {
    use super::*;
    use crate::payload::SeenRoot;

    fn root(epoch: u64, byte: u8) -> VerifiedRoot {
        VerifiedRoot {
            epoch,
            root_hash: [byte; 32],
            vrf_public_key: [0; 32],
            server_key: [0; 32],
        }
    }

    #[test]
    fn a_member_shown_another_root_for_an_epoch_we_saw_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        check_root_against_seen(&store, &root(3, 1)).unwrap();
        check_root_against_seen(&store, &root(4, 2)).unwrap();
        let ours = newest_seen_root(&store).unwrap().unwrap();
        assert_eq!(ours.epoch, 4);
        assert!(!gossip_conflict(&store, &ours).unwrap(), "same view");
        let forked = SeenRoot {
            epoch: 3,
            hash: hex::encode([9u8; 32]),
        };
        assert!(
            gossip_conflict(&store, &forked).unwrap(),
            "(3) another root for epoch 3"
        );
        let unknown = SeenRoot {
            epoch: 7,
            hash: hex::encode([9u8; 32]),
        };
        assert!(
            !gossip_conflict(&store, &unknown).unwrap(),
            "an epoch we never saw"
        );
        // The same client shown another root for a seen epoch, or an older epoch.
        assert!(matches!(
            check_root_against_seen(&store, &root(4, 5)),
            Err(Error::DirectoryAlarm(_))
        ));
        assert!(matches!(
            check_root_against_seen(&store, &root(2, 5)),
            Err(Error::DirectoryAlarm(_))
        ));
    }
}

#[cfg(test)]
mod batch_tests {
    use std::ops::Range;

    use super::Batches;

    /// Drives [`Batches`] as `Session::add` does, against a commit whose size is 3 units per
    /// addition (key package and Welcome secrets) plus 1 per member of the grown group (the
    /// ratchet tree in the Welcome), starting from `existing` members, and that fits up to
    /// `limit` units. Returns the committed batches, or `None` if it gave up.
    fn drive(len: usize, existing: usize, limit: usize) -> Option<Vec<Range<usize>>> {
        let mut batches = Batches::new(len);
        let mut committed: Vec<Range<usize>> = Vec::new();
        while let Some(batch) = batches.next() {
            let members = existing + batch.end;
            if 3 * batch.len() + members <= limit {
                committed.push(batch);
                batches.committed();
            } else if !batches.halve() {
                return None;
            }
        }
        Some(committed)
    }

    #[test]
    fn additions_that_fit_go_in_one_commit() {
        let everyone: Range<usize> = 0..999;
        assert_eq!(drive(999, 1, 5_000), Some([everyone].to_vec()));
        let one: Range<usize> = 0..1;
        assert_eq!(drive(1, 1, 5), Some([one].to_vec()));
    }

    #[test]
    fn a_commit_too_large_is_split_and_every_addition_is_committed_once_in_order() {
        // As a post-quantum group: each commit carries the whole tree, so later batches fit
        // fewer additions.
        let batches = drive(999, 1, 2_000).expect("one addition always fits here");
        let flat: Vec<usize> = batches.iter().flat_map(Clone::clone).collect();
        assert_eq!(flat, (0..999).collect::<Vec<_>>());
        // 999 and 500 are too large; then batches of 250 until the rest.
        assert_eq!(batches, vec![0..250, 250..500, 500..750, 750..999]);
        assert!(batches.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn nothing_to_add_makes_no_commit() {
        assert_eq!(drive(0, 1, 10), Some(vec![]));
    }

    #[test]
    fn a_single_addition_too_large_gives_up() {
        assert_eq!(drive(3, 10, 13), None);
    }
}
