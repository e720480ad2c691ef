//! Fixed-size identifiers, secret hashes and days: parsed once from wire bytes at the edge, so
//! the service and the stores never handle a byte string of unchecked length.
//! Not for: wire types (see `blindpost_wire`) or anything that does I/O.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use blindpost_wire::{BOX_ID_LEN, GROUP_ID_LEN, MESSAGE_ID_LEN, QUEUE_ID_LEN, SECRET_LEN};

/// A calendar day, counted in days since the UNIX epoch (UTC). The only time unit the server
/// stores: nothing finer than a day is ever kept.
pub type Day = i64;

/// Today, by the system clock.
pub fn today() -> Day {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs / 86_400).unwrap_or(i64::MAX)
}

/// A byte string had the wrong length for the identifier or hash it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {expected} bytes, got {got}")]
pub struct BadLength {
    /// What the bytes were meant to be.
    pub what: &'static str,
    /// The required length.
    pub expected: usize,
    /// The length received.
    pub got: usize,
}

macro_rules! fixed_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Wraps exactly `LEN` bytes.
            pub const fn new(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// Parses wire bytes, refusing any other length.
            pub fn parse(bytes: &[u8]) -> Result<Self, BadLength> {
                <[u8; $len]>::try_from(bytes).map(Self).map_err(|_| BadLength {
                    what: $what,
                    expected: $len,
                    got: bytes.len(),
                })
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            // Ids are random and not secret, but they are pseudonyms: show only a prefix.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({}…)", stringify!($name), hex::encode(&self.0[..4]))
            }
        }
    };
}

fixed_id!(
    /// A queue's random id.
    QueueId, QUEUE_ID_LEN, "queue id"
);
fixed_id!(
    /// A group's random id (the MLS group id).
    GroupId, GROUP_ID_LEN, "group id"
);
fixed_id!(
    /// A key-package box's random id.
    BoxId, BOX_ID_LEN, "box id"
);
fixed_id!(
    /// A post's client-chosen idempotency key.
    MessageId, MESSAGE_ID_LEN, "message id"
);

/// SHA-256 of a secret or token. Equality is constant-time; `Debug` never prints the bytes.
#[derive(Clone, Copy)]
pub struct SecretHash([u8; SECRET_LEN]);

impl SecretHash {
    /// Hashes a secret as shown by a client, refusing a secret of the wrong length.
    pub fn of_secret(what: &'static str, secret: &[u8]) -> Result<Self, BadLength> {
        if secret.len() != SECRET_LEN {
            return Err(BadLength {
                what,
                expected: SECRET_LEN,
                got: secret.len(),
            });
        }
        Ok(Self(Sha256::digest(secret).into()))
    }

    /// Takes a hash the client computed (as in `CreateQueue`), refusing the wrong length.
    pub fn parse(what: &'static str, hash: &[u8]) -> Result<Self, BadLength> {
        <[u8; SECRET_LEN]>::try_from(hash)
            .map(Self)
            .map_err(|_| BadLength {
                what,
                expected: SECRET_LEN,
                got: hash.len(),
            })
    }

    /// Wraps stored hash bytes.
    pub const fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes (for storage only).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether two hashes are equal, in time independent of where they differ.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl PartialEq for SecretHash {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other)
    }
}

impl Eq for SecretHash {}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_hash_is_sha256_of_the_secret() {
        let h = SecretHash::of_secret("s", &[7u8; SECRET_LEN]).unwrap();
        let expected: [u8; 32] = Sha256::digest([7u8; SECRET_LEN]).into();
        assert_eq!(h.as_bytes(), &expected);
        assert_eq!(h, SecretHash::parse("h", &expected).unwrap());
        assert_ne!(h, SecretHash::from_bytes([0; 32]));
    }

    #[test]
    fn wrong_lengths_are_refused_with_what_and_sizes() {
        let e = SecretHash::of_secret("receive secret", &[0; 31]).unwrap_err();
        assert_eq!(e.to_string(), "receive secret must be 32 bytes, got 31");
        assert!(QueueId::parse(&[0; 15]).is_err());
        assert!(GroupId::parse(&[0; 16]).is_err());
        assert_eq!(QueueId::parse(&[1; 16]).unwrap().as_bytes(), &[1; 16]);
    }

    #[test]
    fn debug_output_hides_secrets_and_shortens_ids() {
        let h = SecretHash::from_bytes([0xab; 32]);
        assert!(!format!("{h:?}").contains("ab"));
        let q = QueueId::new([0xcd; 16]);
        assert_eq!(format!("{q:?}"), "QueueId(cdcdcdcd…)");
    }

    #[test]
    fn today_is_after_2024() {
        assert!(today() > 19_700);
    }
}
