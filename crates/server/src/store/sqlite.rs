//! The SQLite backend of [`Store`] and [`DirectoryStore`]: one file `blindpost.sqlite3` in WAL
//! mode with `synchronous=FULL` (or `NORMAL` when configured for `durability = "process"`),
//! versioned migrations at open, and group commit.
//! Not for: validation of client input or wire types (the service's job).
//!
//! **Group commit.** Every write goes through one writer thread that owns the write connection.
//! It takes every operation waiting in its channel (up to [`MAX_BATCH_OPS`]), runs them in ONE
//! transaction, each inside its own `SAVEPOINT` so a refused operation is rolled back without
//! undoing the others (an ack, one writing statement, needs none: SQLite undoes a failed
//! statement by itself; nor does a post, which makes every check before its first write),
//! commits once (one fsync for the batch), and only then answers each caller. If the
//! transaction fails, every operation of the batch fails: nothing is ever acknowledged before
//! its commit is durable.
//!
//! **Reads** (fetch, status, lookup, health) go through a small pool of read-only connections
//! on blocking threads; WAL lets them run beside the writer and see only committed data.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use blindpost_wire::limits::MAX_GROUP_ROUTES;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    AkdNodeRow, AkdValueRow, Appended, ClaimedKeyPackage, CommitOp, Committed, DirectoryStore,
    EpochLock, EpochRoot, Expired, Expiry, FetchLimit, Fetched, GroupRow, KeyPackageCount,
    NewGroup, NewQueue, PendingEntry, PostOp, Posted, PublishOp, RESEND_CHUNKS, RouteGrant,
    SHARE_FROM_BYTES, Store, StoreError, StoreFuture, StoreResult, StoredKeys, StoredMessage,
    TransparencyStore, UserRecord, offset_modulus, offsets, pending_bytes, recent_posts,
};
use crate::config::Durability;
use crate::error::{ConflictKind, Credential, Entity, Limit, Refusal};
use crate::types::{BoxId, Day, GroupId, MessageId, QueueId, SecretHash};

/// The database file's name inside the data directory.
pub const DATABASE_FILE: &str = "blindpost.sqlite3";

/// Most operations one group-commit transaction carries.
pub const MAX_BATCH_OPS: usize = 512;
/// Operations that may wait for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 1024;
/// WAL pages (4 KiB each) after which the writer checkpoints itself (see `open_with`).
const WAL_BACKSTOP_PAGES: i64 = 16_000;
/// Read connections kept open and used at once.
const READ_CONNECTIONS: usize = 4;

/// The backend's source of "today". Tests pass a settable clock; the server passes
/// [`crate::types::today`].
pub type Clock = Arc<dyn Fn() -> Day + Send + Sync>;

/// A message row's payload length, whichever way it is held (`m` is the row). A macro so
/// the statements using it stay `&'static str` (no formatting on the hot path).
macro_rules! body_len {
    () => {
        "CASE WHEN m.shared IS NULL THEN length(m.payload) \
         ELSE (SELECT length(data) FROM payloads WHERE id = m.shared) END"
    };
}

/// Versioned schema migrations; `PRAGMA user_version` records how many ran. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema. No owner, no address, no time finer than a day.
    "CREATE TABLE queues (
        id BLOB PRIMARY KEY NOT NULL,
        receive_secret_hash BLOB NOT NULL,
        send_token_hash BLOB NOT NULL,
        next_seq INTEGER NOT NULL,
        created_day INTEGER NOT NULL,
        last_used_day INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        queue_id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        day INTEGER NOT NULL,
        PRIMARY KEY (queue_id, seq)
    );
    CREATE INDEX messages_by_day ON messages (day);
    CREATE TABLE groups (
        id BLOB PRIMARY KEY NOT NULL,
        epoch INTEGER NOT NULL,
        posting_token_hash BLOB NOT NULL,
        created_day INTEGER NOT NULL,
        last_used_day INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE routes (
        group_id BLOB NOT NULL,
        queue_id BLOB NOT NULL,
        PRIMARY KEY (group_id, queue_id)
    ) WITHOUT ROWID;
    CREATE INDEX routes_by_queue ON routes (queue_id);
    CREATE TABLE posted_ids (
        group_id BLOB NOT NULL,
        message_id BLOB NOT NULL,
        day INTEGER NOT NULL,
        PRIMARY KEY (group_id, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX posted_ids_by_day ON posted_ids (day);
    CREATE TABLE key_package_boxes (
        id BLOB PRIMARY KEY NOT NULL,
        secret_hash BLOB NOT NULL,
        last_resort BLOB,
        created_day INTEGER NOT NULL,
        last_used_day INTEGER NOT NULL
    );
    CREATE TABLE key_packages (
        box_id BLOB NOT NULL,
        n INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (box_id, n)
    );
    CREATE TABLE users (
        username TEXT PRIMARY KEY NOT NULL,
        identity_key BLOB NOT NULL,
        version INTEGER NOT NULL,
        entry BLOB NOT NULL,
        signature BLOB NOT NULL
    );",
    // 2: the key-transparency directory (akd). Tree nodes and the aZKS head by akd's binary
    // id; value states by (label, epoch); the server-signed root of every epoch; and
    // registrations accepted but not yet published in an epoch.
    "CREATE TABLE akd_nodes (
        key BLOB PRIMARY KEY NOT NULL,
        data BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE akd_values (
        label BLOB NOT NULL,
        epoch INTEGER NOT NULL,
        version INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (label, epoch)
    ) WITHOUT ROWID;
    CREATE TABLE kt_roots (
        epoch INTEGER PRIMARY KEY NOT NULL,
        root_hash BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    CREATE TABLE kt_pending (
        username TEXT NOT NULL,
        version INTEGER NOT NULL,
        entry BLOB NOT NULL,
        signature BLOB NOT NULL,
        PRIMARY KEY (username, version)
    );",
    // 3: no index on messages.day. Every append and every ack paid for it (~20 % of relay
    // throughput in an A/B run, BENCHMARKS.md); expiry finds old messages as the prefix of
    // the table in rowid (insertion) order instead.
    "DROP INDEX messages_by_day;",
    // 4: no index on posted_ids.day either. Message ids are random, so every post wrote a leaf
    // page of the index as well as of the table (the index is as large as the table); retention
    // sweeps the table in key order instead, in slices (now `expire_posted_chunks`).
    "DROP INDEX posted_ids_by_day;",
    // 5: a payload of at least `SHARE_FROM_BYTES` appended to several queues (a group's
    // commit, Welcome or large post) is stored once, in `payloads`; each of its message rows
    // names it in `shared` and holds an empty `payload`. The trigger releases it with its last
    // message, however that message goes (acknowledgement, retention, queue deletion).
    "CREATE TABLE payloads (
        id INTEGER PRIMARY KEY,
        data BLOB NOT NULL,
        refs INTEGER NOT NULL
    );
    ALTER TABLE messages ADD COLUMN shared INTEGER;
    CREATE TRIGGER messages_release AFTER DELETE ON messages WHEN old.shared IS NOT NULL
    BEGIN
        UPDATE payloads SET refs = refs - 1 WHERE id = old.shared;
        DELETE FROM payloads WHERE id = old.shared AND refs <= 0;
    END;",
    // 6: a group's latest message ids are kept in its row (`store::recent_posts`) and moved
    // to `posted_ids` 32 at a time: ids are random, so writing each to `posted_ids` as it
    // came wrote a B-tree page per post, the largest cost of a post; a group's 32 ids land
    // in its own key range, on a few pages.
    "ALTER TABLE groups ADD COLUMN recent_posts BLOB NOT NULL DEFAULT x'';",
    // 7: a queue's pending bytes are `appended_bytes` less the oldest pending message's
    // `start_offset` (`store::offsets`): summing the queue's messages cost every post to it
    // O(its backlog) in the one writer thread. Existing queues get a random base and their
    // messages the running total before each, in sequence order.
    concat!(
        "ALTER TABLE queues ADD COLUMN appended_bytes INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN start_offset INTEGER NOT NULL DEFAULT 0;
        UPDATE queues SET appended_bytes = abs(random() % ",
        offset_modulus!(),
        ");
        CREATE TEMP TABLE before_each (r INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
        INSERT INTO before_each
            SELECT r, SUM(len) OVER (PARTITION BY queue_id ORDER BY seq) - len FROM (
                SELECT m.rowid AS r, m.queue_id, m.seq, ",
        body_len!(),
        " AS len FROM messages m
            );
        UPDATE messages SET start_offset = (
            (SELECT appended_bytes FROM queues WHERE id = messages.queue_id)
            + (SELECT bytes FROM before_each WHERE r = messages.rowid)
        ) % ",
        offset_modulus!(),
        ";
        UPDATE queues SET appended_bytes = (appended_bytes + (
            SELECT COALESCE(SUM(",
        body_len!(),
        "), 0) FROM messages m WHERE m.queue_id = queues.id
        )) % ",
        offset_modulus!(),
        ";
        DROP TABLE before_each;"
    ),
    // 8: idempotency keys leave a group's row as one chunk (`posted_chunks`: the group's 32
    // ids in one row, keyed by the group and a counter), not as 32 rows keyed by each random
    // id: those landed on random leaf pages of a table holding days of traffic, a random page
    // read and write per post once it outgrew the cache. The counter (`groups.posted_n`, the
    // group's latest chunk) starts at a random base, so it does not tell how many posts a
    // group ever made. Existing keys become chunks of one id each.
    concat!(
        "ALTER TABLE groups ADD COLUMN posted_n INTEGER NOT NULL DEFAULT 0;
        UPDATE groups SET posted_n = abs(random() % ",
        offset_modulus!(),
        ");
        CREATE TABLE posted_chunks (
            group_id BLOB NOT NULL,
            n INTEGER NOT NULL,
            ids BLOB NOT NULL,
            day INTEGER NOT NULL,
            PRIMARY KEY (group_id, n)
        ) WITHOUT ROWID;
        INSERT INTO posted_chunks (group_id, n, ids, day)
            SELECT p.group_id,
                   g.posted_n + row_number() OVER (PARTITION BY p.group_id ORDER BY p.day),
                   p.message_id, p.day
            FROM posted_ids p JOIN groups g ON g.id = p.group_id;
        UPDATE groups SET posted_n = posted_n
            + (SELECT COUNT(*) FROM posted_ids p WHERE p.group_id = groups.id);
        DROP TABLE posted_ids;"
    ),
];

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: RwLock<Option<mpsc::Sender<Box<dyn WriteJob>>>>,
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    readers: Arc<ReadPool>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir`, runs pending migrations and
    /// starts the writer thread. Blocking: call it from a blocking context at start-up.
    pub fn open(data_dir: &Path, clock: Clock) -> StoreResult<Self> {
        Self::open_with(data_dir, clock, Durability::Machine)
    }

    /// [`SqliteStore::open`] with a chosen durability: `Machine` flushes every commit
    /// (`synchronous=FULL`), `Process` leaves flushing to checkpoints (`synchronous=NORMAL`;
    /// in WAL mode a commit is still written to the OS before it is acknowledged).
    pub fn open_with(data_dir: &Path, clock: Clock, durability: Durability) -> StoreResult<Self> {
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = Connection::open(&path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "could not enable WAL (got {mode})"
            )));
        }
        let sync = match durability {
            Durability::Machine => "FULL",
            Durability::Process => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        // Deleted rows (acknowledged messages, claimed key packages) are overwritten, not left
        // readable in free pages of the file.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Each operation of a group commit runs in its own savepoint, whose sub-journal (a copy
        // of every page the operation touches first) went to a temporary file: pwrite calls
        // were 17 % of the writer thread under load (perf). In memory it is a copy.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // The checkpointer thread copies the WAL into the database; the writer's own
        // checkpoint is only the backstop for when it falls behind. At SQLite's default (1000
        // pages) the writer checkpointed itself, ~9 % of its time under load (perf).
        conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
        migrate(&mut conn)?;

        // Held by whoever checkpoints: SQLite answers "busy" at once (it does not wait) to a
        // checkpoint that starts while another runs, and a key-package claim's scrub must not
        // be skipped because the background checkpointer happened to be running.
        let checkpoint_lock = Arc::new(Mutex::new(()));
        let checkpointer = Checkpointer::start(&path, Arc::clone(&checkpoint_lock), durability)?;
        let (jobs, receiver) = mpsc::channel(WRITE_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                writer_loop(&conn, receiver, &clock, &checkpoint_lock);
                drop(conn);
                let _ = done_tx.send(());
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;

        Ok(Self {
            writer: RwLock::new(Some(jobs)),
            writer_done: Mutex::new(Some(done_rx)),
            checkpointer: Mutex::new(Some(checkpointer)),
            readers: Arc::new(ReadPool {
                path,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(READ_CONNECTIONS),
            }),
        })
    }

    /// Runs `work` on the writer thread inside the next group-commit transaction and returns
    /// its result once that transaction has committed.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Day) -> StoreResult<T> + Send + 'static,
    {
        self.write_op(work, Wrap::Savepoint).await
    }

    /// Like [`Self::write`], for an operation that deletes something linkable (a claimed key
    /// package names its owner and a queue): after its batch commits, the WAL is checkpointed
    /// and truncated, so the deleted row's old page is left in neither file.
    async fn write_then_scrub<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Day) -> StoreResult<T> + Send + 'static,
    {
        self.write_op(work, Wrap::SavepointThenScrub).await
    }

    async fn write_op<T, F>(&self, work: F, wrap: Wrap) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Day) -> StoreResult<T> + Send + 'static,
    {
        let sender = {
            let guard = self.writer.read().map_err(|_| StoreError::Closed)?;
            guard.clone().ok_or(StoreError::Closed)?
        };
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(Op {
            work: Some(work),
            result: None,
            reply,
            wrap,
        });
        sender.send(job).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        self.readers.run(work).await
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len();
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > known {
        return Err(StoreError::Backend(format!(
            "database schema version {current} is newer than this server knows ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Group commit

/// What the writer does around one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrap {
    /// Runs inside its own savepoint, so a refused operation is rolled back alone.
    Savepoint,
    /// Runs one writing statement, which SQLite rolls back alone if it fails: no savepoint
    /// (acks, two of every three write operations under load).
    OneStatement,
    /// Makes every check (and so every refusal) before its first write: no savepoint. Any
    /// other failure fails the whole batch, since it may have written part of the operation
    /// (posts: a savepoint copies every page the post touches first, and a random idempotency
    /// key touches a page of its own; +4 % relay throughput, BENCHMARKS.md).
    ChecksFirst,
    /// A savepoint, and once the batch commits the WAL is checkpointed and truncated.
    SavepointThenScrub,
}

/// One operation waiting for the writer.
trait WriteJob: Send {
    /// Runs the operation (inside its savepoint, if it has one); `true` if it succeeded.
    fn run(&mut self, conn: &Connection, day: Day) -> bool;
    /// The error the operation failed with, if it ran and failed.
    fn error(&self) -> Option<StoreError>;
    /// Whether the WAL must be scrubbed (checkpointed and truncated) once this commits.
    fn scrubs(&self) -> bool;
    /// Whether the operation runs inside a savepoint of its own.
    fn needs_savepoint(&self) -> bool;
    /// Whether the operation failed in a way that may have left part of it written, so the
    /// whole batch must be rolled back (only for operations without a savepoint).
    fn failed_part_way(&self) -> bool;
    /// Answers the caller once the batch's fate (`outcome`) is known.
    fn finish(self: Box<Self>, outcome: StoreResult<()>);
}

struct Op<T, F> {
    work: Option<F>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
    wrap: Wrap,
}

impl<T, F> WriteJob for Op<T, F>
where
    T: Send,
    F: FnOnce(&Connection, Day) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection, day: Day) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = work(conn, day);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn error(&self) -> Option<StoreError> {
        self.result.as_ref().and_then(|r| r.as_ref().err().cloned())
    }

    fn scrubs(&self) -> bool {
        self.wrap == Wrap::SavepointThenScrub && matches!(self.result, Some(Ok(_)))
    }

    fn needs_savepoint(&self) -> bool {
        matches!(self.wrap, Wrap::Savepoint | Wrap::SavepointThenScrub)
    }

    fn failed_part_way(&self) -> bool {
        self.wrap == Wrap::ChecksFirst
            && matches!(
                self.result,
                Some(Err(StoreError::Backend(_) | StoreError::Full(_)))
            )
    }

    fn finish(self: Box<Self>, outcome: StoreResult<()>) {
        let answer = match (outcome, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Backend("operation did not run".into())),
        };
        // The caller may have gone away; its operation is committed (or not) all the same.
        let _ = self.reply.send(answer);
    }
}

fn writer_loop(
    conn: &Connection,
    mut jobs: mpsc::Receiver<Box<dyn WriteJob>>,
    clock: &Clock,
    checkpoint_lock: &Mutex<()>,
) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH_OPS {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = run_batch(conn, &mut batch, clock());
        if outcome.is_ok() && batch.iter().any(|job| job.scrubs()) {
            // Before answering: once a claim is acknowledged, its package is in no file.
            // Readers hold snapshots for milliseconds; the busy timeout waits them out.
            let _checkpointing = checkpoint_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let scrubbed = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
            if !matches!(scrubbed, Ok(0)) {
                tracing::warn!("WAL checkpoint after a key-package claim did not complete");
            }
        }
        if let Err(e) = &outcome {
            tracing::error!(error = %e, ops = batch.len(), "group commit failed; nothing of it acknowledged");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        for job in batch {
            job.finish(outcome.clone());
        }
    }
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn WriteJob>], day: Day) -> StoreResult<()> {
    // Cached statements: they run for every operation of every batch, so they are parsed once.
    let run = |sql: &str| -> StoreResult<()> {
        conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    };
    run("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        let savepoint = job.needs_savepoint();
        if savepoint {
            run("SAVEPOINT op")?;
        }
        let ok = job.run(conn, day);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O error, …): nothing of
            // the batch is stored, and every operation in it fails with the cause.
            return Err(job.error().unwrap_or_else(|| {
                StoreError::Backend("the database aborted the transaction".into())
            }));
        }
        if !savepoint {
            if job.failed_part_way() {
                return Err(job.error().unwrap_or_else(|| {
                    StoreError::Backend("an operation failed part-way".into())
                }));
            }
            continue;
        }
        if ok {
            run("RELEASE op")?;
        } else {
            run("ROLLBACK TO op")?;
            run("RELEASE op")?;
        }
    }
    run("COMMIT")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// With `durability = "process"`: how often the checkpointer flushes the WAL and the database
/// file to the disk, and then checkpoints (see [`Checkpointer`]).
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)` every
/// [`CHECKPOINT_EVERY`]: copying WAL frames into the database file then happens beside the
/// writer instead of inside its commits, where perf showed it taking ~13 % of the writer
/// thread under load. A passive checkpoint never blocks the writer. Under steady load it also
/// never completes (the writer appends while it copies), and only a complete checkpoint flushes
/// the database file and lets the WAL restart from its beginning; so SQLite's automatic
/// checkpoint stays on in the writer as the backstop ([`WAL_BACKSTOP_PAGES`]), and finds the
/// frames already copied.
///
/// That backstop flushes the WAL and the database file inside a commit. With
/// `synchronous=FULL` the WAL is flushed by every commit anyway; with `NORMAL` (`process`) it
/// held everything written since the last flush, and the backstop stalled the writer for
/// 5–15 ms every ~0.4 s at half the maximum rate (`perf trace`), which made `process`'s p99
/// twice `machine`'s. So with `process` this thread flushes both files every [`FLUSH_EVERY`]
/// and checkpoints right after, leaving the backstop little to flush or copy (p99 at 11,500
/// posts/s 7.5–9.4 ms → 3.3–4.2 ms with the flush alone; at 14,244/s 4.4–6.8 → 3.7–4.6 ms
/// with the checkpoint at the same pace; BENCHMARKS.md). The flush takes no lock: it only
/// writes out what the OS already holds. With `machine` every commit flushes the WAL, and a
/// checkpoint's own flush of it would only compete with the writer's, so it stays at
/// [`CHECKPOINT_EVERY`].
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, lock: Arc<Mutex<()>>, durability: Durability) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_millis(100))?;
        let (tick, files) = match durability {
            Durability::Machine => (CHECKPOINT_EVERY, None),
            Durability::Process => (FLUSH_EVERY, Some(Flusher::new(path))),
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut files = files;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(tick)
                {
                    if let Some(files) = &mut files {
                        files.flush();
                    }
                    let _checkpointing = lock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let done = conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "background checkpoint did not run");
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and closes its connection (before the writer's, so the writer's close
    /// is the last and removes the WAL).
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// The database file and its WAL, opened to flush them ([`FLUSH_EVERY`]).
struct Flusher {
    database: PathBuf,
    wal: PathBuf,
    open: Option<(std::fs::File, std::fs::File)>,
    /// Whether the last flush failed (a failure is logged as a warning once, not every tick).
    failing: bool,
}

impl Flusher {
    fn new(database: &Path) -> Self {
        let mut wal = database.as_os_str().to_owned();
        wal.push("-wal");
        Self {
            database: database.to_owned(),
            wal: PathBuf::from(wal),
            open: None,
            failing: false,
        }
    }

    /// Flushes both files; opens them first if they are not yet. A failure is logged and
    /// retried at the next tick: commits do not depend on it.
    fn flush(&mut self) {
        if self.open.is_none() {
            match (
                std::fs::File::open(&self.database),
                std::fs::File::open(&self.wal),
            ) {
                (Ok(db), Ok(wal)) => self.open = Some((db, wal)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(error = %e, "cannot open the database files to flush them");
                    return;
                }
            }
        }
        if let Some((db, wal)) = &self.open {
            let flushed = wal.sync_data().and_then(|()| db.sync_data());
            match (flushed, self.failing) {
                (Ok(()), _) => self.failing = false,
                (Err(e), false) => {
                    tracing::warn!(error = %e, "flushing the database files failed");
                    self.failing = true;
                }
                (Err(e), true) => tracing::debug!(error = %e, "flushing still fails"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl ReadPool {
    async fn run<T, F>(self: &Arc<Self>, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let taken = pool.idle.lock().ok().and_then(|mut idle| idle.pop());
            let mut conn = match taken {
                Some(conn) => conn,
                None => pool.open()?,
            };
            let result = work(&mut conn);
            if let Ok(mut idle) = pool.idle.lock() {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    fn open(&self) -> StoreResult<Connection> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "query_only", "ON")?;
        Ok(conn)
    }
}

// ---------------------------------------------------------------------------------------------
// Operations. Each runs inside a savepoint (writes) or a read transaction (reads).

fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

fn hash_from_sql(bytes: Vec<u8>) -> StoreResult<SecretHash> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(SecretHash::from_bytes)
        .map_err(|_| StoreError::Backend("stored hash has the wrong length".into()))
}

/// What a message row holds: the payload itself, or the id of the `payloads` row that holds
/// it for several queues.
#[derive(Clone, Copy)]
enum Body<'a> {
    Inline(&'a [u8]),
    Shared(i64),
}

/// Appends one message to a queue, adding `len` (the payload's length, however it is held) to
/// the queue's running total ([`offsets`]); returns its sequence number, or `None` if the
/// queue is gone. Checks no byte limit: callers do first ([`check_room`]).
fn append(
    conn: &Connection,
    day: Day,
    queue: &QueueId,
    body: Body<'_>,
    len: usize,
) -> StoreResult<Option<u64>> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached(concat!(
            "UPDATE queues SET next_seq = next_seq + 1, last_used_day = ?2,
                    appended_bytes = (appended_bytes + ?3) % ",
            offset_modulus!(),
            "
             WHERE id = ?1
             RETURNING next_seq - 1, (appended_bytes - ?3 + ",
            offset_modulus!(),
            ") % ",
            offset_modulus!()
        ))?
        .query_row(params![queue.as_bytes(), day, len as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((seq, start)) = row else {
        return Ok(None);
    };
    match body {
        Body::Inline(payload) => conn
            .prepare_cached(
                "INSERT INTO messages (queue_id, seq, payload, day, start_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![queue.as_bytes(), seq, payload, day, start])?,
        Body::Shared(id) => conn
            .prepare_cached(
                "INSERT INTO messages (queue_id, seq, payload, day, shared, start_offset)
                 VALUES (?1, ?2, X'', ?3, ?4, ?5)",
            )?
            .execute(params![queue.as_bytes(), seq, day, id, start])?,
    };
    Ok(Some(seq_from_sql(seq)))
}

/// Refuses (`LimitExceeded`) if `len` more bytes would take any of `queues` past its byte
/// limit, if it has one. Reads the queue row and its oldest pending message ([`offsets`]).
fn check_room(conn: &Connection, queues: &[(QueueId, Option<u64>)], len: usize) -> StoreResult<()> {
    for (queue, max) in queues {
        let Some(max) = max else { continue };
        // A queue that is gone has no row and no room to check: the append passes it over.
        let pending: Option<i64> = conn
            .prepare_cached(concat!(
                "SELECT ",
                pending_bytes!(),
                " FROM queues q WHERE q.id = ?1"
            ))?
            .query_row([queue.as_bytes()], |r| r.get(0))
            .optional()?;
        let after = u64::try_from(pending.unwrap_or(0))
            .unwrap_or(0)
            .saturating_add(len as u64);
        if after > *max {
            return Err(Refusal::LimitExceeded(Limit::QueueBytes).into());
        }
    }
    Ok(())
}

/// Appends `payload` to each of `queues`, in order, storing it once when more than one queue
/// is to get it and it is at least [`SHARE_FROM_BYTES`]. A queue that no longer exists is
/// passed over. Refuses (before writing anything) if it would take a queue past its byte
/// limit. Returns where it went.
fn append_to(
    conn: &Connection,
    day: Day,
    queues: &[(QueueId, Option<u64>)],
    payload: &[u8],
) -> StoreResult<Vec<Appended>> {
    check_room(conn, queues, payload.len())?;
    append_unchecked(conn, day, queues.iter().map(|(q, _)| q), payload)
}

/// [`append_to`] without the byte limits: the caller checked them ([`check_room`]).
fn append_unchecked<'q>(
    conn: &Connection,
    day: Day,
    queues: impl ExactSizeIterator<Item = &'q QueueId>,
    payload: &[u8],
) -> StoreResult<Vec<Appended>> {
    let mut appended = Vec::with_capacity(queues.len());
    let body = if queues.len() < 2 || payload.len() < SHARE_FROM_BYTES {
        Body::Inline(payload)
    } else {
        conn.prepare_cached("INSERT INTO payloads (data, refs) VALUES (?1, 0)")?
            .execute([payload])?;
        Body::Shared(conn.last_insert_rowid())
    };
    for queue in queues {
        if let Some(seq) = append(conn, day, queue, body, payload.len())? {
            appended.push(Appended { queue: *queue, seq });
        }
    }
    if let Body::Shared(id) = body {
        conn.prepare_cached("UPDATE payloads SET refs = ?2 WHERE id = ?1")?
            .execute(params![id, appended.len() as i64])?;
        if appended.is_empty() {
            conn.prepare_cached("DELETE FROM payloads WHERE id = ?1")?
                .execute([id])?;
        }
    }
    Ok(appended)
}

fn queue_hashes(
    conn: &Connection,
    queue: &QueueId,
) -> StoreResult<Option<(SecretHash, SecretHash, i64)>> {
    let row: Option<(Vec<u8>, Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT receive_secret_hash, send_token_hash, next_seq FROM queues WHERE id = ?1",
        )?
        .query_row([queue.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    row.map(|(r, s, n)| Ok((hash_from_sql(r)?, hash_from_sql(s)?, n)))
        .transpose()
}

/// Checks that a route's queue exists and its send token matches.
fn check_route(conn: &Connection, grant: &RouteGrant) -> StoreResult<()> {
    match queue_hashes(conn, &grant.queue_id)? {
        None => Err(Refusal::NotFound(Entity::Queue).into()),
        Some((_, send, _)) if send.matches(&grant.send_token_hash) => Ok(()),
        Some(_) => Err(Refusal::Forbidden(Credential::SendToken).into()),
    }
}

fn routes_of(conn: &Connection, group: &GroupId) -> StoreResult<Vec<QueueId>> {
    let mut stmt = conn.prepare_cached("SELECT queue_id FROM routes WHERE group_id = ?1")?;
    let rows = stmt.query_map([group.as_bytes()], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for row in rows {
        let id = QueueId::parse(&row?).map_err(|e| StoreError::Backend(e.to_string()))?;
        out.push(id);
    }
    Ok(out)
}

/// Loads a group and checks epoch (first) and posting token (second), as the wire specifies.
fn check_group(
    conn: &Connection,
    group: &GroupId,
    epoch: u64,
    token: &SecretHash,
) -> StoreResult<GroupRow> {
    let row: Option<(i64, Vec<u8>, Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT epoch, posting_token_hash, recent_posts, posted_n FROM groups WHERE id = ?1",
        )?
        .query_row([group.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((current, hash, recent, posted_n)) = row else {
        return Err(Refusal::NotFound(Entity::Group).into());
    };
    let current = seq_from_sql(current);
    if current != epoch {
        return Err(Refusal::StaleEpoch {
            current_epoch: current,
        }
        .into());
    }
    if !hash_from_sql(hash)?.matches(token) {
        return Err(Refusal::Forbidden(Credential::PostingToken).into());
    }
    Ok(GroupRow {
        epoch: current,
        recent,
        posted_n,
    })
}

/// Whether `id` is in one of the group's chunks of moved ids (`posted_chunks`) with a counter
/// above `after`. Compared here, whole ids only ([`recent_posts::contains`]), on the rows as
/// SQLite holds them: SQL's `instr` tries every byte offset, and over [`RESEND_CHUNKS`]
/// chunks that made a resend's lookup cost 1 ms instead of 0.12 ms (BENCHMARKS.md).
fn chunk_holds(
    conn: &Connection,
    group: &GroupId,
    id: &MessageId,
    after: i64,
) -> StoreResult<bool> {
    let mut stmt =
        conn.prepare_cached("SELECT ids FROM posted_chunks WHERE group_id = ?1 AND n > ?2")?;
    let mut rows = stmt.query(params![group.as_bytes(), after])?;
    while let Some(row) = rows.next()? {
        if let rusqlite::types::ValueRef::Blob(ids) = row.get_ref(0)?
            && recent_posts::contains(ids, id)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How far a post's id was looked up among its group's moved ids before the write.
#[derive(Debug, Clone, Copy)]
enum Lookup {
    /// The id is fresh ([`PostOp::fresh_id`]): compared with the group's row only.
    Fresh,
    /// [`read_lookup`] found it in none of the group's chunks with a counter up to this one;
    /// the writer looks in the chunks moved since.
    Before(i64),
}

/// A resend's lookup, on a read connection: scanning a busy group's chunks (up to
/// [`RESEND_CHUNKS`]) must not hold up the one writer, or any member could stall every post
/// with resends. The group's checks come first, so only a member learns an id is known. `None`
/// if the id was posted (a duplicate); otherwise the counter of the group's latest chunk seen,
/// in the same snapshot.
fn read_lookup(
    conn: &mut Connection,
    group: &GroupId,
    epoch: u64,
    token: &SecretHash,
    id: &MessageId,
) -> StoreResult<Option<i64>> {
    let tx = conn.transaction()?;
    let row = check_group(&tx, group, epoch, token)?;
    let oldest = row.posted_n.saturating_sub(RESEND_CHUNKS);
    if recent_posts::contains(&row.recent, id) || chunk_holds(&tx, group, id, oldest)? {
        return Ok(None);
    }
    Ok(Some(row.posted_n))
}

fn op_create_queue(conn: &Connection, day: Day, q: &NewQueue) -> StoreResult<()> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO queues (id, receive_secret_hash, send_token_hash, next_seq, created_day, last_used_day, appended_bytes)
             VALUES (?1, ?2, ?3, 1, ?4, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![q.id.as_bytes(), q.receive_secret_hash.as_bytes(), q.send_token_hash.as_bytes(), day, offsets::random_base()?])?;
    if inserted == 0 {
        return Err(Refusal::Conflict(ConflictKind::QueueExists).into());
    }
    Ok(())
}

fn op_authenticate_queue(
    conn: &Connection,
    day: Day,
    queue: &QueueId,
    secret: &SecretHash,
) -> StoreResult<u64> {
    let Some((receive, _, next_seq)) = queue_hashes(conn, queue)? else {
        return Err(Refusal::NotFound(Entity::Queue).into());
    };
    if !receive.matches(secret) {
        return Err(Refusal::Forbidden(Credential::ReceiveSecret).into());
    }
    conn.prepare_cached(
        "UPDATE queues SET last_used_day = ?2 WHERE id = ?1 AND last_used_day < ?2",
    )?
    .execute(params![queue.as_bytes(), day])?;
    Ok(seq_from_sql(next_seq - 1))
}

fn op_delete_queue(conn: &Connection, queue: &QueueId, secret: &SecretHash) -> StoreResult<()> {
    let Some((receive, _, _)) = queue_hashes(conn, queue)? else {
        return Err(Refusal::NotFound(Entity::Queue).into());
    };
    if !receive.matches(secret) {
        return Err(Refusal::Forbidden(Credential::ReceiveSecret).into());
    }
    let id = queue.as_bytes();
    conn.prepare_cached("DELETE FROM messages WHERE queue_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM routes WHERE queue_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM queues WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

fn op_create_group(conn: &Connection, day: Day, g: &NewGroup) -> StoreResult<()> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO groups (id, epoch, posting_token_hash, created_day, last_used_day, posted_n)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            g.id.as_bytes(),
            seq_to_sql(g.epoch),
            g.posting_token_hash.as_bytes(),
            day,
            offsets::random_base()?
        ])?;
    if inserted == 0 {
        return Err(Refusal::Conflict(ConflictKind::GroupExists).into());
    }
    for grant in &g.routes {
        check_route(conn, grant)?;
        conn.prepare_cached("INSERT OR IGNORE INTO routes (group_id, queue_id) VALUES (?1, ?2)")?
            .execute(params![g.id.as_bytes(), grant.queue_id.as_bytes()])?;
    }
    Ok(())
}

fn op_commit(conn: &Connection, day: Day, c: &CommitOp) -> StoreResult<Committed> {
    let epoch = check_group(conn, &c.group_id, c.epoch, &c.posting_token_hash)?.epoch;
    let next_epoch = epoch.checked_add(1).ok_or(Refusal::StaleEpoch {
        current_epoch: epoch,
    })?;
    for grant in &c.add_routes {
        check_route(conn, grant)?;
    }
    let gid = c.group_id.as_bytes();
    let mut appended: Vec<QueueId> = Vec::new();
    // The commit reaches every current route, removed ones included (exempt from the queue
    // size limit, so a full queue cannot block its own removal).
    let fanout: Vec<(QueueId, Option<u64>)> = routes_of(conn, &c.group_id)?
        .into_iter()
        .map(|q| {
            (
                q,
                (!c.remove_routes.contains(&q)).then_some(c.max_queue_bytes),
            )
        })
        .collect();
    appended.extend(
        append_to(conn, day, &fanout, &c.commit)?
            .into_iter()
            .map(|a| a.queue),
    );
    for queue in &c.remove_routes {
        conn.prepare_cached("DELETE FROM routes WHERE group_id = ?1 AND queue_id = ?2")?
            .execute(params![gid, queue.as_bytes()])?;
    }
    for grant in &c.add_routes {
        conn.prepare_cached("INSERT OR IGNORE INTO routes (group_id, queue_id) VALUES (?1, ?2)")?
            .execute(params![gid, grant.queue_id.as_bytes()])?;
    }
    let routes: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM routes WHERE group_id = ?1")?
        .query_row([gid], |r| r.get(0))?;
    if usize::try_from(routes).unwrap_or(usize::MAX) > c.max_routes.min(MAX_GROUP_ROUTES) {
        return Err(Refusal::LimitExceeded(Limit::GroupRoutes).into());
    }
    if let Some(welcome) = &c.welcome {
        let joiners: Vec<(QueueId, Option<u64>)> = c
            .add_routes
            .iter()
            .map(|g| (g.queue_id, Some(c.max_queue_bytes)))
            .collect();
        appended.extend(
            append_to(conn, day, &joiners, welcome)?
                .into_iter()
                .map(|a| a.queue),
        );
    }
    conn.prepare_cached(
        "UPDATE groups SET epoch = ?2, posting_token_hash = ?3, last_used_day = ?4 WHERE id = ?1",
    )?
    .execute(params![
        gid,
        seq_to_sql(next_epoch),
        c.next_posting_token_hash.as_bytes(),
        day
    ])?;
    dedup(&mut appended);
    Ok(Committed {
        epoch: next_epoch,
        appended,
    })
}

fn dedup(queues: &mut Vec<QueueId>) {
    let mut seen = HashSet::with_capacity(queues.len());
    queues.retain(|q| seen.insert(*q));
}

/// Every check comes before the first write, so a refused post changed nothing and needs no
/// savepoint ([`Wrap::ChecksFirst`]). A retry of a stored post is a duplicate, whether or not
/// a queue filled up since. A full group row moves its ids to a new chunk, appended at the end
/// of the group's range of `posted_chunks`.
fn op_post(conn: &Connection, day: Day, p: &PostOp, lookup: Lookup) -> StoreResult<Posted> {
    let group = check_group(conn, &p.group_id, p.epoch, &p.posting_token_hash)?;
    let gid = p.group_id.as_bytes();
    if recent_posts::contains(&group.recent, &p.message_id) {
        return Ok(Posted::Duplicate);
    }
    if let Lookup::Before(seen) = lookup
        && chunk_holds(conn, &p.group_id, &p.message_id, seen)?
    {
        return Ok(Posted::Duplicate);
    }
    let fanout: Vec<(QueueId, Option<u64>)> = routes_of(conn, &p.group_id)?
        .into_iter()
        .filter(|q| !p.skip.contains(q))
        .map(|q| (q, Some(p.max_queue_bytes)))
        .collect();
    check_room(conn, &fanout, p.payload.len())?;
    let appended = append_unchecked(conn, day, fanout.iter().map(|(q, _)| q), &p.payload)?;
    let (recent, moved) = recent_posts::record(&group.recent, &p.message_id);
    let mut posted_n = group.posted_n;
    if let Some(ids) = moved {
        // Starts below 2^62 (`offsets::random_base`) and grows by one per 32 posts: it cannot
        // reach `i64::MAX`.
        posted_n += 1;
        conn.prepare_cached(
            "INSERT INTO posted_chunks (group_id, n, ids, day) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![gid, posted_n, ids, day])?;
    }
    conn.prepare_cached(
        "UPDATE groups SET recent_posts = ?2, posted_n = ?3, last_used_day = max(last_used_day, ?4)
         WHERE id = ?1",
    )?
    .execute(params![gid, recent, posted_n, day])?;
    Ok(Posted::Stored { appended })
}

fn box_count(conn: &Connection, box_id: &BoxId) -> StoreResult<u32> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM key_packages WHERE box_id = ?1")?
        .query_row([box_id.as_bytes()], |r| r.get(0))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// A box's secret hash and whether it has a last-resort package.
fn box_row(conn: &Connection, box_id: &BoxId) -> StoreResult<Option<(SecretHash, bool)>> {
    let row: Option<(Vec<u8>, bool)> = conn
        .prepare_cached(
            "SELECT secret_hash, last_resort IS NOT NULL FROM key_package_boxes WHERE id = ?1",
        )?
        .query_row([box_id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(h, lr)| Ok((hash_from_sql(h)?, lr))).transpose()
}

fn op_publish(conn: &Connection, day: Day, p: &PublishOp) -> StoreResult<KeyPackageCount> {
    let bid = p.box_id.as_bytes();
    match box_row(conn, &p.box_id)? {
        None => {
            conn.prepare_cached(
                "INSERT INTO key_package_boxes (id, secret_hash, last_resort, created_day, last_used_day)
                 VALUES (?1, ?2, NULL, ?3, ?3)",
            )?
            .execute(params![bid, p.secret_hash.as_bytes(), day])?;
        }
        Some((hash, _)) if hash.matches(&p.secret_hash) => {}
        Some(_) => return Err(Refusal::Forbidden(Credential::BoxSecret).into()),
    }
    let existing = box_count(conn, &p.box_id)? as usize;
    if existing + p.key_packages.len() > p.max_one_time {
        return Err(Refusal::LimitExceeded(Limit::KeyPackages).into());
    }
    let next: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(n), 0) + 1 FROM key_packages WHERE box_id = ?1")?
        .query_row([bid], |r| r.get(0))?;
    for (n, kp) in (next..).zip(&p.key_packages) {
        conn.prepare_cached("INSERT INTO key_packages (box_id, n, data) VALUES (?1, ?2, ?3)")?
            .execute(params![bid, n, kp])?;
    }
    if let Some(lr) = &p.last_resort {
        conn.prepare_cached("UPDATE key_package_boxes SET last_resort = ?2 WHERE id = ?1")?
            .execute(params![bid, lr])?;
    }
    conn.prepare_cached(
        "UPDATE key_package_boxes SET last_used_day = ?2 WHERE id = ?1 AND last_used_day < ?2",
    )?
    .execute(params![bid, day])?;
    let (_, has_last_resort) =
        box_row(conn, &p.box_id)?.ok_or(Refusal::NotFound(Entity::KeyPackageBox))?;
    Ok(KeyPackageCount {
        one_time: box_count(conn, &p.box_id)?,
        has_last_resort,
    })
}

fn op_claim(conn: &Connection, day: Day, box_id: &BoxId) -> StoreResult<ClaimedKeyPackage> {
    let bid = box_id.as_bytes();
    let last_resort: Option<Option<Vec<u8>>> = conn
        .prepare_cached("SELECT last_resort FROM key_package_boxes WHERE id = ?1")?
        .query_row([bid], |r| r.get(0))
        .optional()?;
    let Some(last_resort) = last_resort else {
        return Err(Refusal::NotFound(Entity::KeyPackageBox).into());
    };
    conn.prepare_cached(
        "UPDATE key_package_boxes SET last_used_day = ?2 WHERE id = ?1 AND last_used_day < ?2",
    )?
    .execute(params![bid, day])?;
    let one_time: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT n, data FROM key_packages WHERE box_id = ?1 ORDER BY n LIMIT 1")?
        .query_row([bid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((n, data)) = one_time {
        conn.prepare_cached("DELETE FROM key_packages WHERE box_id = ?1 AND n = ?2")?
            .execute(params![bid, n])?;
        return Ok(ClaimedKeyPackage {
            data,
            last_resort: false,
        });
    }
    match last_resort {
        Some(data) => Ok(ClaimedKeyPackage {
            data,
            last_resort: true,
        }),
        None => Err(Refusal::NotFound(Entity::KeyPackageBox).into()),
    }
}

fn op_register_user(conn: &Connection, u: &UserRecord) -> StoreResult<()> {
    let stored: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT identity_key, version FROM users WHERE username = ?1")?
        .query_row([&u.username], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let version = seq_to_sql(u.version);
    match stored {
        None => {
            conn.prepare_cached(
                "INSERT INTO users (username, identity_key, version, entry, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![u.username, &u.identity_key[..], version, u.entry, u.signature])?;
            queue_for_publication(conn, u)
        }
        Some((key, _)) if key.as_slice() != u.identity_key.as_slice() => {
            Err(Refusal::Conflict(ConflictKind::UsernameTaken).into())
        }
        Some((_, old)) if old >= version => {
            Err(Refusal::Conflict(ConflictKind::VersionNotIncreased).into())
        }
        Some(_) => {
            conn.prepare_cached(
                "UPDATE users SET version = ?2, entry = ?3, signature = ?4 WHERE username = ?1",
            )?
            .execute(params![u.username, version, u.entry, u.signature])?;
            queue_for_publication(conn, u)
        }
    }
}

fn queue_for_publication(conn: &Connection, u: &UserRecord) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO kt_pending (username, version, entry, signature) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        u.username,
        seq_to_sql(u.version),
        u.entry,
        u.signature
    ])?;
    Ok(())
}

fn read_fetch(
    conn: &mut Connection,
    queue: &QueueId,
    after_seq: u64,
    limit: FetchLimit,
) -> StoreResult<Fetched> {
    let tx = conn.transaction()?;
    let after = seq_to_sql(after_seq);
    let qid = queue.as_bytes();
    let (last, more) = {
        // Sizes first, so payloads beyond the byte budget are never loaded.
        let mut sizes = tx.prepare_cached(concat!(
            "SELECT m.seq, ",
            body_len!(),
            " FROM messages m WHERE m.queue_id = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3"
        ))?;
        let mut rows = sizes.query(params![qid, after, i64::from(limit.max_messages) + 1])?;
        let (mut count, mut bytes, mut last, mut more) = (0u32, 0usize, None, false);
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let len = usize::try_from(row.get::<_, i64>(1)?).unwrap_or(usize::MAX);
            if count >= limit.max_messages
                || (count > 0 && bytes.saturating_add(len) > limit.max_bytes)
            {
                more = true;
                break;
            }
            count += 1;
            bytes = bytes.saturating_add(len);
            last = Some(seq);
        }
        (last, more)
    };
    let Some(last) = last else {
        return Ok(Fetched::default());
    };
    let mut messages = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT m.seq, CASE WHEN m.shared IS NULL THEN m.payload
                 ELSE (SELECT data FROM payloads WHERE id = m.shared) END
             FROM messages m WHERE m.queue_id = ?1 AND m.seq > ?2 AND m.seq <= ?3 ORDER BY m.seq",
        )?;
        let rows = stmt.query_map(params![qid, after, last], |r| {
            Ok(StoredMessage {
                seq: seq_from_sql(r.get(0)?),
                payload: r.get(1)?,
            })
        })?;
        for row in rows {
            messages.push(row?);
        }
    }
    tx.finish()?;
    Ok(Fetched { messages, more })
}

/// Deletes messages stored before `before`. Rows are appended in rowid order and days only
/// grow, so the expired messages are a prefix of the table in rowid order: read the prefix up
/// to the first message to keep (O(expired), no index on `day`), delete below it. Should the
/// clock ever step back a day, messages stored after the step wait until those before them
/// expire.
fn expire_messages(conn: &Connection, before: Day) -> StoreResult<u64> {
    let first_kept: Option<i64> = {
        let mut stmt = conn.prepare_cached("SELECT rowid, day FROM messages ORDER BY rowid")?;
        let mut rows = stmt.query([])?;
        let mut first = None;
        while let Some(row) = rows.next()? {
            if row.get::<_, Day>(1)? >= before {
                first = Some(row.get(0)?);
                break;
            }
        }
        first
    };
    let deleted = match first_kept {
        Some(rowid) => conn
            .prepare_cached("DELETE FROM messages WHERE rowid < ?1")?
            .execute([rowid])?,
        None => conn.prepare_cached("DELETE FROM messages")?.execute([])?,
    };
    Ok(deleted as u64)
}

/// Chunks of idempotency keys [`expire_posted_chunks`] visits per call.
const SWEEP_SLICE: i64 = 4096;

/// A `posted_chunks` primary key: (group id, counter).
type ChunkKey = (Vec<u8>, i64);

/// Deletes the chunks of idempotency keys moved before `before` among the next
/// [`SWEEP_SLICE`] chunks after `after` (from the first if `None`), in key order. Returns how
/// many ids it deleted and the key to continue after, `None` once the table is done. The
/// table has no index on `day`: it would cost every move a write at a second place, while
/// this sweep reads each chunk once per retention pass.
fn expire_posted_chunks(
    conn: &Connection,
    before: Day,
    after: Option<&ChunkKey>,
) -> StoreResult<(u64, Option<ChunkKey>)> {
    let mut chunks: Vec<(ChunkKey, Day, i64)> = Vec::new();
    let mut stmt = match after {
        None => conn.prepare_cached(
            "SELECT group_id, n, day, length(ids) FROM posted_chunks
             ORDER BY group_id, n LIMIT ?1",
        )?,
        Some(_) => conn.prepare_cached(
            "SELECT group_id, n, day, length(ids) FROM posted_chunks
             WHERE (group_id, n) > (?1, ?2)
             ORDER BY group_id, n LIMIT ?3",
        )?,
    };
    let mut rows = match after {
        None => stmt.query([SWEEP_SLICE])?,
        Some((group, n)) => stmt.query(params![group, n, SWEEP_SLICE])?,
    };
    while let Some(row) = rows.next()? {
        chunks.push(((row.get(0)?, row.get(1)?), row.get(2)?, row.get(3)?));
    }
    drop(rows);
    let mut deleted = 0;
    let mut delete =
        conn.prepare_cached("DELETE FROM posted_chunks WHERE group_id = ?1 AND n = ?2")?;
    for ((group, n), day, bytes) in &chunks {
        if *day < before && delete.execute(params![group, n])? > 0 {
            deleted += u64::try_from(*bytes).unwrap_or(0) / MessageId::LEN as u64;
        }
    }
    let next = if chunks.len() < SWEEP_SLICE as usize {
        None
    } else {
        chunks.pop().map(|(key, _, _)| key)
    };
    Ok((deleted, next))
}

fn read_status(
    conn: &mut Connection,
    box_id: &BoxId,
    secret: &SecretHash,
) -> StoreResult<KeyPackageCount> {
    let tx = conn.transaction()?;
    let Some((hash, has_last_resort)) = box_row(&tx, box_id)? else {
        return Err(Refusal::NotFound(Entity::KeyPackageBox).into());
    };
    if !hash.matches(secret) {
        return Err(Refusal::Forbidden(Credential::BoxSecret).into());
    }
    let one_time = box_count(&tx, box_id)?;
    tx.finish()?;
    Ok(KeyPackageCount {
        one_time,
        has_last_resort,
    })
}

fn read_user(conn: &mut Connection, username: &str) -> StoreResult<Option<UserRecord>> {
    let row = conn
        .prepare_cached(
            "SELECT identity_key, version, entry, signature FROM users WHERE username = ?1",
        )?
        .query_row([username], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                UserRecord {
                    username: username.to_owned(),
                    identity_key: [0; 32],
                    version: seq_from_sql(r.get(1)?),
                    entry: r.get(2)?,
                    signature: r.get(3)?,
                },
            ))
        })
        .optional()?;
    row.map(|(key, mut record)| {
        record.identity_key = <[u8; 32]>::try_from(key.as_slice())
            .map_err(|_| StoreError::Backend("stored identity key has the wrong length".into()))?;
        Ok(record)
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------------
// The traits

impl Store for SqliteStore {
    fn create_queue(&self, queue: NewQueue) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, day| op_create_queue(c, day, &queue)))
    }

    fn authenticate_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, u64> {
        Box::pin(
            self.write(move |c, day| {
                op_authenticate_queue(c, day, &queue_id, &receive_secret_hash)
            }),
        )
    }

    fn fetch(
        &self,
        queue_id: QueueId,
        after_seq: u64,
        limit: FetchLimit,
    ) -> StoreFuture<'_, Fetched> {
        Box::pin(self.read(move |c| read_fetch(c, &queue_id, after_seq, limit)))
    }

    fn ack(&self, queue_id: QueueId, up_to_seq: u64) -> StoreFuture<'_, ()> {
        let delete = move |c: &Connection, _| {
            c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND seq <= ?2")?
                .execute(params![queue_id.as_bytes(), seq_to_sql(up_to_seq)])?;
            Ok(())
        };
        Box::pin(self.write_op(delete, Wrap::OneStatement))
    }

    fn delete_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, _| op_delete_queue(c, &queue_id, &receive_secret_hash)))
    }

    fn create_group(&self, group: NewGroup) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, day| op_create_group(c, day, &group)))
    }

    fn commit(&self, commit: CommitOp) -> StoreFuture<'_, Committed> {
        Box::pin(self.write(move |c, day| op_commit(c, day, &commit)))
    }

    fn post(&self, post: PostOp) -> StoreFuture<'_, Posted> {
        Box::pin(async move {
            let lookup = if post.fresh_id {
                Lookup::Fresh
            } else {
                let (group, epoch, token, id) = (
                    post.group_id,
                    post.epoch,
                    post.posting_token_hash,
                    post.message_id,
                );
                match self
                    .read(move |c| read_lookup(c, &group, epoch, &token, &id))
                    .await?
                {
                    Some(seen) => Lookup::Before(seen),
                    None => return Ok(Posted::Duplicate),
                }
            };
            self.write_op(
                move |c, day| op_post(c, day, &post, lookup),
                Wrap::ChecksFirst,
            )
            .await
        })
    }

    fn publish_key_packages(&self, publish: PublishOp) -> StoreFuture<'_, KeyPackageCount> {
        Box::pin(self.write(move |c, day| op_publish(c, day, &publish)))
    }

    fn claim_key_package(&self, box_id: BoxId) -> StoreFuture<'_, ClaimedKeyPackage> {
        Box::pin(self.write_then_scrub(move |c, day| op_claim(c, day, &box_id)))
    }

    fn key_package_status(
        &self,
        box_id: BoxId,
        secret_hash: SecretHash,
    ) -> StoreFuture<'_, KeyPackageCount> {
        Box::pin(self.read(move |c| read_status(c, &box_id, &secret_hash)))
    }

    fn expire(&self, expiry: Expiry) -> StoreFuture<'_, Expired> {
        Box::pin(async move {
            let messages = self
                .write(move |c, _| expire_messages(c, expiry.messages_before))
                .await?;
            // Slice by slice, each its own write operation, so posts and acks interleave with
            // the sweep instead of waiting for one long transaction.
            let mut posted_ids = 0;
            let mut cursor: Option<ChunkKey> = None;
            loop {
                let after = cursor.take();
                let (deleted, next) = self
                    .write(move |c, _| {
                        expire_posted_chunks(c, expiry.posted_ids_before, after.as_ref())
                    })
                    .await?;
                posted_ids += deleted;
                match next {
                    Some(key) => cursor = Some(key),
                    None => break,
                }
            }
            Ok(Expired {
                messages,
                posted_ids,
            })
        })
    }

    fn health_check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.write(|c, _| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
                .await?;
            self.read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
                .await?;
            Ok(())
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
            if let Some(checkpointer) = checkpointer {
                checkpointer.stop();
            }
            // Dropping the last sender lets the writer finish what is queued, then stop.
            if let Ok(mut writer) = self.writer.write() {
                writer.take();
            }
            let done = self.writer_done.lock().ok().and_then(|mut d| d.take());
            if let Some(done) = done {
                let _ = done.await;
            }
            if let Ok(mut idle) = self.readers.idle.lock() {
                idle.clear();
            }
            Ok(())
        })
    }
}

impl DirectoryStore for SqliteStore {
    fn lookup_user(&self, username: String) -> StoreFuture<'_, Option<UserRecord>> {
        Box::pin(self.read(move |c| read_user(c, &username)))
    }

    fn register_user(&self, record: UserRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, _| op_register_user(c, &record)))
    }
}

// ---------------------------------------------------------------------------------------------
// Key transparency

impl TransparencyStore for SqliteStore {
    fn akd_write(&self, nodes: Vec<AkdNodeRow>, values: Vec<AkdValueRow>) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, _| {
            let mut put_node = c.prepare_cached(
                "INSERT OR REPLACE INTO akd_nodes (key, data) VALUES (?1, ?2)",
            )?;
            for n in &nodes {
                put_node.execute(params![n.key, n.data])?;
            }
            let mut put_value = c.prepare_cached(
                "INSERT OR REPLACE INTO akd_values (label, epoch, version, data) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for v in &values {
                put_value.execute(params![
                    v.label,
                    seq_to_sql(v.epoch),
                    seq_to_sql(v.version),
                    v.data
                ])?;
            }
            Ok(())
        }))
    }

    fn akd_nodes(&self, keys: Vec<Vec<u8>>) -> StoreFuture<'_, Vec<AkdNodeRow>> {
        Box::pin(self.read(move |c| {
            let tx = c.transaction()?;
            let mut found = Vec::with_capacity(keys.len());
            {
                let mut get = tx.prepare_cached("SELECT data FROM akd_nodes WHERE key = ?1")?;
                for key in keys {
                    let data: Option<Vec<u8>> = get.query_row([&key], |r| r.get(0)).optional()?;
                    if let Some(data) = data {
                        found.push(AkdNodeRow { key, data });
                    }
                }
            }
            tx.commit()?;
            Ok(found)
        }))
    }

    fn akd_values(&self, label: Vec<u8>) -> StoreFuture<'_, Vec<AkdValueRow>> {
        Box::pin(self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT epoch, version, data FROM akd_values WHERE label = ?1 ORDER BY epoch",
            )?;
            let rows = stmt.query_map([&label], |r| {
                Ok(AkdValueRow {
                    label: label.clone(),
                    epoch: seq_from_sql(r.get(0)?),
                    version: seq_from_sql(r.get(1)?),
                    data: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        }))
    }

    fn pending_entries(&self, limit: usize) -> StoreFuture<'_, Vec<PendingEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT username, version, entry, signature FROM kt_pending ORDER BY rowid LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok(PendingEntry {
                    username: r.get(0)?,
                    version: seq_from_sql(r.get(1)?),
                    entry: r.get(2)?,
                    signature: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        }))
    }

    fn finish_epoch(
        &self,
        root: Option<EpochRoot>,
        published: Vec<(String, u64)>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c, _| {
            if let Some(root) = &root {
                c.prepare_cached(
                    "INSERT INTO kt_roots (epoch, root_hash, signature) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![
                    seq_to_sql(root.epoch),
                    &root.root_hash[..],
                    root.signature
                ])?;
            }
            let mut forget =
                c.prepare_cached("DELETE FROM kt_pending WHERE username = ?1 AND version = ?2")?;
            for (username, version) in &published {
                forget.execute(params![username, seq_to_sql(*version)])?;
            }
            Ok(())
        }))
    }

    fn epoch_root(&self, epoch: u64) -> StoreFuture<'_, Option<EpochRoot>> {
        Box::pin(self.read(move |c| {
            read_root(
                c,
                "SELECT epoch, root_hash, signature FROM kt_roots WHERE epoch = ?1",
                seq_to_sql(epoch),
            )
        }))
    }

    fn latest_root(&self) -> StoreFuture<'_, Option<EpochRoot>> {
        Box::pin(self.read(|c| {
            read_root(
                c,
                "SELECT epoch, root_hash, signature FROM kt_roots WHERE epoch >= ?1 ORDER BY epoch DESC LIMIT 1",
                0,
            )
        }))
    }

    fn shared_keys(&self, _candidate: StoredKeys) -> StoreFuture<'_, Option<StoredKeys>> {
        Box::pin(async { Ok(None) })
    }

    fn epoch_lock(&self, _exclusive: bool) -> StoreFuture<'_, EpochLock> {
        // SQLite is the single-node backend: the directory's in-process lock is enough.
        Box::pin(async { Ok(EpochLock::single_node()) })
    }
}

fn read_root(conn: &mut Connection, sql: &str, arg: i64) -> StoreResult<Option<EpochRoot>> {
    let row: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .prepare_cached(sql)?
        .query_row([arg], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(epoch, hash, signature)| {
        Ok(EpochRoot {
            epoch: seq_from_sql(epoch),
            root_hash: <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| StoreError::Backend("stored root hash has the wrong length".into()))?,
            signature,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_record_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("x.sqlite3")).unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::Backend(_))));
    }

    /// A database in `dir` at schema `version`, as an older release left it.
    fn database_at(dir: &Path, version: usize) -> Connection {
        let conn = Connection::open(dir.join("x.sqlite3")).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn
    }

    /// Migration 7 gives existing queues running totals that make their pending bytes what
    /// their messages hold, and appends and acknowledgements keep them so.
    #[test]
    fn migration_7_counts_what_queues_hold_and_appends_keep_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = database_at(dir.path(), 6);
        let q = |n: u8| QueueId::new([n; 16]);
        for n in [1u8, 2, 3] {
            conn.execute(
                "INSERT INTO queues VALUES (?1, x'00', x'00', 3, 1, 1)",
                [q(n).as_bytes()],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO payloads (id, data, refs) VALUES (7, ?1, 2)",
            [[0u8; 5000]],
        )
        .unwrap();
        let insert = "INSERT INTO messages (queue_id, seq, payload, day, shared)
                      VALUES (?1, ?2, ?3, 1, ?4)";
        let inline: &[u8] = &[0; 100];
        for (n, seq, payload, shared) in [
            (1u8, 1, inline, None),
            (1, 2, &[], Some(7)),
            (2, 1, &[], Some(7)),
        ] {
            conn.execute(insert, params![q(n).as_bytes(), seq, payload, shared])
                .unwrap();
        }
        migrate(&mut conn).unwrap();
        // Exactly `pending` bytes held: one more byte would pass a limit of `pending + len`.
        let holds = |conn: &Connection, n: u8, pending: u64| {
            check_room(conn, &[(q(n), Some(pending + 10))], 10).unwrap();
            assert!(
                check_room(conn, &[(q(n), Some(pending + 10))], 11).is_err(),
                "queue {n} holds more than {pending}"
            );
        };
        holds(&conn, 1, 5100);
        holds(&conn, 2, 5000);
        holds(&conn, 3, 0);
        conn.execute(
            "DELETE FROM messages WHERE queue_id = ?1 AND seq <= 1",
            [q(1).as_bytes()],
        )
        .unwrap();
        holds(&conn, 1, 5000);
        append(&conn, 1, &q(1), Body::Inline(&[1; 30]), 30).unwrap();
        append(&conn, 1, &q(3), Body::Inline(&[1; 30]), 30).unwrap();
        holds(&conn, 1, 5030);
        holds(&conn, 3, 30);
        conn.execute("DELETE FROM messages", []).unwrap();
        for n in [1, 2, 3] {
            holds(&conn, n, 0);
        }
    }

    /// Migration 8 turns each stored idempotency key into a chunk of its group, below the
    /// group's counter, so a resend still finds it and the group's next move does not collide.
    #[test]
    fn migration_8_keeps_every_key_findable_below_its_groups_counter() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = database_at(dir.path(), 7);
        let g = |n: u8| GroupId::new([n; 32]);
        let m = |n: u8| MessageId::new([n; 16]);
        for n in [1u8, 2] {
            conn.execute(
                "INSERT INTO groups (id, epoch, posting_token_hash, created_day, last_used_day)
                 VALUES (?1, 0, x'00', 1, 1)",
                [g(n).as_bytes()],
            )
            .unwrap();
        }
        // Group 1 has three keys, group 2 none, and group 3 (no row) one.
        for (group, id) in [(1, 10), (1, 11), (1, 12), (3, 30)] {
            conn.execute(
                "INSERT INTO posted_ids (group_id, message_id, day) VALUES (?1, ?2, 4)",
                params![g(group).as_bytes(), m(id).as_bytes()],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        for id in [10, 11, 12] {
            assert!(
                chunk_holds(&conn, &g(1), &m(id), i64::MIN).unwrap(),
                "id {id}"
            );
        }
        assert!(!chunk_holds(&conn, &g(1), &m(30), i64::MIN).unwrap());
        let counter = |n: u8| -> i64 {
            conn.query_row(
                "SELECT posted_n FROM groups WHERE id = ?1",
                [g(n).as_bytes()],
                |r| r.get(0),
            )
            .unwrap()
        };
        let (low, high): (i64, i64) = conn
            .query_row(
                "SELECT MIN(n), MAX(n) FROM posted_chunks WHERE group_id = ?1",
                [g(1).as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((high - low, high), (2, counter(1)));
        assert!(counter(2) >= 0);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM posted_chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3, "the key of a group that is gone is dropped");
        // A chunk holds only keys above the counter a reader saw.
        assert!(!chunk_holds(&conn, &g(1), &m(12), high).unwrap());
    }

    #[test]
    fn the_database_runs_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        let conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// `.cargo/config.toml`'s `LIBSQLITE3_FLAGS` reached the bundled SQLite (without it the
    /// build silently gets the default, slower SQLite).
    #[test]
    fn the_bundled_sqlite_is_built_with_the_repository_flags() {
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for wanted in ["DEFAULT_MEMSTATUS=0", "USE_ALLOCA"] {
            assert!(
                options.iter().any(|o| o == wanted),
                "{wanted} missing from {options:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_writer_journals_savepoints_in_memory_and_checkpoints_only_as_a_backstop() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        let (temp_store, backstop) = store
            .write(|conn, _| {
                let temp: i64 = conn.query_row("PRAGMA temp_store", [], |r| r.get(0))?;
                let pages: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?;
                Ok((temp, pages))
            })
            .await
            .unwrap();
        assert_eq!(temp_store, 2, "temp_store = MEMORY");
        assert_eq!(backstop, WAL_BACKSTOP_PAGES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_claim_leaves_an_empty_wal_even_while_the_checkpointer_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        let box_id = BoxId::new([3; 16]);
        let claims = 150;
        store
            .publish_key_packages(PublishOp {
                box_id,
                secret_hash: SecretHash::of_secret("p", &[3; 32]).unwrap(),
                key_packages: (0..claims).map(|n| vec![n as u8; 64]).collect(),
                last_resort: None,
                max_one_time: 1000,
            })
            .await
            .unwrap();
        let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
        for n in 0..claims {
            // WAL frames for the background checkpointer to copy, so it is often busy
            // checkpointing when the claim's scrub starts.
            store
                .write(move |c, _| {
                    c.execute_batch("CREATE TABLE IF NOT EXISTS scratch (x BLOB)")?;
                    c.execute("INSERT INTO scratch (x) VALUES (zeroblob(262144))", [])?;
                    Ok(())
                })
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(n % 7)).await;
            store.claim_key_package(box_id).await.unwrap();
            let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            assert_eq!(len, 0, "claim {n}: the WAL still holds {len} bytes");
        }
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_waiting_for_a_full_wal() {
        for durability in [Durability::Machine, Durability::Process] {
            committed_pages_reach_the_database_file(durability).await;
        }
    }

    async fn committed_pages_reach_the_database_file(durability: Durability) {
        // A few pages are far below the writer's own checkpoint (`WAL_BACKSTOP_PAGES`): only the
        // background checkpointer copies them into the main file (with `process` after each
        // flush).
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(dir.path(), Arc::new(|| 1), durability).unwrap();
        let marker = b"checkpointed-marker-6f1d2a".to_vec();
        let row = marker.clone();
        store
            .write(move |c, _| {
                c.execute_batch("CREATE TABLE IF NOT EXISTS t (x BLOB)")?;
                c.execute("INSERT INTO t (x) VALUES (?1)", [row])?;
                Ok(())
            })
            .await
            .unwrap();
        let main_file = dir.path().join(DATABASE_FILE);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let bytes = std::fs::read(&main_file).unwrap();
            if bytes.windows(marker.len()).any(|w| w == marker.as_slice()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{durability:?}: the committed row never reached the database file"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        store.close().await.unwrap();
    }

    #[test]
    fn the_flusher_waits_for_both_files_and_then_flushes_them() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join(DATABASE_FILE);
        let mut flusher = Flusher::new(&database);
        assert_eq!(flusher.wal, dir.path().join(format!("{DATABASE_FILE}-wal")));
        // Neither file yet, then only one: nothing to flush, no panic, tried again later.
        flusher.flush();
        assert!(flusher.open.is_none());
        std::fs::write(&database, b"db").unwrap();
        flusher.flush();
        assert!(flusher.open.is_none());
        std::fs::write(&flusher.wal, b"wal").unwrap();
        flusher.flush();
        assert!(flusher.open.is_some(), "both files exist: kept open");
        flusher.flush();
        assert!(!flusher.failing);
    }
}

/// What the store tests below share: queue 1 and group 1 routed to it, and posts to it.
#[cfg(test)]
mod fixtures {
    use super::*;

    pub(super) fn ids(n: u8) -> (QueueId, GroupId, SecretHash) {
        (
            QueueId::new([n; 16]),
            GroupId::new([n; 32]),
            SecretHash::of_secret("p", &[n; 32]).unwrap(),
        )
    }

    /// Post `n` (its message id) of `payload` to group 1, epoch 0.
    pub(super) fn post(n: u32, payload: Vec<u8>) -> PostOp {
        let (_, group, token) = ids(1);
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        PostOp {
            group_id: group,
            epoch: 0,
            posting_token_hash: token,
            message_id: MessageId::new(id),
            fresh_id: false,
            payload: payload.into(),
            max_queue_bytes: u64::MAX,
            skip: Default::default(),
        }
    }

    /// Creates queue 1 and group 1 (epoch 0) routed to it; returns the queue.
    pub(super) async fn one_route_group(store: &SqliteStore) -> QueueId {
        let (queue, group, token) = ids(1);
        let send = SecretHash::of_secret("s", &[1; 32]).unwrap();
        store
            .create_queue(NewQueue {
                id: queue,
                receive_secret_hash: SecretHash::of_secret("r", &[1; 32]).unwrap(),
                send_token_hash: send,
            })
            .await
            .unwrap();
        store
            .create_group(NewGroup {
                id: group,
                epoch: 0,
                posting_token_hash: token,
                routes: vec![RouteGrant {
                    queue_id: queue,
                    send_token_hash: send,
                }],
            })
            .await
            .unwrap();
        queue
    }
}

/// The disk filling up, provoked with SQLite's own limit on the database size
/// (`PRAGMA max_page_count`, set on the writer's connection from inside the test), so SQLite
/// fails exactly as on a full disk (`SQLITE_FULL`). Test-only: nothing in a build of the server
/// can set it.
#[cfg(test)]
mod disk_full {
    use super::fixtures::{ids, one_route_group, post};
    use super::*;

    async fn set_max_pages(store: &SqliteStore, extra: i64) {
        store
            .write(move |c, _| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                c.query_row(
                    &format!("PRAGMA max_page_count = {}", pages + extra),
                    [],
                    |r| r.get::<_, i64>(0),
                )?;
                Ok(())
            })
            .await
            .unwrap();
    }

    async fn pending(store: &SqliteStore) -> Vec<Vec<u8>> {
        let (queue, _, _) = ids(1);
        let limit = FetchLimit {
            max_messages: 256,
            max_bytes: usize::MAX,
        };
        let fetched = store.fetch(queue, 0, limit).await.unwrap();
        fetched.messages.into_iter().map(|m| m.payload).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_acknowledges_nothing_it_did_not_store_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        one_route_group(&store).await;

        // Room for a few pages only: posts succeed, then fail as on a full disk.
        set_max_pages(&store, 40).await;
        let mut acked = Vec::new();
        let mut refused = Vec::new();
        for n in 0..40u32 {
            let payload = vec![n as u8; 16 * 1024];
            match store.post(post(n, payload.clone())).await {
                Ok(_) => acked.push(payload),
                Err(StoreError::Full(detail)) => {
                    assert!(detail.contains("full"), "{detail}");
                    refused.push((n, payload));
                }
                Err(other) => panic!("expected a storage-full error, got {other:?}"),
            }
        }
        assert!(
            !acked.is_empty() && !refused.is_empty(),
            "the disk never filled"
        );
        assert_eq!(
            pending(&store).await,
            acked,
            "stored = acknowledged, no more"
        );

        // Space comes back: the refused posts go through on retry (same message ids).
        set_max_pages(&store, 1_000_000).await;
        for (n, payload) in &refused {
            assert!(matches!(
                store.post(post(*n, payload.clone())).await.unwrap(),
                Posted::Stored { .. }
            ));
            acked.push(payload.clone());
        }
        store.close().await.unwrap();

        // Everything acknowledged is durable, exactly once.
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        assert_eq!(pending(&store).await, acked);
    }
}

/// Expiry without an index on `day`: the expired messages are the oldest rows.
/// A resend's lookup runs on a read connection before the write (`read_lookup`); ids moved
/// to a chunk between the two are the writer's to find.
#[cfg(test)]
mod resend_lookup {
    use super::fixtures::{ids, one_route_group, post};
    use super::*;
    use crate::store::RECENT_POSTS;

    async fn lookup(store: &SqliteStore, p: &PostOp) -> Option<i64> {
        let (group, epoch, token, id) = (p.group_id, p.epoch, p.posting_token_hash, p.message_id);
        store
            .read(move |c| read_lookup(c, &group, epoch, &token, &id))
            .await
            .unwrap()
    }

    async fn write(store: &SqliteStore, p: PostOp, lookup: Lookup) -> Posted {
        store
            .write(move |c, day| op_post(c, day, &p, lookup))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_id_moved_between_the_read_and_the_write_is_found_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        one_route_group(&store).await;
        let resend = post(1, b"r".to_vec());
        // The read finds nothing: the id was never posted.
        let seen = lookup(&store, &resend).await.expect("not posted yet");
        // Then the first send lands, and RECENT_POSTS more posts move it to a chunk.
        let fresh = |n: u32| PostOp {
            fresh_id: true,
            ..post(n, b"f".to_vec())
        };
        for n in 1..=RECENT_POSTS as u32 + 1 {
            assert!(matches!(
                store.post(fresh(n)).await.unwrap(),
                Posted::Stored { .. }
            ));
        }
        // The writer looks in the chunks above the counter the read saw.
        assert_eq!(
            write(&store, resend.clone(), Lookup::Before(seen)).await,
            Posted::Duplicate
        );
        // Those only: a chunk at or below it was the read's to search.
        assert!(matches!(
            write(&store, resend.clone(), Lookup::Before(seen + 1)).await,
            Posted::Stored { .. }
        ));
        // Now the read finds it itself, and a wrong token learns nothing.
        assert_eq!(lookup(&store, &resend).await, None);
        let stranger = PostOp {
            posting_token_hash: ids(2).2,
            ..resend
        };
        let (group, token, id) = (
            stranger.group_id,
            stranger.posting_token_hash,
            stranger.message_id,
        );
        let refused = store
            .read(move |c| read_lookup(c, &group, 0, &token, &id))
            .await;
        assert!(matches!(
            refused,
            Err(StoreError::Refused(Refusal::Forbidden(
                Credential::PostingToken
            )))
        ));
    }
}

#[cfg(test)]
mod expiry {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::fixtures::{one_route_group, post};
    use super::*;

    #[tokio::test]
    async fn expiry_deletes_exactly_the_messages_stored_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let today = Arc::new(AtomicI64::new(1));
        let clock = Arc::clone(&today);
        let store =
            SqliteStore::open(dir.path(), Arc::new(move || clock.load(Ordering::SeqCst))).unwrap();
        let queue = one_route_group(&store).await;
        // Two messages on day 1, two on day 2, one on day 3.
        for (n, day) in [(1u8, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
            today.store(day, Ordering::SeqCst);
            store.post(post(u32::from(n), vec![n])).await.unwrap();
        }
        let limit = FetchLimit {
            max_messages: 100,
            max_bytes: 1 << 20,
        };
        let left = |f: Fetched| f.messages.iter().map(|m| m.payload[0]).collect::<Vec<_>>();

        let expired = |before| Expiry {
            messages_before: before,
            posted_ids_before: 0,
        };
        assert_eq!(store.expire(expired(1)).await.unwrap().messages, 0);
        assert_eq!(store.expire(expired(3)).await.unwrap().messages, 4);
        assert_eq!(left(store.fetch(queue, 0, limit).await.unwrap()), [5]);
        assert_eq!(store.expire(expired(10)).await.unwrap().messages, 1);
        assert!(
            store
                .fetch(queue, 0, limit)
                .await
                .unwrap()
                .messages
                .is_empty()
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn expiry_sweeps_posted_chunks_across_slices_and_keeps_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
        // More than two slices of chunks, of two ids each, days 1 and 2 interleaved in key
        // order.
        let total = 2 * SWEEP_SLICE + 100;
        store
            .write(move |c, _| {
                let mut insert = c.prepare_cached(
                    "INSERT INTO posted_chunks (group_id, n, ids, day) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for n in 0..total {
                    insert.execute(params![[7u8; 32], n, [9u8; 2 * MessageId::LEN], 1 + n % 2])?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let count = |store: &SqliteStore, day: Day| {
            let store = store.readers.clone();
            async move {
                store
                    .run(move |c| {
                        Ok(c.query_row(
                            "SELECT COUNT(*) FROM posted_chunks WHERE day = ?1",
                            [day],
                            |r| r.get::<_, i64>(0),
                        )?)
                    })
                    .await
                    .unwrap()
            }
        };
        let expired = store
            .expire(Expiry {
                messages_before: 0,
                posted_ids_before: 2,
            })
            .await
            .unwrap();
        assert_eq!(
            expired.posted_ids, total as u64,
            "two ids in each day-1 chunk"
        );
        assert_eq!(count(&store, 1).await, 0, "every day-1 chunk is gone");
        assert_eq!(count(&store, 2).await, total / 2, "every day-2 chunk stays");
        store.close().await.unwrap();
    }
}
