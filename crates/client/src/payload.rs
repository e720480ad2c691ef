//! What travels inside an MLS application message: a small JSON document, padded with
//! spaces to a size bucket before encryption so ciphertext sizes reveal little. Not for
//! anything the server sees.

use serde::{Deserialize, Serialize};

/// Smallest padded size in bytes; larger payloads are padded to the next power of two.
pub const MIN_BUCKET: usize = 256;

/// The decrypted content of an application message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppMessage {
    /// Random message id (hex), for deduplication.
    pub id: String,
    /// Sender's clock, seconds since the UNIX epoch.
    pub sent_at: u64,
    /// What the message carries.
    #[serde(flatten)]
    pub body: Body,
    /// The sender's view of the group: [`epoch_digest`] of the MLS epoch authenticator of the
    /// epoch the message is encrypted in. A receiver in that epoch compares it with its own
    /// and alarms on a mismatch (a fork). Absent in messages from older clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// The sender's counter of application messages in this group (1, 2, ...): a receiver
    /// that sees a counter jump alarms about the messages missing in between (a gap). 0 (and
    /// absent) means the sender does not count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ctr: u64,
    /// Root gossip: the newest key-directory root the sender has seen, so members compare
    /// what the server showed each of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<SeenRoot>,
}

/// A directory root as gossiped between members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRoot {
    /// The epoch.
    pub epoch: u64,
    /// The root hash, hex.
    pub hash: String,
}

/// The digest of an MLS epoch authenticator carried in [`AppMessage::auth`]: the first 6
/// bytes of its SHA-256, hex. Enough to detect a fork (the server cannot compute
/// authenticators, so it cannot search for a collision), and small enough that the seizure
/// drill's 135-character text still fits the smallest padding bucket.
pub fn epoch_digest(epoch_authenticator: &[u8]) -> String {
    hex::encode(&crate::mls::sha256(epoch_authenticator)[..6])
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The kinds of application message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// The chat's metadata (sent by the creator, and after every add so new members learn it).
    Meta {
        /// The group's name; `None` for a 1:1 chat.
        name: Option<String>,
    },
}

impl AppMessage {
    /// Serialize and pad to a bucket.
    pub fn to_padded_bytes(&self) -> Vec<u8> {
        // Invariant: serializing a struct of strings and integers cannot fail.
        #[allow(clippy::expect_used)]
        let mut bytes = serde_json::to_vec(self).expect("AppMessage serializes");
        let bucket = bytes.len().next_power_of_two().max(MIN_BUCKET);
        bytes.resize(bucket, b' ');
        bytes
    }

    /// Parse a padded payload (trailing spaces are JSON whitespace).
    pub fn from_padded_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_gossip_is_optional_both_ways() {
        let old = br#"{"id":"a","sent_at":1,"type":"text","text":"hi"}"#;
        let parsed = AppMessage::from_padded_bytes(old).unwrap();
        assert_eq!(parsed.root, None, "messages without gossip still parse");
        let bytes = parsed.to_padded_bytes();
        assert!(!String::from_utf8_lossy(&bytes).contains("root"));
        let with = AppMessage {
            root: Some(SeenRoot {
                epoch: 3,
                hash: "ab".into(),
            }),
            ..parsed
        };
        assert_eq!(
            AppMessage::from_padded_bytes(&with.to_padded_bytes()).unwrap(),
            with
        );
    }

    #[test]
    fn payloads_are_padded_to_power_of_two_buckets_and_round_trip() {
        let m = AppMessage {
            id: "00".into(),
            sent_at: 1,
            body: Body::Text { text: "hi".into() },
            root: None,
            auth: None,
            ctr: 0,
        };
        let b = m.to_padded_bytes();
        assert_eq!(b.len(), MIN_BUCKET);
        assert_eq!(AppMessage::from_padded_bytes(&b), Some(m));
        let long = AppMessage {
            id: "00".into(),
            sent_at: 1,
            body: Body::Text {
                text: "x".repeat(300),
            },
            root: None,
            auth: None,
            ctr: 0,
        };
        assert_eq!(long.to_padded_bytes().len(), 512);
    }

    #[test]
    fn the_view_and_counter_are_optional_both_ways() {
        // A message from a client that predates them parses, with neither.
        let old = br#"{"id":"00","sent_at":1,"type":"text","text":"hi"}"#;
        let m = AppMessage::from_padded_bytes(old).unwrap();
        assert_eq!((m.auth.as_deref(), m.ctr), (None, 0));
        // A message carrying them round-trips them.
        let m = AppMessage {
            auth: Some(epoch_digest(b"x")),
            ctr: 7,
            ..m
        };
        assert_eq!(AppMessage::from_padded_bytes(&m.to_padded_bytes()), Some(m));
    }

    #[test]
    fn garbage_payloads_are_rejected() {
        assert_eq!(AppMessage::from_padded_bytes(b"{nope"), None);
    }
}
