//! Catching up: read every queue, process each message (Welcome, application message,
//! proposal, commit) into local state and items, durably, and only then acknowledge it.
//! Everything here treats the server's bytes as hostile: a message that does not parse or
//! verify is skipped (and acknowledged, so it cannot block the queue), never trusted.

use blindpost_wire::{Ack, Fetch, Messages, QueueMessage, Request, Subscribe, response};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use crate::error::{Error, Result};
use crate::mls::{self, identity, sha256};
use crate::now_secs;
use crate::ops::Session;
use crate::payload::{AppMessage, Body, epoch_digest};
use crate::store::{ItemRow, MemberCheck, MemberState, QueueRow, Store};

impl Session<'_> {
    /// Read and process everything pending on every queue we own, then check the member
    /// credentials it showed us against the directory.
    pub(crate) async fn sync_queues(&mut self) -> Result<()> {
        for q in self.client.store.queues()? {
            self.drain_queue(&q).await?;
        }
        self.check_pending_members().await
    }

    /// Read and process everything pending on the queue our leaf in group `gid` names.
    pub(crate) async fn drain_own_route(&mut self, gid: &[u8]) -> Result<()> {
        let route = self.client.store.tx(|s| {
            let group = crate::ops::load_group(s, gid)?;
            let route = mls::leaf_route(&group, group.own_leaf_index());
            s.keep_group(group);
            Ok(route)
        })?;
        let queue = self
            .client
            .store
            .queues()?
            .into_iter()
            .find(|q| Some(&q.id) == route.as_ref())
            .ok_or_else(|| Error::Invalid("our leaf names no queue of this profile".into()))?;
        self.drain_queue(&queue).await
    }

    /// Authenticate a queue on this connection (optionally with pushes).
    pub(crate) async fn subscribe(&mut self, q: &QueueRow, push: bool) -> Result<bool> {
        let last = self.client.store.queue_last_seq(&q.id)?.unwrap_or(0);
        match self
            .conn
            .call(Request::Subscribe(Subscribe {
                queue_id: q.id.clone(),
                receive_secret: q.receive_secret.clone(),
                push,
                after_seq: last,
            }))
            .await
        {
            Ok(_) => {
                self.subscribed.insert(q.id.clone());
                Ok(true)
            }
            // The server does not know the queue (lost, or retention-expired): nothing to read.
            Err(Error::Server {
                code: blindpost_wire::ErrorCode::NotFound,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn drain_queue(&mut self, q: &QueueRow) -> Result<()> {
        // A queue this connection already holds is not subscribed again: that would turn off
        // its pushes (`receive --follow` commits, and so reads its queue, while following).
        if !self.subscribed.contains(&q.id) && !self.subscribe(q, false).await? {
            return Ok(());
        }
        let mut last = self.client.store.queue_last_seq(&q.id)?.unwrap_or(0);
        if last > 0 {
            // Anything up to `last` is stored locally; make sure the server forgets it even if
            // we crashed between storing and acknowledging last time.
            self.ack(&q.id, last).await?;
        }
        loop {
            let body = self
                .conn
                .call(Request::Fetch(Fetch {
                    queue_id: q.id.clone(),
                    after_seq: last,
                    limit: 0,
                }))
                .await?;
            let response::Body::Messages(Messages { messages, more }) = body else {
                return Err(Error::BadServerReply(
                    "fetch answered with something else".into(),
                ));
            };
            let Some(max) = messages.iter().map(|m| m.seq).max() else {
                return Ok(());
            };
            if max <= last {
                return Err(Error::BadServerReply("fetch returned old messages".into()));
            }
            self.process_batch(&q.id, &messages)?;
            self.ack(&q.id, max).await?;
            last = max;
            if !more {
                return Ok(());
            }
        }
    }

    pub(crate) async fn ack(&mut self, queue_id: &[u8], up_to_seq: u64) -> Result<()> {
        self.conn
            .call(Request::Ack(Ack {
                queue_id: queue_id.to_vec(),
                up_to_seq,
                quiet: false,
            }))
            .await?;
        Ok(())
    }

    /// Process messages of one queue in one transaction: after it commits, they may be
    /// acknowledged. Messages at or below the queue's processed sequence number are
    /// duplicates (another process, or a redelivery) and are skipped. Counter gaps are judged
    /// per batch, so messages merely reordered within a batch raise no alarm.
    pub(crate) fn process_batch(&self, queue_id: &[u8], messages: &[QueueMessage]) -> Result<()> {
        process_messages(
            &self.client.store,
            &self.profile.username,
            queue_id,
            messages,
        )
    }
}

/// [`Session::process_batch`] on a store, for `me`.
pub(crate) fn process_messages(
    store: &Store,
    me: &str,
    queue_id: &[u8],
    messages: &[QueueMessage],
) -> Result<()> {
    store.tx(|s| {
        let mut last = s.queue_last_seq(queue_id)?.unwrap_or(0);
        let mut sorted: Vec<&QueueMessage> = messages.iter().collect();
        sorted.sort_by_key(|m| m.seq);
        let mut counted = Vec::new();
        for m in sorted {
            if m.seq <= last {
                continue;
            }
            match s.savepoint(|s| process_one(s, me, &m.payload)) {
                Ok(c) => counted.extend(c),
                Err(e @ (Error::Store(_) | Error::Io(_))) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "skipped a message that did not process"),
            }
            s.set_queue_last_seq(queue_id, m.seq)?;
            last = m.seq;
        }
        check_counters(s, counted)
    })
}

/// An application message's sender counter, for gap detection after the batch.
pub(crate) struct Counted {
    group_id: Vec<u8>,
    sender: String,
    ctr: u64,
}

/// Compare the counters seen in a batch with the highest seen before, per group and sender,
/// and alarm about every number skipped. The first message seen from a sender (since we
/// joined) only sets the baseline.
fn check_counters(s: &Store, counted: Vec<Counted>) -> Result<()> {
    let mut by_sender: std::collections::BTreeMap<(Vec<u8>, String), Vec<u64>> =
        std::collections::BTreeMap::new();
    for c in counted {
        by_sender
            .entry((c.group_id, c.sender))
            .or_default()
            .push(c.ctr);
    }
    for ((gid, sender), mut ctrs) in by_sender {
        let joined = s.get(&joined_key(&gid))?.map_or(0, |v| be_u64(&v));
        let key = format!("recv_ctr/{}/{joined}/{sender}", hex::encode(&gid));
        ctrs.sort_unstable();
        ctrs.dedup();
        let high = match s.get(&key)? {
            Some(v) => be_u64(&v),
            None => ctrs[0].saturating_sub(1),
        };
        let new: Vec<u64> = ctrs.into_iter().filter(|c| *c > high).collect();
        let Some(&max) = new.last() else {
            // Only late arrivals: the gap they filled was already reported.
            continue;
        };
        let missing = (max - high).saturating_sub(new.len() as u64);
        if missing > 0 {
            alarm(
                s,
                &gid,
                "gap",
                &format!("{sender}-{}-{max}", high + 1),
                &sender,
                &format!(
                    "{missing} message(s) from {sender} did not arrive: the server dropped or \
                     withheld them"
                ),
            )?;
        }
        s.set(&key, &max.to_be_bytes())?;
    }
    Ok(())
}

/// Profile key of the epoch at which we joined a group (absent: we created it).
fn joined_key(gid: &[u8]) -> String {
    format!("joined/{}", hex::encode(gid))
}

/// A big-endian u64 stored in the profile (0 if malformed).
pub(crate) fn be_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Record an alarm for the user: an item of `kind` (`gap` or `fork`) whose `text` says what
/// happened. `key` makes its id, so the same event alarms once however often it recurs.
fn alarm(s: &Store, gid: &[u8], kind: &str, key: &str, from: &str, text: &str) -> Result<()> {
    tracing::warn!(kind, "alarm: {text}");
    s.add_item(
        &ItemRow {
            id: format!("{}-{kind}-{key}", hex::encode(&gid[..gid.len().min(12)])),
            group_id: gid.to_vec(),
            sender: from.to_string(),
            kind: kind.into(),
            text: Some(text.to_string()),
            subject: None,
            sent_at: now_secs(),
        },
        false,
    )?;
    Ok(())
}

pub(crate) fn process_one(s: &Store, me: &str, payload: &[u8]) -> Result<Option<Counted>> {
    let hash = sha256(payload);
    let own_echo = s.take_echo(&hash)?;
    let msg = MlsMessageIn::tls_deserialize_exact(payload)
        .map_err(|_| Error::BadServerReply("a queued message is not an MLS message".into()))?;
    match msg.extract() {
        MlsMessageBodyIn::Welcome(w) if !own_echo => join(s, me, w).map(|()| None),
        MlsMessageBodyIn::Welcome(_) => Ok(None),
        MlsMessageBodyIn::PrivateMessage(pm) => handle_protocol(s, me, pm.into(), &hash, own_echo),
        MlsMessageBodyIn::PublicMessage(pm) => handle_protocol(s, me, pm.into(), &hash, own_echo),
        _ => Err(Error::BadServerReply(
            "unexpected MLS message type in a queue".into(),
        )),
    }
}

fn join(s: &Store, me: &str, welcome: Welcome) -> Result<()> {
    let provider = s.provider();
    let staged = StagedWelcome::new_from_welcome(&provider, &mls::join_config(), welcome, None)
        .map_err(Error::mls)?;
    let ctx = staged.group_context();
    if let Some(existing) = s.take_group(ctx.group_id())?
        && existing.is_active()
        && existing.epoch() >= ctx.epoch()
    {
        // A replayed (or stale) Welcome to a group we are in: it must not reset our state.
        return Err(Error::BadServerReply(
            "a Welcome to a group we are already in".into(),
        ));
    }
    let inviter = staged
        .welcome_sender()
        .map(|l| identity(l.credential()))
        .map_err(Error::mls)?;
    let group = staged.into_group(&provider).map_err(Error::mls)?;
    let gid = group.group_id().as_slice().to_vec();
    let now = now_secs();
    s.set(&joined_key(&gid), &group.epoch().as_u64().to_be_bytes())?;
    s.ensure_chat(&gid, None, now)?;
    let others: Vec<String> = group
        .members()
        .map(|m| identity(&m.credential))
        .filter(|u| u != me)
        .collect();
    if let [peer] = others.as_slice() {
        // Tentative until the chat's metadata says whether it is a named group.
        s.set_chat_peer(&gid, peer)?;
    }
    // Every credential in the Welcome's ratchet tree (ours too: a leaf naming us with another
    // key is a ghost) is checked against the directory once the batch is stored (the check
    // needs the network).
    for m in group.members() {
        s.note_member(&member_check(&gid, &m.credential, &m.signature_key), true)?;
    }
    s.keep_group(group);
    s.add_item(
        &ItemRow {
            id: format!("{}-joined", hex::encode(&gid[..12])),
            group_id: gid,
            sender: inviter,
            kind: "joined".into(),
            text: None,
            subject: Some(me.to_string()),
            sent_at: now,
        },
        false,
    )?;
    Ok(())
}

fn handle_protocol(
    s: &Store,
    me: &str,
    pm: ProtocolMessage,
    hash: &[u8],
    own_echo: bool,
) -> Result<Option<Counted>> {
    let Some(mut group) = s.take_group(pm.group_id())? else {
        // A group we never joined or already deleted.
        return Ok(None);
    };
    // Kept for the next message unless openmls refused this one (it may have left the
    // group in memory other than it wrote it).
    let mut intact = true;
    let out = handle_in_group(s, me, &mut group, pm, hash, own_echo, &mut intact)?;
    if intact {
        s.keep_group(group);
    }
    Ok(out)
}

fn handle_in_group(
    s: &Store,
    me: &str,
    group: &mut MlsGroup,
    pm: ProtocolMessage,
    hash: &[u8],
    own_echo: bool,
    intact: &mut bool,
) -> Result<Option<Counted>> {
    let provider = s.provider();
    let gid = pm.group_id().clone();
    if !group.is_active() {
        return Ok(None);
    }
    if pm.is_external() {
        // Nobody outside the group changes it: no external senders are listed, external
        // joins are refused. (openmls exempts external messages from the ciphertext-only
        // policy and would apply a valid external commit, so the refusal is ours.)
        return Err(Error::BadServerReply(
            "a proposal or commit from outside the group".into(),
        ));
    }
    let is_commit = pm.content_type() == ContentType::Commit;
    if own_echo {
        if is_commit && group.pending_commit().is_some() && pm.epoch() == group.epoch() {
            // Our commit was accepted: apply it now, after every older message of our queue
            // (`Session::commit` reads the queue up to here; or we never heard the answer).
            let shown = s.take_shown_echo(hash);
            merge_own_commit(s, group, me, hash, shown)?;
        }
        return Ok(None);
    }
    if is_commit && group.pending_commit().is_some() {
        // Someone else's commit won this epoch: ours is void.
        group
            .clear_pending_commit(provider.storage())
            .map_err(Error::mls)?;
    }
    let gid = gid.as_slice().to_vec();
    let msg_epoch = pm.epoch().as_u64();
    let our_epoch = group.epoch().as_u64();
    let processed = match group.process_message(&provider, pm) {
        Ok(p) => p,
        Err(e) => {
            *intact = false;
            return judge_failure(s, &gid, msg_epoch, our_epoch, e);
        }
    };
    let sender = identity(processed.credential());
    let chat_active = s.chat(&gid)?.is_some_and(|c| c.active);
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(am) => {
            let app = AppMessage::from_padded_bytes(&am.into_bytes())
                .ok_or_else(|| Error::Mls("an application message did not parse".into()))?;
            if !chat_active {
                return Ok(None);
            }
            if let Some(root) = &app.root
                && crate::ops::gossip_conflict(s, root)?
            {
                s.add_item(
                    &ItemRow {
                        id: format!("directory-alarm-{}", app.id),
                        group_id: gid.clone(),
                        sender: sender.clone(),
                        kind: "directory_alarm".into(),
                        text: Some(format!(
                            "KEY DIRECTORY ALARM: @{sender} was shown another directory root \
                             for epoch {} than you; the server may be showing members different \
                             directories",
                            root.epoch
                        )),
                        subject: None,
                        sent_at: app.sent_at,
                    },
                    false,
                )?;
            }
            let ours = epoch_digest(group.epoch_authenticator().as_slice());
            if msg_epoch == our_epoch && app.auth.as_ref().is_some_and(|a| *a != ours) {
                alarm(
                    s,
                    &gid,
                    "fork",
                    &format!("e{msg_epoch}-{sender}"),
                    &sender,
                    &format!(
                        "{sender}'s view of the group differs from ours at epoch \
                         {msg_epoch}: the group has forked"
                    ),
                )?;
            }
            let counted = (app.ctr > 0).then(|| Counted {
                group_id: gid.clone(),
                sender: sender.clone(),
                ctr: app.ctr,
            });
            match app.body {
                Body::Text { text } => {
                    s.add_item(
                        &ItemRow {
                            id: app.id,
                            group_id: gid,
                            sender,
                            kind: "message".into(),
                            text: Some(text),
                            subject: None,
                            sent_at: app.sent_at,
                        },
                        false,
                    )?;
                }
                Body::Meta { name } => {
                    s.set_chat_name(&gid, name.as_deref())?;
                    if name.is_none() {
                        s.set_chat_peer(&gid, &sender)?;
                    }
                }
            }
            return Ok(counted);
        }
        ProcessedMessageContent::ProposalMessage(p) => {
            // We accept one kind of standalone proposal: a member asking to leave.
            let leaving = match (p.proposal(), p.sender()) {
                (Proposal::Remove(r), Sender::Member(by)) => r.removed() == *by,
                _ => false,
            };
            if leaving {
                group
                    .store_pending_proposal(provider.storage(), *p)
                    .map_err(Error::mls)?;
            }
        }
        ProcessedMessageContent::StagedCommitMessage(sc) => {
            let items = commit_items(group, &sc, &sender, hash);
            let added = added_members(group, &sc);
            let self_removed = sc.self_removed();
            group
                .merge_staged_commit(&provider, *sc)
                .map_err(Error::mls)?;
            for item in &items {
                s.add_item(item, false)?;
            }
            // Each added member is checked against the directory after the batch, and so is
            // any other credential we have no verdict on (a member's new leaf key).
            for check in &added {
                s.note_member(check, true)?;
            }
            if !self_removed {
                for m in group.members() {
                    s.note_member(&member_check(&gid, &m.credential, &m.signature_key), false)?;
                }
            }
            if self_removed {
                s.set_chat_inactive(&gid)?;
            }
        }
        // openmls recognised our own commit, accepted by the server: apply it.
        ProcessedMessageContent::OwnPendingCommit => {
            merge_own_commit(s, group, me, hash, false)?;
        }
        ProcessedMessageContent::OwnPrivateMessage => {}
        // Unreachable after the `is_external` refusal above; never accepted either way.
        ProcessedMessageContent::ExternalJoinProposalMessage(_) => {}
    }
    Ok(None)
}

/// A message of a group we are in did not process. From a later epoch: a commit was withheld
/// from us (a gap). From our own epoch yet undecryptable: it was made in an epoch we do not
/// share (a fork), or forged. Both are told to the user, once per epoch; anything else
/// (a replay, a message from an old epoch) is skipped silently.
fn judge_failure<E: std::fmt::Debug + std::fmt::Display>(
    s: &Store,
    gid: &[u8],
    msg_epoch: u64,
    our_epoch: u64,
    e: ProcessMessageError<E>,
) -> Result<Option<Counted>> {
    if msg_epoch > our_epoch {
        alarm(
            s,
            gid,
            "gap",
            &format!("e{msg_epoch}"),
            "",
            &format!(
                "a message from epoch {msg_epoch} arrived while we are at epoch {our_epoch}: \
                 a change to the group was withheld from us, and its messages are unreadable"
            ),
        )?;
        return Ok(None);
    }
    let undecryptable = matches!(
        e,
        ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
            openmls::framing::errors::MessageDecryptionError::AeadError
        ))
    );
    if msg_epoch == our_epoch && undecryptable {
        alarm(
            s,
            gid,
            "fork",
            &format!("e{msg_epoch}"),
            "",
            &format!(
                "a message for epoch {msg_epoch}, our current one, does not decrypt: the \
                 group has forked (or the server forged it)"
            ),
        )?;
        return Ok(None);
    }
    Err(Error::mls(e))
}

/// Apply our own pending commit to the group and record what it changed.
pub(crate) fn merge_own_commit(
    s: &Store,
    group: &mut MlsGroup,
    me: &str,
    commit_hash: &[u8],
    shown: bool,
) -> Result<()> {
    let provider = s.provider();
    let (items, added) = match group.pending_commit() {
        Some(sc) => (
            commit_items(group, sc, me, commit_hash),
            added_members(group, sc),
        ),
        None => return Err(Error::Mls("no pending commit to merge".into())),
    };
    group.merge_pending_commit(&provider).map_err(Error::mls)?;
    for item in &items {
        s.add_item(item, shown)?;
    }
    // Invariant: our commits add only key packages `claim_all` checked against a verified
    // directory lookup (user and MLS signature key), so their members are vouched for.
    for check in &added {
        s.set_member_state(check, MemberState::Verified)?;
    }
    Ok(())
}

/// The directory check a member credential needs: its username and MLS signature key.
fn member_check(gid: &[u8], credential: &Credential, signature_key: &[u8]) -> MemberCheck {
    MemberCheck {
        group_id: gid.to_vec(),
        username: identity(credential),
        signature_key: signature_key.to_vec(),
    }
}

/// The credentials a commit adds.
fn added_members(group: &MlsGroup, sc: &StagedCommit) -> Vec<MemberCheck> {
    let gid = group.group_id().as_slice();
    sc.add_proposals()
        .map(|add| {
            let leaf = add.add_proposal().key_package().leaf_node();
            member_check(gid, leaf.credential(), leaf.signature_key().as_slice())
        })
        .collect()
}

/// The membership changes a commit makes, as items (computed before merging, while the
/// removed members are still in the tree).
fn commit_items(
    group: &MlsGroup,
    sc: &StagedCommit,
    committer: &str,
    commit_hash: &[u8],
) -> Vec<ItemRow> {
    let gid = group.group_id().as_slice().to_vec();
    let base = hex::encode(&commit_hash[..12]);
    let now = now_secs();
    let mut items = Vec::new();
    for (i, add) in sc.add_proposals().enumerate() {
        items.push(ItemRow {
            id: format!("{base}-a{i}"),
            group_id: gid.clone(),
            sender: committer.to_string(),
            kind: "member_added".into(),
            text: None,
            subject: Some(identity(
                add.add_proposal().key_package().leaf_node().credential(),
            )),
            sent_at: now,
        });
    }
    for (i, rm) in sc.remove_proposals().enumerate() {
        let removed = rm.remove_proposal().removed();
        let subject = group
            .member(removed)
            .map(identity)
            .unwrap_or_else(|| "(unknown member)".into());
        let left = matches!(rm.sender(), Sender::Member(by) if *by == removed);
        items.push(ItemRow {
            id: format!("{base}-r{i}"),
            group_id: gid.clone(),
            sender: if left {
                subject.clone()
            } else {
                committer.to_string()
            },
            kind: if left {
                "member_left"
            } else {
                "member_removed"
            }
            .into(),
            text: None,
            subject: Some(subject),
            sent_at: now,
        });
    }
    items
}
