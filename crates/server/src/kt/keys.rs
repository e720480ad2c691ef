//! The server's two long-term secrets: the directory's VRF key (which hides usernames inside
//! the akd tree) and the Ed25519 key that signs every epoch's root (which clients pin). On
//! SQLite each is a 32-byte file in the data directory created with mode 0600 on first start
//! (`directory-vrf.key`, `server-signing.key`); on PostgreSQL both are a row every node reads
//! (`store::TransparencyStore::shared_keys`), created from [`ServerKeys::fresh`] by the first
//! node. Never akd's hard-coded test key. Not for: anything clients hold.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use akd::ecvrf::{VRFKeyStorage, VrfError};
use async_trait::async_trait;
use ed25519_dalek::SigningKey;

use crate::store::StoredKeys;

/// File name of the VRF secret key.
pub const VRF_KEY_FILE: &str = "directory-vrf.key";
/// File name of the root-signing secret key.
pub const SIGNING_KEY_FILE: &str = "server-signing.key";

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or creating the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a 32-byte key.
    #[error("key file {0} is damaged (not 32 bytes, or not a valid key)")]
    Damaged(PathBuf),
    /// The keys stored in the database are not valid keys.
    #[error("the server keys stored in the database are damaged")]
    DamagedStored,
    /// The OS's random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// The VRF secret key, as akd asks for it.
#[derive(Clone)]
pub struct VrfKey(Arc<[u8; 32]>);

#[async_trait]
impl VRFKeyStorage for VrfKey {
    async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
        Ok(self.0.to_vec())
    }
}

/// The server's keys.
pub struct ServerKeys {
    vrf: VrfKey,
    vrf_public: [u8; 32],
    signing: SigningKey,
}

impl ServerKeys {
    /// Loads both keys from `dir`, creating missing ones from the OS's random source.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        let vrf_path = dir.join(VRF_KEY_FILE);
        let vrf_secret = load_or_create(&vrf_path)?;
        let vrf_private = akd::ecvrf::VRFPrivateKey::try_from(&vrf_secret[..])
            .map_err(|_| KeyError::Damaged(vrf_path))?;
        let vrf_public = akd::ecvrf::VRFPublicKey::from(&vrf_private).to_bytes();
        let signing = SigningKey::from_bytes(&load_or_create(&dir.join(SIGNING_KEY_FILE))?);
        Ok(Self {
            vrf: VrfKey(Arc::new(vrf_secret)),
            vrf_public,
            signing,
        })
    }

    /// Two new random secrets, for a store that keeps the keys (the first node's are kept).
    pub fn fresh() -> Result<StoredKeys, KeyError> {
        let mut keys = StoredKeys {
            vrf: [0; 32],
            signing: [0; 32],
        };
        getrandom::fill(&mut keys.vrf).map_err(|e| KeyError::Random(e.to_string()))?;
        getrandom::fill(&mut keys.signing).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(keys)
    }

    /// The keys a store keeps.
    pub fn from_stored(stored: &StoredKeys) -> Result<Self, KeyError> {
        let vrf_private = akd::ecvrf::VRFPrivateKey::try_from(&stored.vrf[..])
            .map_err(|_| KeyError::DamagedStored)?;
        Ok(Self {
            vrf: VrfKey(Arc::new(stored.vrf)),
            vrf_public: akd::ecvrf::VRFPublicKey::from(&vrf_private).to_bytes(),
            signing: SigningKey::from_bytes(&stored.signing),
        })
    }

    /// The VRF key for akd.
    pub fn vrf(&self) -> VrfKey {
        self.vrf.clone()
    }

    /// The VRF public key.
    pub fn vrf_public(&self) -> [u8; 32] {
        self.vrf_public
    }

    /// The root-signing key.
    pub fn signing(&self) -> &SigningKey {
        &self.signing
    }
}

fn load_or_create(path: &Path) -> Result<[u8; 32], KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Damaged(path.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| io(std::io::Error::other(e)))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(path).map_err(io)?;
            file.write_all(&secret).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(secret)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_reloaded_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerKeys::load_or_create(dir.path()).unwrap();
        let again = ServerKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(first.vrf_public(), again.vrf_public());
        assert_eq!(first.signing().to_bytes(), again.signing().to_bytes());
        #[cfg(unix)]
        for name in [VRF_KEY_FILE, SIGNING_KEY_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn a_damaged_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(VRF_KEY_FILE), b"short").unwrap();
        assert!(matches!(
            ServerKeys::load_or_create(dir.path()),
            Err(KeyError::Damaged(_))
        ));
    }
}
