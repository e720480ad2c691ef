//! How blindpost uses openmls: the ciphersuite choice, group and join configuration, the
//! route extensions that tell members where to deliver, key-package creation and checking,
//! and the posting token. The one place these MLS decisions live; no I/O.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_traits::signatures::Signer;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::Provider;

/// The ciphersuite new profiles use: the post-quantum hybrid ML-KEM-768 + X25519 (with
/// AES-128-GCM, SHA-256, Ed25519) from the rust_crypto provider. The one constant deciding it.
pub const DEFAULT_CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;

/// The classic suite, selectable for interoperability with other MLS implementations.
pub const CLASSIC_CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// The ciphersuite a profile uses, as chosen at setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// [`DEFAULT_CIPHERSUITE`].
    PostQuantum,
    /// [`CLASSIC_CIPHERSUITE`].
    Classic,
}

impl Suite {
    /// The MLS ciphersuite.
    pub fn ciphersuite(self) -> Ciphersuite {
        match self {
            Suite::PostQuantum => DEFAULT_CIPHERSUITE,
            Suite::Classic => CLASSIC_CIPHERSUITE,
        }
    }

    /// The name stored in the profile and accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Suite::PostQuantum => "pq",
            Suite::Classic => "classic",
        }
    }

    /// Parse a name from [`Suite::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "pq" => Some(Suite::PostQuantum),
            "classic" => Some(Suite::Classic),
            _ => None,
        }
    }
}

/// Leaf-node extension: the member's delivery queue id for this group (16 bytes). Every
/// member can read it from the tree, so a committer removing a member knows which route to
/// drop.
pub const ROUTE_EXTENSION: u16 = 0xff42;
/// Key-package extension: queue id (16 bytes) followed by its send token (32 bytes), which
/// the adder shows the server to make the queue a route of the group.
pub const INVITE_EXTENSION: u16 = 0xff43;
/// Exporter label of the posting token.
const POSTING_TOKEN_LABEL: &str = "blindpost posting token v1";

/// Capabilities every leaf advertises: our two extensions.
pub fn capabilities(suite: Suite) -> Capabilities {
    Capabilities::builder()
        .ciphersuites(vec![suite.ciphersuite()])
        .extensions(vec![
            ExtensionType::Unknown(ROUTE_EXTENSION),
            ExtensionType::Unknown(INVITE_EXTENSION),
        ])
        .build()
}

fn route_leaf_extensions(queue_id: &[u8]) -> Result<Extensions<LeafNode>> {
    Extensions::single(Extension::Unknown(
        ROUTE_EXTENSION,
        UnknownExtension(queue_id.to_vec()),
    ))
    .map_err(Error::mls)
}

/// Past epochs whose keys a group keeps, to read messages made before a commit it applied:
/// none. The server orders each queue as the group's posts and commits happened (a post at
/// an old epoch is refused), so a member reads every message of an epoch before the commit
/// that ends it; the one case that would read one after, our own commit applied while older
/// messages still wait in our queue, reads the queue first instead (`Session::commit`).
/// Why not openmls's usual handful: every message rewrites the group's message secrets, and
/// each past epoch kept there holds that epoch's member list (an ML-KEM key, ~1.2 KB, per
/// member) and its secret tree, so five past epochs made a message in a 1,000-member group
/// cost ~175 ms instead of ~0.12 ms (BENCHMARKS.md, "Past epochs").
pub const MAX_PAST_EPOCHS: usize = 0;

/// Configuration for joining a group.
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// Create a new group, with our leaf naming `queue_id` as our route.
pub fn create_group(
    provider: &Provider<'_>,
    signer: &impl Signer,
    credential: CredentialWithKey,
    suite: Suite,
    group_id: &[u8],
    queue_id: &[u8],
) -> Result<MlsGroup> {
    MlsGroup::builder()
        .with_group_id(GroupId::from_slice(group_id))
        .ciphersuite(suite.ciphersuite())
        .with_wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .with_capabilities(capabilities(suite))
        .with_leaf_node_extensions(route_leaf_extensions(queue_id)?)
        .map_err(Error::mls)?
        .build(provider, signer, credential)
        .map_err(Error::mls)
}

/// Create a key package whose leaf names `queue_id` as route and which carries the queue's
/// send token for the adder.
pub fn create_key_package(
    provider: &Provider<'_>,
    signer: &impl Signer,
    credential: CredentialWithKey,
    suite: Suite,
    queue_id: &[u8],
    send_token: &[u8],
    last_resort: bool,
) -> Result<Vec<u8>> {
    let mut invite = queue_id.to_vec();
    invite.extend_from_slice(send_token);
    let mut builder = KeyPackage::builder()
        .leaf_node_capabilities(capabilities(suite))
        .leaf_node_extensions(route_leaf_extensions(queue_id)?)
        .key_package_extensions(
            Extensions::single(Extension::Unknown(
                INVITE_EXTENSION,
                UnknownExtension(invite),
            ))
            .map_err(Error::mls)?,
        );
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(suite.ciphersuite(), provider, signer, credential)
        .map_err(Error::mls)?;
    bundle
        .key_package()
        .tls_serialize_detached()
        .map_err(Error::mls)
}

/// A key package claimed from the server, checked.
pub struct CheckedKeyPackage {
    /// The verified key package.
    pub key_package: KeyPackage,
    /// The owner's queue for this group.
    pub queue_id: Vec<u8>,
    /// That queue's send token.
    pub send_token: Vec<u8>,
}

/// Check a key package the server handed out for `username`'s device with MLS signature key
/// `signature_key`: it must parse, verify, use our suite, name that user and key, and carry
/// an invite extension.
pub fn check_key_package(
    provider: &Provider<'_>,
    bytes: &[u8],
    suite: Suite,
    username: &str,
    signature_key: &[u8],
) -> Result<CheckedKeyPackage> {
    let bad = |why: &str| Error::BadServerReply(format!("key package of @{username}: {why}"));
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|_| bad("does not parse"))?;
    let kp = kp_in
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(|_| bad("does not verify"))?;
    if kp.ciphersuite() != suite.ciphersuite() {
        return Err(Error::Invalid(format!(
            "@{username} uses another ciphersuite ({:?}); both sides must use the same",
            kp.ciphersuite()
        )));
    }
    if identity(kp.leaf_node().credential()) != username {
        return Err(bad("names another user"));
    }
    if kp.leaf_node().signature_key().as_slice() != signature_key {
        return Err(bad("is signed by a key the directory does not list"));
    }
    let invite = kp
        .extensions()
        .unknown(INVITE_EXTENSION)
        .ok_or_else(|| bad("has no delivery queue"))?;
    if invite.0.len() != blindpost_wire::QUEUE_ID_LEN + blindpost_wire::SECRET_LEN {
        return Err(bad("has a malformed delivery queue"));
    }
    let (q, t) = invite.0.split_at(blindpost_wire::QUEUE_ID_LEN);
    Ok(CheckedKeyPackage {
        queue_id: q.to_vec(),
        send_token: t.to_vec(),
        key_package: kp,
    })
}

/// The route (queue id) a member's leaf names, if any.
pub fn leaf_route(group: &MlsGroup, leaf: LeafNodeIndex) -> Option<Vec<u8>> {
    group
        .public_group()
        .leaf(leaf)
        .and_then(|l| l.extensions().unknown(ROUTE_EXTENSION))
        .map(|e| e.0.clone())
}

/// The username in a credential (basic credentials carry the username as identity).
pub fn identity(credential: &Credential) -> String {
    BasicCredential::try_from(credential.clone())
        .map(|c| String::from_utf8_lossy(c.identity()).into_owned())
        .unwrap_or_else(|_| "(unknown credential)".to_string())
}

/// The posting token of the group's current epoch.
pub fn posting_token(group: &MlsGroup, provider: &Provider<'_>) -> Result<Vec<u8>> {
    group
        .export_secret(provider.crypto(), POSTING_TOKEN_LABEL, &[], 32)
        .map_err(Error::mls)
}

/// The posting token of the epoch a staged commit moves to.
pub fn next_posting_token(commit: &StagedCommit, provider: &Provider<'_>) -> Result<Vec<u8>> {
    commit
        .export_secret(provider.crypto(), POSTING_TOKEN_LABEL, &[], 32)
        .map_err(Error::mls)
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use openmls_basic_credential::SignatureKeyPair;

    fn member(store: &Store, name: &str, suite: Suite) -> (SignatureKeyPair, CredentialWithKey) {
        let signer = SignatureKeyPair::new(suite.ciphersuite().signature_algorithm()).unwrap();
        signer.store(store.provider().storage()).unwrap();
        let cred = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        (signer, cred)
    }

    #[test]
    fn key_packages_carry_the_route_and_are_checked_against_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let suite = Suite::PostQuantum;
        let (signer, cred) = member(&store, "bob", suite);
        let provider = store.provider();
        let kp =
            create_key_package(&provider, &signer, cred, suite, &[7; 16], &[9; 32], false).unwrap();
        let checked = check_key_package(&provider, &kp, suite, "bob", signer.public()).unwrap();
        assert_eq!(checked.queue_id, vec![7; 16]);
        assert_eq!(checked.send_token, vec![9; 32]);
        // A package presented as someone else's, or under another key, is refused.
        assert!(check_key_package(&provider, &kp, suite, "mallory", signer.public()).is_err());
        assert!(check_key_package(&provider, &kp, suite, "bob", &[1; 32]).is_err());
        assert!(check_key_package(&provider, &kp, Suite::Classic, "bob", signer.public()).is_err());
        assert!(
            check_key_package(
                &provider,
                &kp[..kp.len() - 1],
                suite,
                "bob",
                signer.public()
            )
            .is_err()
        );
    }

    #[test]
    fn the_next_posting_token_from_a_staged_commit_is_the_next_epochs_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let suite = Suite::PostQuantum;
        let (alice, alice_cred) = member(&store, "alice", suite);
        let (bob, bob_cred) = member(&store, "bob", suite);
        let provider = store.provider();
        let kp = create_key_package(&provider, &bob, bob_cred, suite, &[1; 16], &[2; 32], false)
            .unwrap();
        let kp = check_key_package(&provider, &kp, suite, "bob", bob.public()).unwrap();
        let mut group =
            create_group(&provider, &alice, alice_cred, suite, &[3; 32], &[4; 16]).unwrap();
        let t0 = posting_token(&group, &provider).unwrap();
        group
            .add_members(&provider, &alice, &[kp.key_package])
            .unwrap();
        let next = next_posting_token(group.pending_commit().unwrap(), &provider).unwrap();
        group.merge_pending_commit(&provider).unwrap();
        let t1 = posting_token(&group, &provider).unwrap();
        assert_eq!(next, t1);
        assert_ne!(t0, t1);
        // Every member can read every other member's route from the tree.
        let routes: Vec<Vec<u8>> = group
            .members()
            .filter_map(|m| leaf_route(&group, m.index))
            .collect();
        assert_eq!(routes, vec![vec![4; 16], vec![1; 16]]);
    }
}
