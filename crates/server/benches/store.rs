//! criterion benchmarks of the SQLite store's writer: what one post and its acknowledgements
//! cost when another member's queue holds a backlog of constant size (a device offline for
//! days in a busy group), and what a resend's lookup of its id adds in a group with a long
//! history. The byte limit is checked on every post, so what it reads per post shows here.
//! Not for the relay as a whole: `blindpost-bench` measures that.
//!
//! `cargo bench -p blindpost-server --bench store`; `TMPDIR` chooses the disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use blindpost_server::config::Durability;
use blindpost_server::store::{
    NewGroup, NewQueue, PostOp, RECENT_POSTS, RESEND_CHUNKS, RouteGrant, SqliteStore, Store,
};
use blindpost_server::types::{GroupId, MessageId, QueueId, SecretHash};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// The size of the load tool's 256-byte text as an MLS ciphertext.
const PAYLOAD: usize = 674;
/// Posts stored at once while the backlog is filled (they share group commits).
const FILL_AT_ONCE: usize = 256;

fn secret(label: &'static str, n: u8) -> SecretHash {
    SecretHash::of_secret(label, &[n; 32]).unwrap()
}

fn post(n: u64) -> PostOp {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    PostOp {
        group_id: GroupId::new([1; 32]),
        epoch: 0,
        posting_token_hash: secret("posting", 1),
        message_id: MessageId::new(id),
        // As the client posts: each id once.
        fresh_id: true,
        payload: vec![0xAB; PAYLOAD].into(),
        // A limit, so it is checked, that the benchmark never reaches.
        max_queue_bytes: u64::MAX / 2,
        skip: Default::default(),
    }
}

/// A store with a 2-member group whose second member's queue holds `backlog` messages.
async fn group_with_backlog(dir: &std::path::Path, backlog: u64) -> Arc<SqliteStore> {
    let store =
        Arc::new(SqliteStore::open_with(dir, Arc::new(|| 20_000), Durability::Process).unwrap());
    for n in [1u8, 2] {
        store
            .create_queue(NewQueue {
                id: QueueId::new([n; 16]),
                receive_secret_hash: secret("receive", n),
                send_token_hash: secret("send", n),
            })
            .await
            .unwrap();
    }
    store
        .create_group(NewGroup {
            id: GroupId::new([1; 32]),
            epoch: 0,
            posting_token_hash: secret("posting", 1),
            routes: [1u8, 2]
                .iter()
                .map(|&n| RouteGrant {
                    queue_id: QueueId::new([n; 16]),
                    send_token_hash: secret("send", n),
                })
                .collect(),
        })
        .await
        .unwrap();
    let mut n = 0;
    while n < backlog {
        let batch = (backlog - n).min(FILL_AT_ONCE as u64);
        let posts = (n..n + batch).map(|k| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.post(post(k)).await.unwrap() })
        });
        for p in posts.collect::<Vec<_>>() {
            p.await.unwrap();
        }
        n += batch;
    }
    // The online member has read everything.
    store.ack(QueueId::new([1; 16]), backlog).await.unwrap();
    store
}

/// Posts id `next` (fresh or not) and acknowledges it as the two members would: the online
/// member reads it; the offline one's backlog keeps its size (its oldest goes).
async fn post_and_ack(store: &SqliteStore, next: u64, backlog: u64, fresh_id: bool) {
    store
        .post(PostOp {
            fresh_id,
            ..post(next)
        })
        .await
        .unwrap();
    // Both queues got it as sequence number `next + 1`.
    store.ack(QueueId::new([1; 16]), next + 1).await.unwrap();
    store
        .ack(QueueId::new([2; 16]), next + 1 - backlog)
        .await
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn post_beside_a_backlog(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    for backlog in [0u64, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = rt.block_on(group_with_backlog(dir.path(), backlog));
        let mut next = backlog;
        group.bench_function(
            BenchmarkId::new("post_and_ack_beside_backlog", backlog),
            |b| {
                b.iter(|| {
                    rt.block_on(post_and_ack(&store, next, backlog, true));
                    next += 1;
                });
            },
        );
        rt.block_on(store.close()).unwrap();
    }
    group.finish();
}

/// A post whose id is not fresh, in a group whose history fills the chunks a resend is looked
/// up in ([`RESEND_CHUNKS`]): the worst case, an id found in none of them. Beside a fresh post
/// in the same group.
fn resend_lookup(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    // Every RECENT_POSTS-th post moves a chunk; one post more than the chunks need.
    let history = RESEND_CHUNKS as u64 * RECENT_POSTS as u64 + 1;
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(group_with_backlog(dir.path(), history));
    let mut next = history;
    for fresh in [true, false] {
        let name = if fresh { "fresh" } else { "resend" };
        group.bench_function(BenchmarkId::new("post_after_1024_chunks", name), |b| {
            b.iter(|| {
                rt.block_on(post_and_ack(&store, next, history, fresh));
                next += 1;
            });
        });
    }
    rt.block_on(store.close()).unwrap();
    group.finish();
}

criterion_group!(benches, post_beside_a_backlog, resend_lookup);
criterion_main!(benches);
