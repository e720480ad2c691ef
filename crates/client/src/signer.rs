//! The device's MLS signer: the stored `SignatureKeyPair` with its Ed25519 signing key decoded
//! once. Not for: storing the key (openmls's storage provider keeps the pair) or the directory
//! identity key (`ops::Profile::identity`).

use ed25519_dalek::Signer as _;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use zeroize::Zeroize;

/// Signs as the pair does, with the same (deterministic Ed25519) signatures. Why it exists:
/// `SignatureKeyPair::sign` rebuilds the Ed25519 key from its bytes for every signature, and
/// that derives the public key with a base-point multiplication: ~15 µs of a 2-member
/// message's ~157 µs (perf, BENCHMARKS.md).
pub struct DeviceSigner {
    pair: SignatureKeyPair,
    ed25519: Option<ed25519_dalek::SigningKey>,
}

impl DeviceSigner {
    /// Wraps a pair; a pair whose key cannot be read back (another scheme, or a serde form this
    /// code does not expect) keeps signing through the pair itself.
    pub fn new(pair: SignatureKeyPair) -> Self {
        let ed25519 = if pair.signature_scheme() == SignatureScheme::ED25519 {
            ed25519_key(&pair)
        } else {
            None
        };
        Self { pair, ed25519 }
    }

    /// The stored pair.
    pub fn pair(&self) -> &SignatureKeyPair {
        &self.pair
    }

    /// The public key.
    pub fn public(&self) -> &[u8] {
        self.pair.public()
    }
}

/// The pair's Ed25519 key, read through its serde form (the crate exposes the private half
/// only to its own tests), and only if it matches the pair's public key.
fn ed25519_key(pair: &SignatureKeyPair) -> Option<ed25519_dalek::SigningKey> {
    #[derive(serde::Deserialize)]
    struct Private {
        private: Vec<u8>,
    }
    let mut encoded = rmp_serde::to_vec_named(pair).ok()?;
    let decoded: Option<Private> = rmp_serde::from_slice(&encoded).ok();
    encoded.zeroize();
    let mut decoded = decoded?;
    let mut seed = <[u8; 32]>::try_from(decoded.private.as_slice()).ok();
    decoded.private.zeroize();
    let key = seed.as_ref().map(ed25519_dalek::SigningKey::from_bytes);
    seed.zeroize();
    key.filter(|k| k.verifying_key().as_bytes().as_slice() == pair.public())
}

impl Signer for DeviceSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        match &self.ed25519 {
            Some(key) => Ok(key.sign(payload).to_bytes().to_vec()),
            None => self.pair.sign(payload),
        }
    }

    fn signature_scheme(&self) -> SignatureScheme {
        self.pair.signature_scheme()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_exactly_as_the_pair_does_with_the_key_decoded_once() {
        let pair = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let expected = pair.sign(b"payload").unwrap();
        let signer = DeviceSigner::new(pair);
        assert!(signer.ed25519.is_some(), "the Ed25519 key was read back");
        assert_eq!(signer.sign(b"payload").unwrap(), expected);
        assert_eq!(signer.signature_scheme(), SignatureScheme::ED25519);
    }
}
