//! The storage behaviour suite: every test is a function over a [`Backend`] (a store, its
//! directory, a settable clock, and a way to reopen), instantiated below for SQLite and
//! PostgreSQL. A new backend plugs in by implementing `Backend` and adding one line to the
//! `backend_suite!` call.
//!
//! PostgreSQL: each test creates a fresh database on `127.0.0.1:5432` (trust auth, user
//! `postgres` or `root`; `BLINDPOST_TEST_POSTGRES` overrides the admin URL) and drops it
//! afterwards. If no server answers, each PostgreSQL test prints why it was skipped to stderr
//! and passes — unless `BLINDPOST_REQUIRE_POSTGRES` is set (CI sets it), when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use blindpost_server::error::{ConflictKind, Credential, Entity, Limit, Refusal};
use blindpost_server::kt::{AkdStorage, KtConfig, KtError, Transparency};
use blindpost_server::store::postgres::{self, Wakeups};
use blindpost_server::store::sqlite::Clock;
use blindpost_server::store::{
    Appended, CommitOp, DirectoryStore, Expiry, FetchLimit, Fetched, NewGroup, NewQueue, PgStore,
    PostOp, Posted, PublishOp, RECENT_POSTS, RESEND_CHUNKS, RouteGrant, SHARE_FROM_BYTES,
    SqliteStore, Store, StoreError, TransparencyStore, UserRecord,
};
use blindpost_server::types::{BoxId, Day, GroupId, MessageId, QueueId, SecretHash};
use blindpost_wire::{SignedDirectoryEntry, SignedRoot, root_signature_message};
use prost::Message as _;

// ---------------------------------------------------------------------------------------------
// Backends

trait Backend: Sized {
    fn store(&self) -> Arc<dyn Store>;
    /// Every node's store on this database: one for SQLite, two for PostgreSQL (two pools,
    /// as two `blindpostd` processes would have). Concurrency tests spread over them.
    fn nodes(&self) -> Vec<Arc<dyn Store>>;
    fn directory(&self) -> Arc<dyn DirectoryStore>;
    fn transparency(&self) -> Arc<dyn TransparencyStore>;
    /// A directory for key files that survives `reopen`.
    fn data_dir(&self) -> &std::path::Path;
    fn set_day(&self, day: Day);
    /// Closes the store and opens the same database again.
    fn reopen(&mut self) -> impl Future<Output = ()>;
    /// Rows of the `payloads` table (payloads stored once for several queues), read directly.
    fn shared_payload_rows(&self) -> impl Future<Output = i64>;
    /// Moves every group's chunk counter (`groups.posted_n`) on by `by`, directly: as if each
    /// had moved that many more chunks of ids since.
    fn advance_chunk_counters(&self, by: i64) -> impl Future<Output = ()>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    day: Arc<AtomicI64>,
    store: Arc<SqliteStore>,
}

impl Sqlite {
    async fn new(_test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let day = Arc::new(AtomicI64::new(20_000));
        let store = Arc::new(SqliteStore::open(dir.path(), clock(&day)).unwrap());
        Some(Self { dir, day, store })
    }
}

fn clock(day: &Arc<AtomicI64>) -> Clock {
    let day = Arc::clone(day);
    Arc::new(move || day.load(Ordering::SeqCst))
}

impl Backend for Sqlite {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    fn nodes(&self) -> Vec<Arc<dyn Store>> {
        vec![self.store.clone()]
    }
    fn directory(&self) -> Arc<dyn DirectoryStore> {
        self.store.clone()
    }
    fn transparency(&self) -> Arc<dyn TransparencyStore> {
        self.store.clone()
    }
    fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    fn set_day(&self, day: Day) {
        self.day.store(day, Ordering::SeqCst);
    }
    async fn reopen(&mut self) {
        self.store.close().await.unwrap();
        self.store = Arc::new(SqliteStore::open(self.dir.path(), clock(&self.day)).unwrap());
    }
    async fn shared_payload_rows(&self) -> i64 {
        let path = self
            .dir
            .path()
            .join(blindpost_server::store::sqlite::DATABASE_FILE);
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM payloads", [], |r| r.get(0))
            .unwrap()
    }
    async fn advance_chunk_counters(&self, by: i64) {
        let path = self
            .dir
            .path()
            .join(blindpost_server::store::sqlite::DATABASE_FILE);
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        conn.execute("UPDATE groups SET posted_n = posted_n + ?1", [by])
            .unwrap();
    }
}

/// A fresh PostgreSQL database for one test, dropped when the test ends (even by a panic).
struct TestDb {
    admin: String,
    name: String,
    url: String,
}

/// The PostgreSQL backend: a fresh database and two nodes' stores on it.
struct Postgres {
    db: TestDb,
    /// The nodes' data directory (unused for keys on PostgreSQL, which keeps them in the
    /// database).
    dir: tempfile::TempDir,
    day: Arc<AtomicI64>,
    store: Arc<PgStore>,
    other_node: Arc<PgStore>,
}

/// Admin URLs tried in turn (trust auth on the local server).
fn postgres_admin_urls() -> Vec<String> {
    match std::env::var("BLINDPOST_TEST_POSTGRES") {
        Ok(url) => vec![url],
        Err(_) => ["postgres", "root"]
            .iter()
            .map(|u| format!("postgres://{u}@127.0.0.1:5432/test"))
            .collect(),
    }
}

async fn admin_client(admin: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Terminates the database's connections named `application_name`; how many there were.
async fn cut_connections(pg: &Postgres, application_name: &str) -> usize {
    let admin = admin_client(&pg.db.admin).await.unwrap();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND datname = $2",
            &[&application_name, &pg.db.name],
        )
        .await
        .unwrap()
        .len()
}

impl TestDb {
    /// Creates one, or says on stderr why `test` is skipped and returns `None`.
    async fn create(test: &str) -> Option<Self> {
        let mut reasons = Vec::new();
        for admin in postgres_admin_urls() {
            let client = match admin_client(&admin).await {
                Ok(client) => client,
                Err(e) => {
                    reasons.push(format!("{admin}: {e}"));
                    continue;
                }
            };
            let mut rnd = [0u8; 6];
            getrandom::fill(&mut rnd).unwrap();
            let name = format!("bp_test_{}_{}", std::process::id(), hex::encode(rnd));
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            let (base, _) = admin.rsplit_once('/').unwrap();
            let url = format!("{base}/{name}");
            return Some(Self { admin, name, url });
        }
        let why = format!(
            "SKIPPED postgres test {test}: no PostgreSQL server answered ({})",
            reasons.join("; ")
        );
        assert!(
            std::env::var_os("BLINDPOST_REQUIRE_POSTGRES").is_none(),
            "{why}, and BLINDPOST_REQUIRE_POSTGRES is set"
        );
        // Past the test harness's capture, so the skip shows in `cargo test` output.
        let _ = writeln!(std::io::stderr(), "{why}");
        None
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime: use a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                admin_client(&admin)
                    .await
                    .unwrap()
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .unwrap();
            });
        })
        .join();
        if dropped.is_err() {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

impl Postgres {
    async fn new(test: &str) -> Option<Self> {
        let db = TestDb::create(test).await?;
        let day = Arc::new(AtomicI64::new(20_000));
        let store = Arc::new(PgStore::open(&db.url, clock(&day)).await.unwrap());
        let other_node = Arc::new(PgStore::open(&db.url, clock(&day)).await.unwrap());
        Some(Self {
            db,
            dir: tempfile::tempdir().unwrap(),
            day,
            store,
            other_node,
        })
    }
}

impl Backend for Postgres {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    fn nodes(&self) -> Vec<Arc<dyn Store>> {
        vec![self.store.clone(), self.other_node.clone()]
    }
    fn directory(&self) -> Arc<dyn DirectoryStore> {
        self.store.clone()
    }
    fn transparency(&self) -> Arc<dyn TransparencyStore> {
        self.store.clone()
    }
    fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    fn set_day(&self, day: Day) {
        self.day.store(day, Ordering::SeqCst);
    }
    async fn reopen(&mut self) {
        self.store.close().await.unwrap();
        self.store = Arc::new(PgStore::open(&self.db.url, clock(&self.day)).await.unwrap());
    }
    async fn shared_payload_rows(&self) -> i64 {
        admin_client(&self.db.url)
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM payloads", &[])
            .await
            .unwrap()
            .get(0)
    }
    async fn advance_chunk_counters(&self, by: i64) {
        admin_client(&self.db.url)
            .await
            .unwrap()
            .execute("UPDATE groups SET posted_n = posted_n + $1", &[&by])
            .await
            .unwrap();
    }
}

macro_rules! backend_suite {
    ($($module:ident: $backend:ident),+ ; $tests:tt) => {
        $( backend_suite!(@one $module $backend $tests); )+
    };
    (@one $module:ident $backend:ident [$($test:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(mut backend) = $backend::new(stringify!($test)).await else {
                        return;
                    };
                    super::$test(&mut backend).await;
                    for node in backend.nodes() {
                        node.close().await.unwrap();
                    }
                }
            )*
        }
    };
}

backend_suite!(sqlite_backend: Sqlite, postgres_backend: Postgres; [
    queue_create_append_fetch_ack_delete,
    sequence_numbers_strictly_increase_under_concurrent_posts,
    fetch_respects_message_and_byte_limits,
    commit_fans_out_changes_routes_and_rotates_the_token,
    refused_commit_changes_nothing,
    concurrent_commits_at_one_epoch_have_one_winner,
    posts_are_idempotent_by_message_id,
    a_fresh_id_is_compared_with_the_groups_latest_ids_only,
    a_resend_is_looked_up_in_the_groups_latest_chunks_only,
    create_group_checks_routes,
    key_package_publish_status_and_limits,
    concurrent_claims_never_hand_out_a_package_twice,
    directory_register_update_and_conflicts,
    retention_expires_old_messages_and_posted_ids,
    everything_acknowledged_survives_reopen,
    a_full_queue_refuses_posts_whole_until_acknowledged,
    a_queue_keeps_counting_after_acknowledgement_retention_and_reopen,
    the_byte_limit_counts_shared_payloads_and_frees_on_ack_expiry_and_reopen,
    a_post_skips_the_routes_it_names,
    a_payload_for_several_queues_is_stored_once_and_goes_with_its_last_message,
    group_route_limit_is_enforced_by_commit,
    akd_storage_passes_akds_own_storage_suite,
    directory_epochs_publish_prove_and_survive_reopen,
    lookup_answers_are_reused_within_an_epoch_only,
]);

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: wake-ups between nodes

/// Records what the listener relays.
#[derive(Default)]
struct Wakes {
    queues: std::sync::Mutex<Vec<QueueId>>,
    resyncs: std::sync::atomic::AtomicUsize,
}

impl Wakeups for Wakes {
    fn appended(&self, queues: &[QueueId]) {
        self.queues.lock().unwrap().extend_from_slice(queues);
    }
    fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
    }
}

impl Wakes {
    async fn until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    fn relayed(&self) -> Vec<QueueId> {
        self.queues.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_listener_relays_other_nodes_appends_and_resyncs_after_losing_its_connection() {
    let Some(pg) = Postgres::new("postgres_listener_relays_other_nodes_appends").await else {
        return;
    };
    let wakes = Arc::new(Wakes::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let listener = pg.store.listen(wakes.clone(), stopped);
    wakes
        .until("first LISTEN", |w| w.resyncs.load(Ordering::SeqCst) == 1)
        .await;

    // Node 2 stores; node 1's listener hears which queues, and only those.
    let other = pg.other_node.clone();
    queue(&*other, 1).await;
    queue(&*other, 2).await;
    group(&*other, 1, 0, 1, &[1, 2]).await;
    other.post(post(1, 0, 1, 1, b"x")).await.unwrap();
    wakes
        .until("a wake-up for node 2's post", |w| w.relayed().len() == 2)
        .await;
    let mut relayed = wakes.relayed();
    relayed.sort();
    assert_eq!(relayed, vec![qid(1), qid(2)]);

    // Node 1's own appends are not relayed back (its service woke its connections already);
    // notifications arrive in commit order, so once node 2's next post is heard, an echo of
    // node 1's would have been too.
    pg.store.post(post(1, 0, 1, 2, b"own")).await.unwrap();
    other.post(post(1, 0, 1, 3, b"y")).await.unwrap();
    wakes
        .until("node 2's second post", |w| w.relayed().len() >= 4)
        .await;
    assert_eq!(wakes.relayed().len(), 4, "node 1 heard its own post");

    // Cut the listener's connection: it reconnects, re-checks every subscription, and hears
    // node 2 again.
    let cut = cut_connections(&pg, "blindpostd-listen").await;
    assert_eq!(cut, 1, "one listener connection");
    wakes
        .until("a resync after reconnecting", |w| {
            w.resyncs.load(Ordering::SeqCst) == 2
        })
        .await;
    other.post(post(1, 0, 1, 4, b"z")).await.unwrap();
    wakes
        .until("a wake-up after reconnecting", |w| w.relayed().len() == 6)
        .await;

    // Cut node 2's notifier connection: its next wake-up still arrives (it connects again, and
    // a round that fails keeps its queues for the next).
    let cut = cut_connections(&pg, "blindpostd-notify").await;
    assert!(cut > 0, "node 2's notifier was connected");
    other
        .post(post(1, 0, 1, 6, b"after the cut"))
        .await
        .unwrap();
    wakes
        .until("a wake-up after the notifier's connection was cut", |w| {
            w.relayed().len() == 8
        })
        .await;

    // A node whose listener connects tells the others to re-check every subscription: its
    // wake-ups go out after its commits, so a node that died between the two is covered when
    // it (or any node) connects again.
    let other_wakes = Arc::new(Wakes::default());
    let other_listener = other.listen(other_wakes.clone(), stop.subscribe());
    wakes
        .until("a resync asked by node 2's listener", |w| {
            w.resyncs.load(Ordering::SeqCst) == 3
        })
        .await;
    assert_eq!(
        other_wakes.resyncs.load(Ordering::SeqCst),
        1,
        "node 2 re-checks its own subscriptions once, and not for its own request"
    );

    // A node that closes right after a post still sends that post's wake-up.
    let before = wakes.relayed().len();
    other.post(post(1, 0, 1, 5, b"last")).await.unwrap();
    other.close().await.unwrap();
    wakes
        .until("the closing node's last wake-up", |w| {
            w.relayed().len() == before + 2
        })
        .await;

    stop.send(true).unwrap();
    listener.await.unwrap();
    other_listener.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_operations_survive_the_pools_connections_being_cut() {
    let Some(pg) = Postgres::new("postgres_operations_survive_cut_connections").await else {
        return;
    };
    let s = pg.store();
    // Fill the pool with several connections.
    let mut warm = tokio::task::JoinSet::new();
    for n in 1..=8u8 {
        let s = Arc::clone(&s);
        warm.spawn(async move { queue(&*s, n).await });
    }
    while let Some(r) = warm.join_next().await {
        r.unwrap();
    }
    let cut = cut_connections(&pg, "blindpostd").await;
    assert!(cut > 0);
    // Every operation still succeeds: dead connections are replaced, and an operation that
    // met one before committing runs again on a fresh one.
    group(&*s, 1, 0, 1, &[1, 2]).await;
    for i in 0..8u32 {
        s.post(post(1, 0, 1, i, b"after the cut")).await.unwrap();
    }
    assert_eq!(payloads(&*s, qid(2)).await.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_nodes_starting_at_once_migrate_once_and_refuse_a_newer_schema() {
    let Some(db) = TestDb::create("postgres_nodes_starting_at_once_migrate_once").await else {
        return;
    };
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let url = db.url.clone();
        starts.spawn(async move { PgStore::open(&url, Arc::new(|| 1)).await });
    }
    while let Some(started) = starts.join_next().await {
        started.unwrap().unwrap().close().await.unwrap();
    }
    let client = admin_client(&db.url).await.unwrap();
    let rows = client
        .query("SELECT version FROM blindpost_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one version row");
    assert_eq!(
        rows[0].get::<_, i64>(0),
        postgres::SCHEMA_VERSION as i64,
        "every migration applied once"
    );
    client
        .batch_execute("UPDATE blindpost_schema SET version = 99")
        .await
        .unwrap();
    let newer = PgStore::open(&db.url, Arc::new(|| 1)).await;
    assert!(
        matches!(newer, Err(StoreError::Backend(ref m)) if m.contains("newer")),
        "a schema from a newer server is refused"
    );
}

/// The property test runs synchronously (proptest drives cases), one fresh backend per case.
macro_rules! backend_properties {
    ($backend:ident) => {
        mod sqlite_properties {
            use super::*;
            use proptest::test_runner::{Config, TestRunner};

            #[test]
            fn queue_invariants_hold_under_random_interleavings() {
                let cases = std::env::var("BLINDPOST_PROPTEST_CASES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(48);
                let mut runner = TestRunner::new(Config {
                    cases,
                    failure_persistence: None,
                    ..Config::default()
                });
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                runner
                    .run(&super::queue_ops(), |ops| {
                        rt.block_on(async {
                            let Some(mut backend) = $backend::new("queue_invariants").await else {
                                return Ok(());
                            };
                            super::queue_invariants(&mut backend, &ops).await
                        })
                    })
                    .unwrap();
            }
        }
    };
}

backend_properties!(Sqlite);

// ---------------------------------------------------------------------------------------------
// Helpers

fn receive_secret(n: u8) -> SecretHash {
    SecretHash::of_secret("r", &[n ^ 0xA5; 32]).unwrap()
}

fn send_token(n: u8) -> SecretHash {
    SecretHash::of_secret("s", &[n ^ 0x5A; 32]).unwrap()
}

fn posting(n: u8) -> SecretHash {
    SecretHash::of_secret("p", &[n; 32]).unwrap()
}

fn qid(n: u8) -> QueueId {
    QueueId::new([n; 16])
}

fn gid(n: u8) -> GroupId {
    GroupId::new([n; 32])
}

fn mid(n: u32) -> MessageId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    MessageId::new(b)
}

fn grant(n: u8) -> RouteGrant {
    RouteGrant {
        queue_id: qid(n),
        send_token_hash: send_token(n),
    }
}

const ALL: FetchLimit = FetchLimit {
    max_messages: 256,
    max_bytes: usize::MAX,
};

async fn queue(s: &dyn Store, n: u8) -> QueueId {
    s.create_queue(NewQueue {
        id: qid(n),
        receive_secret_hash: receive_secret(n),
        send_token_hash: send_token(n),
    })
    .await
    .unwrap();
    qid(n)
}

async fn group(s: &dyn Store, g: u8, epoch: u64, token: u8, routes: &[u8]) -> GroupId {
    s.create_group(NewGroup {
        id: gid(g),
        epoch,
        posting_token_hash: posting(token),
        routes: routes.iter().map(|n| grant(*n)).collect(),
    })
    .await
    .unwrap();
    gid(g)
}

fn post(g: u8, epoch: u64, token: u8, id: u32, payload: &[u8]) -> PostOp {
    PostOp {
        group_id: gid(g),
        epoch,
        posting_token_hash: posting(token),
        message_id: mid(id),
        fresh_id: false,
        payload: payload.into(),
        max_queue_bytes: u64::MAX,
        skip: Default::default(),
    }
}

fn commit(g: u8, epoch: u64, token: u8, next: u8) -> CommitOp {
    CommitOp {
        group_id: gid(g),
        epoch,
        posting_token_hash: posting(token),
        commit: b"commit".to_vec(),
        next_posting_token_hash: posting(next),
        add_routes: vec![],
        remove_routes: vec![],
        welcome: None,
        max_routes: usize::MAX,
        max_queue_bytes: u64::MAX,
    }
}

async fn payloads(s: &dyn Store, q: QueueId) -> Vec<Vec<u8>> {
    s.fetch(q, 0, ALL)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|m| m.payload)
        .collect()
}

fn refusal<T: std::fmt::Debug>(r: Result<T, StoreError>) -> Refusal {
    match r {
        Err(StoreError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn queue_create_append_fetch_ack_delete(b: &mut impl Backend) {
    let s = b.store();
    let q = queue(&*s, 1).await;
    let dup = s
        .create_queue(NewQueue {
            id: q,
            receive_secret_hash: receive_secret(9),
            send_token_hash: send_token(9),
        })
        .await;
    assert_eq!(refusal(dup), Refusal::Conflict(ConflictKind::QueueExists));
    assert_eq!(s.authenticate_queue(q, receive_secret(1)).await.unwrap(), 0);
    assert_eq!(
        refusal(s.authenticate_queue(q, receive_secret(2)).await),
        Refusal::Forbidden(Credential::ReceiveSecret)
    );
    assert_eq!(
        refusal(s.authenticate_queue(qid(77), receive_secret(77)).await),
        Refusal::NotFound(Entity::Queue)
    );

    group(&*s, 1, 0, 1, &[1]).await;
    for i in 1..=3u8 {
        let posted = s.post(post(1, 0, 1, u32::from(i), &[i])).await.unwrap();
        let seq = u64::from(i);
        assert_eq!(
            posted,
            Posted::Stored {
                appended: vec![Appended { queue: q, seq }]
            },
            "each post lands at the next sequence number"
        );
    }
    let fetched = s.fetch(q, 0, ALL).await.unwrap();
    assert_eq!(
        fetched.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(payloads(&*s, q).await, [vec![1], vec![2], vec![3]]);
    assert!(!fetched.more);
    assert_eq!(s.authenticate_queue(q, receive_secret(1)).await.unwrap(), 3);

    s.ack(q, 2).await.unwrap();
    assert_eq!(payloads(&*s, q).await, [vec![3]]);
    s.ack(q, 1).await.unwrap(); // already gone: not an error
    s.ack(q, 3).await.unwrap();
    assert_eq!(s.fetch(q, 0, ALL).await.unwrap(), Fetched::default());
    // Sequence numbers continue after acknowledged messages.
    s.post(post(1, 0, 1, 4, b"4")).await.unwrap();
    assert_eq!(s.fetch(q, 0, ALL).await.unwrap().messages[0].seq, 4);

    assert_eq!(
        refusal(s.delete_queue(q, receive_secret(5)).await),
        Refusal::Forbidden(Credential::ReceiveSecret)
    );
    s.delete_queue(q, receive_secret(1)).await.unwrap();
    assert_eq!(
        refusal(s.authenticate_queue(q, receive_secret(1)).await),
        Refusal::NotFound(Entity::Queue)
    );
    assert!(s.fetch(q, 0, ALL).await.unwrap().messages.is_empty());
    // Its route went with it.
    let posted = s.post(post(1, 0, 1, 5, b"5")).await.unwrap();
    assert_eq!(posted, Posted::Stored { appended: vec![] });
    assert_eq!(
        refusal(s.delete_queue(q, receive_secret(1)).await),
        Refusal::NotFound(Entity::Queue)
    );
}

async fn sequence_numbers_strictly_increase_under_concurrent_posts(b: &mut impl Backend) {
    let s = b.store();
    let q = queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    let nodes = b.nodes();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let s = Arc::clone(&nodes[i as usize % nodes.len()]);
        tasks.spawn(async move { s.post(post(1, 0, 1, i, &i.to_be_bytes())).await.unwrap() });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let page = s
            .fetch(
                q,
                after,
                FetchLimit {
                    max_messages: 7,
                    max_bytes: usize::MAX,
                },
            )
            .await
            .unwrap();
        seqs.extend(page.messages.iter().map(|m| m.seq));
        after = *seqs.last().unwrap();
        if !page.more {
            break;
        }
    }
    assert_eq!(seqs.len(), 100);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(
        s.authenticate_queue(q, receive_secret(1)).await.unwrap(),
        *seqs.last().unwrap()
    );
}

async fn fetch_respects_message_and_byte_limits(b: &mut impl Backend) {
    let s = b.store();
    let q = queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    for i in 0..5u32 {
        s.post(post(1, 0, 1, i, &[0u8; 100])).await.unwrap();
    }
    let page = s
        .fetch(
            q,
            0,
            FetchLimit {
                max_messages: 2,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 2);
    assert!(page.more);
    let page = s
        .fetch(
            q,
            0,
            FetchLimit {
                max_messages: 256,
                max_bytes: 250,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.messages.len(),
        2,
        "two 100-byte messages fit in 250 bytes"
    );
    assert!(page.more);
    let page = s
        .fetch(
            q,
            0,
            FetchLimit {
                max_messages: 256,
                max_bytes: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.messages.len(),
        1,
        "one message is returned even above the byte budget"
    );
    let page = s.fetch(q, 4, ALL).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);
    assert!(!page.more);
}

async fn commit_fans_out_changes_routes_and_rotates_the_token(b: &mut impl Backend) {
    let s = b.store();
    for n in 1..=3 {
        queue(&*s, n).await;
    }
    group(&*s, 1, 5, 1, &[1, 2]).await;
    let mut c = commit(1, 5, 1, 2);
    c.remove_routes = vec![qid(2), qid(99)];
    c.add_routes = vec![grant(3)];
    c.welcome = Some(b"welcome".to_vec());
    let committed = s.commit(c).await.unwrap();
    assert_eq!(committed.epoch, 6);
    let appended: HashSet<_> = committed.appended.into_iter().collect();
    assert_eq!(appended, HashSet::from([qid(1), qid(2), qid(3)]));
    assert_eq!(payloads(&*s, qid(1)).await, [b"commit".to_vec()]);
    assert_eq!(
        payloads(&*s, qid(2)).await,
        [b"commit".to_vec()],
        "the removed member learns of it"
    );
    assert_eq!(payloads(&*s, qid(3)).await, [b"welcome".to_vec()]);

    assert_eq!(
        refusal(s.post(post(1, 5, 1, 1, b"old")).await),
        Refusal::StaleEpoch { current_epoch: 6 }
    );
    assert_eq!(
        refusal(s.post(post(1, 6, 1, 1, b"old token")).await),
        Refusal::Forbidden(Credential::PostingToken)
    );
    let posted = s.post(post(1, 6, 2, 1, b"hello")).await.unwrap();
    let Posted::Stored { appended } = posted else {
        panic!("not stored")
    };
    assert_eq!(
        appended
            .into_iter()
            .map(|a| a.queue)
            .collect::<HashSet<_>>(),
        HashSet::from([qid(1), qid(3)])
    );
    assert_eq!(
        payloads(&*s, qid(2)).await.len(),
        1,
        "a removed route gets nothing more"
    );
    assert_eq!(
        payloads(&*s, qid(3)).await,
        [b"welcome".to_vec(), b"hello".to_vec()]
    );
}

async fn refused_commit_changes_nothing(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    queue(&*s, 2).await;
    group(&*s, 1, 0, 1, &[1]).await;
    let mut c = commit(1, 0, 1, 2);
    c.add_routes = vec![RouteGrant {
        queue_id: qid(2),
        send_token_hash: send_token(7),
    }];
    c.welcome = Some(b"w".to_vec());
    assert_eq!(
        refusal(s.commit(c.clone()).await),
        Refusal::Forbidden(Credential::SendToken)
    );
    c.add_routes = vec![grant(42)];
    assert_eq!(refusal(s.commit(c).await), Refusal::NotFound(Entity::Queue));
    assert_eq!(
        refusal(s.commit(commit(1, 0, 9, 2)).await),
        Refusal::Forbidden(Credential::PostingToken)
    );
    assert_eq!(
        refusal(s.commit(commit(1, 3, 1, 2)).await),
        Refusal::StaleEpoch { current_epoch: 0 }
    );
    assert_eq!(
        refusal(s.commit(commit(9, 0, 1, 2)).await),
        Refusal::NotFound(Entity::Group)
    );
    assert!(
        payloads(&*s, qid(1)).await.is_empty(),
        "no commit was appended"
    );
    assert!(payloads(&*s, qid(2)).await.is_empty());
    // Still at epoch 0 with the old token.
    s.post(post(1, 0, 1, 1, b"x")).await.unwrap();
}

async fn concurrent_commits_at_one_epoch_have_one_winner(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    group(&*s, 1, 10, 1, &[1]).await;
    let nodes = b.nodes();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u8 {
        let s = Arc::clone(&nodes[usize::from(i) % nodes.len()]);
        tasks.spawn(async move {
            let mut c = commit(1, 10, 1, 100 + i);
            c.commit = vec![i];
            s.commit(c).await
        });
    }
    let (mut won, mut stale) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(c) => {
                assert_eq!(c.epoch, 11);
                won += 1;
            }
            Err(StoreError::Refused(Refusal::StaleEpoch { current_epoch: 11 })) => stale += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((won, stale), (1, 15));
    assert_eq!(
        payloads(&*s, qid(1)).await.len(),
        1,
        "exactly one commit was sequenced"
    );
}

async fn posts_are_idempotent_by_message_id(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    group(&*s, 2, 0, 1, &[1]).await;
    assert!(matches!(
        s.post(post(1, 0, 1, 7, b"a")).await.unwrap(),
        Posted::Stored { .. }
    ));
    assert_eq!(
        s.post(post(1, 0, 1, 7, b"a")).await.unwrap(),
        Posted::Duplicate
    );
    // The id is per group.
    assert!(matches!(
        s.post(post(2, 0, 1, 7, b"b")).await.unwrap(),
        Posted::Stored { .. }
    ));
    assert_eq!(payloads(&*s, qid(1)).await, [b"a".to_vec(), b"b".to_vec()]);
    // A refused post does not record its id.
    refusal(s.post(post(1, 0, 9, 8, b"c")).await);
    assert!(matches!(
        s.post(post(1, 0, 1, 8, b"c")).await.unwrap(),
        Posted::Stored { .. }
    ));
    // Ids the group row holds and ids moved on to a chunk (RECENT_POSTS at a time) are
    // remembered alike, across a restart.
    let more = 100..100 + 2 * RECENT_POSTS as u32 + 3;
    for id in more.clone() {
        assert!(matches!(
            s.post(post(1, 0, 1, id, b"d")).await.unwrap(),
            Posted::Stored { .. }
        ));
    }
    b.reopen().await;
    let s = b.store();
    for id in [7, 8].into_iter().chain(more) {
        assert_eq!(
            s.post(post(1, 0, 1, id, b"d")).await.unwrap(),
            Posted::Duplicate,
            "id {id}"
        );
    }
}

async fn a_fresh_id_is_compared_with_the_groups_latest_ids_only(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    let fresh = |id: u32| PostOp {
        fresh_id: true,
        ..post(1, 0, 1, id, b"f")
    };
    // The post after RECENT_POSTS moves the group's ids 1..=RECENT_POSTS to a chunk.
    let last = RECENT_POSTS as u32 + 1;
    for id in 1..=last {
        assert!(matches!(
            s.post(fresh(id)).await.unwrap(),
            Posted::Stored { .. }
        ));
    }
    // An id among the group's latest is a duplicate, even when the post calls it fresh.
    assert_eq!(s.post(fresh(last)).await.unwrap(), Posted::Duplicate);
    // A moved id: a resend (not fresh) is looked up and found.
    assert_eq!(
        s.post(post(1, 0, 1, 1, b"f")).await.unwrap(),
        Posted::Duplicate
    );
    // A post that calls it fresh is not looked up there: the client's word is taken, and only
    // its own message is stored twice.
    assert!(matches!(
        s.post(fresh(1)).await.unwrap(),
        Posted::Stored { .. }
    ));
    assert_eq!(payloads(&*s, qid(1)).await.len(), last as usize + 1);
}

async fn a_resend_is_looked_up_in_the_groups_latest_chunks_only(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    // The post after RECENT_POSTS moves ids 1..=RECENT_POSTS into one chunk.
    for id in 1..=RECENT_POSTS as u32 + 1 {
        assert!(matches!(
            s.post(post(1, 0, 1, id, b"p")).await.unwrap(),
            Posted::Stored { .. }
        ));
    }
    // RESEND_CHUNKS - 1 chunks later, that chunk is still among the latest RESEND_CHUNKS.
    b.advance_chunk_counters(RESEND_CHUNKS - 1).await;
    assert_eq!(
        s.post(post(1, 0, 1, 1, b"p")).await.unwrap(),
        Posted::Duplicate
    );
    // One chunk more and it is not looked at: a resend of id 2 is stored again.
    b.advance_chunk_counters(1).await;
    assert!(matches!(
        s.post(post(1, 0, 1, 2, b"p")).await.unwrap(),
        Posted::Stored { .. }
    ));
    // The group's next move lands above the counter, and its ids are found.
    for id in 100..100 + RECENT_POSTS as u32 {
        s.post(post(1, 0, 1, id, b"p")).await.unwrap();
    }
    assert_eq!(
        s.post(post(1, 0, 1, 100, b"p")).await.unwrap(),
        Posted::Duplicate
    );
}

async fn create_group_checks_routes(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    let mut g = NewGroup {
        id: gid(1),
        epoch: 0,
        posting_token_hash: posting(1),
        routes: vec![RouteGrant {
            queue_id: qid(1),
            send_token_hash: send_token(2),
        }],
    };
    assert_eq!(
        refusal(s.create_group(g.clone()).await),
        Refusal::Forbidden(Credential::SendToken)
    );
    g.routes = vec![grant(3)];
    assert_eq!(
        refusal(s.create_group(g.clone()).await),
        Refusal::NotFound(Entity::Queue)
    );
    g.routes = vec![grant(1)];
    s.create_group(g.clone()).await.unwrap();
    assert_eq!(
        refusal(s.create_group(g).await),
        Refusal::Conflict(ConflictKind::GroupExists)
    );
    s.post(post(1, 0, 1, 1, b"x")).await.unwrap();
    assert_eq!(payloads(&*s, qid(1)).await.len(), 1);
}

fn publish(box_n: u8, secret: u8, count: u8, last_resort: Option<&[u8]>) -> PublishOp {
    PublishOp {
        box_id: BoxId::new([box_n; 16]),
        secret_hash: SecretHash::of_secret("b", &[secret; 32]).unwrap(),
        key_packages: (0..count).map(|i| vec![box_n, i]).collect(),
        last_resort: last_resort.map(<[u8]>::to_vec),
        max_one_time: 10,
    }
}

async fn key_package_publish_status_and_limits(b: &mut impl Backend) {
    let s = b.store();
    let bx = BoxId::new([1; 16]);
    let c = s
        .publish_key_packages(publish(1, 1, 3, None))
        .await
        .unwrap();
    assert_eq!((c.one_time, c.has_last_resort), (3, false));
    let c = s
        .publish_key_packages(publish(1, 1, 2, Some(b"lr")))
        .await
        .unwrap();
    assert_eq!((c.one_time, c.has_last_resort), (5, true));
    assert_eq!(
        refusal(s.publish_key_packages(publish(1, 2, 1, None)).await),
        Refusal::Forbidden(Credential::BoxSecret)
    );
    assert_eq!(
        refusal(s.publish_key_packages(publish(1, 1, 6, None)).await),
        Refusal::LimitExceeded(Limit::KeyPackages)
    );
    let secret = SecretHash::of_secret("b", &[1; 32]).unwrap();
    let c = s.key_package_status(bx, secret).await.unwrap();
    assert_eq!((c.one_time, c.has_last_resort), (5, true));
    assert_eq!(
        refusal(
            s.key_package_status(bx, SecretHash::of_secret("b", &[2; 32]).unwrap())
                .await
        ),
        Refusal::Forbidden(Credential::BoxSecret)
    );
    assert_eq!(
        refusal(s.key_package_status(BoxId::new([9; 16]), secret).await),
        Refusal::NotFound(Entity::KeyPackageBox)
    );
    // Claims come oldest first.
    assert_eq!(s.claim_key_package(bx).await.unwrap().data, vec![1, 0]);
    // A box with nothing left and no last resort has nothing to give.
    s.publish_key_packages(publish(2, 2, 1, None))
        .await
        .unwrap();
    s.claim_key_package(BoxId::new([2; 16])).await.unwrap();
    assert_eq!(
        refusal(s.claim_key_package(BoxId::new([2; 16])).await),
        Refusal::NotFound(Entity::KeyPackageBox)
    );
    assert_eq!(
        refusal(s.claim_key_package(BoxId::new([3; 16])).await),
        Refusal::NotFound(Entity::KeyPackageBox)
    );
}

async fn concurrent_claims_never_hand_out_a_package_twice(b: &mut impl Backend) {
    let s = b.store();
    s.publish_key_packages(publish(1, 1, 10, Some(b"last")))
        .await
        .unwrap();
    let bx = BoxId::new([1; 16]);
    let nodes = b.nodes();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let s = Arc::clone(&nodes[i % nodes.len()]);
        tasks.spawn(async move { s.claim_key_package(bx).await.unwrap() });
    }
    let mut one_time = HashSet::new();
    let mut last_resort = 0;
    while let Some(r) = tasks.join_next().await {
        let claimed = r.unwrap();
        if claimed.last_resort {
            assert_eq!(claimed.data, b"last");
            last_resort += 1;
        } else {
            assert!(
                one_time.insert(claimed.data),
                "a one-time package was handed out twice"
            );
        }
    }
    assert_eq!((one_time.len(), last_resort), (10, 20));
    let c = s
        .key_package_status(bx, SecretHash::of_secret("b", &[1; 32]).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (c.one_time, c.has_last_resort),
        (0, true),
        "the last resort is never deleted"
    );
    // Topping up makes one-time packages come first again.
    s.publish_key_packages(publish(1, 1, 1, None))
        .await
        .unwrap();
    assert!(!s.claim_key_package(bx).await.unwrap().last_resort);
    assert!(s.claim_key_package(bx).await.unwrap().last_resort);
}

fn user(name: &str, key: u8, version: u64) -> UserRecord {
    UserRecord {
        username: name.into(),
        identity_key: [key; 32],
        version,
        entry: vec![key, version as u8],
        signature: vec![0; 64],
    }
}

async fn directory_register_update_and_conflicts(b: &mut impl Backend) {
    let d = b.directory();
    assert_eq!(d.lookup_user("alice".into()).await.unwrap(), None);
    d.register_user(user("alice", 1, 1)).await.unwrap();
    assert_eq!(
        d.lookup_user("alice".into()).await.unwrap(),
        Some(user("alice", 1, 1))
    );
    assert_eq!(
        refusal(d.register_user(user("alice", 2, 5)).await),
        Refusal::Conflict(ConflictKind::UsernameTaken)
    );
    assert_eq!(
        refusal(d.register_user(user("alice", 1, 1)).await),
        Refusal::Conflict(ConflictKind::VersionNotIncreased)
    );
    d.register_user(user("alice", 1, 3)).await.unwrap();
    assert_eq!(
        refusal(d.register_user(user("alice", 1, 2)).await),
        Refusal::Conflict(ConflictKind::VersionNotIncreased)
    );
    assert_eq!(
        d.lookup_user("alice".into()).await.unwrap(),
        Some(user("alice", 1, 3))
    );
    d.register_user(user("bob", 2, 0)).await.unwrap();
    assert_eq!(
        d.lookup_user("bob".into())
            .await
            .unwrap()
            .unwrap()
            .identity_key,
        [2; 32]
    );
}

async fn retention_expires_old_messages_and_posted_ids(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    group(&*s, 1, 0, 1, &[1]).await;
    b.set_day(100);
    // The last of these moves the first RECENT_POSTS ids from the group row to a chunk.
    let old = RECENT_POSTS as u32 + 1;
    for id in 1..=old {
        s.post(post(1, 0, 1, id, b"old")).await.unwrap();
    }
    b.set_day(110);
    s.post(post(1, 0, 1, 1000, b"new")).await.unwrap();
    let expiry = Expiry {
        messages_before: 105,
        posted_ids_before: 105,
    };
    let expired = s.expire(expiry).await.unwrap();
    assert_eq!(
        (expired.messages, expired.posted_ids),
        (u64::from(old), RECENT_POSTS as u64)
    );
    assert_eq!(payloads(&*s, qid(1)).await, [b"new".to_vec()]);
    // An expired id is forgotten; the group's latest ids stay in its row, however old.
    assert!(matches!(
        s.post(post(1, 0, 1, 1, b"again")).await.unwrap(),
        Posted::Stored { .. }
    ));
    for id in [old, 1000] {
        assert_eq!(
            s.post(post(1, 0, 1, id, b"x")).await.unwrap(),
            Posted::Duplicate,
            "id {id}"
        );
    }
    let expired = s.expire(expiry).await.unwrap();
    assert_eq!((expired.messages, expired.posted_ids), (0, 0));
}

async fn everything_acknowledged_survives_reopen(b: &mut impl Backend) {
    {
        let s = b.store();
        queue(&*s, 1).await;
        queue(&*s, 2).await;
        group(&*s, 1, 0, 1, &[1]).await;
        let mut c = commit(1, 0, 1, 2);
        c.add_routes = vec![grant(2)];
        c.welcome = Some(b"w".to_vec());
        s.commit(c).await.unwrap();
        s.post(post(1, 1, 2, 1, b"m")).await.unwrap();
        s.publish_key_packages(publish(1, 1, 2, Some(b"lr")))
            .await
            .unwrap();
        b.directory()
            .register_user(user("carol", 3, 1))
            .await
            .unwrap();
    }
    b.reopen().await;
    let s = b.store();
    assert_eq!(
        payloads(&*s, qid(1)).await,
        [b"commit".to_vec(), b"m".to_vec()]
    );
    assert_eq!(payloads(&*s, qid(2)).await, [b"w".to_vec(), b"m".to_vec()]);
    assert_eq!(
        s.authenticate_queue(qid(2), receive_secret(2))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        refusal(s.post(post(1, 0, 1, 2, b"x")).await),
        Refusal::StaleEpoch { current_epoch: 1 }
    );
    assert_eq!(
        s.post(post(1, 1, 2, 1, b"m")).await.unwrap(),
        Posted::Duplicate
    );
    let c = s
        .key_package_status(
            BoxId::new([1; 16]),
            SecretHash::of_secret("b", &[1; 32]).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((c.one_time, c.has_last_resort), (2, true));
    assert_eq!(
        b.directory().lookup_user("carol".into()).await.unwrap(),
        Some(user("carol", 3, 1))
    );
}

/// A queue's sequence numbers and byte count carry on, whatever removed its messages: an
/// acknowledgement of all of them, the hourly pass a day later, retention, a reopen. Written
/// for a store that kept the counters in the queue's newest message row (BENCHMARKS.md,
/// "Queue counters in the newest row"); it holds any backend to the same.
async fn a_queue_keeps_counting_after_acknowledgement_retention_and_reopen(b: &mut impl Backend) {
    let limited = |id: u32, len: usize| PostOp {
        max_queue_bytes: 100,
        ..post(1, 0, 1, id, &vec![id as u8; len])
    };
    let seqs = |f: Fetched| f.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let nothing_expires = Expiry {
        messages_before: 0,
        posted_ids_before: 0,
    };
    let q = qid(1);
    {
        let s = b.store();
        queue(&*s, 1).await;
        group(&*s, 1, 0, 1, &[1]).await;
        b.set_day(10);
        s.post(limited(1, 60)).await.unwrap();
        s.post(limited(2, 40)).await.unwrap();
        s.ack(q, 2).await.unwrap();
        assert_eq!(s.fetch(q, 0, ALL).await.unwrap(), Fetched::default());
        assert_eq!(s.authenticate_queue(q, receive_secret(1)).await.unwrap(), 2);
        // Nothing is pending: a post of the whole limit fits.
        s.post(limited(3, 100)).await.unwrap();
        assert_eq!(
            refusal(s.post(limited(4, 1)).await),
            Refusal::LimitExceeded(Limit::QueueBytes)
        );
        s.ack(q, 3).await.unwrap();
        // A day later the hourly pass runs; nothing is old enough for retention.
        b.set_day(11);
        assert_eq!(s.expire(nothing_expires).await.unwrap().messages, 0);
        assert_eq!(s.authenticate_queue(q, receive_secret(1)).await.unwrap(), 3);
        s.post(limited(4, 100)).await.unwrap();
        assert_eq!(seqs(s.fetch(q, 0, ALL).await.unwrap()), [4]);
        assert_eq!(
            refusal(s.post(limited(5, 1)).await),
            Refusal::LimitExceeded(Limit::QueueBytes)
        );
        // Never acknowledged, message 4 outlives retention.
        b.set_day(50);
        let expired = s
            .expire(Expiry {
                messages_before: 40,
                posted_ids_before: 0,
            })
            .await
            .unwrap();
        assert_eq!(expired.messages, 1);
        assert_eq!(s.fetch(q, 0, ALL).await.unwrap(), Fetched::default());
        assert_eq!(s.authenticate_queue(q, receive_secret(1)).await.unwrap(), 4);
    }
    b.reopen().await;
    let s = b.store();
    assert_eq!(
        s.post(limited(5, 100)).await.unwrap(),
        Posted::Stored {
            appended: vec![Appended { queue: q, seq: 5 }]
        }
    );
    assert_eq!(
        refusal(s.post(limited(6, 1)).await),
        Refusal::LimitExceeded(Limit::QueueBytes)
    );
    s.ack(q, 5).await.unwrap();
    assert_eq!(
        s.post(limited(6, 1)).await.unwrap(),
        Posted::Stored {
            appended: vec![Appended { queue: q, seq: 6 }]
        }
    );
}

async fn a_full_queue_refuses_posts_whole_until_acknowledged(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    queue(&*s, 2).await;
    group(&*s, 1, 0, 1, &[1, 2]).await;
    let limited = |id: u32, len: usize| PostOp {
        max_queue_bytes: 100,
        ..post(1, 0, 1, id, &vec![id as u8; len])
    };
    s.post(limited(1, 60)).await.unwrap();
    s.post(limited(2, 40)).await.unwrap();
    assert_eq!(
        refusal(s.post(limited(3, 1)).await),
        Refusal::LimitExceeded(Limit::QueueBytes)
    );
    // Refused whole: neither route got it, and the id is not burnt.
    assert_eq!(payloads(&*s, qid(1)).await.len(), 2);
    assert_eq!(payloads(&*s, qid(2)).await.len(), 2);
    // A retry of a stored post is a duplicate, although the queues filled up since.
    assert_eq!(s.post(limited(2, 40)).await.unwrap(), Posted::Duplicate);
    assert_eq!(payloads(&*s, qid(1)).await.len(), 2);
    // Queue 1's reader catches up; queue 2's still blocks the post.
    s.ack(qid(1), 2).await.unwrap();
    assert_eq!(
        refusal(s.post(limited(3, 1)).await),
        Refusal::LimitExceeded(Limit::QueueBytes)
    );
    s.ack(qid(2), 1).await.unwrap();
    assert!(matches!(
        s.post(limited(3, 50)).await.unwrap(),
        Posted::Stored { .. }
    ));
    assert_eq!(payloads(&*s, qid(2)).await.len(), 2);
    // A commit removing the full queue still reaches it (and is not blocked by it).
    let mut c = commit(1, 0, 1, 2);
    c.max_queue_bytes = 90;
    c.remove_routes = vec![qid(2)];
    s.commit(c).await.unwrap();
    assert_eq!(payloads(&*s, qid(2)).await.last().unwrap(), b"commit");
}

/// The byte limit holds exactly however a queue's messages are held (inline, or one shared
/// payload) and however they go (acknowledgement, retention), across a reopen.
async fn the_byte_limit_counts_shared_payloads_and_frees_on_ack_expiry_and_reopen(
    b: &mut impl Backend,
) {
    let s = b.store();
    queue(&*s, 1).await;
    queue(&*s, 2).await;
    group(&*s, 1, 0, 1, &[1, 2]).await;
    let big = SHARE_FROM_BYTES;
    let max = big + 300;
    let limited = |id: u32, len: usize| PostOp {
        max_queue_bytes: max as u64,
        ..post(1, 0, 1, id, &vec![id as u8; len])
    };
    // Does a post of `len` fit? A refused post changes nothing.
    let fits = |s: Arc<dyn Store>, id: u32, len: usize| async move {
        match s.post(limited(id, len)).await {
            Ok(_) => true,
            Err(StoreError::Refused(Refusal::LimitExceeded(Limit::QueueBytes))) => false,
            Err(e) => panic!("post {id}: {e}"),
        }
    };
    b.set_day(100);
    s.post(limited(1, big)).await.unwrap();
    assert_eq!(b.shared_payload_rows().await, 1);
    s.post(limited(2, 100)).await.unwrap();
    assert!(!fits(Arc::clone(&s), 3, 201).await);
    b.set_day(110);
    assert!(fits(Arc::clone(&s), 3, 200).await);
    assert!(!fits(Arc::clone(&s), 4, 1).await);
    // Queue 1 acknowledges the shared payload; queue 2 still holds it and stays full.
    s.ack(qid(1), 1).await.unwrap();
    assert!(!fits(Arc::clone(&s), 4, 1).await);
    s.ack(qid(2), 2).await.unwrap();
    // Queue 1 holds posts 2 and 3 (300 bytes), queue 2 post 3 (200).
    b.reopen().await;
    let s = b.store();
    assert_eq!(b.shared_payload_rows().await, 0);
    assert!(!fits(Arc::clone(&s), 4, big + 1).await);
    // Retention takes what was posted on day 100 (queue 1's 100 bytes); day 110's 200 stay.
    let expired = s
        .expire(Expiry {
            messages_before: 105,
            posted_ids_before: 0,
        })
        .await
        .unwrap();
    assert_eq!(expired.messages, 1);
    assert!(!fits(Arc::clone(&s), 4, big + 101).await);
    assert!(fits(Arc::clone(&s), 4, big + 100).await);
    assert!(!fits(Arc::clone(&s), 5, 1).await);
}

async fn a_post_skips_the_routes_it_names(b: &mut impl Backend) {
    let s = b.store();
    queue(&*s, 1).await;
    queue(&*s, 2).await;
    group(&*s, 1, 0, 1, &[1, 2]).await;
    // Queue 1 (the poster's own, say) is full: a post skipping it is not refused by it.
    let limited = |id: u32, len: usize, skip: Vec<QueueId>| PostOp {
        max_queue_bytes: 100,
        skip: Arc::new(skip.into_iter().collect()),
        ..post(1, 0, 1, id, &vec![id as u8; len])
    };
    s.post(limited(1, 90, vec![qid(2)])).await.unwrap();
    let posted = s.post(limited(2, 50, vec![qid(1)])).await.unwrap();
    assert_eq!(
        posted,
        Posted::Stored {
            appended: vec![Appended {
                queue: qid(2),
                seq: 1
            }]
        }
    );
    assert_eq!(payloads(&*s, qid(1)).await, vec![vec![1u8; 90]]);
    assert_eq!(payloads(&*s, qid(2)).await, vec![vec![2u8; 50]]);
    // Without the skip the full queue refuses the post whole.
    assert_eq!(
        refusal(s.post(limited(3, 50, vec![])).await),
        Refusal::LimitExceeded(Limit::QueueBytes)
    );
    // Skipping every route stores the post nowhere, yet burns its id (a repeat is a duplicate).
    let none = s.post(limited(4, 1, vec![qid(1), qid(2)])).await.unwrap();
    assert_eq!(none, Posted::Stored { appended: vec![] });
    assert_eq!(
        s.post(limited(4, 1, vec![])).await.unwrap(),
        Posted::Duplicate
    );
}

async fn a_payload_for_several_queues_is_stored_once_and_goes_with_its_last_message(
    b: &mut impl Backend,
) {
    let s = b.store();
    for n in 1..=3 {
        queue(&*s, n).await;
    }
    group(&*s, 1, 0, 1, &[1, 2, 3]).await;
    let big = |c: u8| vec![c; SHARE_FROM_BYTES];
    // Below the threshold a payload is copied into each queue's row.
    s.post(post(1, 0, 1, 1, b"small")).await.unwrap();
    assert_eq!(
        b.shared_payload_rows().await,
        0,
        "small payloads are copied"
    );
    for n in 1..=3 {
        s.ack(qid(n), 1).await.unwrap();
    }
    s.post(post(1, 0, 1, 2, &big(1))).await.unwrap();
    for n in 1..=3 {
        assert_eq!(payloads(&*s, qid(n)).await, vec![big(1)]);
    }
    assert_eq!(
        b.shared_payload_rows().await,
        1,
        "stored once for three queues"
    );
    // A post that reaches one queue is stored in its message row. (A connection's skipped
    // queues include any it holds outside the group, here queue 99.)
    let one = PostOp {
        skip: Arc::new([qid(2), qid(3), qid(99)].into_iter().collect()),
        ..post(1, 0, 1, 3, &big(2))
    };
    s.post(one).await.unwrap();
    assert_eq!(b.shared_payload_rows().await, 1);
    assert_eq!(payloads(&*s, qid(1)).await, vec![big(1), big(2)]);
    // The shared payload stays until the last queue holding it acknowledges it.
    s.ack(qid(1), 3).await.unwrap();
    s.ack(qid(2), 2).await.unwrap();
    assert_eq!(b.shared_payload_rows().await, 1);
    assert_eq!(payloads(&*s, qid(3)).await, vec![big(1)]);
    s.ack(qid(3), 2).await.unwrap();
    assert_eq!(
        b.shared_payload_rows().await,
        0,
        "gone with its last message"
    );
    // Retention releases it too, and so does deleting its queues.
    s.post(post(1, 0, 1, 4, &big(3))).await.unwrap();
    assert_eq!(b.shared_payload_rows().await, 1);
    s.expire(Expiry {
        messages_before: 20_001,
        posted_ids_before: 0,
    })
    .await
    .unwrap();
    assert_eq!(
        b.shared_payload_rows().await,
        0,
        "expired with its messages"
    );
    assert!(payloads(&*s, qid(1)).await.is_empty());
    s.post(post(1, 0, 1, 5, &big(4))).await.unwrap();
    for n in 1..=3 {
        assert_eq!(b.shared_payload_rows().await, 1);
        s.delete_queue(qid(n), receive_secret(n)).await.unwrap();
    }
    assert_eq!(b.shared_payload_rows().await, 0, "deleted with its queues");
}

async fn group_route_limit_is_enforced_by_commit(b: &mut impl Backend) {
    let s = b.store();
    for n in 1..=4 {
        queue(&*s, n).await;
    }
    group(&*s, 1, 0, 1, &[1, 2]).await;
    let mut c = commit(1, 0, 1, 2);
    c.max_routes = 3;
    c.add_routes = vec![grant(3), grant(4)];
    assert_eq!(
        refusal(s.commit(c.clone()).await),
        Refusal::LimitExceeded(Limit::GroupRoutes)
    );
    assert_eq!(payloads(&*s, qid(1)).await.len(), 0, "refused whole");
    c.add_routes = vec![grant(3)];
    assert_eq!(s.commit(c).await.unwrap().epoch, 1);
}

// ---------------------------------------------------------------------------------------------
// The property: random interleavings of post / burst of posts / retried post / deliver / ack /
// restart keep the queue invariants.

#[derive(Debug, Clone)]
enum QueueOp {
    /// A new post of `len` bytes to the group (routes: queues 1 and 2).
    Post(usize),
    /// This many new posts of a few bytes each, fresh ids: enough to move the group's latest
    /// ids to chunks (`RECENT_POSTS` at a time), so that retries are looked up there.
    Burst(usize),
    /// The post with this index (modulo those made) is retried with its message id.
    Retry(usize),
    /// Queue `q` fetches at most `limit` messages above its `cursor`-th pending message.
    Deliver { q: u8, limit: u32, cursor: usize },
    /// Queue `q` acknowledges up to its `k`-th pending message (past the end: all).
    Ack { q: u8, k: usize },
    /// The store is closed and opened again.
    Restart,
}

fn queue_ops() -> impl proptest::strategy::Strategy<Value = Vec<QueueOp>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        4 => (1usize..300).prop_map(QueueOp::Post),
        1 => (1usize..2 * RECENT_POSTS).prop_map(QueueOp::Burst),
        2 => any::<usize>().prop_map(QueueOp::Retry),
        3 => (1u8..=2, 1u32..5, 0usize..8)
            .prop_map(|(q, limit, cursor)| QueueOp::Deliver { q, limit, cursor }),
        2 => (1u8..=2, 0usize..6).prop_map(|(q, k)| QueueOp::Ack { q, k }),
        1 => Just(QueueOp::Restart),
    ];
    proptest::collection::vec(op, 1..40)
}

async fn queue_invariants(
    b: &mut impl Backend,
    ops: &[QueueOp],
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prop_assert_eq;
    use std::collections::BTreeMap;

    let s = b.store();
    queue(&*s, 1).await;
    queue(&*s, 2).await;
    group(&*s, 1, 0, 1, &[1, 2]).await;
    // The model: each queue's pending messages by sequence number, and the next number.
    let mut pending: [BTreeMap<u64, Vec<u8>>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut next_seq = [1u64, 1u64];
    let mut posts: Vec<Vec<u8>> = Vec::new();
    let mut acked_up_to = [0u64, 0u64];
    for op in ops {
        let s = b.store();
        match op {
            QueueOp::Post(len) => {
                let n = posts.len() as u32;
                let mut payload = n.to_be_bytes().to_vec();
                payload.resize(*len + 4, 0xAB);
                // The byte limit is exact, whatever came before: one byte less than the
                // fuller queue's pending bytes plus this payload is refused, that much is not.
                let fullest: usize = pending
                    .iter()
                    .map(|p| p.values().map(Vec::len).sum())
                    .max()
                    .unwrap_or(0);
                let limited = |max: usize| PostOp {
                    max_queue_bytes: max as u64,
                    ..post(1, 0, 1, n, &payload)
                };
                let refused = s.post(limited(fullest + payload.len() - 1)).await;
                proptest::prop_assert!(
                    matches!(
                        refused,
                        Err(StoreError::Refused(Refusal::LimitExceeded(
                            Limit::QueueBytes
                        )))
                    ),
                    "a post one byte over the limit: {:?}",
                    refused
                );
                s.post(limited(fullest + payload.len())).await.unwrap();
                for q in 0..2 {
                    pending[q].insert(next_seq[q], payload.clone());
                    next_seq[q] += 1;
                }
                posts.push(payload);
            }
            QueueOp::Burst(k) => {
                for _ in 0..*k {
                    let n = posts.len() as u32;
                    let payload = n.to_be_bytes().to_vec();
                    let fresh = PostOp {
                        fresh_id: true,
                        ..post(1, 0, 1, n, &payload)
                    };
                    let stored = matches!(s.post(fresh).await.unwrap(), Posted::Stored { .. });
                    proptest::prop_assert!(stored, "fresh post {} of a burst", n);
                    for q in 0..2 {
                        pending[q].insert(next_seq[q], payload.clone());
                        next_seq[q] += 1;
                    }
                    posts.push(payload);
                }
            }
            QueueOp::Retry(i) => {
                if !posts.is_empty() {
                    let i = i % posts.len();
                    let again = s.post(post(1, 0, 1, i as u32, &posts[i])).await.unwrap();
                    prop_assert_eq!(again, Posted::Duplicate);
                }
            }
            QueueOp::Deliver { q, limit, cursor } => {
                let idx = usize::from(*q - 1);
                let after = pending[idx]
                    .keys()
                    .nth(cursor.saturating_sub(1))
                    .copied()
                    .filter(|_| *cursor > 0)
                    .unwrap_or(acked_up_to[idx]);
                let got = s
                    .fetch(
                        qid(*q),
                        after,
                        FetchLimit {
                            max_messages: *limit,
                            max_bytes: usize::MAX,
                        },
                    )
                    .await
                    .unwrap();
                let expected: Vec<(u64, Vec<u8>)> = pending[idx]
                    .range(after + 1..)
                    .take(*limit as usize)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                let more = pending[idx].range(after + 1..).count() > expected.len();
                let got_pairs: Vec<(u64, Vec<u8>)> = got
                    .messages
                    .into_iter()
                    .map(|m| (m.seq, m.payload))
                    .collect();
                prop_assert_eq!(got_pairs, expected, "delivery after {}", after);
                prop_assert_eq!(got.more, more);
            }
            QueueOp::Ack { q, k } => {
                let idx = usize::from(*q - 1);
                let up_to = pending[idx]
                    .keys()
                    .nth(*k)
                    .copied()
                    .unwrap_or(next_seq[idx] - 1);
                s.ack(qid(*q), up_to).await.unwrap();
                pending[idx].retain(|seq, _| *seq > up_to);
                acked_up_to[idx] = acked_up_to[idx].max(up_to);
            }
            QueueOp::Restart => b.reopen().await,
        }
        // After every step: each queue holds exactly the model's pending messages, in strictly
        // increasing order: nothing acknowledged reappears, nothing unacknowledged is lost.
        let s = b.store();
        for q in 1..=2u8 {
            let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
            loop {
                let page = s
                    .fetch(
                        qid(q),
                        got.last().map_or(0, |(seq, _)| *seq),
                        FetchLimit {
                            max_messages: 256,
                            max_bytes: usize::MAX,
                        },
                    )
                    .await
                    .unwrap();
                got.extend(page.messages.into_iter().map(|m| (m.seq, m.payload)));
                if !page.more {
                    break;
                }
            }
            let want: Vec<(u64, Vec<u8>)> = pending[usize::from(q - 1)]
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            prop_assert_eq!(got, want, "queue {} after {:?}", q, op);
            let head = s
                .authenticate_queue(qid(q), receive_secret(q))
                .await
                .unwrap();
            prop_assert_eq!(
                head,
                next_seq[usize::from(q - 1)] - 1,
                "head of queue {}",
                q
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Key transparency

async fn akd_storage_passes_akds_own_storage_suite(b: &mut impl Backend) {
    // akd's conformance tests for storage layers (they panic on any deviation).
    akd::storage::tests::run_test_cases_for_storage_impl(AkdStorage::new(b.transparency())).await;
}

/// Looks `name` up through `kt`, verifies akd's proof against the returned root (as a client
/// does, panicking on any failure) and returns the root and the proven value.
async fn verified_lookup(kt: &Transparency, name: &str) -> (SignedRoot, SignedDirectoryEntry) {
    let (root, proof) = kt.lookup(name).await.unwrap();
    let proof = akd::LookupProof::try_from(
        &<akd::proto::specs::types::LookupProof as protobuf::Message>::parse_from_bytes(&proof)
            .unwrap(),
    )
    .unwrap();
    let hash: akd::Digest = root.root_hash.as_slice().try_into().unwrap();
    let verified = akd::verify::lookup_verify::<KtConfig>(
        &root.vrf_public_key,
        hash,
        root.epoch,
        akd::AkdLabel(name.as_bytes().to_vec()),
        proof,
    )
    .unwrap();
    let value = SignedDirectoryEntry::decode(verified.value.0.as_slice()).unwrap();
    (root, value)
}

/// Panics unless `root` carries a valid signature by its server key.
fn verify_root_signature(root: &SignedRoot) {
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&root.server_key.as_slice().try_into().unwrap())
            .unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&root.signature).unwrap();
    key.verify_strict(
        &root_signature_message(root.epoch, &root.root_hash, &root.vrf_public_key),
        &sig,
    )
    .unwrap();
}

/// Panics unless `kt` proves that `epoch` extends `epoch - 1` (both roots signed).
async fn verify_audit_step(kt: &Transparency, epoch: u64) {
    let (start, end, audit) = kt.audit(epoch).await.unwrap();
    assert_eq!((start.epoch, end.epoch), (epoch - 1, epoch));
    verify_root_signature(&start);
    verify_root_signature(&end);
    let single = akd::SingleAppendOnlyProof::try_from(
        &<akd::proto::specs::types::SingleAppendOnlyProof as protobuf::Message>::parse_from_bytes(
            &audit,
        )
        .unwrap(),
    )
    .unwrap();
    akd::auditor::verify_consecutive_append_only::<KtConfig>(
        &single,
        start.root_hash.as_slice().try_into().unwrap(),
        end.root_hash.as_slice().try_into().unwrap(),
        epoch,
    )
    .await
    .unwrap();
}

async fn directory_epochs_publish_prove_and_survive_reopen(b: &mut impl Backend) {
    let kt = Transparency::open(b.transparency(), b.data_dir())
        .await
        .unwrap();
    let genesis = kt.latest_root().await.unwrap();
    assert_eq!(genesis.epoch, 0);
    assert_eq!(
        kt.publish_pending().await.unwrap(),
        None,
        "nothing queued, no epoch"
    );

    let d = b.directory();
    d.register_user(user("alice", 1, 1)).await.unwrap();
    d.register_user(user("bob", 2, 1)).await.unwrap();
    d.register_user(user("bob", 2, 2)).await.unwrap();
    assert_eq!(kt.publish_pending().await.unwrap(), Some(1));
    assert_eq!(
        kt.publish_pending().await.unwrap(),
        None,
        "the queue was emptied"
    );

    let (root, value) = verified_lookup(&kt, "bob").await;
    assert_eq!(root.epoch, 1);
    assert_eq!(
        value.entry,
        vec![2, 2],
        "the highest queued version was published"
    );
    // The root is signed by the server key.
    verify_root_signature(&root);
    // Epoch 1 provably extends epoch 0.
    verify_audit_step(&kt, 1).await;
    assert!(matches!(kt.lookup("carol").await, Err(KtError::NotFound)));

    // Republishing an unchanged value (as after a crash between publication and clearing
    // the queue) makes no epoch and clears the queue.
    let mut same = user("bob", 2, 3);
    same.entry = vec![2, 2];
    d.register_user(same).await.unwrap();
    assert_eq!(kt.publish_pending().await.unwrap(), None);
    assert!(
        b.transparency()
            .pending_entries(10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(kt.latest_root().await.unwrap().epoch, 1);
    drop(kt);

    b.reopen().await;
    let kt = Transparency::open(b.transparency(), b.data_dir())
        .await
        .unwrap();
    let again = kt.latest_root().await.unwrap();
    assert_eq!(again, root, "same epoch, same root, same keys after reopen");
    d_after_reopen_lookup(&kt).await;
}

async fn lookup_answers_are_reused_within_an_epoch_only(b: &mut impl Backend) {
    let kt = Transparency::open(b.transparency(), b.data_dir())
        .await
        .unwrap();
    let d = b.directory();
    d.register_user(user("alice", 1, 1)).await.unwrap();
    assert_eq!(kt.publish_pending().await.unwrap(), Some(1));
    // Asked twice in one epoch: the same answer, and it verifies.
    let first = kt.lookup("alice").await.unwrap();
    assert_eq!(kt.lookup("alice").await.unwrap(), first);
    assert_eq!(verified_lookup(&kt, "alice").await.1.entry, vec![1, 1]);
    assert!(matches!(kt.lookup("carol").await, Err(KtError::NotFound)));
    assert!(matches!(kt.lookup("carol").await, Err(KtError::NotFound)));

    // A new epoch: neither the old value nor the old absence is served again.
    d.register_user(user("alice", 1, 2)).await.unwrap();
    d.register_user(user("carol", 3, 1)).await.unwrap();
    assert_eq!(kt.publish_pending().await.unwrap(), Some(2));
    let (root, alice) = verified_lookup(&kt, "alice").await;
    assert_eq!((root.epoch, alice.entry), (2, vec![1, 2]));
    let (root, carol) = verified_lookup(&kt, "carol").await;
    assert_eq!((root.epoch, carol.entry), (2, vec![3, 1]));
}

async fn d_after_reopen_lookup(kt: &Transparency) {
    let (root, _) = kt.lookup("alice").await.unwrap();
    assert_eq!(root.epoch, 1);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: one key directory across nodes

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_nodes_share_one_key_directory_and_publish_consistent_epochs() {
    let Some(pg) = Postgres::new("postgres_nodes_share_one_key_directory").await else {
        return;
    };
    // Two nodes open their directories at once on a fresh database: one creates it, both
    // sign with the same key from the database, and neither writes key files.
    let (dir_1, dir_2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (kt_1, kt_2) = tokio::join!(
        Transparency::open(pg.store.clone(), dir_1.path()),
        Transparency::open(pg.other_node.clone(), dir_2.path()),
    );
    let (kt_1, kt_2) = (Arc::new(kt_1.unwrap()), Arc::new(kt_2.unwrap()));
    assert_eq!(kt_1.server_key(), kt_2.server_key(), "one signing key");
    assert_eq!(kt_1.latest_root().await.unwrap().epoch, 0, "one epoch 0");
    for dir in [&dir_1, &dir_2] {
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no key file on a node"
        );
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let interval = std::time::Duration::from_secs(3600);
    let publishers = [
        tokio::spawn(Arc::clone(&kt_1).run_publisher(interval, stopped.clone())),
        tokio::spawn(Arc::clone(&kt_2).run_publisher(interval, stopped)),
    ];

    // Registered as `RegisterUser` does on node 1 (store, then wait for the epoch); node 2,
    // which cached nothing, proves it at once.
    pg.store.register_user(user("alice", 1, 1)).await.unwrap();
    kt_1.publish_soon().await.unwrap();
    let (root, value) = verified_lookup(&kt_2, "alice").await;
    assert_eq!(value.entry, vec![1, 1]);
    assert_eq!(root.epoch, 1);
    assert_eq!(root.server_key, kt_1.server_key().to_vec());

    // Registrations on both nodes at once: each answers only once published; every one is
    // proven by both nodes; the epochs form one history.
    let mut registrations = tokio::task::JoinSet::new();
    for i in 0..12u8 {
        let (store, kt): (Arc<PgStore>, _) = if i % 2 == 0 {
            (pg.store.clone(), Arc::clone(&kt_1))
        } else {
            (pg.other_node.clone(), Arc::clone(&kt_2))
        };
        registrations.spawn(async move {
            store
                .register_user(user(&format!("user{i}"), 10 + i, 1))
                .await
                .unwrap();
            kt.publish_soon().await.unwrap();
        });
    }
    while let Some(done) = registrations.join_next().await {
        done.unwrap();
    }
    for i in 0..12u8 {
        let name = format!("user{i}");
        let (root_1, value_1) = verified_lookup(&kt_1, &name).await;
        let (root_2, value_2) = verified_lookup(&kt_2, &name).await;
        assert_eq!(value_1.entry, vec![10 + i, 1], "{name} via node 1");
        assert_eq!(value_2.entry, vec![10 + i, 1], "{name} via node 2");
        assert_eq!(root_1, root_2, "both nodes prove from the same epoch");
    }
    let latest = kt_1.latest_root().await.unwrap();
    assert_eq!(latest, kt_2.latest_root().await.unwrap());
    assert!(
        (2..=13).contains(&latest.epoch),
        "12 registrations in 1 to 12 epochs after epoch 1, got {}",
        latest.epoch
    );
    assert!(pg.store.pending_entries(100).await.unwrap().is_empty());
    // Node 2 answered alice's lookup at epoch 1; once node 1 publishes her new value, node 2
    // proves the new one (no node serves an answer from an older epoch).
    pg.store.register_user(user("alice", 1, 2)).await.unwrap();
    kt_1.publish_soon().await.unwrap();
    let (root, value) = verified_lookup(&kt_2, "alice").await;
    assert_eq!(value.entry, vec![1, 2]);
    let latest = kt_1.latest_root().await.unwrap();
    assert_eq!(root, latest);
    // The whole history audits, whichever node is asked.
    for epoch in 1..=latest.epoch {
        let kt = if epoch % 2 == 0 { &kt_1 } else { &kt_2 };
        verify_audit_step(kt, epoch).await;
    }

    stop.send(true).unwrap();
    for p in publishers {
        p.await.unwrap();
    }
    pg.store.close().await.unwrap();
    pg.other_node.close().await.unwrap();
}
