//! Crashes and faults against the real `blindpostd` binary, each judged by one checker of
//! lost / duplicated / unexpected messages: `kill -9` at random moments during sustained sends
//! (many rounds, restart on the same data), the server paused with SIGSTOP past the clients'
//! timeouts, connections cut in the middle of a frame, and the disk filling up (a real 3 MiB
//! tmpfs; needs root to mount, as CI has — without root it says so and checks nothing, and the
//! SQLite-level unit test in `store/sqlite.rs` covers the same path). Senders retry each post
//! with its message id until acknowledged; the receiver drops sequence numbers it has processed
//! (as the real client does) and acknowledges after processing.
//! `BLINDPOST_CRASH_ROUNDS` (default 8) sets the number of kill -9 rounds.
//! Not for: client crashes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

/// How long a test client waits for one answer before it gives up on the connection.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// The real binary

struct Daemon {
    child: tokio::process::Child,
    data: PathBuf,
    addr: SocketAddr,
}

impl Daemon {
    async fn start(data: &Path) -> Self {
        Self::start_on(data, "127.0.0.1:0").await
    }

    async fn start_on(data: &Path, listen: &str) -> Self {
        for _ in 0..100 {
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_blindpostd"))
                .args(["--listen", listen, "--log", "warn", "--data"])
                .arg(data)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            if let Ok(Some(line)) = lines.next_line().await
                && let Some(addr) = line.strip_prefix("blindpostd listening on ")
            {
                return Self {
                    child,
                    data: data.to_owned(),
                    addr: addr.parse().unwrap(),
                };
            }
            // The port may still be held by the killed process for a moment.
            let _ = child.wait().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("blindpostd did not start");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// `kill -9`, then start again on the same address and data.
    async fn crash_and_restart(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait().await;
        let again = Self::start_on(&self.data, &self.addr.to_string()).await;
        *self = again;
    }
}

// ---------------------------------------------------------------------------------------------
// A client that survives the server going away

struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Option<Self> {
        let url = format!("ws://{addr}/v1/ws");
        match tokio::time::timeout(CLIENT_TIMEOUT, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => Some(Self { ws, next_id: 1 }),
            _ => None,
        }
    }

    /// Connects, retrying until the server answers (it may be restarting or paused).
    async fn reconnect(addr: SocketAddr) -> Self {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(c) = Self::connect(addr).await {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One request; `None` if the connection failed or the answer did not come in time.
    async fn request(&mut self, request: Request) -> Option<Body> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            id,
            request: Some(request),
        };
        let exchange = async {
            self.ws.send(Message::binary(encode(&frame))).await.ok()?;
            loop {
                match self.ws.next().await? {
                    Ok(Message::Binary(bytes)) => {
                        if let Some(Kind::Response(r)) = decode_server(&bytes).ok()?.kind
                            && r.id == id
                        {
                            return r.body;
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange).await.ok()?
    }
}

// ---------------------------------------------------------------------------------------------
// Workload and checker

/// What the senders and the receiver saw.
#[derive(Default)]
struct Ledger {
    /// Payloads whose post the server acknowledged.
    acked: HashSet<Vec<u8>>,
    /// Payloads ever sent.
    attempted: HashSet<Vec<u8>>,
    /// Payloads the receiving application got, in order (duplicates kept, to be counted).
    delivered: Vec<Vec<u8>>,
    /// Posts sent again after a failure.
    retries: u64,
}

struct Verdict {
    lost: usize,
    duplicated: usize,
    unexpected: usize,
}

fn check(ledger: &Ledger) -> Verdict {
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for d in &ledger.delivered {
        *seen.entry(d).or_default() += 1;
    }
    Verdict {
        lost: ledger
            .acked
            .iter()
            .filter(|a| !seen.contains_key(a.as_slice()))
            .count(),
        duplicated: seen.values().filter(|n| **n > 1).count(),
        unexpected: seen
            .keys()
            .filter(|d| !ledger.attempted.contains(**d))
            .count(),
    }
}

struct Setup {
    queue: Q,
    group: Vec<u8>,
    token: Vec<u8>,
}

async fn setup(addr: SocketAddr) -> Setup {
    let mut c = Client::connect(addr).await;
    let (queue, group, token) = queue_and_group(&mut c).await;
    Setup {
        queue,
        group,
        token,
    }
}

/// One sender: posts `s{sender}-{n}` one after another, each retried with its message id
/// (on a fresh connection) until acknowledged, until `stop` is set.
async fn sender(
    addr: SocketAddr,
    setup: Arc<Setup>,
    me: u8,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut conn = Conn::reconnect(addr).await;
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let payload = format!("s{me}-{n}").into_bytes();
        let mut id = [0u8; 16];
        id[0] = me;
        id[1..5].copy_from_slice(&n.to_be_bytes());
        ledger.lock().unwrap().attempted.insert(payload.clone());
        // As a client should: the first send says the id is fresh; a resend after a lost
        // answer does not, so the server looks it up in full.
        let mut fresh_id = true;
        loop {
            let request = Request::Post(Post {
                group_id: setup.group.clone(),
                epoch: 0,
                posting_token: setup.token.clone(),
                message_id: id.to_vec(),
                payload: payload.clone(),
                skip_subscribed: false,
                fresh_id,
            });
            match conn.request(request).await {
                Some(Body::Ok(_)) => break,
                Some(other) => panic!("post refused: {other:?}"),
                None => {
                    fresh_id = false;
                    ledger.lock().unwrap().retries += 1;
                    conn = Conn::reconnect(addr).await;
                }
            }
        }
        ledger.lock().unwrap().acked.insert(payload);
        n += 1;
    }
}

/// The receiver: fetch above the last processed sequence number, hand new messages to the
/// application (the ledger), then acknowledge. Stops once `stop` is set and a fetch is empty.
async fn receiver(
    addr: SocketAddr,
    setup: Arc<Setup>,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut processed: u64 = 0;
    'connection: loop {
        let mut conn = Conn::reconnect(addr).await;
        let subscribe = Request::Subscribe(Subscribe {
            queue_id: setup.queue.id.clone(),
            receive_secret: setup.queue.receive.clone(),
            push: false,
            after_seq: 0,
        });
        if conn.request(subscribe).await.is_none() {
            continue;
        }
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let fetch = Request::Fetch(Fetch {
                queue_id: setup.queue.id.clone(),
                after_seq: 0,
                limit: 0,
            });
            let Some(Body::Messages(m)) = conn.request(fetch).await else {
                continue 'connection;
            };
            if m.messages.is_empty() {
                if stopping {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            for msg in &m.messages {
                assert!(msg.seq > 0);
                if msg.seq <= processed {
                    continue; // redelivered (its ack was lost): already processed
                }
                ledger.lock().unwrap().delivered.push(msg.payload.clone());
                processed = msg.seq;
            }
            let ack = Request::Ack(Ack {
                queue_id: setup.queue.id.clone(),
                up_to_seq: processed,
                quiet: false,
            });
            if conn.request(ack).await.is_none() {
                continue 'connection;
            }
        }
    }
}

/// Runs senders and a receiver while `disrupt` does its worst, then stops the senders, lets the
/// receiver drain, and returns the ledger.
async fn under_load<F, Fut>(daemon: Daemon, senders: u8, disrupt: F) -> Ledger
where
    F: FnOnce(Daemon) -> Fut,
    Fut: std::future::Future<Output = Daemon>,
{
    let addr = daemon.addr;
    let setup = Arc::new(setup(addr).await);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop_send = Arc::new(AtomicBool::new(false));
    let stop_receive = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for me in 0..senders {
        tasks.spawn(sender(
            addr,
            Arc::clone(&setup),
            me,
            Arc::clone(&stop_send),
            Arc::clone(&ledger),
        ));
    }
    let receiving = tokio::spawn(receiver(
        addr,
        Arc::clone(&setup),
        Arc::clone(&stop_receive),
        Arc::clone(&ledger),
    ));
    let _daemon = disrupt(daemon).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_send.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    stop_receive.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), receiving)
        .await
        .expect("the receiver drains")
        .unwrap();
    Arc::try_unwrap(ledger)
        .ok()
        .expect("all tasks finished")
        .into_inner()
        .unwrap()
}

fn assert_clean(what: &str, ledger: &Ledger) {
    let v = check(ledger);
    eprintln!(
        "{what}: {} acknowledged, {} delivered, {} retries; lost {}, duplicated {}, unexpected {}",
        ledger.acked.len(),
        ledger.delivered.len(),
        ledger.retries,
        v.lost,
        v.duplicated,
        v.unexpected
    );
    assert!(!ledger.acked.is_empty(), "{what}: nothing was sent");
    assert_eq!(
        (v.lost, v.duplicated, v.unexpected),
        (0, 0, 0),
        "{what}: lost / duplicated / unexpected"
    );
}

/// A random delay in `[min, min + spread)` milliseconds.
fn random_ms(min: u64, spread: u64) -> Duration {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    Duration::from_millis(min + u64::from_le_bytes(b) % spread)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let rounds: u32 = std::env::var("BLINDPOST_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let ledger = under_load(daemon, 4, |mut d| async move {
        for _ in 0..rounds {
            tokio::time::sleep(random_ms(100, 400)).await;
            d.crash_and_restart().await;
        }
        d
    })
    .await;
    assert_clean(&format!("kill -9 x {rounds}"), &ledger);
    assert!(ledger.retries > 0, "the crashes interrupted no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_paused_past_client_timeouts_resumes_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let ledger = under_load(daemon, 3, |d| async move {
        for _ in 0..2 {
            tokio::time::sleep(random_ms(100, 300)).await;
            d.signal("-STOP");
            // Well past CLIENT_TIMEOUT: every client gives up and reconnects (or tries to).
            tokio::time::sleep(CLIENT_TIMEOUT * 3).await;
            d.signal("-CONT");
        }
        d
    })
    .await;
    assert_clean("SIGSTOP x 2", &ledger);
    assert!(ledger.retries > 0, "no client timed out during the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_cut_mid_frame_is_not_stored_and_its_retry_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let setup = setup(daemon.addr).await;
    let post_frame = |payload: &[u8]| {
        encode(&ClientFrame {
            id: 1,
            request: Some(Request::Post(Post {
                group_id: setup.group.clone(),
                epoch: 0,
                posting_token: setup.token.clone(),
                message_id: vec![0xC0; 16],
                payload: payload.to_vec(),
                skip_subscribed: false,
                fresh_id: false,
            })),
        })
    };
    // Cut in the middle of the WebSocket frame: half the bytes, then the TCP connection closes.
    let frame = post_frame(&[0xAA; 100_000]);
    let mut tcp = TcpStream::connect(daemon.addr).await.unwrap();
    tcp.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let mut ws_frame = vec![0x82, 0xFF];
    ws_frame.extend_from_slice(&(frame.len() as u64).to_be_bytes());
    ws_frame.extend_from_slice(&[0, 0, 0, 0]); // zero mask: payload as is
    ws_frame.extend_from_slice(&frame);
    tcp.write_all(&ws_frame[..ws_frame.len() / 2])
        .await
        .unwrap();
    drop(tcp);

    // The client reconnects and sends the same post again (same message id): stored once.
    let mut c = Client::connect(daemon.addr).await;
    c.ok(Request::Post(Post {
        group_id: setup.group.clone(),
        epoch: 0,
        posting_token: setup.token.clone(),
        message_id: vec![0xC0; 16],
        payload: vec![0xAA; 100_000],
        skip_subscribed: false,
        fresh_id: false,
    }))
    .await;
    // The answer to a retry is cut too (connection dropped before reading): still once.
    let mut blind = Client::connect(daemon.addr).await;
    blind
        .send(Message::binary(post_frame(&[0xAA; 100_000])))
        .await;
    drop(blind);
    c.request(subscribe(&setup.queue, false)).await;
    let got = fetched(&mut c, &setup.queue).await;
    assert_eq!(got.len(), 1, "exactly one copy stored");
    assert_eq!(got[0].1, vec![0xAA; 100_000], "and it is whole");
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Self(dir)
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// Every message of a queue, page by page.
async fn fetch_all(c: &mut Client, queue: &Q) -> Vec<(u64, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |(seq, _)| *seq);
        let request = Request::Fetch(Fetch {
            queue_id: queue.id.clone(),
            after_seq: after,
            limit: 0,
        });
        match c.request(request).await {
            Body::Messages(m) => {
                all.extend(m.messages.into_iter().map(|m| (m.seq, m.payload)));
                if !m.more {
                    return all;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_acknowledges_nothing_unstored_and_recovers_when_space_returns() {
    if !is_root() {
        // Mounting needs root; the SQLite-level disk-full unit test runs everywhere.
        eprintln!("not root: the tmpfs disk-full test is not run");
        return;
    }
    let disk = Tmpfs::mount("3m");
    let data = disk.0.path().join("data");
    let mut daemon = Daemon::start(&data).await;
    let mut c = Client::connect(daemon.addr).await;
    let (queue, group, token) = queue_and_group(&mut c).await;
    let post_n = |n: u8| post(&group, 0, &token, n, &[n; 64 * 1024]);

    let mut acked = Vec::new();
    let mut refused = None;
    for n in 0..=200u8 {
        match c.request(post_n(n)).await {
            Body::Ok(_) => acked.push(n),
            Body::Error(e) => {
                assert_eq!(e.code(), ErrorCode::Unavailable, "{}", e.message);
                assert!(e.message.contains("storage is full"), "{}", e.message);
                refused = Some(n);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let refused = refused.expect("the disk never filled");
    assert!(!acked.is_empty());
    // While full, reads still work, and show exactly what was acknowledged.
    c.request(subscribe(&queue, false)).await;
    let stored: Vec<u8> = fetch_all(&mut c, &queue)
        .await
        .iter()
        .map(|m| m.1[0])
        .collect();
    assert_eq!(
        stored, acked,
        "stored = acknowledged while the disk is full"
    );

    // Space returns: the refused post goes through on retry, and so do new ones.
    disk.resize("64m");
    c.ok(post_n(refused)).await;
    c.ok(post_n(refused + 1)).await;
    acked.extend([refused, refused + 1]);

    // And all of it survives a crash.
    daemon.crash_and_restart().await;
    let mut c = Client::connect(daemon.addr).await;
    c.request(subscribe(&queue, false)).await;
    let stored: Vec<u8> = fetch_all(&mut c, &queue)
        .await
        .iter()
        .map(|m| m.1[0])
        .collect();
    assert_eq!(stored, acked, "durable, exactly once");
    eprintln!(
        "disk full: {} posts of 64 KiB acknowledged on a 3 MiB tmpfs, post {refused} refused \
         with Unavailable, stored after the resize; all survived kill -9",
        acked.len() - 2
    );
    drop(daemon);
}
