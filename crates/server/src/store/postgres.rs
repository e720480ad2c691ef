//! The PostgreSQL backend of [`Store`], [`DirectoryStore`] and [`TransparencyStore`], for
//! deployments where many stateless `blindpostd` nodes share one database; and the `LISTEN`
//! task that tells this node about messages other nodes stored. Not for: validation of client
//! input, or SQLite.
//!
//! **Transactions.** Every operation is one transaction on a pooled connection, committed
//! before the caller is answered (an acknowledgement means the commit is durable, subject to
//! the server's `synchronous_commit`; see `docs/DEPLOY.md`). PostgreSQL batches the WAL flushes
//! of concurrent commits itself, so the group commit the SQLite backend does by hand happens
//! inside the database here; a pool of [`POOL_SIZE`] connections keeps that many in flight.
//! Statements are pipelined ([`Tx`]): a post is two round trips, an acknowledgement one, and
//! an acknowledgement's commit does not wait for the disk (the client repeats a lost one).
//!
//! **Concurrency between nodes.** Checks that must be atomic with their write take row locks
//! (READ COMMITTED): commits and posts lock the group row (`FOR UPDATE`), so the epoch
//! compare-and-set sees the winner's epoch after waiting; publishes lock the box row; a claim
//! deletes one package chosen `FOR UPDATE SKIP LOCKED`, so two nodes never hand out the same
//! one-time package. An operation that hits a deadlock, a unique-key race or a dead pooled
//! connection is rolled back and run again from scratch (at most [`MAX_RETRIES`] times); a
//! failed `COMMIT` is never retried (its outcome is unknown) and is reported as an error,
//! never acknowledged.
//!
//! **Wake-ups.** After a transaction that appended messages commits, its queue ids go to this
//! node's notifier task, which sends them with `pg_notify` on [`CHANNEL`] (with this node's
//! tag), many commits' worth in one notification. Not inside the appending transaction:
//! PostgreSQL serialises every transaction that notifies, through its commit, on one lock,
//! which cost the 1:1 relay 22 % (BENCHMARKS.md). [`PgStore::listen`] relays other nodes'
//! notifications to a [`Wakeups`] sink (the hub), and after every (re)connection asks it to
//! re-check every subscription and tells every other node to do the same (`node:*`): so
//! nothing committed while a listener was away, or by a node that died between a commit and
//! its notification, is left unpushed once that node (or any node) connects again.
//!
//! **Key transparency.** akd's records, the signed roots and the pending registrations in the
//! same tables as SQLite's; the server's keys in one row (`kt_keys`) every node reads; the
//! directory's epoch lock is an advisory lock (`EPOCH_LOCK`) held by a pooled connection in
//! an open transaction, exclusive to publish and shared to prove (ARCHITECTURE.md).

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blindpost_wire::limits::MAX_GROUP_ROUTES;
use futures_util::StreamExt as _;
use futures_util::future::{join3, try_join, try_join3};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

use super::{
    AkdNodeRow, AkdValueRow, Appended, ClaimedKeyPackage, CommitOp, Committed, DirectoryStore,
    EpochLock, EpochRoot, Expired, Expiry, FetchLimit, Fetched, GroupRow, KeyPackageCount,
    NewGroup, NewQueue, PendingEntry, PostOp, Posted, PublishOp, RouteGrant, Store, StoreError,
    StoreFuture, StoreResult, StoredKeys, StoredMessage, TransparencyStore, UserRecord,
    offset_modulus, offsets, pending_bytes, recent_posts,
};
use crate::error::{ConflictKind, Credential, Entity, Limit, Refusal};
use crate::types::{BoxId, Day, GroupId, MessageId, QueueId, SecretHash};

pub use super::sqlite::Clock;

/// Connections each node keeps to the database for operations.
pub const POOL_SIZE: usize = 16;
/// How often an operation is run again after a deadlock or unique-key race.
pub const MAX_RETRIES: usize = 5;
/// The notification channel carrying "these queues have new messages".
pub const CHANNEL: &str = "blindpost_queues";
/// Key of the advisory lock that serialises migrations across nodes starting at once.
const MIGRATION_LOCK: i64 = 0x626c_696e_6470_6f73; // "blindpos"
/// Key of the advisory lock between key-directory publication (exclusive) and proofs (shared).
const EPOCH_LOCK: i64 = 0x626c_696e_6470_6b74; // "blindpkt"
/// Most pooled connections that may hold the epoch lock at once; the rest stay free for the
/// directory reads the lock holders make, so holders never wait on each other for a
/// connection.
const EPOCH_LOCK_HOLDERS: usize = POOL_SIZE / 2;
/// Sent on [`CHANNEL`]: a node's wake-ups, or (`node:*`) "re-check every subscription".
const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";
/// Shortest time between two rounds of the notifier task ([`notify_loop`]).
const NOTIFY_EVERY: Duration = Duration::from_millis(2);
/// The payload after `node:` that asks every other node to re-check every subscription.
const RESYNC_ALL: &str = "*";
/// PostgreSQL refuses notification payloads of 8000 bytes or more.
const MAX_NOTIFY_PAYLOAD: usize = 7_900;
/// How often the listener proves its connection is alive.
const LISTEN_PING: Duration = Duration::from_secs(15);
/// Longest pause between listener reconnection attempts.
const LISTEN_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The schema version this server creates and understands.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// A message row's payload length, whichever way it is held (`m` is the row).
macro_rules! body_len {
    () => {
        "CASE WHEN m.shared IS NULL THEN octet_length(m.payload)
         ELSE (SELECT octet_length(data) FROM payloads WHERE id = m.shared) END"
    };
}

/// Versioned schema migrations; `blindpost_schema.version` records how many ran. Append only.
/// Same tables and columns as the SQLite backend (see SEIZURE.md).
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema. No owner, no address, no time finer than a day.
    "CREATE TABLE queues (
        id BYTEA PRIMARY KEY,
        receive_secret_hash BYTEA NOT NULL,
        send_token_hash BYTEA NOT NULL,
        next_seq BIGINT NOT NULL,
        created_day BIGINT NOT NULL,
        last_used_day BIGINT NOT NULL
    );
    CREATE TABLE messages (
        queue_id BYTEA NOT NULL,
        seq BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        day BIGINT NOT NULL,
        PRIMARY KEY (queue_id, seq)
    );
    CREATE INDEX messages_by_day ON messages (day);
    CREATE TABLE groups (
        id BYTEA PRIMARY KEY,
        epoch BIGINT NOT NULL,
        posting_token_hash BYTEA NOT NULL,
        created_day BIGINT NOT NULL,
        last_used_day BIGINT NOT NULL
    );
    CREATE TABLE routes (
        group_id BYTEA NOT NULL,
        queue_id BYTEA NOT NULL,
        PRIMARY KEY (group_id, queue_id)
    );
    CREATE INDEX routes_by_queue ON routes (queue_id);
    CREATE TABLE posted_ids (
        group_id BYTEA NOT NULL,
        message_id BYTEA NOT NULL,
        day BIGINT NOT NULL,
        PRIMARY KEY (group_id, message_id)
    );
    CREATE INDEX posted_ids_by_day ON posted_ids (day);
    CREATE TABLE key_package_boxes (
        id BYTEA PRIMARY KEY,
        secret_hash BYTEA NOT NULL,
        last_resort BYTEA,
        created_day BIGINT NOT NULL,
        last_used_day BIGINT NOT NULL
    );
    CREATE TABLE key_packages (
        box_id BYTEA NOT NULL,
        n BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (box_id, n)
    );
    CREATE TABLE users (
        username TEXT PRIMARY KEY,
        identity_key BYTEA NOT NULL,
        version BIGINT NOT NULL,
        entry BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );",
    // 2: the key-transparency directory (akd), as SQLite's migration 2, plus the server's
    // keys, which every node shares (SEIZURE.md). `kt_pending.id` keeps arrival order.
    "CREATE TABLE akd_nodes (
        key BYTEA PRIMARY KEY,
        data BYTEA NOT NULL
    );
    CREATE TABLE akd_values (
        label BYTEA NOT NULL,
        epoch BIGINT NOT NULL,
        version BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (label, epoch)
    );
    CREATE TABLE kt_roots (
        epoch BIGINT PRIMARY KEY,
        root_hash BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );
    CREATE TABLE kt_pending (
        id BIGSERIAL PRIMARY KEY,
        username TEXT NOT NULL,
        version BIGINT NOT NULL,
        entry BYTEA NOT NULL,
        signature BYTEA NOT NULL,
        UNIQUE (username, version)
    );
    CREATE TABLE kt_keys (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        vrf_key BYTEA NOT NULL,
        signing_key BYTEA NOT NULL
    );",
    // 3: as SQLite's migration 5: a large payload appended to several queues is stored once in
    // `payloads`, named by its message rows (`shared`, with an empty `payload`); the trigger
    // releases it with its last message. Acknowledgements of one payload on several nodes
    // serialise on its row (the `UPDATE`).
    "CREATE TABLE payloads (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        data BYTEA NOT NULL,
        refs INTEGER NOT NULL
    );
    ALTER TABLE messages ADD COLUMN shared BIGINT;
    CREATE FUNCTION release_payload() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE payloads SET refs = refs - 1 WHERE id = OLD.shared;
        DELETE FROM payloads WHERE id = OLD.shared AND refs <= 0;
        RETURN NULL;
    END $$;
    CREATE TRIGGER messages_release AFTER DELETE ON messages
        FOR EACH ROW WHEN (OLD.shared IS NOT NULL) EXECUTE FUNCTION release_payload();",
    // 4: as SQLite's migration 6: a group's latest message ids are kept in its row
    // (`store::recent_posts`) and moved to `posted_ids` 32 at a time. Posts to a group already
    // serialise on that row (`check_group` locks it).
    "ALTER TABLE groups ADD COLUMN recent_posts BYTEA NOT NULL DEFAULT ''::bytea;",
    // 5: as SQLite's migration 7: a queue's pending bytes are `appended_bytes` less the oldest
    // pending message's `start_offset` (`store::offsets`), not a sum over its messages.
    // Existing queues get a random base and their messages the running total before each.
    concat!(
        "ALTER TABLE queues ADD COLUMN appended_bytes BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN start_offset BIGINT NOT NULL DEFAULT 0;
        UPDATE queues SET appended_bytes = floor(random() * ", offset_modulus!(), ")::BIGINT;
        UPDATE messages m SET start_offset = (q.appended_bytes + b.bytes) % ", offset_modulus!(), "
        FROM queues q, (
            SELECT queue_id, seq, (SUM(len) OVER (PARTITION BY queue_id ORDER BY seq) - len)::BIGINT AS bytes
            FROM (SELECT m.queue_id, m.seq, ", body_len!(), " AS len FROM messages m) x
        ) b
        WHERE q.id = m.queue_id AND b.queue_id = m.queue_id AND b.seq = m.seq;
        UPDATE queues q SET appended_bytes = (q.appended_bytes + s.bytes) % ", offset_modulus!(), "
        FROM (
            SELECT m.queue_id, SUM(", body_len!(), ")::BIGINT AS bytes FROM messages m GROUP BY m.queue_id
        ) s
        WHERE q.id = s.queue_id;"
    ),
    // 6: as SQLite's migration 8: idempotency keys leave a group's row as one chunk
    // (`posted_chunks`, keyed by the group and a counter that starts at a random base), not
    // as 32 rows keyed by each random id. Existing keys become chunks of one id each.
    concat!(
        "ALTER TABLE groups ADD COLUMN posted_n BIGINT NOT NULL DEFAULT 0;
        UPDATE groups SET posted_n = floor(random() * ", offset_modulus!(), ")::BIGINT;
        CREATE TABLE posted_chunks (
            group_id BYTEA NOT NULL,
            n BIGINT NOT NULL,
            ids BYTEA NOT NULL,
            day BIGINT NOT NULL,
            PRIMARY KEY (group_id, n)
        );
        CREATE INDEX posted_chunks_by_day ON posted_chunks (day);
        INSERT INTO posted_chunks (group_id, n, ids, day)
            SELECT p.group_id,
                   g.posted_n + row_number() OVER (PARTITION BY p.group_id ORDER BY p.day),
                   p.message_id, p.day
            FROM posted_ids p JOIN groups g ON g.id = p.group_id;
        UPDATE groups g SET posted_n = g.posted_n + c.moved
        FROM (SELECT group_id, COUNT(*) AS moved FROM posted_ids GROUP BY group_id) c
        WHERE c.group_id = g.id;
        DROP TABLE posted_ids;"
    ),
];

/// The two forms of an append statement to the queues that `$which` (a `WHERE` clause over
/// `queues`) selects: `[inline, shared]`. Its first CTE, `q`, takes each queue's next sequence
/// number and adds the payload (`$2`) to its running total, yielding `id`, `seq` and `start`,
/// the total before the message (`store::offsets`). Both insert a message row per queue with
/// payload `$2` on day `$3`; the shared form stores a payload for more than one queue once,
/// in `payloads`, with one reference per row ([`super::SHARE_FROM_BYTES`] chooses). `$also`
/// (optional) adds CTEs of the caller's own (`, name AS (…)`), which PostgreSQL runs once each
/// in the same statement.
macro_rules! append_statements {
    (@forms $targets:expr) => {
        [
            concat!(
                $targets,
                " INSERT INTO messages (queue_id, seq, payload, day, start_offset)
                  SELECT id, seq, $2, $3, start FROM q RETURNING queue_id, seq"
            ),
            concat!(
                $targets,
                ", p AS (
                    INSERT INTO payloads (data, refs)
                    SELECT $2, n FROM (SELECT count(*)::INTEGER AS n FROM q) c WHERE n > 1
                    RETURNING id
                 )
                 INSERT INTO messages (queue_id, seq, payload, day, shared, start_offset)
                 SELECT q.id, q.seq, CASE WHEN p.id IS NULL THEN $2 ELSE ''::BYTEA END, $3, p.id,
                        q.start
                 FROM q LEFT JOIN p ON TRUE
                 RETURNING queue_id, seq"
            ),
        ]
    };
    ($which:expr) => {
        append_statements!($which, "")
    };
    ($which:expr, $also:expr) => {
        append_statements!(@forms concat!(
            "WITH q AS (
                UPDATE queues SET next_seq = next_seq + 1, last_used_day = $3,
                    appended_bytes = (appended_bytes + octet_length($2::BYTEA)) % ",
            offset_modulus!(),
            " ",
            $which,
            " RETURNING id, next_seq - 1 AS seq,
                    (appended_bytes - octet_length($2::BYTEA) + ",
            offset_modulus!(),
            ") % ",
            offset_modulus!(),
            " AS start
             )",
            $also
        ))
    };
}

/// The form of an append statement for `payload` (see [`append_statements`]).
fn append_form<'a>([inline, shared]: [&'a str; 2], payload: &[u8]) -> &'a str {
    if payload.len() >= super::SHARE_FROM_BYTES {
        shared
    } else {
        inline
    }
}

/// Where the listener delivers other nodes' wake-ups (implemented by the hub).
pub trait Wakeups: Send + Sync + 'static {
    /// These queues have new messages.
    fn appended(&self, queues: &[QueueId]);
    /// Notifications may have been missed: re-check every subscribed queue.
    fn resync(&self);
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PgStore {
    pool: Arc<Pool>,
    clock: Clock,
    /// Random per process: marks our own notifications, which the service already delivered.
    node: String,
    /// Bounds the connections holding the epoch lock (see [`EPOCH_LOCK_HOLDERS`]).
    epoch_holders: Arc<Semaphore>,
    /// Queues whose wake-ups the notifier task still has to send.
    wakes: Arc<Wakes>,
    /// The notifier task, awaited by `close` so the last wake-ups go out.
    notifier: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The wake-ups committed but not yet sent, shared with the notifier task ([`notify_loop`]).
/// A set: a queue with many appends since the last notification is named once.
#[derive(Default)]
struct Wakes {
    pending: Mutex<std::collections::HashSet<QueueId>>,
    ready: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Wakes {
    /// Queues appended to by a transaction that has committed.
    fn add(&self, queues: Vec<QueueId>) {
        if queues.is_empty() {
            return;
        }
        self.put_back(queues);
        self.ready.notify_one();
    }

    /// Queues to name in the next round (also those a failed round could not send).
    fn put_back(&self, queues: Vec<QueueId>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.extend(queues);
        }
    }

    fn take(&self) -> Vec<QueueId> {
        self.pending
            .lock()
            .map(|mut pending| pending.drain().collect())
            .unwrap_or_default()
    }

    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.ready.notify_one();
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.wakes.close();
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`), runs pending
    /// migrations (serialised across nodes by an advisory lock) and opens the pool.
    pub async fn open(url: &str, clock: Clock) -> StoreResult<Self> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Backend(format!("invalid database URL: {e}")))?;
        config
            .application_name("blindpostd")
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30));
        let pool = Arc::new(Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(POOL_SIZE)),
        });
        {
            let mut conn = pool.get().await?;
            migrate(&mut conn.client).await.map_err(Fail::into_store)?;
        }
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag)
            .map_err(|e| StoreError::Backend(format!("no randomness for the node tag: {e}")))?;
        let node = hex::encode(tag);
        let wakes = Arc::new(Wakes::default());
        let notifier = tokio::spawn(notify_loop(
            pool.config.clone(),
            node.clone(),
            Arc::clone(&wakes),
        ));
        Ok(Self {
            pool,
            clock,
            node,
            epoch_holders: Arc::new(Semaphore::new(EPOCH_LOCK_HOLDERS)),
            wakes,
            notifier: Mutex::new(Some(notifier)),
        })
    }

    /// Relays other nodes' wake-ups to `wakeups` until `stop` is set: `LISTEN`s on its own
    /// connection, reconnects with back-off when that connection is lost, and after every
    /// (re)connection calls [`Wakeups::resync`] and asks every other node to re-check its
    /// subscriptions too (`node:*`), in case a node died between a commit and its wake-up.
    pub fn listen(
        &self,
        wakeups: Arc<dyn Wakeups>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut config = self.pool.config.clone();
        // Named apart from the pool's connections, so operators (and tests) can tell it.
        config.application_name("blindpostd-listen");
        let node = self.node.clone();
        tokio::spawn(listen_loop(config, node, wakeups, stop))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An operation's failure before it is reported: a database error keeps its SQLSTATE so the
/// retry loop can tell a deadlock from a real fault.
enum Fail {
    Store(StoreError),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        Fail::Store(r.into())
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl Fail {
    /// Whether running the operation again, from scratch, is safe and may succeed: a
    /// deadlock or race, or a pooled connection found dead before anything was committed.
    fn retryable(&self) -> bool {
        if self.connection_lost() {
            return true;
        }
        match self {
            Fail::Db(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::UNIQUE_VIOLATION
            }),
            Fail::Store(_) => false,
        }
    }

    /// Whether the server ended this session (restart, failover, terminated backend), so its
    /// idle siblings in the pool are likely dead too.
    fn connection_lost(&self) -> bool {
        match self {
            Fail::Db(e) => {
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        *c == SqlState::ADMIN_SHUTDOWN
                            || *c == SqlState::CRASH_SHUTDOWN
                            || c.code().starts_with("08")
                    })
            }
            Fail::Store(_) => false,
        }
    }

    fn into_store(self) -> StoreError {
        match self {
            Fail::Store(e) => e,
            Fail::Db(e) if e.code() == Some(&SqlState::DISK_FULL) => {
                StoreError::Full(db_message(&e))
            }
            Fail::Db(e) => StoreError::Backend(db_message(&e)),
        }
    }
}

/// A database error's text with its causes (never a parameter value: tokio-postgres does not
/// echo them).
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// A `COMMIT` that failed or whose outcome is unknown: never retried.
fn commit_failed(e: &tokio_postgres::Error) -> Fail {
    Fail::Store(StoreError::Backend(format!(
        "commit failed: {}",
        db_message(e)
    )))
}

fn bad_row(what: &str) -> Fail {
    Fail::Store(StoreError::Backend(format!("unexpected stored {what}")))
}

// ---------------------------------------------------------------------------------------------
// Connections

struct PgConn {
    client: Client,
    /// Prepared statements of this connection, by their SQL text.
    stmts: HashMap<&'static str, Statement>,
    /// Set from an operation's `BEGIN` until its `COMMIT` or `ROLLBACK` is answered: a
    /// connection dropped with it set (its operation was cancelled, or ending the
    /// transaction failed) is closed, not reused, so the database rolls the transaction back.
    in_tx: bool,
}

struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<PgConn>>,
    permits: Arc<Semaphore>,
}

/// A connection taken from the pool; goes back on drop unless it broke or is inside a
/// transaction ([`PgConn::in_tx`]).
struct Pooled {
    conn: Option<PgConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        // Invariant: `conn` is `Some` until `drop`.
        #[allow(clippy::expect_used)]
        self.conn
            .as_ref()
            .expect("pooled connection present until drop")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut PgConn {
        // Invariant: `conn` is `Some` until `drop`.
        #[allow(clippy::expect_used)]
        self.conn
            .as_mut()
            .expect("pooled connection present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.client.is_closed()
            && !conn.in_tx
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(conn);
        }
    }
}

impl Pool {
    async fn get(self: &Arc<Self>) -> StoreResult<Pooled> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let idle = loop {
            let next = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            match next {
                Some(conn) if conn.client.is_closed() => continue,
                other => break other,
            }
        };
        let conn = match idle {
            Some(conn) => conn,
            None => PgConn {
                client: connect(&self.config).await?,
                stmts: HashMap::new(),
                in_tx: false,
            },
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: Arc::clone(self),
            _permit: permit,
        })
    }
}

async fn connect(config: &tokio_postgres::Config) -> StoreResult<Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        StoreError::Backend(format!(
            "cannot connect to the database: {}",
            db_message(&e)
        ))
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection lost");
        }
    });
    Ok(client)
}

async fn migrate(client: &mut Client) -> Result<(), Fail> {
    let tx = client.transaction().await?;
    // Nodes starting at once wait here for each other; DDL is transactional, so a node that
    // fails half-way leaves nothing behind.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS blindpost_schema (version BIGINT NOT NULL)")
        .await?;
    let current: i64 = match tx
        .query_opt("SELECT version FROM blindpost_schema", &[])
        .await?
    {
        Some(row) => row.try_get(0)?,
        None => {
            tx.execute("INSERT INTO blindpost_schema (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    let known = MIGRATIONS.len();
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > known {
        return Err(StoreError::Backend(format!(
            "database schema version {current} is newer than this server knows ({known})"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await?;
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute("UPDATE blindpost_schema SET version = $1", &[&version])
            .await?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    tx.commit().await?;
    Ok(())
}

/// Where an operation is in its transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No transaction: reads and idempotent single statements, each committing by itself.
    Autocommit,
    /// A transaction not begun yet: this `BEGIN` goes out with the operation's first
    /// statements, in the same round trip.
    Pending(&'static str),
    /// `BEGIN` sent.
    Open,
    /// Committed or rolled back.
    Ended,
}

/// `BEGIN` of an operation whose commit must be durable before it is answered.
const BEGIN: &str = "BEGIN";
/// `BEGIN` of an operation whose effect may be lost in a crash of the database, because the
/// client repeats it: an acknowledgement (a lost one only brings back messages the client
/// has, which it recognises by sequence number and acknowledges again).
const BEGIN_RELAXED: &str = "BEGIN; SET LOCAL synchronous_commit TO off";

/// One operation on a pooled connection: its transaction's phase, the connection's
/// statement cache, the day, and the queues to wake once it commits.
///
/// Statements go out pipelined: [`Tx::send`] puts a transaction's `BEGIN` in the round trip
/// of its first statements, an operation can send several statements before it reads any
/// answer, and [`Tx::commit_with`] sends a last statement and the `COMMIT` together. A post
/// is two round trips instead of seven (ARCHITECTURE.md, "PostgreSQL round trips").
struct Tx<'a> {
    client: &'a Client,
    phase: Phase,
    /// The connection's [`PgConn::in_tx`].
    in_tx: &'a mut bool,
    stmts: &'a mut HashMap<&'static str, Statement>,
    day: Day,
    wake: Vec<QueueId>,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Tx<'_> {
    /// `sql` prepared on this connection (once; then from its cache).
    async fn stmt(&mut self, sql: &'static str) -> Result<Statement, Fail> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    /// Awaits `work`, statements on [`Tx::client`] sent in the order its futures are first
    /// polled, after this transaction's `BEGIN` if that has not gone out yet (in the same
    /// round trip). `BEGIN` fails only with its connection, which fails `work` too.
    async fn send<T>(
        &mut self,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Fail> {
        let Phase::Pending(begin) = self.phase else {
            return Ok(work.await?);
        };
        self.phase = Phase::Open;
        *self.in_tx = true;
        let (_, value) = try_join(self.client.batch_execute(begin), work).await?;
        Ok(value)
    }

    async fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, Fail> {
        let s = self.stmt(sql).await?;
        let client = self.client;
        self.send(client.query(&s, params)).await
    }

    async fn opt(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>, Fail> {
        let s = self.stmt(sql).await?;
        let client = self.client;
        self.send(client.query_opt(&s, params)).await
    }

    async fn one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, Fail> {
        let s = self.stmt(sql).await?;
        let client = self.client;
        self.send(client.query_one(&s, params)).await
    }

    async fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, Fail> {
        let s = self.stmt(sql).await?;
        let client = self.client;
        self.send(client.execute(&s, params)).await
    }

    /// Runs one last statement and commits, both in one round trip (with `BEGIN` too if
    /// nothing went out yet); returns the statement's rows. One statement, so the `COMMIT`
    /// can never take part of the operation's last step: a statement that fails in the
    /// database aborts the transaction, and the `COMMIT` behind it then rolls back; one
    /// that never left (it could not be encoded) leaves only what came before it, which
    /// callers keep to reads.
    async fn commit_with(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, Fail> {
        let s = self.stmt(sql).await?;
        let client = self.client;
        let begin = match self.phase {
            Phase::Autocommit => return self.send(client.query(&s, params)).await,
            Phase::Pending(begin) => Some(begin),
            Phase::Open => None,
            Phase::Ended => {
                return Err(Fail::Store(StoreError::Backend(
                    "a statement after the commit".into(),
                )));
            }
        };
        // A relaxed transaction sent whole in this round trip: an acknowledgement, which the
        // client repeats anyway, so running it again after an unknown outcome is safe.
        let repeatable = begin == Some(BEGIN_RELAXED);
        self.phase = Phase::Ended;
        *self.in_tx = true;
        let (begun, rows, committed) = join3(
            async {
                match begin {
                    Some(begin) => client.batch_execute(begin).await,
                    None => Ok(()),
                }
            },
            client.query(&s, params),
            client.batch_execute("COMMIT"),
        )
        .await;
        match (begun.and(rows), committed) {
            (Ok(rows), Ok(())) => {
                *self.in_tx = false;
                Ok(rows)
            }
            // The database refused a statement, so the transaction aborted: the `COMMIT`
            // rolled it back (or, failing, left the connection to be discarded).
            (Err(e), committed) if e.as_db_error().is_some() => {
                *self.in_tx = committed.is_err();
                Err(Fail::Db(e))
            }
            // The connection ended (a database restart or failover found a pooled connection
            // dead) before the outcome was known: only a repeatable transaction runs again.
            (Err(e), _) | (Ok(_), Err(e)) if repeatable && e.is_closed() => Err(Fail::Db(e)),
            (Err(e), _) | (Ok(_), Err(e)) => Err(commit_failed(&e)),
        }
    }

    /// Commits (an open transaction) or does nothing (autocommit, nothing sent, or already
    /// committed by [`Tx::commit_with`]). A failure is never retryable: whether a failed
    /// `COMMIT` took effect is unknown.
    async fn commit(&mut self) -> Result<(), Fail> {
        if self.phase != Phase::Open {
            return Ok(());
        }
        self.phase = Phase::Ended;
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| commit_failed(&e))?;
        *self.in_tx = false;
        Ok(())
    }

    async fn rollback(&mut self) {
        if self.phase == Phase::Open {
            self.phase = Phase::Ended;
            if self.client.batch_execute("ROLLBACK").await.is_ok() {
                *self.in_tx = false;
            }
        }
    }

    /// Tells every listening node that `queues` have new messages, once this commits.
    fn notify(&mut self, queues: &[QueueId]) {
        self.wake.extend_from_slice(queues);
    }
}

/// `node:hexid,hexid,…` notification payloads naming `queues`, each below PostgreSQL's limit.
fn wake_payloads(node: &str, queues: &[QueueId]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::new();
    for q in queues {
        if payload.is_empty() {
            payload.push_str(node);
            payload.push(':');
        } else {
            payload.push(',');
        }
        payload.push_str(&hex::encode(q.as_bytes()));
        if payload.len() > MAX_NOTIFY_PAYLOAD {
            payloads.push(std::mem::take(&mut payload));
        }
    }
    if !payload.is_empty() {
        payloads.push(payload);
    }
    payloads
}

/// The notifier task: sends the wake-ups of committed transactions, all that gathered since the
/// last round in one go, until the store is dropped. Its own connection, not a pooled one: under
/// load every pooled connection is busy and wake-ups waited behind operations (p99 across two
/// nodes 145–191 ms against 98–101 ms before). It does not wait for its commits to be flushed
/// (`synchronous_commit` off): a wake-up carries no data. A round that fails keeps its queues
/// for the next, which waits with back-off (as the listener does) and connects again; a
/// failure is logged once, not every round.
async fn notify_loop(mut config: tokio_postgres::Config, node: String, wakes: Arc<Wakes>) {
    config.application_name("blindpostd-notify");
    let mut link: Option<(Client, Statement)> = None;
    let mut last_round = tokio::time::Instant::now();
    let mut backoff: Option<Duration> = None;
    loop {
        wakes.ready.notified().await;
        // Closing: what is pending goes out at once (one try), then the task ends.
        let closing = wakes.closed.load(std::sync::atomic::Ordering::SeqCst);
        if !closing {
            // At most one round per `NOTIFY_EVERY`, or per back-off after a failure: each round
            // is a transaction, and every listening backend wakes for it.
            tokio::time::sleep_until(last_round + backoff.unwrap_or(NOTIFY_EVERY)).await;
        }
        last_round = tokio::time::Instant::now();
        let queues = wakes.take();
        if queues.is_empty() {
            if closing {
                return;
            }
            continue;
        }
        match send_round(&config, &mut link, &node, &queues).await {
            Ok(()) => {
                if backoff.take().is_some() {
                    tracing::info!("sending wake-ups to other nodes again");
                }
            }
            Err(e) => {
                link = None;
                if backoff.is_none() {
                    tracing::warn!(error = %e, "cannot send wake-ups to other nodes; retrying");
                }
                backoff = Some(backoff.map_or(Duration::from_millis(100), |b| {
                    (b * 2).min(LISTEN_MAX_BACKOFF)
                }));
                wakes.put_back(queues);
                // Come round again even if nothing new is committed.
                wakes.ready.notify_one();
            }
        }
        if closing {
            return;
        }
    }
}

/// One round: connects first if needed, then sends every payload naming `queues`.
async fn send_round(
    config: &tokio_postgres::Config,
    link: &mut Option<(Client, Statement)>,
    node: &str,
    queues: &[QueueId],
) -> Result<(), String> {
    let (client, notify) = match link {
        Some(open) if !open.0.is_closed() => open,
        _ => link.insert(notifier_link(config).await?),
    };
    for payload in wake_payloads(node, queues) {
        client
            .execute(notify, &[&CHANNEL, &payload])
            .await
            .map_err(|e| db_message(&e))?;
    }
    Ok(())
}

async fn notifier_link(config: &tokio_postgres::Config) -> Result<(Client, Statement), String> {
    let client = connect(config).await.map_err(|e| e.to_string())?;
    client
        .batch_execute("SET synchronous_commit TO off")
        .await
        .map_err(|e| db_message(&e))?;
    let notify = client
        .prepare(NOTIFY_SQL)
        .await
        .map_err(|e| db_message(&e))?;
    Ok((client, notify))
}

/// Runs `$body` (an expression using the `Tx` named `$tx`) in a transaction of its own and
/// commits; with `autocommit`, runs it without one (only for reads and idempotent single
/// statements: a lost connection makes it run again); with `relaxed`, in a transaction whose
/// commit does not wait for the database's disk ([`BEGIN_RELAXED`]: only for what the
/// client repeats). Runs it again from scratch after a deadlock, a unique-key race or a dead
/// connection, never after a failed `COMMIT`.
macro_rules! transact {
    ($store:expr, |$tx:ident| $body:expr) => {
        transact!(@run $store, Phase::Pending(BEGIN), |$tx| $body)
    };
    ($store:expr, relaxed |$tx:ident| $body:expr) => {
        transact!(@run $store, Phase::Pending(BEGIN_RELAXED), |$tx| $body)
    };
    ($store:expr, autocommit |$tx:ident| $body:expr) => {
        transact!(@run $store, Phase::Autocommit, |$tx| $body)
    };
    (@run $store:expr, $phase:expr, |$tx:ident| $body:expr) => {
        Box::pin(async move {
            let store = $store;
            let mut attempt = 0;
            loop {
                let mut conn = store.pool.get().await?;
                let PgConn { client, stmts, in_tx } = &mut *conn;
                #[allow(unused_mut)]
                let mut $tx = Tx {
                    client: &*client,
                    phase: $phase,
                    in_tx,
                    stmts,
                    day: (store.clock)(),
                    wake: Vec::new(),
                };
                let outcome = match $body.await {
                    Ok(value) => {
                        let wake = std::mem::take(&mut $tx.wake);
                        $tx.commit().await.map(|()| {
                            store.wakes.add(wake);
                            value
                        })
                    }
                    Err(e) => {
                        $tx.rollback().await;
                        Err(e)
                    }
                };
                match outcome {
                    Ok(value) => return Ok(value),
                    Err(e) if e.retryable() && attempt < MAX_RETRIES => {
                        attempt += 1;
                        if e.connection_lost() {
                            // A database restart kills every pooled connection: reconnect.
                            if let Ok(mut idle) = store.pool.idle.lock() {
                                idle.clear();
                            }
                        }
                        tracing::debug!(attempt, error = %e.into_store(), "retrying an operation");
                    }
                    Err(e) => return Err(e.into_store()),
                }
            }
        })
    };
}

// ---------------------------------------------------------------------------------------------
// Operations

fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

fn hash_from_sql(bytes: &[u8]) -> Result<SecretHash, Fail> {
    <[u8; 32]>::try_from(bytes)
        .map(SecretHash::from_bytes)
        .map_err(|_| bad_row("hash length"))
}

fn queue_from_sql(bytes: &[u8]) -> Result<QueueId, Fail> {
    QueueId::parse(bytes).map_err(|_| bad_row("queue id"))
}

/// Appends `payload` to each of `queues` that still exists, in one statement; returns the
/// queues it went to.
async fn append_many(
    tx: &mut Tx<'_>,
    queues: &[Vec<u8>],
    payload: &[u8],
) -> Result<Vec<Appended>, Fail> {
    if queues.is_empty() {
        return Ok(Vec::new());
    }
    let day = tx.day;
    let rows = tx
        .query(
            append_form(append_statements!("WHERE id = ANY($1)"), payload),
            &[&queues, &payload, &day],
        )
        .await?;
    rows.iter().map(appended_from_row).collect()
}

/// One `RETURNING queue_id, seq` row of an append.
fn appended_from_row(row: &tokio_postgres::Row) -> Result<Appended, Fail> {
    Ok(Appended {
        queue: queue_from_sql(row.try_get::<_, &[u8]>(0)?)?,
        seq: seq_from_sql(row.try_get(1)?),
    })
}

/// `append_statements!`'s target for every route of group `$1` but the queues in `$4`.
macro_rules! group_routes {
    () => {
        "WHERE id IN (SELECT queue_id FROM routes WHERE group_id = $1) AND NOT (id = ANY($4))"
    };
}

/// A post's append to its group's routes ([`group_routes`]), in the same statement as the
/// rest of its writes: the group's latest message ids become `$5`, and the ids moving out of
/// it (`$6`, if any) become the group's chunk number `$7`, its new counter. One statement, so
/// [`Tx::commit_with`] can send it with the `COMMIT`.
const POST_STATEMENTS: [&str; 2] = append_statements!(
    group_routes!(),
    ", g AS (
        UPDATE groups SET recent_posts = $5, posted_n = $7,
            last_used_day = GREATEST(last_used_day, $3)
        WHERE id = $1
     ), h AS (
        INSERT INTO posted_chunks (group_id, n, ids, day)
        SELECT $1, $7, $6::BYTEA, $3 WHERE $6::BYTEA IS NOT NULL
     )"
);

/// The group's latest `$3` ([`super::RESEND_CHUNKS`]) chunks that hold a post's id's bytes
/// somewhere; [`recent_posts::contains`] keeps only a whole id's match.
const CHUNKS_HOLDING: &str = "SELECT ids FROM posted_chunks
     WHERE group_id = $1 AND n > (SELECT posted_n FROM groups WHERE id = $1) - $3
       AND position($2 IN ids) > 0";

/// Appends `payload` to every route of `group` but those in `skip`, in one statement; returns
/// where it landed.
async fn append_to_routes(
    tx: &mut Tx<'_>,
    group: &GroupId,
    payload: &[u8],
    skip: &[QueueId],
) -> Result<Vec<Appended>, Fail> {
    let day = tx.day;
    let skip: Vec<&[u8]> = skip.iter().map(|q| q.as_bytes()).collect();
    let rows = tx
        .query(
            append_form(append_statements!(group_routes!()), payload),
            &[&group.as_bytes(), &payload, &day, &skip],
        )
        .await?;
    rows.iter().map(appended_from_row).collect()
}

/// The queues an append goes to, for [`check_room`].
enum Room<'a> {
    /// Every route of a group.
    Routes(&'a GroupId),
    /// These queues.
    Queues(&'a [Vec<u8>]),
}

/// The pending bytes of every route of group `$1`, as `(queue, bytes)` rows.
const ROUTES_ROOM: &str = concat!(
    "SELECT q.id, ",
    pending_bytes!(),
    " FROM routes r JOIN queues q ON q.id = r.queue_id WHERE r.group_id = $1"
);

/// Refused with `LimitExceeded(QueueBytes)` if any queue of `room` (but those `exempt`)
/// would hold more than `max` pending payload bytes after an append of `len` bytes. Returns
/// the queues of `room` that were exempt.
async fn check_room(
    tx: &mut Tx<'_>,
    room: Room<'_>,
    len: usize,
    max: u64,
    exempt: impl Fn(&QueueId) -> bool,
) -> Result<Vec<QueueId>, Fail> {
    let rows = match room {
        Room::Routes(group) => tx.query(ROUTES_ROOM, &[&group.as_bytes()]).await?,
        Room::Queues(queues) => {
            tx.query(
                concat!(
                    "SELECT q.id, ",
                    pending_bytes!(),
                    " FROM queues q WHERE q.id = ANY($1)"
                ),
                &[&queues],
            )
            .await?
        }
    };
    room_checked(&rows, len, max, exempt)
}

/// [`check_room`]'s verdict on its `(queue, bytes)` rows.
fn room_checked(
    rows: &[Row],
    len: usize,
    max: u64,
    exempt: impl Fn(&QueueId) -> bool,
) -> Result<Vec<QueueId>, Fail> {
    let mut exempted = Vec::new();
    for row in rows {
        let queue = queue_from_sql(row.try_get::<_, &[u8]>(0)?)?;
        let pending = u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0);
        if exempt(&queue) {
            exempted.push(queue);
        } else if pending.saturating_add(len as u64) > max {
            return Err(Refusal::LimitExceeded(Limit::QueueBytes).into());
        }
    }
    Ok(exempted)
}

/// Locks a group's row and reads what [`group_checked`] checks.
const GROUP_FOR_UPDATE: &str = "SELECT epoch, posting_token_hash, recent_posts, posted_n
     FROM groups WHERE id = $1 FOR UPDATE";

/// Locks the group row and checks epoch (first) and posting token (second).
async fn check_group(
    tx: &mut Tx<'_>,
    group: &GroupId,
    epoch: u64,
    token: &SecretHash,
) -> Result<GroupRow, Fail> {
    let row = tx.opt(GROUP_FOR_UPDATE, &[&group.as_bytes()]).await?;
    group_checked(row, epoch, token)
}

/// [`check_group`]'s verdict on the group's row.
fn group_checked(row: Option<Row>, epoch: u64, token: &SecretHash) -> Result<GroupRow, Fail> {
    let Some(row) = row else {
        return Err(Refusal::NotFound(Entity::Group).into());
    };
    let current = seq_from_sql(row.try_get(0)?);
    if current != epoch {
        return Err(Refusal::StaleEpoch {
            current_epoch: current,
        }
        .into());
    }
    if !hash_from_sql(row.try_get(1)?)?.matches(token) {
        return Err(Refusal::Forbidden(Credential::PostingToken).into());
    }
    Ok(GroupRow {
        epoch: current,
        recent: row.try_get(2)?,
        posted_n: row.try_get(3)?,
    })
}

/// A queue's receive-secret hash, send-token hash and next sequence number.
async fn queue_hashes(
    tx: &mut Tx<'_>,
    queue: &QueueId,
) -> Result<Option<(SecretHash, SecretHash, i64)>, Fail> {
    let row = tx
        .opt(
            "SELECT receive_secret_hash, send_token_hash, next_seq FROM queues WHERE id = $1",
            &[&queue.as_bytes()],
        )
        .await?;
    row.map(|r| {
        Ok((
            hash_from_sql(r.try_get(0)?)?,
            hash_from_sql(r.try_get(1)?)?,
            r.try_get(2)?,
        ))
    })
    .transpose()
}

async fn check_route(tx: &mut Tx<'_>, grant: &RouteGrant) -> Result<(), Fail> {
    match queue_hashes(tx, &grant.queue_id).await? {
        None => Err(Refusal::NotFound(Entity::Queue).into()),
        Some((_, send, _)) if send.matches(&grant.send_token_hash) => Ok(()),
        Some(_) => Err(Refusal::Forbidden(Credential::SendToken).into()),
    }
}

async fn op_create_queue(tx: &mut Tx<'_>, q: &NewQueue) -> Result<(), Fail> {
    let day = tx.day;
    let inserted = tx
        .exec(
            "INSERT INTO queues (id, receive_secret_hash, send_token_hash, next_seq, created_day, last_used_day, appended_bytes)
             VALUES ($1, $2, $3, 1, $4, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[
                &q.id.as_bytes(),
                &q.receive_secret_hash.as_bytes(),
                &q.send_token_hash.as_bytes(),
                &day,
                &offsets::random_base()?,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(Refusal::Conflict(ConflictKind::QueueExists).into());
    }
    Ok(())
}

async fn op_authenticate_queue(
    tx: &mut Tx<'_>,
    queue: &QueueId,
    secret: &SecretHash,
) -> Result<u64, Fail> {
    let Some((receive, _, next_seq)) = queue_hashes(tx, queue).await? else {
        return Err(Refusal::NotFound(Entity::Queue).into());
    };
    if !receive.matches(secret) {
        return Err(Refusal::Forbidden(Credential::ReceiveSecret).into());
    }
    let day = tx.day;
    tx.exec(
        "UPDATE queues SET last_used_day = $2 WHERE id = $1 AND last_used_day < $2",
        &[&queue.as_bytes(), &day],
    )
    .await?;
    Ok(seq_from_sql(next_seq - 1))
}

async fn op_delete_queue(
    tx: &mut Tx<'_>,
    queue: &QueueId,
    secret: &SecretHash,
) -> Result<(), Fail> {
    let Some((receive, _, _)) = queue_hashes(tx, queue).await? else {
        return Err(Refusal::NotFound(Entity::Queue).into());
    };
    if !receive.matches(secret) {
        return Err(Refusal::Forbidden(Credential::ReceiveSecret).into());
    }
    let id = queue.as_bytes();
    tx.exec("DELETE FROM messages WHERE queue_id = $1", &[&id])
        .await?;
    tx.exec("DELETE FROM routes WHERE queue_id = $1", &[&id])
        .await?;
    tx.exec("DELETE FROM queues WHERE id = $1", &[&id]).await?;
    Ok(())
}

async fn op_create_group(tx: &mut Tx<'_>, g: &NewGroup) -> Result<(), Fail> {
    let day = tx.day;
    let epoch = seq_to_sql(g.epoch);
    let inserted = tx
        .exec(
            "INSERT INTO groups (id, epoch, posting_token_hash, created_day, last_used_day, posted_n)
             VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[
                &g.id.as_bytes(),
                &epoch,
                &g.posting_token_hash.as_bytes(),
                &day,
                &offsets::random_base()?,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(Refusal::Conflict(ConflictKind::GroupExists).into());
    }
    for grant in &g.routes {
        check_route(tx, grant).await?;
        tx.exec(
            "INSERT INTO routes (group_id, queue_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&g.id.as_bytes(), &grant.queue_id.as_bytes()],
        )
        .await?;
    }
    Ok(())
}

async fn op_commit(tx: &mut Tx<'_>, c: &CommitOp) -> Result<Committed, Fail> {
    let epoch = check_group(tx, &c.group_id, c.epoch, &c.posting_token_hash)
        .await?
        .epoch;
    let next_epoch = epoch.checked_add(1).ok_or(Refusal::StaleEpoch {
        current_epoch: epoch,
    })?;
    for grant in &c.add_routes {
        check_route(tx, grant).await?;
    }
    let gid = c.group_id.as_bytes();
    // The commit reaches every current route, removed ones included (exempt from the queue
    // size limit, so a full queue cannot block its own removal).
    check_room(
        tx,
        Room::Routes(&c.group_id),
        c.commit.len(),
        c.max_queue_bytes,
        |q| c.remove_routes.contains(q),
    )
    .await?;
    let mut appended: Vec<QueueId> = append_to_routes(tx, &c.group_id, &c.commit, &[])
        .await?
        .into_iter()
        .map(|a| a.queue)
        .collect();
    let removed: Vec<&[u8]> = c.remove_routes.iter().map(|q| q.as_bytes()).collect();
    tx.exec(
        "DELETE FROM routes WHERE group_id = $1 AND queue_id = ANY($2)",
        &[&gid, &removed],
    )
    .await?;
    let added: Vec<Vec<u8>> = c
        .add_routes
        .iter()
        .map(|g| g.queue_id.as_bytes().to_vec())
        .collect();
    tx.exec(
        "INSERT INTO routes (group_id, queue_id) SELECT $1, unnest($2::BYTEA[])
         ON CONFLICT DO NOTHING",
        &[&gid, &added],
    )
    .await?;
    let routes: i64 = tx
        .one("SELECT COUNT(*) FROM routes WHERE group_id = $1", &[&gid])
        .await?
        .try_get(0)?;
    if usize::try_from(routes).unwrap_or(usize::MAX) > c.max_routes.min(MAX_GROUP_ROUTES) {
        return Err(Refusal::LimitExceeded(Limit::GroupRoutes).into());
    }
    if let Some(welcome) = &c.welcome {
        check_room(
            tx,
            Room::Queues(&added),
            welcome.len(),
            c.max_queue_bytes,
            |_| false,
        )
        .await?;
        appended.extend(
            append_many(tx, &added, welcome)
                .await?
                .into_iter()
                .map(|a| a.queue),
        );
    }
    let day = tx.day;
    tx.exec(
        "UPDATE groups SET epoch = $2, posting_token_hash = $3, last_used_day = $4 WHERE id = $1",
        &[
            &gid,
            &seq_to_sql(next_epoch),
            &c.next_posting_token_hash.as_bytes(),
            &day,
        ],
    )
    .await?;
    dedup(&mut appended);
    tx.notify(&appended);
    Ok(Committed {
        epoch: next_epoch,
        appended,
    })
}

fn dedup(queues: &mut Vec<QueueId>) {
    let mut seen = std::collections::HashSet::with_capacity(queues.len());
    queues.retain(|q| seen.insert(*q));
}

/// A retry of a stored post is a duplicate. The group row's lock (`GROUP_FOR_UPDATE`) makes
/// posts to a group read and write `recent_posts` and its chunks one at a time. Two round
/// trips: the lock and every read (behind the `BEGIN`), then the writes with the `COMMIT`.
/// Only a post whose id is not fresh reads the group's chunks; that scan holds up only posts
/// to its own group (the row lock), not other groups' as it would SQLite's one writer.
async fn op_post(tx: &mut Tx<'_>, p: &PostOp) -> Result<Posted, Fail> {
    let gid = p.group_id.as_bytes();
    let mid = p.message_id.as_bytes();
    let lock = tx.stmt(GROUP_FOR_UPDATE).await?;
    let chunks = match p.fresh_id {
        true => None,
        false => Some(tx.stmt(CHUNKS_HOLDING).await?),
    };
    let room = tx.stmt(ROUTES_ROOM).await?;
    let client = tx.client;
    // In this order: the statements after the lock run once it is held (each query is
    // queued when its future is first polled, and `try_join3` polls in order).
    let (group, chunks, room) = tx
        .send(try_join3(
            client.query_opt(&lock, &[&gid]),
            async {
                match &chunks {
                    Some(holding) => {
                        client
                            .query(holding, &[&gid, &mid, &super::RESEND_CHUNKS])
                            .await
                    }
                    None => Ok(Vec::new()),
                }
            },
            client.query(&room, &[&gid]),
        ))
        .await?;
    let group = group_checked(group, p.epoch, &p.posting_token_hash)?;
    if recent_posts::contains(&group.recent, &p.message_id) {
        return Ok(Posted::Duplicate);
    }
    for chunk in &chunks {
        if recent_posts::contains(chunk.try_get(0)?, &p.message_id) {
            return Ok(Posted::Duplicate);
        }
    }
    // Only the group's routes among the connection's queues go back to the database, not
    // every queue the connection holds (up to thousands).
    let skip = room_checked(&room, p.payload.len(), p.max_queue_bytes, |q| {
        p.skip.contains(q)
    })?;
    let skip: Vec<&[u8]> = skip.iter().map(|q| q.as_bytes()).collect();
    let (recent, moved) = recent_posts::record(&group.recent, &p.message_id);
    // Starts below 2^62 (`offsets::random_base`) and grows by one per 32 posts: it cannot
    // reach `i64::MAX`.
    let posted_n = group.posted_n + i64::from(moved.is_some());
    let day = tx.day;
    let payload: &[u8] = &p.payload;
    let rows = tx
        .commit_with(
            append_form(POST_STATEMENTS, payload),
            &[&gid, &payload, &day, &skip, &recent, &moved, &posted_n],
        )
        .await?;
    let appended = rows
        .iter()
        .map(appended_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let queues: Vec<QueueId> = appended.iter().map(|a| a.queue).collect();
    tx.notify(&queues);
    Ok(Posted::Stored { appended })
}

async fn box_count(tx: &mut Tx<'_>, box_id: &BoxId) -> Result<u32, Fail> {
    let n: i64 = tx
        .one(
            "SELECT COUNT(*) FROM key_packages WHERE box_id = $1",
            &[&box_id.as_bytes()],
        )
        .await?
        .try_get(0)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// A box's secret hash and whether it has a last-resort package; `lock` locks its row.
async fn box_row(
    tx: &mut Tx<'_>,
    box_id: &BoxId,
    lock: bool,
) -> Result<Option<(SecretHash, bool)>, Fail> {
    let sql = if lock {
        "SELECT secret_hash, last_resort IS NOT NULL FROM key_package_boxes WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT secret_hash, last_resort IS NOT NULL FROM key_package_boxes WHERE id = $1"
    };
    let row = tx.opt(sql, &[&box_id.as_bytes()]).await?;
    row.map(|r| Ok((hash_from_sql(r.try_get(0)?)?, r.try_get(1)?)))
        .transpose()
}

async fn op_publish(tx: &mut Tx<'_>, p: &PublishOp) -> Result<KeyPackageCount, Fail> {
    let bid = p.box_id.as_bytes();
    let day = tx.day;
    match box_row(tx, &p.box_id, true).await? {
        None => {
            // A concurrent first publish of the same box makes this a unique-key race,
            // which the retry loop runs again (and then finds the row).
            tx.exec(
                "INSERT INTO key_package_boxes (id, secret_hash, last_resort, created_day, last_used_day)
                 VALUES ($1, $2, NULL, $3, $3)",
                &[&bid, &p.secret_hash.as_bytes(), &day],
            )
            .await?;
        }
        Some((hash, _)) if hash.matches(&p.secret_hash) => {}
        Some(_) => return Err(Refusal::Forbidden(Credential::BoxSecret).into()),
    }
    let existing = box_count(tx, &p.box_id).await? as usize;
    if existing + p.key_packages.len() > p.max_one_time {
        return Err(Refusal::LimitExceeded(Limit::KeyPackages).into());
    }
    let next: i64 = tx
        .one(
            "SELECT COALESCE(MAX(n), 0) + 1 FROM key_packages WHERE box_id = $1",
            &[&bid],
        )
        .await?
        .try_get(0)?;
    for (n, kp) in (next..).zip(&p.key_packages) {
        tx.exec(
            "INSERT INTO key_packages (box_id, n, data) VALUES ($1, $2, $3)",
            &[&bid, &n, kp],
        )
        .await?;
    }
    if let Some(lr) = &p.last_resort {
        tx.exec(
            "UPDATE key_package_boxes SET last_resort = $2 WHERE id = $1",
            &[&bid, lr],
        )
        .await?;
    }
    tx.exec(
        "UPDATE key_package_boxes SET last_used_day = $2 WHERE id = $1 AND last_used_day < $2",
        &[&bid, &day],
    )
    .await?;
    let (_, has_last_resort) = box_row(tx, &p.box_id, false)
        .await?
        .ok_or(Refusal::NotFound(Entity::KeyPackageBox))?;
    Ok(KeyPackageCount {
        one_time: box_count(tx, &p.box_id).await?,
        has_last_resort,
    })
}

async fn op_claim(tx: &mut Tx<'_>, box_id: &BoxId) -> Result<ClaimedKeyPackage, Fail> {
    let bid = box_id.as_bytes();
    let day = tx.day;
    // No row lock on the box: claims on one box from many nodes proceed in parallel.
    let Some(row) = tx
        .opt(
            "SELECT last_resort FROM key_package_boxes WHERE id = $1",
            &[&bid],
        )
        .await?
    else {
        return Err(Refusal::NotFound(Entity::KeyPackageBox).into());
    };
    let last_resort: Option<Vec<u8>> = row.try_get(0)?;
    // Each claimer deletes a package nobody else holds a lock on: never one twice.
    let one_time = tx
        .opt(
            "DELETE FROM key_packages WHERE (box_id, n) = (
                SELECT box_id, n FROM key_packages WHERE box_id = $1
                ORDER BY n LIMIT 1 FOR UPDATE SKIP LOCKED
             ) RETURNING data",
            &[&bid],
        )
        .await?;
    tx.exec(
        "UPDATE key_package_boxes SET last_used_day = $2 WHERE id = $1 AND last_used_day < $2",
        &[&bid, &day],
    )
    .await?;
    if let Some(row) = one_time {
        return Ok(ClaimedKeyPackage {
            data: row.try_get(0)?,
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

async fn op_register_user(tx: &mut Tx<'_>, u: &UserRecord) -> Result<(), Fail> {
    let stored = tx
        .opt(
            "SELECT identity_key, version FROM users WHERE username = $1 FOR UPDATE",
            &[&u.username],
        )
        .await?;
    let version = seq_to_sql(u.version);
    let Some(row) = stored else {
        // Two first registrations at once: the loser hits the unique key, is run again and
        // then sees the winner's row.
        tx.exec(
            "INSERT INTO users (username, identity_key, version, entry, signature)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &u.username,
                &&u.identity_key[..],
                &version,
                &u.entry,
                &u.signature,
            ],
        )
        .await?;
        return queue_for_publication(tx, u).await;
    };
    let key: &[u8] = row.try_get(0)?;
    let old: i64 = row.try_get(1)?;
    if key != u.identity_key.as_slice() {
        return Err(Refusal::Conflict(ConflictKind::UsernameTaken).into());
    }
    if old >= version {
        return Err(Refusal::Conflict(ConflictKind::VersionNotIncreased).into());
    }
    tx.exec(
        "UPDATE users SET version = $2, entry = $3, signature = $4 WHERE username = $1",
        &[&u.username, &version, &u.entry, &u.signature],
    )
    .await?;
    queue_for_publication(tx, u).await
}

/// Queues an accepted entry for the next key-transparency epoch, in the registration's
/// transaction.
async fn queue_for_publication(tx: &mut Tx<'_>, u: &UserRecord) -> Result<(), Fail> {
    tx.exec(
        "INSERT INTO kt_pending (username, version, entry, signature) VALUES ($1, $2, $3, $4)",
        &[&u.username, &seq_to_sql(u.version), &u.entry, &u.signature],
    )
    .await?;
    Ok(())
}

async fn read_fetch(
    tx: &mut Tx<'_>,
    queue: &QueueId,
    after_seq: u64,
    limit: FetchLimit,
) -> Result<Fetched, Fail> {
    let after = seq_to_sql(after_seq);
    let qid = queue.as_bytes();
    // Sizes first, so payloads beyond the byte budget are never loaded.
    let sizes = tx
        .query(
            concat!(
                "SELECT m.seq, (",
                body_len!(),
                ")::BIGINT FROM messages m
                 WHERE m.queue_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"
            ),
            &[&qid, &after, &(i64::from(limit.max_messages) + 1)],
        )
        .await?;
    let (mut count, mut bytes, mut last, mut more) = (0u32, 0usize, None, false);
    for row in &sizes {
        let seq: i64 = row.try_get(0)?;
        let len = usize::try_from(row.try_get::<_, i64>(1)?).unwrap_or(usize::MAX);
        if count >= limit.max_messages || (count > 0 && bytes.saturating_add(len) > limit.max_bytes)
        {
            more = true;
            break;
        }
        count += 1;
        bytes = bytes.saturating_add(len);
        last = Some(seq);
    }
    let Some(last) = last else {
        return Ok(Fetched::default());
    };
    let rows = tx
        .query(
            "SELECT m.seq, CASE WHEN m.shared IS NULL THEN m.payload
                 ELSE (SELECT data FROM payloads WHERE id = m.shared) END
             FROM messages m WHERE m.queue_id = $1 AND m.seq > $2 AND m.seq <= $3
             ORDER BY m.seq",
            &[&qid, &after, &last],
        )
        .await?;
    let messages = rows
        .iter()
        .map(|r| {
            Ok(StoredMessage {
                seq: seq_from_sql(r.try_get(0)?),
                payload: r.try_get(1)?,
            })
        })
        .collect::<Result<_, Fail>>()?;
    Ok(Fetched { messages, more })
}

async fn read_status(
    tx: &mut Tx<'_>,
    box_id: &BoxId,
    secret: &SecretHash,
) -> Result<KeyPackageCount, Fail> {
    let Some((hash, has_last_resort)) = box_row(tx, box_id, false).await? else {
        return Err(Refusal::NotFound(Entity::KeyPackageBox).into());
    };
    if !hash.matches(secret) {
        return Err(Refusal::Forbidden(Credential::BoxSecret).into());
    }
    Ok(KeyPackageCount {
        one_time: box_count(tx, box_id).await?,
        has_last_resort,
    })
}

async fn read_user(tx: &mut Tx<'_>, username: &str) -> Result<Option<UserRecord>, Fail> {
    let row = tx
        .opt(
            "SELECT identity_key, version, entry, signature FROM users WHERE username = $1",
            &[&username],
        )
        .await?;
    row.map(|r| {
        let key: &[u8] = r.try_get(0)?;
        Ok(UserRecord {
            username: username.to_owned(),
            identity_key: <[u8; 32]>::try_from(key).map_err(|_| bad_row("identity key"))?,
            version: seq_from_sql(r.try_get(1)?),
            entry: r.try_get(2)?,
            signature: r.try_get(3)?,
        })
    })
    .transpose()
}

async fn op_expire(tx: &mut Tx<'_>, expiry: &Expiry) -> Result<Expired, Fail> {
    let messages = tx
        .exec(
            "DELETE FROM messages WHERE day < $1",
            &[&expiry.messages_before],
        )
        .await?;
    let bytes: i64 = tx
        .one(
            "WITH d AS (DELETE FROM posted_chunks WHERE day < $1 RETURNING octet_length(ids) AS n)
             SELECT COALESCE(SUM(n), 0)::BIGINT FROM d",
            &[&expiry.posted_ids_before],
        )
        .await?
        .try_get(0)?;
    let posted_ids = u64::try_from(bytes).unwrap_or(0) / MessageId::LEN as u64;
    Ok(Expired {
        messages,
        posted_ids,
    })
}

// ---------------------------------------------------------------------------------------------
// The traits

impl Store for PgStore {
    fn create_queue(&self, queue: NewQueue) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_create_queue(&mut tx, &queue))
    }

    fn authenticate_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, u64> {
        transact!(self, |tx| op_authenticate_queue(
            &mut tx,
            &queue_id,
            &receive_secret_hash
        ))
    }

    fn fetch(
        &self,
        queue_id: QueueId,
        after_seq: u64,
        limit: FetchLimit,
    ) -> StoreFuture<'_, Fetched> {
        transact!(
            self,
            autocommit | tx | read_fetch(&mut tx, &queue_id, after_seq, limit)
        )
    }

    /// `BEGIN`, the delete and `COMMIT` in one round trip, and the commit does not wait for
    /// the database's disk: a crash of the database may bring the messages back, and the
    /// client, which has them, skips and acknowledges them again (ARCHITECTURE.md).
    fn ack(&self, queue_id: QueueId, up_to_seq: u64) -> StoreFuture<'_, ()> {
        transact!(
            self,
            relaxed
                | tx
                | async {
                    tx.commit_with(
                        "DELETE FROM messages WHERE queue_id = $1 AND seq <= $2",
                        &[&queue_id.as_bytes(), &seq_to_sql(up_to_seq)],
                    )
                    .await
                    .map(|_| ())
                }
        )
    }

    fn delete_queue(
        &self,
        queue_id: QueueId,
        receive_secret_hash: SecretHash,
    ) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_delete_queue(
            &mut tx,
            &queue_id,
            &receive_secret_hash
        ))
    }

    fn create_group(&self, group: NewGroup) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_create_group(&mut tx, &group))
    }

    fn commit(&self, commit: CommitOp) -> StoreFuture<'_, Committed> {
        transact!(self, |tx| op_commit(&mut tx, &commit))
    }

    fn post(&self, post: PostOp) -> StoreFuture<'_, Posted> {
        transact!(self, |tx| op_post(&mut tx, &post))
    }

    fn publish_key_packages(&self, publish: PublishOp) -> StoreFuture<'_, KeyPackageCount> {
        transact!(self, |tx| op_publish(&mut tx, &publish))
    }

    fn claim_key_package(&self, box_id: BoxId) -> StoreFuture<'_, ClaimedKeyPackage> {
        transact!(self, |tx| op_claim(&mut tx, &box_id))
    }

    fn key_package_status(
        &self,
        box_id: BoxId,
        secret_hash: SecretHash,
    ) -> StoreFuture<'_, KeyPackageCount> {
        transact!(
            self,
            autocommit | tx | read_status(&mut tx, &box_id, &secret_hash)
        )
    }

    fn expire(&self, expiry: Expiry) -> StoreFuture<'_, Expired> {
        transact!(self, |tx| op_expire(&mut tx, &expiry))
    }

    fn health_check(&self) -> StoreFuture<'_, ()> {
        transact!(
            self,
            autocommit | tx | async { tx.one("SELECT 1", &[]).await.map(|_| ()) }
        )
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // Wait for every operation in flight (each holds a permit), then refuse new ones.
            let all = u32::try_from(POOL_SIZE).unwrap_or(u32::MAX);
            if let Ok(permits) = self.pool.permits.acquire_many(all).await {
                self.pool.permits.close();
                drop(permits);
            }
            // Every commit is done: send the last wake-ups.
            self.wakes.close();
            let notifier = self.notifier.lock().ok().and_then(|mut n| n.take());
            if let Some(notifier) = notifier
                && tokio::time::timeout(Duration::from_secs(5), notifier)
                    .await
                    .is_err()
            {
                tracing::warn!("the last wake-ups to other nodes were not sent in time");
            }
            if let Ok(mut idle) = self.pool.idle.lock() {
                idle.clear();
            }
            Ok(())
        })
    }
}

impl DirectoryStore for PgStore {
    fn lookup_user(&self, username: String) -> StoreFuture<'_, Option<UserRecord>> {
        transact!(self, autocommit | tx | read_user(&mut tx, &username))
    }

    fn register_user(&self, record: UserRecord) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_register_user(&mut tx, &record))
    }
}

// ---------------------------------------------------------------------------------------------
// Key transparency

fn root_from_row(row: &Row) -> Result<EpochRoot, Fail> {
    let hash: &[u8] = row.try_get(1)?;
    Ok(EpochRoot {
        epoch: seq_from_sql(row.try_get(0)?),
        root_hash: <[u8; 32]>::try_from(hash).map_err(|_| bad_row("root hash length"))?,
        signature: row.try_get(2)?,
    })
}

async fn op_akd_write(
    tx: &mut Tx<'_>,
    nodes: &[AkdNodeRow],
    values: &[AkdValueRow],
) -> Result<(), Fail> {
    for n in nodes {
        tx.exec(
            "INSERT INTO akd_nodes (key, data) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data",
            &[&n.key, &n.data],
        )
        .await?;
    }
    for v in values {
        tx.exec(
            "INSERT INTO akd_values (label, epoch, version, data) VALUES ($1, $2, $3, $4)
             ON CONFLICT (label, epoch) DO UPDATE SET version = EXCLUDED.version,
             data = EXCLUDED.data",
            &[
                &v.label,
                &seq_to_sql(v.epoch),
                &seq_to_sql(v.version),
                &v.data,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn op_finish_epoch(
    tx: &mut Tx<'_>,
    root: Option<&EpochRoot>,
    published: &[(String, u64)],
) -> Result<(), Fail> {
    if let Some(root) = root {
        tx.exec(
            "INSERT INTO kt_roots (epoch, root_hash, signature) VALUES ($1, $2, $3)",
            &[
                &seq_to_sql(root.epoch),
                &&root.root_hash[..],
                &root.signature,
            ],
        )
        .await?;
    }
    for (username, version) in published {
        tx.exec(
            "DELETE FROM kt_pending WHERE username = $1 AND version = $2",
            &[username, &seq_to_sql(*version)],
        )
        .await?;
    }
    Ok(())
}

async fn op_shared_keys(tx: &mut Tx<'_>, candidate: &StoredKeys) -> Result<StoredKeys, Fail> {
    // The first node to get here stores its candidate; every node then reads the same keys.
    tx.exec(
        "INSERT INTO kt_keys (id, vrf_key, signing_key) VALUES (1, $1, $2)
         ON CONFLICT (id) DO NOTHING",
        &[&&candidate.vrf[..], &&candidate.signing[..]],
    )
    .await?;
    let row = tx
        .one("SELECT vrf_key, signing_key FROM kt_keys WHERE id = 1", &[])
        .await?;
    let key = |i: usize| -> Result<[u8; 32], Fail> {
        let bytes: &[u8] = row.try_get(i)?;
        <[u8; 32]>::try_from(bytes).map_err(|_| bad_row("server key length"))
    };
    Ok(StoredKeys {
        vrf: key(0)?,
        signing: key(1)?,
    })
}

/// The epoch lock as held by one pooled connection in an open transaction
/// (`pg_advisory_xact_lock`): ending the transaction releases it, and a dead connection
/// releases it too.
struct HeldEpochLock {
    conn: Option<Pooled>,
    _holder: OwnedSemaphorePermit,
}

impl Drop for HeldEpochLock {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // The connection goes back to the pool only after its transaction ended.
            // A connection whose `ROLLBACK` fails stays marked `in_tx`, so dropping it closes
            // it, which releases the lock.
            Ok(runtime) => {
                runtime.spawn(async move {
                    if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                        conn.in_tx = false;
                    }
                });
            }
            // No runtime left to end the transaction: dropping the connection (marked
            // `in_tx`) closes it, which releases the lock.
            Err(_) => drop(conn),
        }
    }
}

impl TransparencyStore for PgStore {
    fn akd_write(&self, nodes: Vec<AkdNodeRow>, values: Vec<AkdValueRow>) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_akd_write(&mut tx, &nodes, &values))
    }

    fn akd_nodes(&self, keys: Vec<Vec<u8>>) -> StoreFuture<'_, Vec<AkdNodeRow>> {
        transact!(
            self,
            autocommit
                | tx
                | async {
                    let rows = tx
                        .query(
                            "SELECT key, data FROM akd_nodes WHERE key = ANY($1)",
                            &[&keys],
                        )
                        .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(AkdNodeRow {
                                key: r.try_get(0)?,
                                data: r.try_get(1)?,
                            })
                        })
                        .collect::<Result<Vec<_>, Fail>>()
                }
        )
    }

    fn akd_values(&self, label: Vec<u8>) -> StoreFuture<'_, Vec<AkdValueRow>> {
        transact!(
            self,
            autocommit
                | tx
                | async {
                    let rows = tx
                .query(
                    "SELECT epoch, version, data FROM akd_values WHERE label = $1 ORDER BY epoch",
                    &[&label],
                )
                .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(AkdValueRow {
                                label: label.clone(),
                                epoch: seq_from_sql(r.try_get(0)?),
                                version: seq_from_sql(r.try_get(1)?),
                                data: r.try_get(2)?,
                            })
                        })
                        .collect::<Result<Vec<_>, Fail>>()
                }
        )
    }

    fn pending_entries(&self, limit: usize) -> StoreFuture<'_, Vec<PendingEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        transact!(
            self,
            autocommit
                | tx
                | async {
                    let rows = tx
                        .query(
                            "SELECT username, version, entry, signature FROM kt_pending
                     ORDER BY id LIMIT $1",
                            &[&limit],
                        )
                        .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(PendingEntry {
                                username: r.try_get(0)?,
                                version: seq_from_sql(r.try_get(1)?),
                                entry: r.try_get(2)?,
                                signature: r.try_get(3)?,
                            })
                        })
                        .collect::<Result<Vec<_>, Fail>>()
                }
        )
    }

    fn finish_epoch(
        &self,
        root: Option<EpochRoot>,
        published: Vec<(String, u64)>,
    ) -> StoreFuture<'_, ()> {
        transact!(self, |tx| op_finish_epoch(
            &mut tx,
            root.as_ref(),
            &published
        ))
    }

    fn epoch_root(&self, epoch: u64) -> StoreFuture<'_, Option<EpochRoot>> {
        transact!(
            self,
            autocommit
                | tx
                | async {
                    tx.opt(
                        "SELECT epoch, root_hash, signature FROM kt_roots WHERE epoch = $1",
                        &[&seq_to_sql(epoch)],
                    )
                    .await?
                    .as_ref()
                    .map(root_from_row)
                    .transpose()
                }
        )
    }

    fn latest_root(&self) -> StoreFuture<'_, Option<EpochRoot>> {
        transact!(
            self,
            autocommit
                | tx
                | async {
                    tx.opt(
                "SELECT epoch, root_hash, signature FROM kt_roots ORDER BY epoch DESC LIMIT 1",
                &[],
            )
            .await?
            .as_ref()
            .map(root_from_row)
            .transpose()
                }
        )
    }

    fn shared_keys(&self, candidate: StoredKeys) -> StoreFuture<'_, Option<StoredKeys>> {
        Box::pin(async move {
            let keys: StoreResult<StoredKeys> =
                transact!(self, |tx| op_shared_keys(&mut tx, &candidate)).await;
            keys.map(Some)
        })
    }

    fn epoch_lock(&self, exclusive: bool) -> StoreFuture<'_, EpochLock> {
        Box::pin(async move {
            let holder = Arc::clone(&self.epoch_holders)
                .acquire_owned()
                .await
                .map_err(|_| StoreError::Closed)?;
            let mut conn = self.pool.get().await?;
            // Until its `ROLLBACK` is answered (see `HeldEpochLock`'s drop); a failed `BEGIN`
            // leaves it set too, so the connection is closed, not reused.
            conn.in_tx = true;
            let sql = if exclusive {
                format!("BEGIN; SELECT pg_advisory_xact_lock({EPOCH_LOCK})")
            } else {
                format!("BEGIN; SELECT pg_advisory_xact_lock_shared({EPOCH_LOCK})")
            };
            if let Err(e) = conn.client.batch_execute(&sql).await {
                return Err(StoreError::Backend(format!(
                    "cannot take the directory lock: {}",
                    db_message(&e)
                )));
            }
            Ok(EpochLock::held(Box::new(HeldEpochLock {
                conn: Some(conn),
                _holder: holder,
            })))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// LISTEN

async fn listen_loop(
    config: tokio_postgres::Config,
    node: String,
    wakeups: Arc<dyn Wakeups>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&config, &node, wakeups.as_ref(), &mut stop, &mut backoff).await {
            Ok(()) => return,
            Err(reason) => {
                tracing::warn!(%reason, "database listener lost; reconnecting");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = crate::stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(LISTEN_MAX_BACKOFF);
    }
}

/// One listening connection: returns `Ok` on stop, `Err` when the connection is lost.
async fn listen_once(
    config: &tokio_postgres::Config,
    node: &str,
    wakeups: &dyn Wakeups,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| db_message(&e))?;
    let (tx, mut notifications) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "database listener connection failed");
                    return;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| e.to_string())?;
        // Anything committed while we were not listening is found by re-reading; and the other
        // nodes re-read too, in case this node died between a commit and its notification.
        wakeups.resync();
        client
            .execute(NOTIFY_SQL, &[&CHANNEL, &format!("{node}:{RESYNC_ALL}")])
            .await
            .map_err(|e| db_message(&e))?;
        *backoff = Duration::from_millis(100);
        tracing::info!("listening for other nodes' wake-ups");
        let mut ping = tokio::time::interval(LISTEN_PING);
        ping.tick().await;
        loop {
            tokio::select! {
                payload = notifications.recv() => match payload {
                    Some(payload) => relay(&payload, node, wakeups),
                    None => return Err("the connection closed".to_string()),
                },
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        return Err("the connection stopped answering".to_string());
                    }
                }
                () = crate::stopped(stop) => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// Parses `node:hexid,hexid,…` and wakes those queues, or `node:*` and re-checks every
/// subscription, unless the node is us (the service already woke them). Malformed ids are
/// skipped.
fn relay(payload: &str, node: &str, wakeups: &dyn Wakeups) {
    let Some((from, ids)) = payload.split_once(':') else {
        return;
    };
    if from == node {
        return;
    }
    if ids == RESYNC_ALL {
        wakeups.resync();
        return;
    }
    let queues: Vec<QueueId> = ids
        .split(',')
        .filter_map(|h| hex::decode(h).ok())
        .filter_map(|b| QueueId::parse(&b).ok())
        .collect();
    if !queues.is_empty() {
        wakeups.appended(&queues);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<QueueId>>, std::sync::atomic::AtomicUsize);

    impl Wakeups for Seen {
        fn appended(&self, queues: &[QueueId]) {
            self.0.lock().unwrap().extend_from_slice(queues);
        }
        fn resync(&self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn another_nodes_resync_all_resyncs_and_our_own_does_not() {
        let seen = Seen::default();
        relay("other:*", "me", &seen);
        relay("me:*", "me", &seen);
        assert_eq!(seen.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(seen.0.lock().unwrap().is_empty());
    }

    #[test]
    fn wake_payloads_name_every_queue_once_below_the_limit_and_relay_back() {
        let queues: Vec<QueueId> = (0..1_000u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                QueueId::new(id)
            })
            .collect();
        let payloads = wake_payloads("node", &queues);
        assert!(payloads.len() > 1, "1,000 ids do not fit one notification");
        assert!(
            payloads
                .iter()
                .all(|p| p.len() < 8_000 && p.starts_with("node:"))
        );
        let seen = Seen::default();
        for p in &payloads {
            relay(p, "me", &seen);
        }
        assert_eq!(*seen.0.lock().unwrap(), queues);
        assert!(wake_payloads("node", &[]).is_empty());
    }

    #[test]
    fn relay_skips_own_notifications_and_malformed_ids() {
        let seen = Seen::default();
        let a = QueueId::new([1; 16]);
        let b = QueueId::new([2; 16]);
        let payload = format!(
            "other:{},zz,{},{}",
            hex::encode(a.as_bytes()),
            hex::encode([3u8; 4]),
            hex::encode(b.as_bytes())
        );
        relay(&payload, "me", &seen);
        relay(&format!("me:{}", hex::encode(a.as_bytes())), "me", &seen);
        relay("garbage", "me", &seen);
        assert_eq!(*seen.0.lock().unwrap(), vec![a, b]);
    }

    /// A connection to the local test server with a fresh schema of its own first on the
    /// search path; `None` (and why, on stderr) if no server answers, unless
    /// `BLINDPOST_REQUIRE_POSTGRES` is set.
    async fn scratch_schema() -> Option<(Client, String)> {
        let mut reasons = Vec::new();
        for user in ["postgres", "root"] {
            let url = format!("postgres://{user}@127.0.0.1:5432/test");
            match tokio_postgres::connect(&url, NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    let mut rnd = [0u8; 6];
                    getrandom::fill(&mut rnd).unwrap();
                    let schema = format!("bp_unit_{}", hex::encode(rnd));
                    client
                        .batch_execute(&format!(
                            "CREATE SCHEMA {schema}; SET search_path TO {schema}"
                        ))
                        .await
                        .unwrap();
                    return Some((client, schema));
                }
                Err(e) => reasons.push(format!("{url}: {e}")),
            }
        }
        let why = format!("no PostgreSQL server answered ({})", reasons.join("; "));
        assert!(
            std::env::var_os("BLINDPOST_REQUIRE_POSTGRES").is_none(),
            "{why}, and BLINDPOST_REQUIRE_POSTGRES is set"
        );
        eprintln!("SKIPPED: {why}");
        None
    }

    /// A `Tx` on `client` in `phase`, with its own statement cache and `in_tx` flag.
    macro_rules! tx_on {
        ($client:expr, $phase:expr, $in_tx:ident) => {{
            Tx {
                client: $client,
                phase: $phase,
                in_tx: &mut $in_tx,
                stmts: &mut HashMap::new(),
                day: 1,
                wake: Vec::new(),
            }
        }};
    }

    async fn count(client: &Client) -> i64 {
        client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The last statement and the `COMMIT` go out together: on success everything before
    /// them is committed too; when the database refuses the last statement, nothing of the
    /// operation is, and the connection is left outside any transaction, fit for reuse.
    #[tokio::test]
    async fn commit_with_commits_the_whole_operation_or_none_of_it() {
        let Some((client, schema)) = scratch_schema().await else {
            return;
        };
        client
            .batch_execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        let insert = "INSERT INTO t VALUES ($1)";

        let mut in_tx = false;
        let mut tx = tx_on!(&client, Phase::Pending(BEGIN), in_tx);
        tx.exec(insert, &[&1i32])
            .await
            .map_err(Fail::into_store)
            .unwrap();
        tx.commit_with(insert, &[&2i32])
            .await
            .map_err(Fail::into_store)
            .unwrap();
        tx.commit().await.map_err(Fail::into_store).unwrap();
        assert!(!in_tx);
        assert_eq!(count(&client).await, 2);

        let mut tx = tx_on!(&client, Phase::Pending(BEGIN), in_tx);
        tx.exec(insert, &[&3i32])
            .await
            .map_err(Fail::into_store)
            .unwrap();
        let refused = tx.commit_with(insert, &[&1i32]).await;
        tx.rollback().await;
        match refused {
            Err(e @ Fail::Db(_)) => assert!(e.retryable(), "a unique-key race is run again"),
            Err(Fail::Store(e)) => panic!("a refused statement is not a failed commit: {e}"),
            Ok(_) => panic!("a duplicate key was accepted"),
        }
        assert!(
            !in_tx,
            "the COMMIT behind the refusal ended the transaction"
        );
        assert_eq!(
            count(&client).await,
            2,
            "the refused operation's first write is gone"
        );

        // Nothing sent before it: BEGIN, the statement and COMMIT in one round trip.
        let mut tx = tx_on!(&client, Phase::Pending(BEGIN), in_tx);
        tx.commit_with(insert, &[&4i32])
            .await
            .map_err(Fail::into_store)
            .unwrap();
        assert!(!in_tx);
        assert_eq!(count(&client).await, 3);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    /// An acknowledgement's transaction commits without waiting for the disk, and only it:
    /// the setting ends with it, so the next operation on the pooled connection waits again.
    #[tokio::test]
    async fn a_relaxed_transaction_leaves_the_connection_as_it_found_it() {
        let Some((client, schema)) = scratch_schema().await else {
            return;
        };
        let setting = "SELECT current_setting('synchronous_commit')";
        let before: String = client.query_one(setting, &[]).await.unwrap().get(0);
        assert_ne!(before, "off", "the test server must wait for its disk");
        let mut in_tx = false;
        let mut tx = tx_on!(&client, Phase::Pending(BEGIN_RELAXED), in_tx);
        let inside: String = tx
            .one(setting, &[])
            .await
            .map_err(Fail::into_store)
            .unwrap()
            .get(0);
        tx.commit().await.map_err(Fail::into_store).unwrap();
        assert_eq!(inside, "off");
        let after: String = client.query_one(setting, &[]).await.unwrap().get(0);
        assert_eq!(after, before);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    /// An acknowledgement's transaction (relaxed, sent with its `COMMIT` in one round trip)
    /// that finds its pooled connection ended by the database can run again on a fresh one:
    /// the client repeats it anyway. A durable transaction's unknown outcome cannot.
    #[tokio::test]
    async fn a_relaxed_commit_on_a_lost_connection_runs_again_a_durable_one_does_not() {
        for (begin, runs_again) in [(BEGIN_RELAXED, true), (BEGIN, false)] {
            let Some((client, schema)) = scratch_schema().await else {
                return;
            };
            let (admin, admin_schema) = scratch_schema().await.unwrap();
            client
                .batch_execute("CREATE TABLE t (n int)")
                .await
                .unwrap();
            let insert = "INSERT INTO t VALUES ($1)";
            let mut in_tx = false;
            let mut tx = tx_on!(&client, Phase::Pending(begin), in_tx);
            // Prepared before the cut, as on a pooled connection: the operation's one round
            // trip is then `BEGIN`, the statement and `COMMIT`.
            tx.stmt(insert).await.map_err(Fail::into_store).unwrap();
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap();
            for _ in 0..500 {
                if client.is_closed() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(client.is_closed(), "the backend was not ended");
            let Err(e) = tx.commit_with(insert, &[&1i32]).await else {
                panic!("a commit on an ended connection succeeded");
            };
            assert_eq!(e.retryable(), runs_again, "{begin}");
            admin
                .batch_execute(&format!("DROP SCHEMA {schema}, {admin_schema} CASCADE"))
                .await
                .unwrap();
        }
    }

    /// A connection whose operation stopped inside its transaction (cancelled, or ending it
    /// failed) is closed, never handed to the next operation; a finished one is reused.
    #[tokio::test]
    async fn a_connection_left_inside_a_transaction_is_not_reused() {
        let Some((client, schema)) = scratch_schema().await else {
            return;
        };
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        let mut config = None;
        for user in ["postgres", "root"] {
            let url = format!("postgres://{user}@127.0.0.1:5432/test");
            if tokio_postgres::connect(&url, NoTls).await.is_ok() {
                config = Some(tokio_postgres::Config::from_str(&url).unwrap());
                break;
            }
        }
        let pool = Arc::new(Pool {
            config: config.unwrap(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(2)),
        });
        let idle = |pool: &Pool| pool.idle.lock().unwrap().len();

        // First dropped without a COMMIT or ROLLBACK, as a cancelled operation is; then
        // committed.
        for (commit, idle_after) in [(false, 0), (true, 1)] {
            let mut conn = pool.get().await.unwrap();
            let PgConn {
                client,
                stmts,
                in_tx,
            } = &mut *conn;
            let mut tx = Tx {
                client: &*client,
                phase: Phase::Pending(BEGIN),
                in_tx,
                stmts,
                day: 1,
                wake: Vec::new(),
            };
            tx.exec("SELECT 1", &[])
                .await
                .map_err(Fail::into_store)
                .unwrap();
            if commit {
                tx.commit().await.map_err(Fail::into_store).unwrap();
            }
            drop(conn);
            assert_eq!(idle(&pool), idle_after, "committed: {commit}");
        }
    }

    /// Brings a scratch schema to `version`, as a database an older release left.
    async fn schema_at(client: &Client, version: usize) {
        for sql in &MIGRATIONS[..version] {
            client.batch_execute(sql).await.unwrap();
        }
        client
            .batch_execute(&format!(
                "CREATE TABLE blindpost_schema (version BIGINT NOT NULL);
                 INSERT INTO blindpost_schema VALUES ({version});"
            ))
            .await
            .unwrap();
    }

    /// Migration 5 gives existing queues running totals that make their pending bytes what
    /// their messages hold, and removing the oldest messages keeps that true.
    #[tokio::test]
    async fn migration_5_counts_what_queues_hold() {
        let Some((mut client, schema)) = scratch_schema().await else {
            return;
        };
        schema_at(&client, 4).await;
        for q in [1u8, 2, 3] {
            client
                .execute(
                    "INSERT INTO queues VALUES ($1, '\\x00', '\\x00', 3, 1, 1)",
                    &[&[q; 16].as_slice()],
                )
                .await
                .unwrap();
        }
        let shared: i64 = client
            .query_one(
                "INSERT INTO payloads (data, refs) VALUES ($1, 2) RETURNING id",
                &[&[0u8; 5000].as_slice()],
            )
            .await
            .unwrap()
            .get(0);
        let insert = "INSERT INTO messages (queue_id, seq, payload, day, shared)
                      VALUES ($1, $2, $3, 1, $4)";
        let inline: &[u8] = &[0; 100];
        let rows = [
            ([1u8; 16], 1i64, inline, None::<i64>),
            ([1; 16], 2, &[], Some(shared)),
            ([2; 16], 1, &[], Some(shared)),
        ];
        for (q, seq, payload, shared) in rows {
            client
                .execute(insert, &[&q.as_slice(), &seq, &payload, &shared])
                .await
                .unwrap();
        }
        migrate(&mut client)
            .await
            .map_err(Fail::into_store)
            .unwrap();
        async fn pending(client: &Client) -> Vec<i64> {
            client
                .query(
                    concat!("SELECT ", pending_bytes!(), " FROM queues q ORDER BY q.id"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
        assert_eq!(pending(&client).await, vec![5100, 5000, 0]);
        client
            .execute(
                "DELETE FROM messages WHERE queue_id = $1 AND seq <= 1",
                &[&[1u8; 16].as_slice()],
            )
            .await
            .unwrap();
        assert_eq!(pending(&client).await, vec![5000, 5000, 0]);
        client.execute("DELETE FROM messages", &[]).await.unwrap();
        assert_eq!(pending(&client).await, vec![0, 0, 0]);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    /// Migration 6 turns each stored idempotency key into a chunk of its group, below the
    /// group's counter, so the group's next move lands above them.
    #[tokio::test]
    async fn migration_6_keeps_every_key_in_a_chunk_below_its_groups_counter() {
        let Some((mut client, schema)) = scratch_schema().await else {
            return;
        };
        schema_at(&client, 5).await;
        for g in [1u8, 2] {
            client
                .execute(
                    "INSERT INTO groups (id, epoch, posting_token_hash, created_day, last_used_day)
                     VALUES ($1, 0, '\\x00', 1, 1)",
                    &[&[g; 32].as_slice()],
                )
                .await
                .unwrap();
        }
        // Group 1 has three keys, group 2 none, and group 3 (no row) one.
        for (g, id) in [(1u8, 10u8), (1, 11), (1, 12), (3, 30)] {
            client
                .execute(
                    "INSERT INTO posted_ids (group_id, message_id, day) VALUES ($1, $2, 4)",
                    &[&[g; 32].as_slice(), &[id; 16].as_slice()],
                )
                .await
                .unwrap();
        }
        migrate(&mut client)
            .await
            .map_err(Fail::into_store)
            .unwrap();
        let chunks = client
            .query(
                "SELECT c.ids, c.n, g.posted_n FROM posted_chunks c JOIN groups g ON g.id = c.group_id
                 ORDER BY c.n",
                &[],
            )
            .await
            .unwrap();
        let ids: Vec<Vec<u8>> = chunks.iter().map(|r| r.get(0)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, [[10u8; 16], [11; 16], [12; 16]].map(|i| i.to_vec()));
        let n: Vec<i64> = chunks.iter().map(|r| r.get(1)).collect();
        let counter: i64 = chunks[0].get(2);
        assert_eq!(n, [counter - 2, counter - 1, counter]);
        let rows = client
            .query("SELECT 1 FROM posted_chunks", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 3, "the key of a group that is gone is dropped");
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
