//! The blindpost client library: identity, MLS state, conversations, the local store and the
//! transport. Every front end (the `blindpost` CLI, the load tool) uses this; it prints
//! nothing and returns data and typed errors.
//!
//! A [`Client`] owns one profile directory. Each operation takes the profile lock, connects,
//! catches up on everything pending (so a user never acts on a stale view), does its work and
//! returns. Received items are stored durably before they are acknowledged to the server, and
//! kept unshown until [`Client::take_new_items`] hands them out.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod mls;
mod ops;
mod payload;
mod safety;
mod store;
mod sync;
mod transport;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{Error, Result};
pub use mls::{CLASSIC_CIPHERSUITE, DEFAULT_CIPHERSUITE, Suite};
pub use safety::SafetyNumber;
pub use transport::ws_url;

use store::{ChatRow, ItemRow, Store};

/// Number of one-time key packages a device keeps on the server.
pub const KEY_PACKAGE_TARGET: usize = 10;
/// Top up when fewer than this many remain.
pub const KEY_PACKAGE_LOW_WATER: u32 = 5;

/// A client over one profile directory.
pub struct Client {
    dir: PathBuf,
    store: Store,
}

/// Something to show the user: a message or a membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Stable id (deduplication key).
    pub id: String,
    /// The chat's display name (group name, `@peer`, or `#` + group id prefix).
    pub chat: String,
    /// The chat's group id, hex.
    pub chat_id: String,
    /// Who sent it or made the change.
    pub from: String,
    /// `message`, `member_added`, `member_removed`, `member_left`, `joined`, `removed`,
    /// `created`.
    pub kind: String,
    /// The text, for messages.
    pub text: Option<String>,
    /// Whom a membership change is about.
    pub subject: Option<String>,
    /// When it was sent (sender's clock for messages; when we learned of it otherwise).
    pub sent_at: SystemTime,
}

/// A conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    /// Display name (group name, `@peer`, or `#` + group id prefix).
    pub name: String,
    /// Group id, hex.
    pub id: String,
    /// Whether it is a 1:1 chat.
    pub direct: bool,
    /// Whether we are still a member.
    pub active: bool,
    /// Current members' usernames (empty when not a member).
    pub members: Vec<String>,
}

/// A member of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Username.
    pub username: String,
    /// Whether it is us.
    pub me: bool,
}

impl Client {
    /// Open the profile in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let store = Store::open(&dir)?;
        Ok(Self { dir, store })
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our username, once set up.
    pub fn username(&self) -> Result<Option<String>> {
        self.store.get_str("username")
    }

    /// The server URL, once set up.
    pub fn server(&self) -> Result<Option<String>> {
        self.store.get_str("server")
    }

    /// Items not handed out before, oldest first; each is handed out once.
    pub fn take_new_items(&self) -> Result<Vec<Item>> {
        let rows = self.store.tx(|s| s.take_unshown())?;
        self.items_from_rows(rows)
    }

    /// Every chat.
    pub fn chats(&self) -> Result<Vec<Chat>> {
        let rows = self.store.chats()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let members = if row.active {
                self.member_list(&row.group_id)?
                    .into_iter()
                    .map(|m| m.username)
                    .collect()
            } else {
                Vec::new()
            };
            out.push(Chat {
                name: display_name(row),
                id: hex::encode(&row.group_id),
                direct: row.peer.is_some() && row.name.is_none(),
                active: row.active,
                members,
            });
        }
        Ok(out)
    }

    /// A chat's items, oldest first.
    pub fn history(&self, target: &str) -> Result<Vec<Item>> {
        let group_id = self.resolve(target)?;
        let rows = self.store.history(&group_id)?;
        self.items_from_rows(rows)
    }

    /// A chat's current members.
    pub fn members(&self, target: &str) -> Result<Vec<Member>> {
        let group_id = self.resolve(target)?;
        let chat = self.store.chat(&group_id)?;
        if !chat.is_some_and(|c| c.active) {
            return Err(Error::NotAMember(target.to_string()));
        }
        self.member_list(&group_id)
    }

    /// Find the chat a target names: `@user` (the 1:1 chat with that user), `#` + a prefix of
    /// the group id, or a group name.
    pub fn resolve(&self, target: &str) -> Result<Vec<u8>> {
        let chats = self.store.chats()?;
        let matches: Vec<&ChatRow> = if let Some(user) = target.strip_prefix('@') {
            chats
                .iter()
                .filter(|c| c.name.is_none() && c.peer.as_deref() == Some(user))
                .collect()
        } else if let Some(prefix) = target.strip_prefix('#') {
            let prefix = prefix.to_ascii_lowercase();
            chats
                .iter()
                .filter(|c| !prefix.is_empty() && hex::encode(&c.group_id).starts_with(&prefix))
                .collect()
        } else {
            chats
                .iter()
                .filter(|c| c.name.as_deref() == Some(target))
                .collect()
        };
        // Prefer chats we are still in: an old, left chat of the same name is no ambiguity.
        let active: Vec<&ChatRow> = matches.iter().copied().filter(|c| c.active).collect();
        let pick = if active.is_empty() { matches } else { active };
        match pick.as_slice() {
            [] => Err(Error::UnknownChat(target.to_string())),
            [one] => Ok(one.group_id.clone()),
            many => Err(Error::AmbiguousChat(
                target.to_string(),
                many.iter()
                    .map(|c| format!("#{}", &hex::encode(&c.group_id)[..8]))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    fn items_from_rows(&self, rows: Vec<ItemRow>) -> Result<Vec<Item>> {
        let chats = self.store.chats()?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let chat = chats
                    .iter()
                    .find(|c| c.group_id == r.group_id)
                    .map(display_name)
                    .unwrap_or_else(|| format!("#{}", &hex::encode(&r.group_id)[..8]));
                Item {
                    id: r.id,
                    chat,
                    chat_id: hex::encode(&r.group_id),
                    from: r.sender,
                    kind: r.kind,
                    text: r.text,
                    subject: r.subject,
                    sent_at: UNIX_EPOCH + Duration::from_secs(r.sent_at),
                }
            })
            .collect())
    }
}

impl Item {
    /// `sent_at` as RFC 3339 (UTC, seconds).
    pub fn sent_at_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(self.sent_at).to_string()
    }
}

fn display_name(c: &ChatRow) -> String {
    match (&c.name, &c.peer) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => format!("@{p}"),
        (None, None) => format!("#{}", &hex::encode(&c.group_id)[..8]),
    }
}

/// Seconds since the UNIX epoch, now.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `n` random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Invariant: the OS random source does not fail on supported platforms; if it did,
    // continuing with predictable keys would be worse than stopping.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut b).expect("OS random source");
    b
}
