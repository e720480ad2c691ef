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

mod bench_support;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod kt;
mod mls;
mod msgpack;
mod nilpack;
mod ops;
mod payload;
mod safety;
mod server_link;
mod signer;
mod store;
mod sync;
mod transport;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use bench_support::{BenchProvider, BenchRoute, BenchStore};
pub use error::{Error, Result};
pub use mls::{CLASSIC_CIPHERSUITE, DEFAULT_CIPHERSUITE, MAX_PAST_EPOCHS, Suite};
pub use ops::{AuditReport, Verification, VerifyAction, audit};
pub use safety::SafetyNumber;
pub use server_link::servers_from_link;
pub use signer::DeviceSigner;
pub use transport::{
    BoxIo, Io, KEEPALIVE, MAX_PINS, MAX_RELAYS, RelaySettings, Route, ServerSettings,
    open_websocket, ws_url,
};

use store::{ChatRow, ItemRow, Store};

/// The server list as stored under the profile key `server`: one URL per line (a profile
/// from before several servers were supported holds exactly one).
pub(crate) fn parse_servers(stored: Option<&str>) -> Vec<String> {
    stored
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The profile key holding every server's settings, a JSON array of [`ServerSettings`].
const SERVERS_KEY: &str = "servers";
/// The older profile key: server URLs, one per line (still written, for older readers).
const LEGACY_SERVER_KEY: &str = "server";
/// The profile key prefix under which the path that last worked is remembered per server URL.
const ROUTE_KEY_PREFIX: &str = "route/";

/// Number of one-time key packages a device keeps on the server.
pub const KEY_PACKAGE_TARGET: usize = 10;
/// Top up when fewer than this many remain.
pub const KEY_PACKAGE_LOW_WATER: u32 = 5;

/// What [`Client::on_connect`] stores.
type RouteObserver = Box<dyn Fn(&Route) + Send + Sync>;

/// A client over one profile directory.
pub struct Client {
    dir: PathBuf,
    store: Store,
    /// Index (into the profile's server list) of the server to try first: the last one that
    /// answered, moved on when a connection drops.
    preferred_server: std::sync::atomic::AtomicUsize,
    /// Told the way each connection went (see [`Client::on_connect`]).
    route_observer: Option<RouteObserver>,
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
    /// `created`, `directory_alarm`, `unverified_member`.
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
    /// Whether the key directory vouches for the member's MLS credential (a verified lookup
    /// lists its signature key among the user's devices). False until the check passed.
    pub verified: bool,
}

impl Client {
    /// Open the profile in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let store = Store::open(&dir)?;
        Ok(Self {
            dir,
            store,
            preferred_server: std::sync::atomic::AtomicUsize::new(0),
            route_observer: None,
        })
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our username, once set up.
    pub fn username(&self) -> Result<Option<String>> {
        self.store.get_str("username")
    }

    /// Calls `observer` with the way every connection to a server went (directly, through a
    /// proxy, through a relay), each time one is opened: what `blindpost -v` shows.
    pub fn on_connect(&mut self, observer: impl Fn(&Route) + Send + Sync + 'static) {
        self.route_observer = Some(Box::new(observer));
    }

    pub(crate) fn observe(&self, route: &Route) {
        if let Some(observer) = &self.route_observer {
            observer(route);
        }
    }

    /// The server URLs, in the order they are tried (empty before setup). Every URL names a
    /// node of the same deployment (one shared database).
    pub fn servers(&self) -> Result<Vec<String>> {
        Ok(self.server_settings()?.into_iter().map(|s| s.url).collect())
    }

    /// Every server's settings, in the order they are tried (empty before setup). A profile
    /// from before settings were stored yields URLs with default settings.
    pub fn server_settings(&self) -> Result<Vec<ServerSettings>> {
        if let Some(json) = self.store.get_str(SERVERS_KEY)? {
            return serde_json::from_str(&json).map_err(|e| {
                Error::Invalid(format!("the profile's server settings are unreadable: {e}"))
            });
        }
        Ok(
            parse_servers(self.store.get_str(LEGACY_SERVER_KEY)?.as_deref())
                .into_iter()
                .map(ServerSettings::new)
                .collect(),
        )
    }

    /// Adds a server (after checking its settings) to the end of the list. Adding a URL that
    /// is already listed is an error.
    pub fn add_server(&self, settings: impl Into<ServerSettings>) -> Result<()> {
        let settings = settings.into().normalized();
        let mut servers = self.server_settings()?;
        if servers.is_empty() {
            return Err(Error::NotSetUp);
        }
        settings.check()?;
        if servers.iter().any(|s| s.url == settings.url) {
            return Err(Error::Invalid(format!(
                "{} is already listed",
                settings.url
            )));
        }
        servers.push(settings);
        self.store_servers(&servers)
    }

    /// Removes a server by its URL; the last one cannot be removed.
    pub fn remove_server(&self, url: &str) -> Result<()> {
        let mut servers = self.server_settings()?;
        let before = servers.len();
        servers.retain(|s| s.url != url);
        if servers.len() == before {
            return Err(Error::Invalid(format!("{url} is not listed")));
        }
        if servers.is_empty() {
            return Err(Error::Invalid(
                "cannot remove the only server; add another first".into(),
            ));
        }
        self.store.delete(&format!("{ROUTE_KEY_PREFIX}{url}"))?;
        self.store_servers(&servers)
    }

    /// Writes the server list: the settings, and the URLs under the older key.
    pub(crate) fn store_servers(&self, servers: &[ServerSettings]) -> Result<()> {
        let json = serde_json::to_string(servers)
            .map_err(|e| Error::Invalid(format!("cannot store the server settings: {e}")))?;
        let urls = servers
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        self.store.tx(|s| {
            s.set(SERVERS_KEY, json.as_bytes())?;
            s.set(LEGACY_SERVER_KEY, urls.as_bytes())
        })
    }

    /// The path that last worked for the server `url` (`direct` or a relay URL).
    pub(crate) fn remembered_route(&self, url: &str) -> Result<Option<String>> {
        self.store.get_str(&format!("{ROUTE_KEY_PREFIX}{url}"))
    }

    /// Remembers the path that worked for the server `url`.
    pub(crate) fn remember_route(&self, url: &str, memo: &str) -> Result<()> {
        if self.remembered_route(url)?.as_deref() == Some(memo) {
            return Ok(());
        }
        self.store
            .set(&format!("{ROUTE_KEY_PREFIX}{url}"), memo.as_bytes())
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn an_old_single_url_profile_is_a_list_of_one_and_the_list_can_be_edited() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::open(dir.path()).unwrap();
        assert!(client.servers().unwrap().is_empty());
        assert!(matches!(
            client.add_server("ws://a:1"),
            Err(Error::NotSetUp)
        ));
        // What a profile written before several servers were supported holds.
        client.store.set("server", b"ws://a:1").unwrap();
        assert_eq!(client.servers().unwrap(), vec!["ws://a:1"]);

        client.add_server("wss://b:2").unwrap();
        assert_eq!(client.servers().unwrap(), vec!["ws://a:1", "wss://b:2"]);
        assert!(client.add_server("wss://b:2").is_err(), "listed twice");
        assert!(client.add_server("http://c:3").is_err(), "not a ws:// URL");
        let err = client.add_server("ws://c:3").unwrap_err();
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        assert!(client.remove_server("ws://nope:9").is_err());
        client.remove_server("ws://a:1").unwrap();
        assert_eq!(client.servers().unwrap(), vec!["wss://b:2"]);
        // The settings are stored as JSON; the URLs also under the old key.
        assert_eq!(
            client.store.get_str("server").unwrap().unwrap(),
            "wss://b:2"
        );
        let mut relayed = ServerSettings::new("wss://d:4/p");
        relayed.proxy = Some("socks5h://u:pw@127.0.0.1:9050".into());
        relayed.relays = vec![RelaySettings::new("wss://r/q", vec![])];
        client.add_server(relayed.clone()).unwrap();
        assert_eq!(client.server_settings().unwrap()[1], relayed);
        client.remove_server("wss://d:4/p").unwrap();
        assert!(
            client.remove_server("wss://b:2").is_err(),
            "the last server stays"
        );
        assert_eq!(client.servers().unwrap(), vec!["wss://b:2"]);
    }

    #[tokio::test]
    async fn connecting_skips_a_dead_server_and_prefers_the_one_that_answered() {
        // A port nothing listens on (bound, then closed), and a live WebSocket server.
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("ws://{}", l.local_addr().unwrap())
        };
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_url = format!("ws://{}", live.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = live.accept().await {
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                    while futures_util::StreamExt::next(&mut ws).await.is_some() {}
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let client = Client::open(dir.path()).unwrap();
        let servers = vec![
            ServerSettings::new(dead.clone()),
            ServerSettings::new(live_url),
        ];
        client.connect(&servers).await.unwrap().close().await;
        assert_eq!(client.preferred_server.load(Ordering::Relaxed), 1);
        // After a drop the client tries the next one first (here: round to the dead one,
        // then on to the live one again).
        client.rotate_server();
        client.connect(&servers).await.unwrap().close().await;
        assert_eq!(client.preferred_server.load(Ordering::Relaxed), 1);
        // With every server dead, the error names each failure.
        let dead = ServerSettings::new(dead);
        let err = client.connect(&[dead.clone(), dead]).await.err().unwrap();
        assert!(
            matches!(err, Error::Unreachable(ref m) if m.contains(';')),
            "{err}"
        );
    }
}
