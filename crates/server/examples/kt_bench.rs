//! Key-transparency benchmark (not a test): builds a directory of N usernames in the real
//! SQLite store, then measures publishing one epoch of U updates, lookup-proof generation and
//! client-side verification, and proof sizes. Usage:
//! `cargo run -p blindpost-server --example kt_bench -- N U` (dev profile: dependencies such as
//! akd and SQLite are built with opt-level 2; figures in BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use blindpost_server::kt::{KtConfig, Transparency};
use blindpost_server::store::{DirectoryStore, SqliteStore, TransparencyStore, UserRecord};

fn user(i: usize, version: u64) -> UserRecord {
    UserRecord {
        username: format!("user{i}"),
        identity_key: [7; 32],
        version,
        entry: [vec![version as u8], vec![0x42; 120]].concat(),
        signature: vec![0; 64],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("N and U are numbers"))
        .collect();
    let (n, u) = (
        args.first().copied().unwrap_or(10_000),
        args.get(1).copied().unwrap_or(1_000),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), Arc::new(|| 20_000)).unwrap());
    let kt = Transparency::open(Arc::clone(&store) as Arc<dyn TransparencyStore>, dir.path())
        .await
        .unwrap();

    // Build the directory in chunks of 10,000 concurrent registrations, each published in
    // epochs of at most the server's per-epoch cap.
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        // Concurrent registrations share group-commit transactions, as on a busy server.
        let regs = (i..end).map(|j| store.register_user(user(j, 1)));
        for r in futures_util::future::join_all(regs).await {
            r.unwrap();
        }
        while kt.publish_pending().await.unwrap().is_some() {}
        i = end;
    }
    println!("build: {n} usernames in {:.1} s", t.elapsed().as_secs_f64());

    // One epoch of U updates of existing usernames.
    for j in 0..u {
        store
            .register_user(user(j * (n / u).max(1) % n, 2))
            .await
            .unwrap();
    }
    let t = Instant::now();
    kt.publish_pending().await.unwrap();
    println!(
        "publish: epoch of {u} updates on {n} in {:.3} s",
        t.elapsed().as_secs_f64()
    );

    // Lookup proofs: generation, verification, size.
    let samples = 200;
    let mut gen_total = 0.0;
    let mut ver_total = 0.0;
    let mut bytes_total = 0usize;
    for k in 0..samples {
        let name = format!("user{}", (k * 7919) % n);
        let t = Instant::now();
        let (root, proof) = kt.lookup(&name).await.unwrap();
        gen_total += t.elapsed().as_secs_f64();
        bytes_total += proof.len();
        let t = Instant::now();
        let wire =
            <akd::proto::specs::types::LookupProof as protobuf::Message>::parse_from_bytes(&proof)
                .unwrap();
        let proof = akd::LookupProof::try_from(&wire).unwrap();
        akd::verify::lookup_verify::<KtConfig>(
            &root.vrf_public_key,
            root.root_hash.as_slice().try_into().unwrap(),
            root.epoch,
            akd::AkdLabel(name.into_bytes()),
            proof,
        )
        .unwrap();
        ver_total += t.elapsed().as_secs_f64();
    }
    let per = |x: f64| x / samples as f64 * 1e3;
    println!(
        "lookup proof: generate {:.2} ms, verify {:.2} ms, size {} bytes (mean of {samples})",
        per(gen_total),
        per(ver_total),
        bytes_total / samples
    );
    let (_, history) = kt.history("user0").await.unwrap();
    println!("history proof (2 values): {} bytes", history.len());
    let latest = kt.latest_root().await.unwrap().epoch;
    let (_, _, audit) = kt.audit(latest).await.unwrap();
    println!("append-only proof of the last epoch: {} bytes", audit.len());
    let db = std::fs::metadata(dir.path().join("blindpost.sqlite3"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("database: {:.1} MiB", db as f64 / 1048576.0);
}
