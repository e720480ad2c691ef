//! The profile's local store: one SQLite file (WAL, mode 0600) holding openmls's state
//! (through `openmls_sqlite_storage`) beside our own tables (`bp_*`): profile settings and
//! secrets, queues, chats, received items, echo hashes and the directory verdicts on group
//! members' credentials. Not for talking to the server.
//!
//! Writes that belong together run in one transaction ([`Store::tx`]), and the profile lock
//! ([`ProfileLock`]) serialises whole operations between processes sharing a profile. Loaded
//! MLS groups stay in memory between operations ([`Store::take_group`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openmls::group::{GroupId, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

/// serde codec for openmls's stored values: MessagePack with field names. Binary, and
/// self-describing as openmls's types need (`tls_codec` reads byte strings with
/// `deserialize_any`, which rules out postcard and bincode). JSON, before store format 3,
/// spelled every byte as a number. From format 4, values of 1 KiB or more are stored with
/// their runs of `nil` packed ([`crate::nilpack`]) when that saves a quarter or more: openmls
/// rewrites a group's message secrets (one mostly-empty slot per leaf) on every message.
/// Encoded by [`crate::msgpack`] (the bytes `rmp_serde` writes, packed as they are written),
/// decoded by `rmp_serde`.
#[derive(Default)]
pub struct MsgpackCodec;

/// A value that did not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("stored MLS value: {0}")]
pub struct CodecError(String);

impl Codec for MsgpackCodec {
    type Error = CodecError;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        crate::msgpack::to_vec(value).map_err(|e| CodecError(e.to_string()))
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        if slice.first() == Some(&crate::nilpack::PACKED) {
            let raw = crate::nilpack::unpack(slice).map_err(|e| CodecError(e.to_string()))?;
            return rmp_serde::from_slice(&raw).map_err(|e| CodecError(e.to_string()));
        }
        rmp_serde::from_slice(slice).map_err(|e| CodecError(e.to_string()))
    }
}

/// The openmls provider over the profile's connection.
pub struct Provider<'c> {
    crypto: &'c RustCrypto,
    storage: SqliteStorageProvider<MsgpackCodec, &'c Connection>,
}

impl<'c> OpenMlsProvider for Provider<'c> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<MsgpackCodec, &'c Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

/// The first store format whose openmls values are MessagePack ([`MsgpackCodec`]); profiles of
/// formats 1 and 2 hold JSON and are refused ([`Error::OldProfile`]).
const BINARY_FORMAT: i64 = 3;

/// Our own tables. Versioned by `PRAGMA user_version` (the store format).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE bp_profile (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE bp_queues (
    id BLOB PRIMARY KEY,
    receive_secret BLOB NOT NULL,
    send_token BLOB NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE bp_chats (
    group_id BLOB PRIMARY KEY,
    name TEXT,
    peer TEXT,
    created_at INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE bp_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    group_id BLOB NOT NULL,
    sender TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT,
    subject TEXT,
    sent_at INTEGER NOT NULL,
    shown INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX bp_items_group ON bp_items (group_id, seq);
CREATE TABLE bp_echo (hash BLOB PRIMARY KEY);
"#,
    r#"
CREATE TABLE bp_member_checks (
    group_id BLOB NOT NULL,
    username TEXT NOT NULL,
    signature_key BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'verified', 'unverified')),
    PRIMARY KEY (group_id, username, signature_key)
);
"#,
    // Format 3 (`BINARY_FORMAT`): openmls's values are MessagePack. No table changes.
    "",
    // Format 4: large openmls values may be nil-packed (`nilpack`); format 3 values still
    // read as they are. No table changes.
    "",
];

/// A row of `bp_items`: one thing to show the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRow {
    /// Stable id (message id, or derived from the commit).
    pub id: String,
    /// The group.
    pub group_id: Vec<u8>,
    /// Who did it (username).
    pub sender: String,
    /// `message`, `member_added`, `member_removed`, `member_left`, `joined`, `removed`, `created`.
    pub kind: String,
    /// The text of a message.
    pub text: Option<String>,
    /// Whom a membership change is about.
    pub subject: Option<String>,
    /// Seconds since the UNIX epoch.
    pub sent_at: u64,
}

/// A row of `bp_chats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRow {
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// The group's name (groups) — `None` for 1:1 chats.
    pub name: Option<String>,
    /// The other member (1:1 chats).
    pub peer: Option<String>,
    /// Whether we are still a member.
    pub active: bool,
}

/// The verdict on a group member's MLS credential (before it, the credential is `pending`:
/// seen, not checked yet, as the check needs the network; see [`Store::note_member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// The directory lists the member's MLS signature key among the user's devices.
    Verified,
    /// It does not (unknown user, key not listed, or the proof failed).
    Unverified,
}

impl MemberState {
    fn as_str(self) -> &'static str {
        match self {
            MemberState::Verified => "verified",
            MemberState::Unverified => "unverified",
        }
    }
}

/// A member credential awaiting its directory check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCheck {
    /// The group.
    pub group_id: Vec<u8>,
    /// The username the credential names.
    pub username: String,
    /// The credential's MLS signature key.
    pub signature_key: Vec<u8>,
}

/// A queue we can read.
#[derive(Debug, Clone)]
pub struct QueueRow {
    /// The queue id.
    pub id: Vec<u8>,
    /// Its receive secret.
    pub receive_secret: Vec<u8>,
}

/// How many loaded groups a store keeps in memory (any one is dropped to make room).
const CACHED_GROUPS: usize = 16;

/// The local store of one profile.
pub struct Store {
    conn: Connection,
    crypto: RustCrypto,
    /// Loaded groups, each exactly as the committed store holds it (see [`Store::take_group`]).
    groups: RefCell<HashMap<Vec<u8>, MlsGroup>>,
    /// `PRAGMA data_version` when `groups` was last known to match the store: it changes when
    /// another connection (another process on this profile) commits.
    data_version: Cell<i64>,
    /// Hashes of our own commits whose echo, when it applies them, applies them as already
    /// shown (the command that made them showed them). In memory only: after a restart an
    /// echo applies its commit as news, which is what it then is.
    shown_echoes: RefCell<HashSet<Vec<u8>>>,
}

impl Store {
    /// Open (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let path = dir.join("blindpost.sqlite3");
        if !path.exists() {
            // Create the file with mode 0600 before SQLite opens it.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
        }
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // openmls_sqlite_storage's `openmls_group_data` checks `data_type IN (12 names)`, and
        // SQLite evaluates such a list by building a temporary B-tree of the names on every
        // execution; openmls writes its message secrets there twice per message (sender and
        // receiver), each write a fresh statement. The names come from openmls's code, never
        // from input, and our one CHECK (`bp_member_checks.state`) is written from constants
        // and read by equality. ARCHITECTURE.md "Client store: CHECK constraints ignored".
        conn.pragma_update(None, "ignore_check_constraints", "ON")?;
        // Take the write lock up front: migrations of two processes must not interleave.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| -> Result<()> {
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version < BINARY_FORMAT && holds_openmls_values(&conn)? {
                return Err(Error::OldProfile(u32::try_from(version).unwrap_or(0)));
            }
            for (i, m) in MIGRATIONS
                .iter()
                .enumerate()
                .skip(usize::try_from(version).unwrap_or(0))
            {
                conn.execute_batch(m)?;
                conn.pragma_update(None, "user_version", i as i64 + 1)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        SqliteStorageProvider::<MsgpackCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .map_err(|e| Error::Mls(format!("storage migrations: {e}")))?;
        for suffix in ["-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(Self {
            conn,
            crypto: RustCrypto::default(),
            groups: RefCell::default(),
            data_version: Cell::new(0),
            shown_echoes: RefCell::default(),
        })
    }

    /// A group's MLS state, from memory if nothing changed it since it was put back with
    /// [`Store::keep_group`], else loaded from the store. It is *taken*: until it is kept
    /// again (after the operation on it succeeded), the next call loads it anew.
    ///
    /// Invariant: a kept group equals what the committed store holds. It is kept only after
    /// its operation succeeded; every kept group is dropped when a transaction or savepoint
    /// rolls back and when another connection has committed to the profile (so
    /// `receive --follow` and `send` in two processes each see the other's changes).
    pub fn take_group(&self, gid: &GroupId) -> Result<Option<MlsGroup>> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?;
        if version != self.data_version.replace(version) {
            self.groups.borrow_mut().clear();
        }
        if let Some(group) = self.groups.borrow_mut().remove(gid.as_slice()) {
            return Ok(Some(group));
        }
        MlsGroup::load(self.provider().storage(), gid).map_err(Error::mls)
    }

    /// Put a group back for the next [`Store::take_group`], once what was done with it
    /// succeeded (and is written, or will be when the current transaction commits).
    pub fn keep_group(&self, group: MlsGroup) {
        let mut groups = self.groups.borrow_mut();
        if groups.len() >= CACHED_GROUPS
            && let Some(any) = groups.keys().next().cloned()
        {
            groups.remove(&any);
        }
        groups.insert(group.group_id().as_slice().to_vec(), group);
    }

    /// Forget every kept group: the store may no longer hold what they say.
    fn forget_groups(&self) {
        self.groups.borrow_mut().clear();
    }

    /// The openmls provider over this store.
    pub fn provider(&self) -> Provider<'_> {
        Provider {
            crypto: &self.crypto,
            storage: SqliteStorageProvider::new(&self.conn),
        }
    }

    /// Run `f` in one transaction: everything it wrote is committed together, or nothing.
    pub fn tx<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = f(self).and_then(|v| Ok(self.conn.execute_batch("COMMIT").map(|()| v)?));
        if result.is_err() {
            self.forget_groups();
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        result
    }

    /// Run `f` inside a savepoint of the current transaction: if it fails, only its own
    /// writes are undone.
    pub fn savepoint<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("SAVEPOINT one_message")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("RELEASE one_message")?;
                Ok(v)
            }
            Err(e) => {
                self.forget_groups();
                self.conn
                    .execute_batch("ROLLBACK TO one_message; RELEASE one_message")?;
                Err(e)
            }
        }
    }

    // --- profile settings -----------------------------------------------------------------

    /// A profile value.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM bp_profile WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// A profile value as text.
    pub fn get_str(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Set a profile value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO bp_profile (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Delete a profile value.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM bp_profile WHERE key = ?1", params![key])?;
        Ok(())
    }

    // --- queues -------------------------------------------------------------------------------

    /// Remember a queue we can read.
    pub fn add_queue(&self, id: &[u8], receive_secret: &[u8], send_token: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO bp_queues (id, receive_secret, send_token) VALUES (?1, ?2, ?3)",
            params![id, receive_secret, send_token],
        )?;
        Ok(())
    }

    /// Every queue we read.
    pub fn queues(&self) -> Result<Vec<QueueRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, receive_secret FROM bp_queues ORDER BY rowid")?;
        let rows = st.query_map([], |r| {
            Ok(QueueRow {
                id: r.get(0)?,
                receive_secret: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The highest processed sequence number of a queue.
    pub fn queue_last_seq(&self, id: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT last_seq FROM bp_queues WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .map(|v| v as u64))
    }

    /// Record that a queue's messages up to `seq` are processed.
    pub fn set_queue_last_seq(&self, id: &[u8], seq: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE bp_queues SET last_seq = MAX(last_seq, ?2) WHERE id = ?1",
            params![id, seq as i64],
        )?;
        Ok(())
    }

    // --- chats --------------------------------------------------------------------------------

    /// Create a chat record if absent.
    pub fn ensure_chat(&self, group_id: &[u8], peer: Option<&str>, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO bp_chats (group_id, peer, created_at) VALUES (?1, ?2, ?3)",
            params![group_id, peer, now as i64],
        )?;
        Ok(())
    }

    /// Set a chat's name (`None`: a 1:1 chat).
    pub fn set_chat_name(&self, group_id: &[u8], name: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE bp_chats SET name = ?2 WHERE group_id = ?1",
            params![group_id, name],
        )?;
        Ok(())
    }

    /// Set a 1:1 chat's peer.
    pub fn set_chat_peer(&self, group_id: &[u8], peer: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE bp_chats SET peer = ?2 WHERE group_id = ?1",
            params![group_id, peer],
        )?;
        Ok(())
    }

    /// Mark a chat as left.
    pub fn set_chat_inactive(&self, group_id: &[u8]) -> Result<()> {
        self.conn.execute(
            "UPDATE bp_chats SET active = 0 WHERE group_id = ?1",
            [group_id],
        )?;
        Ok(())
    }

    /// Every chat, oldest first.
    pub fn chats(&self) -> Result<Vec<ChatRow>> {
        let mut st = self.conn.prepare(
            "SELECT group_id, name, peer, active FROM bp_chats ORDER BY created_at, rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ChatRow {
                group_id: r.get(0)?,
                name: r.get(1)?,
                peer: r.get(2)?,
                active: r.get::<_, i64>(3)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One chat.
    pub fn chat(&self, group_id: &[u8]) -> Result<Option<ChatRow>> {
        Ok(self.chats()?.into_iter().find(|c| c.group_id == group_id))
    }

    // --- items --------------------------------------------------------------------------------

    /// Store an item; `false` if one with the same id exists (deduplication).
    pub fn add_item(&self, item: &ItemRow, shown: bool) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO bp_items (id, group_id, sender, kind, text, subject, sent_at, shown)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                item.id,
                item.group_id,
                item.sender,
                item.kind,
                item.text,
                item.subject,
                item.sent_at as i64,
                shown
            ],
        )?;
        Ok(n == 1)
    }

    /// Items not yet shown, oldest first, marking them shown.
    pub fn take_unshown(&self) -> Result<Vec<ItemRow>> {
        let items = self.items_where("shown = 0", params![])?;
        self.conn
            .execute("UPDATE bp_items SET shown = 1 WHERE shown = 0", [])?;
        Ok(items)
    }

    /// A chat's items, oldest first.
    pub fn history(&self, group_id: &[u8]) -> Result<Vec<ItemRow>> {
        self.items_where("group_id = ?1", params![group_id])
    }

    fn items_where(&self, cond: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<ItemRow>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT id, group_id, sender, kind, text, subject, sent_at FROM bp_items
             WHERE {cond} ORDER BY seq"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok(ItemRow {
                id: r.get(0)?,
                group_id: r.get(1)?,
                sender: r.get(2)?,
                kind: r.get(3)?,
                text: r.get(4)?,
                subject: r.get(5)?,
                sent_at: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // --- member credential checks ------------------------------------------------------------

    /// Record a member credential seen in a group as awaiting its directory check. With
    /// `again`, an earlier verdict for the same credential is reset (the member was added
    /// anew); without, an existing verdict stands.
    pub fn note_member(&self, m: &MemberCheck, again: bool) -> Result<()> {
        let sql = if again {
            "INSERT INTO bp_member_checks (group_id, username, signature_key, state)
             VALUES (?1, ?2, ?3, 'pending')
             ON CONFLICT (group_id, username, signature_key) DO UPDATE SET state = 'pending'"
        } else {
            "INSERT OR IGNORE INTO bp_member_checks (group_id, username, signature_key, state)
             VALUES (?1, ?2, ?3, 'pending')"
        };
        self.conn
            .execute(sql, params![m.group_id, m.username, m.signature_key])?;
        Ok(())
    }

    /// Store the verdict on a member credential.
    pub fn set_member_state(&self, m: &MemberCheck, state: MemberState) -> Result<()> {
        self.conn.execute(
            "INSERT INTO bp_member_checks (group_id, username, signature_key, state)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (group_id, username, signature_key) DO UPDATE SET state = excluded.state",
            params![m.group_id, m.username, m.signature_key, state.as_str()],
        )?;
        Ok(())
    }

    /// Every member credential still awaiting its check.
    pub fn pending_member_checks(&self) -> Result<Vec<MemberCheck>> {
        let mut st = self.conn.prepare(
            "SELECT group_id, username, signature_key FROM bp_member_checks
             WHERE state = 'pending' ORDER BY rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(MemberCheck {
                group_id: r.get(0)?,
                username: r.get(1)?,
                signature_key: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether the directory check of a member credential passed.
    pub fn member_verified(&self, m: &MemberCheck) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM bp_member_checks
                 WHERE group_id = ?1 AND username = ?2 AND signature_key = ?3
                   AND state = 'verified'",
                params![m.group_id, m.username, m.signature_key],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    // --- echoes of what we sent -----------------------------------------------------------

    /// Remember the hash of a message we are about to post.
    pub fn add_echo(&self, hash: &[u8]) -> Result<()> {
        self.conn
            .execute("INSERT OR IGNORE INTO bp_echo (hash) VALUES (?1)", [hash])?;
        Ok(())
    }

    /// When the echo of our commit `hash` applies it, apply it as shown.
    pub fn show_echo(&self, hash: &[u8]) {
        self.shown_echoes.borrow_mut().insert(hash.to_vec());
    }

    /// Whether the echo of our commit `hash` applies it as shown ([`Store::show_echo`]);
    /// forgets it.
    pub fn take_shown_echo(&self, hash: &[u8]) -> bool {
        self.shown_echoes.borrow_mut().remove(hash)
    }

    /// Whether `hash` is one of ours; forgets it.
    pub fn take_echo(&self, hash: &[u8]) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM bp_echo WHERE hash = ?1", [hash])?
            == 1)
    }
}

/// Whether any of openmls's tables (named `openmls_*`; not its migration history) has a row.
fn holds_openmls_values(conn: &Connection) -> Result<bool> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name LIKE 'openmls\\_%' ESCAPE '\\'
             AND name != 'openmls_sqlite_storage_migrations'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for table in tables {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM \"{table}\")");
        if conn.query_row(&sql, [], |r| r.get::<_, bool>(0))? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// An exclusive lock on a profile, held for the length of one operation so two processes
/// (say `receive --follow` and `send`) never interleave MLS state changes.
pub struct ProfileLock {
    file: File,
}

impl ProfileLock {
    /// Wait for and take the lock of the profile in `dir`.
    pub fn acquire(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("lock"))?;
        file.lock()?;
        Ok(Self { file })
    }
}

impl Drop for ProfileLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use openmls::prelude::{BasicCredential, CredentialWithKey, LeafNodeParameters};
    use openmls_basic_credential::SignatureKeyPair;

    use super::*;
    use crate::mls::CLASSIC_CIPHERSUITE;

    /// A one-member group created in `store` (epoch 0), and its member's signer.
    fn group(store: &Store) -> (GroupId, SignatureKeyPair) {
        let signer = SignatureKeyPair::new(CLASSIC_CIPHERSUITE.signature_algorithm()).unwrap();
        let cred = CredentialWithKey {
            credential: BasicCredential::new(b"alice".to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let group = store
            .tx(|s| {
                MlsGroup::builder()
                    .ciphersuite(CLASSIC_CIPHERSUITE)
                    .build(&s.provider(), &signer, cred)
                    .map_err(Error::mls)
            })
            .unwrap();
        let gid = group.group_id().clone();
        store.keep_group(group);
        (gid, signer)
    }

    /// Commit a self-update and merge it: the group moves to the next epoch.
    fn next_epoch(s: &Store, group: &mut MlsGroup, signer: &SignatureKeyPair) -> Result<()> {
        let provider = s.provider();
        group
            .self_update(&provider, signer, LeafNodeParameters::default())
            .map_err(Error::mls)?;
        group.merge_pending_commit(&provider).map_err(Error::mls)
    }

    fn epoch(store: &Store, gid: &GroupId) -> u64 {
        let group = store.take_group(gid).unwrap().unwrap();
        let epoch = group.epoch().as_u64();
        store.keep_group(group);
        epoch
    }

    #[test]
    fn a_kept_group_is_reloaded_after_another_connection_changed_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let ours = Store::open(dir.path()).unwrap();
        let (gid, signer) = group(&ours);
        assert_eq!(epoch(&ours, &gid), 0);
        // Another process on the profile (say `receive --follow`) moves the group on.
        let theirs = Store::open(dir.path()).unwrap();
        theirs
            .tx(|s| {
                let mut g = s.take_group(&gid)?.unwrap();
                next_epoch(s, &mut g, &signer)?;
                s.keep_group(g);
                Ok(())
            })
            .unwrap();
        assert_eq!(epoch(&ours, &gid), 1, "not the stale copy kept in memory");
    }

    #[test]
    fn a_group_changed_in_a_transaction_that_rolled_back_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (gid, signer) = group(&store);
        let failed = store.tx(|s| {
            let mut g = s.take_group(&gid)?.unwrap();
            next_epoch(s, &mut g, &signer)?;
            s.keep_group(g);
            Err::<(), _>(Error::Invalid("a later step failed".into()))
        });
        assert!(failed.is_err());
        assert_eq!(epoch(&store, &gid), 0, "the rolled-back epoch is gone");
        let failed = store.tx(|s| {
            s.savepoint(|s| {
                let mut g = s.take_group(&gid)?.unwrap();
                next_epoch(s, &mut g, &signer)?;
                s.keep_group(g);
                Err::<(), _>(Error::Invalid("this message failed".into()))
            })
            .or(Ok(()))
        });
        assert!(failed.is_ok());
        assert_eq!(epoch(&store, &gid), 0, "the rolled-back savepoint is gone");
    }

    #[test]
    fn a_profile_holding_json_mls_state_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _ = group(&store);
        drop(store);
        // What a profile of store format 2 (JSON codec) looks like to this version.
        Connection::open(dir.path().join("blindpost.sqlite3"))
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::OldProfile(2)), "{err}");
        assert!(err.to_string().contains("older blindpost"), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    #[test]
    fn a_format_2_profile_without_mls_state_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        Connection::open(dir.path().join("blindpost.sqlite3"))
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let (gid, _) = group(&store);
        assert_eq!(epoch(&store, &gid), 0);
    }

    #[test]
    fn openmls_writes_build_no_temporary_btree_for_their_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // The statement openmls_sqlite_storage prepares for every group value it writes.
        let sql = "EXPLAIN INSERT OR REPLACE INTO openmls_group_data \
                   (group_id, data_type, group_data, provider_version) VALUES (?, ?, ?, ?)";
        let ops: Vec<String> = store
            .conn
            .prepare(sql)
            .unwrap()
            .query_map(params![b"g".as_slice(), "tree", b"v".as_slice(), 1], |r| {
                r.get(1)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(ops.iter().any(|op| op == "Insert"), "{ops:?}");
        assert!(!ops.iter().any(|op| op == "OpenEphemeral"), "{ops:?}");
    }

    #[test]
    fn small_values_keep_the_format_3_encoding_and_format_3_values_still_read() {
        let small = (b"group id".to_vec(), 7u32);
        let encoded = MsgpackCodec::to_vec(&small).unwrap();
        assert_eq!(encoded, rmp_serde::to_vec_named(&small).unwrap());
        // A large value as format 3 stored it (plain MessagePack) reads back.
        let large: Vec<Option<[u8; 4]>> = vec![None; 5000];
        let plain = rmp_serde::to_vec_named(&large).unwrap();
        let read: Vec<Option<[u8; 4]>> = MsgpackCodec::from_slice(&plain).unwrap();
        assert_eq!(read, large);
    }

    #[test]
    fn a_large_groups_message_secrets_are_stored_packed_and_load_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (gid, signer) = group(&store);
        let scratch = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let key_packages: Vec<_> = (0..400)
            .map(|i| {
                let s = SignatureKeyPair::new(CLASSIC_CIPHERSUITE.signature_algorithm()).unwrap();
                let cred = CredentialWithKey {
                    credential: BasicCredential::new(format!("m{i}").into_bytes()).into(),
                    signature_key: s.public().into(),
                };
                openmls::prelude::KeyPackage::builder()
                    .build(CLASSIC_CIPHERSUITE, &scratch, &s, cred)
                    .unwrap()
                    .key_package()
                    .clone()
            })
            .collect();
        store
            .tx(|s| {
                let provider = s.provider();
                let mut g = s.take_group(&gid)?.unwrap();
                g.add_members(&provider, &signer, &key_packages)
                    .map_err(Error::mls)?;
                g.merge_pending_commit(&provider).map_err(Error::mls)?;
                g.create_message(&provider, &signer, b"first")
                    .map_err(Error::mls)?;
                s.keep_group(g);
                Ok(())
            })
            .unwrap();
        let stored: Vec<u8> = store
            .conn
            .query_row(
                "SELECT group_data FROM openmls_group_data WHERE data_type = 'message_secrets'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored[0], crate::nilpack::PACKED, "stored packed");
        let unpacked = crate::nilpack::unpack(&stored).unwrap();
        assert!(
            stored.len() * 2 < unpacked.len(),
            "{} of {}",
            stored.len(),
            unpacked.len()
        );
        drop(store);
        // A fresh process: the group is read back from the packed value and goes on.
        let store = Store::open(dir.path()).unwrap();
        store
            .tx(|s| {
                let provider = s.provider();
                let mut g = s.take_group(&gid)?.unwrap();
                assert_eq!(g.members().count(), 401);
                g.create_message(&provider, &signer, b"second")
                    .map_err(Error::mls)?;
                s.keep_group(g);
                Ok(())
            })
            .unwrap();
    }
}
