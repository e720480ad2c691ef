//! Key-transparency checks: every directory answer is verified before any key in it is
//! trusted. A signed root must verify under the server key pinned on first contact; a lookup
//! or key-history proof must verify (akd) against that root; an audit step must prove one
//! epoch extends the previous one. Pure functions over wire messages, so hostile-server tests
//! can feed them forged answers. Not for: network I/O or the profile (the callers in `ops`).

use akd::configuration::DomainLabel;
use akd::{AkdLabel, HistoryParams, HistoryVerificationParams};
use blindpost_wire::limits::MAX_HISTORY_VALUES;
use blindpost_wire::{SignedDirectoryEntry, SignedRoot, root_signature_message};
use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message as _;
use protobuf::Message as _;

use crate::error::{Error, Result};

/// akd's domain separation for blindpost (see `blindpost_wire::KT_DOMAIN_LABEL`).
#[derive(Clone, Copy, Debug)]
pub struct BlindpostLabel;

impl DomainLabel for BlindpostLabel {
    fn domain_label() -> &'static [u8] {
        blindpost_wire::KT_DOMAIN_LABEL
    }
}

/// The akd configuration the server uses.
pub type KtConfig = akd::ExperimentalConfiguration<BlindpostLabel>;

/// A root whose signature verified under the expected server key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRoot {
    /// The epoch.
    pub epoch: u64,
    /// The root hash.
    pub root_hash: [u8; 32],
    /// The VRF public key it commits to.
    pub vrf_public_key: [u8; 32],
    /// The server key that signed it.
    pub server_key: [u8; 32],
}

fn alarm(why: impl Into<String>) -> Error {
    Error::DirectoryAlarm(why.into())
}

/// Checks a root's signature, and that its key is `pinned` (when one is pinned).
pub fn verify_root(root: Option<&SignedRoot>, pinned: Option<&[u8; 32]>) -> Result<VerifiedRoot> {
    let root = root.ok_or_else(|| alarm("the server sent no signed root"))?;
    let arr = |b: &[u8], what: &str| -> Result<[u8; 32]> {
        b.try_into()
            .map_err(|_| alarm(format!("the signed root's {what} has the wrong length")))
    };
    let root_hash = arr(&root.root_hash, "hash")?;
    let vrf_public_key = arr(&root.vrf_public_key, "VRF key")?;
    let server_key = arr(&root.server_key, "server key")?;
    if pinned.is_some_and(|p| p != &server_key) {
        return Err(alarm(
            "the directory root is signed by another key than the one pinned for this server",
        ));
    }
    let key = VerifyingKey::from_bytes(&server_key)
        .map_err(|_| alarm("the server key is not an Ed25519 key"))?;
    let sig: [u8; 64] = root
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| alarm("the root signature has the wrong length"))?;
    key.verify_strict(
        &root_signature_message(root.epoch, &root_hash, &vrf_public_key),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| {
        alarm(format!(
            "the signature on epoch {}'s root does not verify",
            root.epoch
        ))
    })?;
    Ok(VerifiedRoot {
        epoch: root.epoch,
        root_hash,
        vrf_public_key,
        server_key,
    })
}

/// Verifies a lookup proof for `username` against `root` and returns the signed entry it
/// proves (the caller still checks the entry's own signature).
pub fn verify_lookup(
    username: &str,
    root: &VerifiedRoot,
    proof: &[u8],
) -> Result<SignedDirectoryEntry> {
    let wire = akd::proto::specs::types::LookupProof::parse_from_bytes(proof)
        .map_err(|_| alarm(format!("the lookup proof for @{username} does not decode")))?;
    let proof = akd::LookupProof::try_from(&wire)
        .map_err(|_| alarm(format!("the lookup proof for @{username} is malformed")))?;
    let result = akd::verify::lookup_verify::<KtConfig>(
        &root.vrf_public_key,
        root.root_hash,
        root.epoch,
        AkdLabel(username.as_bytes().to_vec()),
        proof,
    )
    .map_err(|e| {
        alarm(format!(
            "the directory's proof for @{username} does not verify against epoch {}: {e}",
            root.epoch
        ))
    })?;
    SignedDirectoryEntry::decode(result.value.0.as_slice())
        .map_err(|_| alarm(format!("the directory value of @{username} is malformed")))
}

/// One proven past value of a username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryValue {
    /// The epoch it was published in.
    pub epoch: u64,
    /// Its version.
    pub version: u64,
    /// The raw value (a serialized `SignedDirectoryEntry`).
    pub value: Vec<u8>,
}

/// Verifies a key-history proof for `username` against `root`.
pub fn verify_history(
    username: &str,
    root: &VerifiedRoot,
    proof: &[u8],
) -> Result<Vec<HistoryValue>> {
    let wire = akd::proto::specs::types::HistoryProof::parse_from_bytes(proof)
        .map_err(|_| alarm(format!("the history proof for @{username} does not decode")))?;
    let proof = akd::HistoryProof::try_from(&wire)
        .map_err(|_| alarm(format!("the history proof for @{username} is malformed")))?;
    let results = akd::verify::key_history_verify::<KtConfig>(
        &root.vrf_public_key,
        root.root_hash,
        root.epoch,
        AkdLabel(username.as_bytes().to_vec()),
        proof,
        HistoryVerificationParams::Default {
            history_params: HistoryParams::MostRecent(MAX_HISTORY_VALUES),
        },
    )
    .map_err(|e| {
        alarm(format!(
            "the directory's history of @{username} does not verify against epoch {}: {e}",
            root.epoch
        ))
    })?;
    Ok(results
        .into_iter()
        .map(|r| HistoryValue {
            epoch: r.epoch,
            version: r.version,
            value: r.value.0,
        })
        .collect())
}

/// Verifies that `end` (epoch e) extends `start` (epoch e − 1) by akd's append-only proof.
pub async fn verify_audit_step(
    start: &VerifiedRoot,
    end: &VerifiedRoot,
    proof: &[u8],
) -> Result<()> {
    if end.epoch == 0 || start.epoch + 1 != end.epoch {
        return Err(alarm(format!(
            "the audit proof is for epochs {} → {}, not consecutive ones",
            start.epoch, end.epoch
        )));
    }
    let wire =
        akd::proto::specs::types::SingleAppendOnlyProof::parse_from_bytes(proof).map_err(|_| {
            alarm(format!(
                "epoch {}'s append-only proof does not decode",
                end.epoch
            ))
        })?;
    let proof = akd::SingleAppendOnlyProof::try_from(&wire).map_err(|_| {
        alarm(format!(
            "epoch {}'s append-only proof is malformed",
            end.epoch
        ))
    })?;
    akd::auditor::verify_consecutive_append_only::<KtConfig>(
        &proof,
        start.root_hash,
        end.root_hash,
        end.epoch,
    )
    .await
    .map_err(|e| {
        alarm(format!(
            "epoch {} does not extend epoch {}: {e}",
            end.epoch, start.epoch
        ))
    })
}

#[cfg(test)]
mod tests {
    //! A hostile server as a test double: an akd directory in memory whose answers are
    //! tampered with before the checks see them.

    use super::*;
    use akd::storage::StorageManager;
    use akd::storage::memory::AsyncInMemoryDatabase;
    use akd::{AkdValue, AzksParallelismConfig, Directory, EpochHash};
    use ed25519_dalek::{Signer, SigningKey};

    type TestDirectory = Directory<KtConfig, AsyncInMemoryDatabase, akd::ecvrf::HardCodedAkdVRF>;

    async fn directory() -> (TestDirectory, [u8; 32]) {
        let vrf = akd::ecvrf::HardCodedAkdVRF;
        let d = Directory::new(
            StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
            vrf,
            AzksParallelismConfig::default(),
        )
        .await
        .unwrap();
        let pk = d.get_public_key().await.unwrap().to_bytes();
        (d, pk)
    }

    fn signed(key: &SigningKey, epoch: u64, hash: [u8; 32], vrf: [u8; 32]) -> SignedRoot {
        SignedRoot {
            epoch,
            root_hash: hash.to_vec(),
            vrf_public_key: vrf.to_vec(),
            server_key: key.verifying_key().to_bytes().to_vec(),
            signature: key
                .sign(&root_signature_message(epoch, &hash, &vrf))
                .to_bytes()
                .to_vec(),
        }
    }

    fn value(v: &[u8]) -> AkdValue {
        AkdValue(
            SignedDirectoryEntry {
                entry: v.to_vec(),
                signature: vec![0; 64],
            }
            .encode_to_vec(),
        )
    }

    #[tokio::test]
    async fn a_substituted_value_or_a_root_from_another_key_is_refused() {
        let (d, vrf) = directory().await;
        let server = SigningKey::from_bytes(&[1; 32]);
        let EpochHash(epoch, hash) = d
            .publish(vec![(AkdLabel(b"alice".to_vec()), value(b"real"))])
            .await
            .unwrap();
        let root = signed(&server, epoch, hash, vrf);
        let pinned = server.verifying_key().to_bytes();
        let (proof, _) = d.lookup(AkdLabel(b"alice".to_vec())).await.unwrap();
        let bytes = akd::proto::specs::types::LookupProof::from(&proof)
            .write_to_bytes()
            .unwrap();

        // The honest answer verifies.
        let ok = verify_root(Some(&root), Some(&pinned)).unwrap();
        assert_eq!(verify_lookup("alice", &ok, &bytes).unwrap().entry, b"real");

        // (1) the server swaps the value (a substituted key) in an otherwise valid proof.
        let mut forged = proof.clone();
        forged.value = value(b"attacker");
        let forged = akd::proto::specs::types::LookupProof::from(&forged)
            .write_to_bytes()
            .unwrap();
        assert!(matches!(
            verify_lookup("alice", &ok, &forged),
            Err(Error::DirectoryAlarm(_))
        ));
        // The proof is for alice, not for bob.
        assert!(matches!(
            verify_lookup("bob", &ok, &bytes),
            Err(Error::DirectoryAlarm(_))
        ));
        // A root signed by another key than the pinned one.
        let other = signed(&SigningKey::from_bytes(&[2; 32]), epoch, hash, vrf);
        assert!(matches!(
            verify_root(Some(&other), Some(&pinned)),
            Err(Error::DirectoryAlarm(_))
        ));
        // A root whose signature does not cover its hash.
        let mut bent = root.clone();
        bent.root_hash = vec![7; 32];
        assert!(matches!(
            verify_root(Some(&bent), Some(&pinned)),
            Err(Error::DirectoryAlarm(_))
        ));
        // Garbage instead of a proof.
        assert!(verify_lookup("alice", &ok, b"\xff\xff").is_err());
    }

    #[tokio::test]
    async fn history_shows_every_value_and_audit_steps_chain() {
        let (d, vrf) = directory().await;
        let server = SigningKey::from_bytes(&[1; 32]);
        let label = AkdLabel(b"alice".to_vec());
        let EpochHash(_, h1) = d
            .publish(vec![(label.clone(), value(b"v1"))])
            .await
            .unwrap();
        let EpochHash(e2, h2) = d
            .publish(vec![(label.clone(), value(b"ghost"))])
            .await
            .unwrap();
        let root = verify_root(Some(&signed(&server, e2, h2, vrf)), None).unwrap();
        let (proof, _) = d
            .key_history(&label, HistoryParams::MostRecent(MAX_HISTORY_VALUES))
            .await
            .unwrap();
        let bytes = akd::proto::specs::types::HistoryProof::from(&proof)
            .write_to_bytes()
            .unwrap();
        let values = verify_history("alice", &root, &bytes).unwrap();
        assert_eq!(
            values.len(),
            2,
            "a value the owner did not publish cannot be hidden"
        );

        let start = verify_root(Some(&signed(&server, 1, h1, vrf)), None).unwrap();
        let audit = d.audit(1, 2).await.unwrap();
        let step = akd::proto::specs::types::SingleAppendOnlyProof::from(&audit.proofs[0])
            .write_to_bytes()
            .unwrap();
        verify_audit_step(&start, &root, &step).await.unwrap();
        // (4) a rewritten old root does not chain.
        let rewritten = verify_root(Some(&signed(&server, 1, [6; 32], vrf)), None).unwrap();
        assert!(matches!(
            verify_audit_step(&rewritten, &root, &step).await,
            Err(Error::DirectoryAlarm(_))
        ));
    }
}
