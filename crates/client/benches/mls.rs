//! criterion benchmarks of the client's MLS costs, each beside bare openmls doing the same
//! work, so the overhead blindpost adds is a ratio. "blindpost" runs openmls against the
//! client's real persistence ([`BenchStore`]: SQLite, WAL, `synchronous=FULL`, the client's
//! codec), one transaction per operation, with the group kept in memory between operations
//! exactly as the client keeps it; "bare" is openmls with its in-memory provider and the
//! group kept in memory.
//!
//! Groups: a creator and one other member, both benchmarked, plus passive members whose keys
//! are thrown away. `BLINDPOST_BENCH_TREE` picks how the group is built:
//! - `sparse` (the default): the creator adds everyone in one commit and the other member
//!   joins from the Welcome, so only the creator's path is filled and every other parent is
//!   blank. Benchmark ids `<side>/<n>/…`.
//! - `full`: the creator makes the group alone and every other member joins by an external
//!   commit, which carries the joiner's update path, read by the creator and the other member;
//!   so no parent is blank and no leaf is unmerged, the tree of a group whose members each
//!   committed once after joining. Each join reads the whole tree, so building it is quadratic
//!   in n (minutes at 1,000). Benchmark ids `<side>/<n>-full/…`. Unlike a sparse group (one
//!   or two epochs old), such a group has been through n epochs.
//!
//! Both sides keep as many past epochs' keys as the client does (`MAX_PAST_EPOCHS`, none):
//! with the five the client kept before, every message in a full group rewrote five past
//! epochs' member lists (BENCHMARKS.md, "Past epochs").
//!
//! Membership changes (1,000 members and up): `add_create` / `remove_create` time the
//! creator building the commit; `*_process` the other member processing it, staged but not
//! merged; `*_apply` processing and merging it, which is what applying a commit costs a member
//! (the merge writes the new epoch's whole ratchet tree).
//!
//! Sizes 2 and 1,000 by default; set `BLINDPOST_BENCH_LARGE=1` to add 10,000 (building it
//! takes minutes sparse, hours full).
//! Not for the relay: `blindpost-bench` measures that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use blindpost_client::{BenchProvider, BenchStore, DEFAULT_CIPHERSUITE, DeviceSigner};
use criterion::{Criterion, criterion_group, criterion_main};
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

const CS: Ciphersuite = DEFAULT_CIPHERSUITE;

/// Where a member's MLS state lives.
trait Env {
    type P<'a>: OpenMlsProvider
    where
        Self: 'a;
    const NAME: &'static str;
    /// The signer a member signs with.
    type S: openmls_traits::signatures::Signer;
    /// Turn a generated key pair into that signer.
    fn signer(pair: SignatureKeyPair) -> Self::S;
    /// Run one operation on `group` as the client would.
    fn op<T>(&self, group: &mut MlsGroup, f: impl FnOnce(&Self::P<'_>, &mut MlsGroup) -> T) -> T;
    /// Run `f` with the provider (setup steps).
    fn with<T>(&self, f: impl FnOnce(&Self::P<'_>) -> T) -> T;
}

struct Bare(OpenMlsRustCrypto);

impl Env for Bare {
    type P<'a> = OpenMlsRustCrypto;
    const NAME: &'static str = "bare";
    type S = SignatureKeyPair;
    fn signer(pair: SignatureKeyPair) -> SignatureKeyPair {
        pair
    }
    fn op<T>(&self, group: &mut MlsGroup, f: impl FnOnce(&Self::P<'_>, &mut MlsGroup) -> T) -> T {
        f(&self.0, group)
    }
    fn with<T>(&self, f: impl FnOnce(&Self::P<'_>) -> T) -> T {
        f(&self.0)
    }
}

struct Persisted {
    store: BenchStore,
    _dir: tempfile::TempDir,
}

impl Env for Persisted {
    type P<'a> = BenchProvider<'a>;
    const NAME: &'static str = "blindpost";
    type S = DeviceSigner;
    /// The client's signer (its Ed25519 key decoded once).
    fn signer(pair: SignatureKeyPair) -> DeviceSigner {
        DeviceSigner::new(pair)
    }
    /// `group` only names the group: the store keeps its own copy in memory, as the client
    /// does, and hands it to `f` inside the operation's transaction.
    fn op<T>(&self, group: &mut MlsGroup, f: impl FnOnce(&Self::P<'_>, &mut MlsGroup) -> T) -> T {
        self.store
            .with_group(group.group_id(), |p, g| Ok(f(p, g)))
            .unwrap()
    }
    fn with<T>(&self, f: impl FnOnce(&Self::P<'_>) -> T) -> T {
        self.store.tx(|p| Ok(f(p))).unwrap()
    }
}

fn persisted() -> Persisted {
    let dir = tempfile::tempdir().unwrap();
    Persisted {
        store: BenchStore::open(dir.path()).unwrap(),
        _dir: dir,
    }
}

fn identity(name: &str) -> (SignatureKeyPair, CredentialWithKey) {
    let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
    let cred = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (signer, cred)
}

fn key_package<P: OpenMlsProvider>(p: &P, name: &str) -> KeyPackage {
    let (signer, cred) = identity(name);
    KeyPackage::builder()
        .build(CS, p, &signer, cred)
        .unwrap()
        .key_package()
        .clone()
}

/// Join from a serialised Welcome.
fn join_from_welcome<P: OpenMlsProvider>(p: &P, welcome: &[u8]) -> MlsGroup {
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(welcome)
        .unwrap()
        .extract()
    else {
        panic!("not a welcome")
    };
    StagedWelcome::new_from_welcome(p, &join_config(), w, None)
        .unwrap()
        .into_group(p)
        .unwrap()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(blindpost_client::MAX_PAST_EPOCHS)
        .build()
}

/// How the group's ratchet tree is built (see the header).
#[derive(Clone, Copy, PartialEq)]
enum Tree {
    Sparse,
    Full,
}

/// `BLINDPOST_BENCH_TREE`: `sparse` (the default) or `full`; anything else is an error.
fn tree() -> Tree {
    match std::env::var("BLINDPOST_BENCH_TREE").as_deref() {
        Err(_) | Ok("sparse") => Tree::Sparse,
        Ok("full") => Tree::Full,
        Ok(t) => panic!("BLINDPOST_BENCH_TREE: {t:?} is neither sparse nor full"),
    }
}

/// A group of `n`: the creator in `a`, one other member in `b`.
struct Pair<E: Env> {
    a: E,
    alice: E::S,
    ga: MlsGroup,
    b: E,
    gb: MlsGroup,
}

/// Build a group of `n` as `tree` says (see the header).
fn build<E: Env>(a: E, b: E, n: usize, tree: Tree, scratch: &OpenMlsRustCrypto) -> Pair<E> {
    let (alice, alice_cred) = identity("alice");
    let mut ga = a.with(|p| {
        MlsGroup::builder()
            .ciphersuite(CS)
            .with_wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(blindpost_client::MAX_PAST_EPOCHS)
            .build(p, &alice, alice_cred)
            .unwrap()
    });
    let gb = match tree {
        Tree::Sparse => {
            let bob_kp = b.with(|p| key_package(p, "bob"));
            let mut kps = vec![bob_kp];
            kps.extend((2..n).map(|i| key_package(scratch, &format!("m{i}"))));
            let welcome = a.op(&mut ga, |p, g| {
                let (_, w, _) = g.add_members(p, &alice, &kps).unwrap();
                g.merge_pending_commit(p).unwrap();
                w.tls_serialize_detached().unwrap()
            });
            b.with(|p| join_from_welcome(p, &welcome))
        }
        Tree::Full => {
            let info = group_info(&a, &mut ga, &alice);
            let (bob, bob_cred) = identity("bob");
            let (mut gb, commit) = b.with(|p| join_externally(p, &bob, bob_cred, info));
            apply_commit(&a, &mut ga, &commit);
            for i in 2..n {
                let info = group_info(&a, &mut ga, &alice);
                let (signer, cred) = identity(&format!("m{i}"));
                // Its own provider, dropped with its state.
                let (_, commit) =
                    join_externally(&OpenMlsRustCrypto::default(), &signer, cred, info);
                apply_commit(&a, &mut ga, &commit);
                apply_commit(&b, &mut gb, &commit);
            }
            gb
        }
    };
    Pair {
        a,
        alice: E::signer(alice),
        ga,
        b,
        gb,
    }
}

/// A GroupInfo of the creator's current epoch, carrying its ratchet tree, as a joiner reads it.
fn group_info<E: Env>(a: &E, ga: &mut MlsGroup, alice: &SignatureKeyPair) -> VerifiableGroupInfo {
    let bytes = a.op(ga, |p, g| {
        g.export_group_info(p.crypto(), alice, true)
            .unwrap()
            .tls_serialize_detached()
            .unwrap()
    });
    let MlsMessageBodyIn::GroupInfo(info) = MlsMessageIn::tls_deserialize_exact(bytes.as_slice())
        .unwrap()
        .extract()
    else {
        panic!("not a group info")
    };
    info
}

/// Join from `info` by an external commit (with the joiner's update path) and merge it: the
/// joiner's group and the commit for the members.
fn join_externally<P: OpenMlsProvider>(
    p: &P,
    signer: &SignatureKeyPair,
    cred: CredentialWithKey,
    info: VerifiableGroupInfo,
) -> (MlsGroup, Vec<u8>) {
    let (mut group, bundle) = MlsGroup::external_commit_builder()
        .with_config(join_config())
        .build_group(p, info, cred)
        .unwrap()
        .load_psks(p.storage())
        .unwrap()
        .build(p.rand(), p.crypto(), signer, |_| true)
        .unwrap()
        .finalize(p)
        .unwrap();
    group.merge_pending_commit(p).unwrap();
    (group, bundle.commit().tls_serialize_detached().unwrap())
}

/// Process another member's commit and merge it.
fn apply_commit<E: Env>(env: &E, group: &mut MlsGroup, commit: &[u8]) {
    env.op(group, |p, g| {
        let processed = g.process_message(p, protocol(commit)).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a commit")
        };
        g.merge_staged_commit(p, *staged).unwrap();
    });
}

fn protocol(bytes: &[u8]) -> ProtocolMessage {
    match MlsMessageIn::tls_deserialize_exact(bytes)
        .unwrap()
        .extract()
    {
        MlsMessageBodyIn::PrivateMessage(m) => m.into(),
        MlsMessageBodyIn::PublicMessage(m) => m.into(),
        _ => panic!("not a protocol message"),
    }
}

/// Encrypt (and persist) at the creator, decrypt (and persist) at the other member.
fn app_message<E: Env>(pair: &mut Pair<E>, payload: &[u8]) {
    let Pair {
        a,
        alice,
        ga,
        b,
        gb,
        ..
    } = pair;
    let bytes = a.op(ga, |p, g| {
        g.create_message(p, alice, payload)
            .unwrap()
            .tls_serialize_detached()
            .unwrap()
    });
    b.op(gb, |p, g| {
        let processed = g.process_message(p, protocol(&bytes)).unwrap();
        assert!(matches!(
            processed.into_content(),
            ProcessedMessageContent::ApplicationMessage(_)
        ));
    });
}

#[derive(PartialEq)]
enum Change {
    Add,
    Remove,
}

/// Which part of a membership change a benchmark times.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// The creator builds the commit (and persists it as pending).
    Create,
    /// The other member processes it: staged, not merged.
    Process,
    /// The other member processes and merges it, as the client applies a commit.
    Apply,
}

/// Time creating a one-member add or remove commit at the creator (persisted as pending), or
/// processing it at the other member (staged, not merged, so the next iteration starts from
/// the same epoch); [`Step::Apply`] is [`apply`].
fn membership<E: Env>(
    pair: &mut Pair<E>,
    change: &Change,
    step: Step,
    iters: u64,
    scratch: &OpenMlsRustCrypto,
) -> Duration {
    if step == Step::Apply {
        return apply(pair, change, iters, scratch);
    }
    let process = step == Step::Process;
    let mut total = Duration::ZERO;
    let members = pair.a.op(&mut pair.ga, |_, g| g.members().count()) as u32;
    for _ in 0..iters {
        let kp = key_package(scratch, "newcomer");
        let Pair {
            a,
            alice,
            ga,
            b,
            gb,
            ..
        } = pair;
        let t = Instant::now();
        let commit = a.op(ga, |p, g| {
            let c = match change {
                Change::Add => g.add_members(p, alice, &[kp]).unwrap().0,
                Change::Remove => {
                    g.remove_members(p, alice, &[LeafNodeIndex::new(members - 1)])
                        .unwrap()
                        .0
                }
            };
            c.tls_serialize_detached().unwrap()
        });
        if !process {
            total += t.elapsed();
        }
        let t = Instant::now();
        if process {
            b.op(gb, |p, g| {
                let processed = g.process_message(p, protocol(&commit)).unwrap();
                assert!(matches!(
                    processed.into_content(),
                    ProcessedMessageContent::StagedCommitMessage(_)
                ));
            });
            total += t.elapsed();
        }
        a.op(ga, |p, g| g.clear_pending_commit(p.storage()).unwrap());
    }
    total
}

/// Time processing *and merging* a one-member change at the other member: what applying a
/// commit costs the client, whose merge writes the new epoch's whole ratchet tree. Each
/// iteration adds a newcomer and removes it again, both merged on both sides, so the group
/// keeps its size; only `timed` is counted. (Each remove blanks the newcomer's direct path
/// until a later commit of the creator's refills the creator's side of it: a full tree keeps
/// all but a few parents.)
fn apply<E: Env>(
    pair: &mut Pair<E>,
    timed: &Change,
    iters: u64,
    scratch: &OpenMlsRustCrypto,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let kp = key_package(scratch, "newcomer");
        let key = kp.leaf_node().signature_key().as_slice().to_vec();
        let Pair {
            a,
            alice,
            ga,
            b,
            gb,
            ..
        } = pair;
        for change in [Change::Add, Change::Remove] {
            let commit = a.op(ga, |p, g| {
                let c = match change {
                    Change::Add => {
                        g.add_members(p, alice, std::slice::from_ref(&kp))
                            .unwrap()
                            .0
                    }
                    Change::Remove => {
                        let leaf = g.members().find(|m| m.signature_key == key).unwrap().index;
                        g.remove_members(p, alice, &[leaf]).unwrap().0
                    }
                };
                g.merge_pending_commit(p).unwrap();
                c.tls_serialize_detached().unwrap()
            });
            let t = Instant::now();
            apply_commit(b, gb, &commit);
            if change == *timed {
                total += t.elapsed();
            }
        }
    }
    total
}

/// Group sizes: `BLINDPOST_BENCH_SIZES` (comma-separated, e.g. `2,10000`) if set, else 2 and
/// 1,000, plus 10,000 with `BLINDPOST_BENCH_LARGE=1`. A size that does not parse is an error.
fn sizes() -> Vec<usize> {
    if let Ok(list) = std::env::var("BLINDPOST_BENCH_SIZES") {
        return list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("BLINDPOST_BENCH_SIZES: {n:?} is not a size"))
            })
            .collect();
    }
    let mut s = vec![2, 1000];
    if std::env::var_os("BLINDPOST_BENCH_LARGE").is_some() {
        s.push(10_000);
    }
    s
}

/// Whether to run the side named `name` ("bare" or "blindpost"): `BLINDPOST_BENCH_SIDE`
/// picks one; both run when it is unset.
fn side(name: &str) -> bool {
    std::env::var("BLINDPOST_BENCH_SIDE").map_or(true, |s| s == name)
}

fn run_env<E: Env>(c: &mut Criterion, make: impl Fn() -> E) {
    let scratch = OpenMlsRustCrypto::default();
    let payload = vec![b'x'; 512];
    let tree = tree();
    for n in sizes() {
        let started = Instant::now();
        let mut pair = build(make(), make(), n, tree, &scratch);
        let id = match tree {
            Tree::Sparse => format!("{}/{n}", E::NAME),
            Tree::Full => format!("{}/{n}-full", E::NAME),
        };
        let parents = pair.a.op(&mut pair.ga, |_, g| {
            g.export_ratchet_tree().parents().count()
        });
        let blank = n - 1 - parents;
        eprintln!(
            "built a {n}-member group ({id}) in {:.1}s, {blank} of {} parents blank",
            started.elapsed().as_secs_f64(),
            n - 1
        );
        assert!(
            tree == Tree::Sparse || blank == 0,
            "a blank parent in a full tree"
        );
        let mut g = c.benchmark_group(&id);
        g.bench_function("app_message", |bch| {
            bch.iter(|| app_message(&mut pair, &payload))
        });
        g.finish();
        // Membership changes take up to seconds each at these sizes: flat sampling (the same
        // iteration count per sample, 10 samples) instead of criterion's linear 1 + 2 + … + 10.
        let mut g = c.benchmark_group(&id);
        g.sampling_mode(criterion::SamplingMode::Flat);
        if n >= 1000 {
            for (name, change, step) in [
                ("add_create", Change::Add, Step::Create),
                ("add_process", Change::Add, Step::Process),
                ("add_apply", Change::Add, Step::Apply),
                ("remove_create", Change::Remove, Step::Create),
                ("remove_process", Change::Remove, Step::Process),
                ("remove_apply", Change::Remove, Step::Apply),
            ] {
                g.bench_function(name, |bch| {
                    bch.iter_custom(|iters| membership(&mut pair, &change, step, iters, &scratch))
                });
            }
        }
        g.finish();
    }
    // Joining a 2-member group from its Welcome.
    let mut g = c.benchmark_group(format!("{}/join", E::NAME));
    g.bench_function("welcome_2", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (alice, alice_cred) = identity("alice");
                let mut group = MlsGroup::builder()
                    .ciphersuite(CS)
                    .with_wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
                    .use_ratchet_tree_extension(true)
                    .build(&scratch, &alice, alice_cred)
                    .unwrap();
                let env = make();
                let kp = env.with(|p| key_package(p, "bob"));
                let (_, w, _) = group.add_members(&scratch, &alice, &[kp]).unwrap();
                let w = w.tls_serialize_detached().unwrap();
                let t = Instant::now();
                env.with(|p| join_from_welcome(p, &w));
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    if side(Bare::NAME) {
        run_env(c, || Bare(OpenMlsRustCrypto::default()));
    }
    if side(Persisted::NAME) {
        run_env(c, persisted);
    }
}

criterion_group! {
    name = mls;
    // Defaults; `--warm-up-time`, `--measurement-time` and `--sample-size` override them.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(mls);
