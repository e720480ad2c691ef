//! Safety numbers: a number two users compare (in person, or over another channel) to be sure
//! each holds the other's real identity key. Derived like Signal's: each side's key and name
//! hashed 5,200 times with SHA-512 into 30 digits; the two halves sorted and joined.

use sha2::{Digest, Sha512};

/// Iterations of the per-side hash (Signal's value).
const ITERATIONS: usize = 5200;

/// A safety number for a pair of users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    /// 60 digits.
    pub digits: String,
    /// The peer's identity key, hex.
    pub peer_identity_key: String,
}

impl SafetyNumber {
    /// The safety number of `(username, identity key)` pairs `a` and `b`; symmetric.
    pub fn new(a: (&str, &[u8]), b: (&str, &[u8])) -> Self {
        let (fa, fb) = (fingerprint(a.0, a.1), fingerprint(b.0, b.1));
        let digits = if fa <= fb { fa + &fb } else { fb + &fa };
        Self {
            digits,
            peer_identity_key: hex::encode(b.1),
        }
    }

    /// The digits in 12 groups of 5, as people read them aloud.
    pub fn grouped(&self) -> String {
        self.digits
            .as_bytes()
            .chunks(5)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn fingerprint(username: &str, key: &[u8]) -> String {
    let mut h = Sha512::new();
    h.update([0u8, 0]);
    h.update(key);
    h.update(username.as_bytes());
    let mut digest = h.finalize();
    for _ in 1..ITERATIONS {
        let mut h = Sha512::new();
        h.update(digest);
        h.update(key);
        digest = h.finalize();
    }
    digest[..30]
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safety_numbers_are_symmetric_sixty_digits() {
        let a = SafetyNumber::new(("alice", &[1; 32]), ("bob", &[2; 32]));
        let b = SafetyNumber::new(("bob", &[2; 32]), ("alice", &[1; 32]));
        assert_eq!(a.digits, b.digits);
        assert_eq!(a.digits.len(), 60);
        assert!(a.digits.bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(a.grouped().split(' ').count(), 12);
    }

    #[test]
    fn a_different_key_changes_the_number() {
        let a = SafetyNumber::new(("alice", &[1; 32]), ("bob", &[2; 32]));
        let b = SafetyNumber::new(("alice", &[1; 32]), ("bob", &[3; 32]));
        assert_ne!(a.digits, b.digits);
    }
}
