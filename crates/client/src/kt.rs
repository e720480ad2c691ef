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
    if let Some(pinned) = pinned {
        if &server_key != pinned {
            return Err(alarm(
                "the directory root is signed by another key than the one pinned for this server",
            ));
        }
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
    .map_err(|_| alarm(format!("the signature on epoch {}'s root does not verify", root.epoch)))?;
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
    let wire = akd::proto::specs::types::SingleAppendOnlyProof::parse_from_bytes(proof)
        .map_err(|_| alarm(format!("epoch {}'s append-only proof does not decode", end.epoch)))?;
    let proof = akd::SingleAppendOnlyProof::try_from(&wire)
        .map_err(|_| alarm(format!("epoch {}'s append-only proof is malformed", end.epoch)))?;
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
