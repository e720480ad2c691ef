//! The measured window against blindpostd: every device holds one WebSocket and speaks the
//! wire protocol directly (`Subscribe` with push, `Ack`; the sender `Post`s its pre-encrypted
//! messages with the group's posting token). No MLS work happens here, so the window measures
//! the relay. Not for setting anything up (`setup.rs`) or for checking decryption (`main.rs`
//! does that afterwards through the client library).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use blindpost_client::{BoxIo, ServerSettings};
use blindpost_wire::{
    self as wire, Ack, ClientFrame, Post, Request, Subscribe, response, server_frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::{WebSocketStream, tungstenite};

use crate::setup::Conversation;
use crate::stats::Latencies;

/// A WebSocket to blindpostd (plain, TLS, or TLS inside a relay's tunnel).
pub type Ws = WebSocketStream<BoxIo>;

/// Open a WebSocket the way the client does (`ws://`, or `wss://` with the settings' pins,
/// directly or through one of its relays), with small buffers (the tool may hold many).
pub async fn connect(server: &ServerSettings) -> Result<Ws> {
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(wire::limits::MAX_FRAME_BYTES + 64 * 1024);
    config.max_frame_size = Some(wire::limits::MAX_FRAME_BYTES + 64 * 1024);
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    let url = &server.url;
    let (ws, _route) = tokio::time::timeout(
        Duration::from_secs(10),
        blindpost_client::open_websocket(server, config),
    )
    .await
    .map_err(|_| anyhow!("connecting to {url} timed out"))?
    .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

/// Send one request and wait for its answer (used before the window, one at a time).
pub async fn call(ws: &mut Ws, id: u64, request: Request) -> Result<response::Body> {
    let frame = ClientFrame {
        id,
        request: Some(request),
    };
    ws.send(tungstenite::Message::Binary(
        wire::encode_padded(&frame).into(),
    ))
    .await?;
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("the server closed the connection"))??;
        let tungstenite::Message::Binary(bytes) = msg else {
            continue;
        };
        match wire::decode_server(&bytes)?.kind {
            Some(server_frame::Kind::Response(r)) if r.id == id => {
                return match r.body {
                    Some(response::Body::Error(e)) => {
                        bail!("server refused: {:?}: {}", e.code(), e.message)
                    }
                    Some(body) => Ok(body),
                    None => bail!("empty response"),
                };
            }
            _ => continue,
        }
    }
}

/// How posts are paced.
#[derive(Clone, Copy)]
pub enum Pacing {
    /// Each sender waits for the answer to a post before sending the next (as JetStream
    /// publishers awaiting each publish ack do): the maximum rate.
    Closed,
    /// Open loop: posts leave at fixed times, `rate` per second over all senders, whatever
    /// the server answers (so a slow server cannot hide its queueing). Latency counts from
    /// when each post left; how late posts left their schedule is reported apart
    /// ([`Outcome::send_lag`]): tokio's timer ticks in whole milliseconds, and counting from
    /// the scheduled time added that tick to every latency (p50 1.6 ms at 1,000 posts/s,
    /// against 0.3 ms from a thread keeping the schedule to the microsecond).
    Open {
        /// Messages per second, all senders together.
        rate: f64,
    },
}

/// What the window measured.
pub struct Outcome {
    /// Posts answered `Ok` whose send time fell in the window.
    pub posted: u64,
    /// Deliveries to members other than the sender received within the window.
    pub delivered_in_window: u64,
    /// Every delivery to a non-sender, including those that arrived during the drain.
    pub delivered_total: u64,
    /// Echoes of the sender's own posts: 0, since posts skip the sender's subscribed queue
    /// (`Post.skip_subscribed`); anything else means the server ignored the flag.
    pub echoes: u64,
    /// Error answers, failed connections, unknown payloads.
    pub errors: u64,
    /// Send→receive latencies.
    pub latencies: Latencies,
    /// Open loop: how long after its scheduled time each post left (empty in a closed loop).
    pub send_lag: Latencies,
    /// Per conversation and receiving member: payloads to check for decryption, in order.
    pub samples: Vec<Vec<Vec<Vec<u8>>>>,
}

/// Live counters for the progress line.
#[derive(Default)]
pub struct Counters {
    /// Posts answered `Ok`.
    pub posted: AtomicU64,
    /// Deliveries to non-senders.
    pub delivered: AtomicU64,
    /// Errors so far.
    pub errors: AtomicU64,
}

struct Shared {
    /// Pool payload fingerprint → (conversation, pool index).
    fingerprints: HashMap<u64, (u32, u32)>,
    /// Per conversation: when post `k` left.
    sent: Vec<Mutex<Vec<Instant>>>,
    pacing: Pacing,
    start: Instant,
    end: Instant,
    pool_len: usize,
    sample_every: usize,
    counters: Arc<Counters>,
    echoes: AtomicU64,
    in_window: AtomicU64,
    conversations: usize,
}

impl Shared {
    /// When post `k` of conversation `c` was sent.
    fn sent_at(&self, c: usize, k: u64) -> Option<Instant> {
        self.sent[c]
            .lock()
            .ok()
            .and_then(|v| v.get(k as usize).copied())
    }
}

fn open_offset(rate: f64, conversations: usize, c: usize, k: u64) -> Duration {
    let interval = conversations as f64 / rate;
    let phase = interval * c as f64 / conversations as f64;
    Duration::from_secs_f64(phase + interval * k as f64)
}

/// A cheap fingerprint of a pool payload: its last 8 bytes (part of the AEAD tag, so
/// effectively random and distinct per message).
fn fingerprint(payload: &[u8]) -> u64 {
    let n = payload.len();
    let mut b = [0u8; 8];
    if n >= 8 {
        b.copy_from_slice(&payload[n - 8..]);
    }
    u64::from_le_bytes(b)
}

/// Run the window: connect and subscribe every device, post for `duration`, then wait (at most
/// `drain`) for deliveries still in flight.
pub async fn run(
    convs: &[Conversation],
    duration: Duration,
    drain: Duration,
    pacing: Pacing,
    sample_every: usize,
    counters: Arc<Counters>,
) -> Result<Outcome> {
    let pool_len = convs.first().map(|c| c.pool.len()).unwrap_or(0);
    let mut fingerprints = HashMap::new();
    for (c, conv) in convs.iter().enumerate() {
        for (i, p) in conv.pool.iter().enumerate() {
            if fingerprints
                .insert(fingerprint(p), (c as u32, i as u32))
                .is_some()
            {
                bail!("two pool messages share a fingerprint; run again");
            }
        }
    }
    // Connect and subscribe everyone before the window starts.
    let mut devices = Vec::new();
    for (c, conv) in convs.iter().enumerate() {
        for (m, member) in conv.members.iter().enumerate() {
            let mut ws = connect(&member.server).await?;
            call(
                &mut ws,
                2,
                Request::Subscribe(Subscribe {
                    queue_id: member.route.queue_id.clone(),
                    receive_secret: member.route.receive_secret.clone(),
                    push: true,
                    after_seq: member.route.last_seq,
                }),
            )
            .await
            .with_context(|| format!("subscribing device {m} of conversation {c}"))?;
            devices.push((c, m, ws));
        }
    }
    let start = Instant::now() + Duration::from_millis(100);
    let shared = Arc::new(Shared {
        fingerprints,
        sent: convs.iter().map(|_| Mutex::new(Vec::new())).collect(),
        pacing,
        start,
        end: start + duration,
        pool_len,
        sample_every: sample_every.max(1),
        counters,
        echoes: AtomicU64::new(0),
        in_window: AtomicU64::new(0),
        conversations: convs.len(),
    });
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut posting = Vec::new();
    for (c, m, ws) in devices {
        let role = if m == 0 {
            let conv = &convs[c];
            let route = &conv.members[0].route;
            let (done, posted) = oneshot::channel();
            posting.push(posted);
            Role::Sender {
                template: Post {
                    group_id: route.group_id.clone(),
                    epoch: route.epoch,
                    posting_token: route.posting_token.clone(),
                    message_id: Vec::new(),
                    payload: Vec::new(),
                    // As the client does: the sender's connection reads its own queue, so
                    // its echo is not stored.
                    skip_subscribed: true,
                    // As the client does: each post is sent once, so its id is fresh.
                    fresh_id: true,
                },
                pool: Arc::new(conv.pool.clone()),
                done,
            }
        } else {
            Role::Receiver
        };
        let device = Device {
            ws,
            shared: shared.clone(),
            stopped: stopped.clone(),
            c,
            m,
            next_ack_id: 2,
            last_k: None,
            latencies: Latencies::default(),
            samples: Vec::new(),
            closed: false,
        };
        tasks.push(tokio::spawn(device.run(role)));
    }
    let mut posted = 0;
    let mut send_lag = Latencies::default();
    for p in posting {
        let (ok, lag) = p.await.map_err(|_| anyhow!("a sender failed"))?;
        posted += ok;
        send_lag.merge(lag);
    }
    // Wait for what is still in flight: every non-sender should get every post.
    let receivers_per_post = convs.first().map_or(0, |c| c.members.len() as u64 - 1);
    let expected = posted.saturating_mul(receivers_per_post);
    let drain_until = Instant::now() + drain;
    while Instant::now() < drain_until
        && shared.counters.delivered.load(Ordering::Relaxed) < expected
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    let mut latencies = Latencies::default();
    let mut samples: Vec<Vec<Vec<Vec<u8>>>> = convs
        .iter()
        .map(|c| vec![Vec::new(); c.members.len()])
        .collect();
    for t in tasks {
        let (c, m, lat, smp) = t.await.map_err(|e| anyhow!("a device failed: {e}"))?;
        latencies.merge(lat);
        samples[c][m] = smp;
    }
    Ok(Outcome {
        posted,
        delivered_in_window: shared.in_window.load(Ordering::Relaxed),
        delivered_total: shared.counters.delivered.load(Ordering::Relaxed),
        echoes: shared.echoes.load(Ordering::Relaxed),
        errors: shared.counters.errors.load(Ordering::Relaxed),
        latencies,
        send_lag,
        samples,
    })
}

/// Post ids are odd (`2k + 1`), everything else even.
fn post_id(k: u64) -> u64 {
    2 * k + 1
}

/// What a device does besides reading its queue.
enum Role {
    /// Posts the conversation's pool; reports `(posts answered Ok, send lag)` on `done` once
    /// every post it sent is answered, then reads until the window's end like a receiver.
    Sender {
        template: Post,
        pool: Arc<Vec<Vec<u8>>>,
        done: oneshot::Sender<(u64, Latencies)>,
    },
    Receiver,
}

type ReadResult = (usize, usize, Latencies, Vec<Vec<u8>>);

/// One device: one task owning its WebSocket, reading and writing it in turn. A task per
/// direction with a channel between (as before) woke two or three tasks per frame; the
/// tool shares the 2 cores with the server it measures, so its own cost per message counts.
struct Device {
    ws: Ws,
    shared: Arc<Shared>,
    /// `true` once the window and its drain are over: a connection ending after that is no
    /// error.
    stopped: watch::Receiver<bool>,
    c: usize,
    m: usize,
    next_ack_id: u64,
    /// The last post index seen from the sender (pool indexes repeat once it is used up).
    last_k: Option<u64>,
    latencies: Latencies,
    samples: Vec<Vec<u8>>,
    /// The connection ended (counted once, as an error if before the window's end).
    closed: bool,
}

/// A frame that needs the caller: the answer to a post, or the end of the connection.
enum Event {
    Answer(bool),
    Closed,
    Other,
}

impl Device {
    async fn run(mut self, role: Role) -> ReadResult {
        if let Role::Sender {
            template,
            pool,
            done,
        } = role
        {
            let result = self.post_all(template, &pool).await;
            let _ = done.send(result);
        }
        // Read until the window (and its drain) is over.
        while !self.closed {
            let msg = tokio::select! {
                msg = self.ws.next() => msg,
                _ = self.stopped.changed() => break,
            };
            self.handle(msg).await;
        }
        let _ = self.ws.close(None).await;
        (self.c, self.m, self.latencies, self.samples)
    }

    /// Post until the window ends; returns the posts answered `Ok` and, in an open loop, how
    /// late each left its schedule.
    async fn post_all(&mut self, template: Post, pool: &[Vec<u8>]) -> (u64, Latencies) {
        let shared = self.shared.clone();
        let mut ok = 0u64;
        let mut answered = 0u64;
        let mut lag = Latencies::default();
        tokio::time::sleep_until(shared.start.into()).await;
        let mut k: u64 = 0;
        loop {
            let left = match shared.pacing {
                Pacing::Closed => {
                    let now = Instant::now();
                    if now >= shared.end {
                        break;
                    }
                    now
                }
                Pacing::Open { rate } => {
                    let at = shared.start + open_offset(rate, shared.conversations, self.c, k);
                    if at >= shared.end {
                        break;
                    }
                    // Take the answers that come in meanwhile.
                    let sleep = tokio::time::sleep_until(at.into());
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            msg = self.ws.next() => match self.handle(msg).await {
                                Event::Answer(good) => {
                                    answered += 1;
                                    ok += u64::from(good);
                                }
                                Event::Closed => return (ok, lag),
                                Event::Other => {}
                            },
                        }
                    }
                    let left = Instant::now();
                    lag.record(left.saturating_duration_since(at));
                    left
                }
            };
            if let Ok(mut v) = shared.sent[self.c].lock() {
                v.push(left);
            }
            let mut post = template.clone();
            let mut message_id = [0u8; 16];
            message_id[..8].copy_from_slice(&(self.c as u64).to_le_bytes());
            message_id[8..].copy_from_slice(&k.to_le_bytes());
            post.message_id = message_id.to_vec();
            post.payload = pool[(k as usize) % pool.len()].clone();
            let frame = ClientFrame {
                id: post_id(k),
                request: Some(Request::Post(post)),
            };
            if self
                .ws
                .send(tungstenite::Message::Binary(
                    wire::encode_padded(&frame).into(),
                ))
                .await
                .is_err()
            {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.closed = true;
                return (ok, lag);
            }
            k += 1;
            if let Pacing::Closed = shared.pacing {
                match self.answer().await {
                    Some(good) => {
                        answered += 1;
                        ok += u64::from(good);
                    }
                    None => return (ok, lag),
                }
            }
        }
        // Open loop: collect the answers of the posts still in flight.
        while answered < k {
            match self.answer().await {
                Some(good) => {
                    answered += 1;
                    ok += u64::from(good);
                }
                None => break,
            }
        }
        (ok, lag)
    }

    /// Read until the answer to a post arrives (`Some(ok)`), or `None` if the connection ends
    /// or none comes within 30 s.
    async fn answer(&mut self) -> Option<bool> {
        let wait = async {
            loop {
                let msg = self.ws.next().await;
                match self.handle(msg).await {
                    Event::Answer(good) => return Some(good),
                    Event::Closed => return None,
                    Event::Other => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .ok()
            .flatten()
    }

    /// Handle one frame: count a post's answer, record and acknowledge a push.
    async fn handle(
        &mut self,
        msg: Option<Result<tungstenite::Message, tungstenite::Error>>,
    ) -> Event {
        let shared = self.shared.clone();
        let err = |shared: &Shared| shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        let Some(Ok(msg)) = msg else {
            if !*self.stopped.borrow() {
                err(&shared);
            }
            self.closed = true;
            return Event::Closed;
        };
        let tungstenite::Message::Binary(bytes) = msg else {
            return Event::Other;
        };
        let Ok(frame) = wire::decode_server(&bytes) else {
            err(&shared);
            return Event::Other;
        };
        match frame.kind {
            Some(server_frame::Kind::Response(r)) => {
                let ok = !matches!(r.body, Some(response::Body::Error(_)) | None);
                if !ok {
                    err(&shared);
                }
                if r.id % 2 == 1 {
                    if ok {
                        shared.counters.posted.fetch_add(1, Ordering::Relaxed);
                    }
                    return Event::Answer(ok);
                }
                Event::Other
            }
            Some(server_frame::Kind::Push(push)) => {
                let now = Instant::now();
                let mut max_seq = 0;
                for qm in &push.messages {
                    max_seq = max_seq.max(qm.seq);
                    let Some(&(from, idx)) = shared.fingerprints.get(&fingerprint(&qm.payload))
                    else {
                        // Left over from setup (e.g. the sender's own earlier messages).
                        continue;
                    };
                    if from as usize != self.c {
                        err(&shared);
                        continue;
                    }
                    if self.m == 0 {
                        shared.echoes.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // The post index: the next one after the last seen with this pool index.
                    let p = shared.pool_len as u64;
                    let idx = u64::from(idx);
                    let k = match self.last_k {
                        None => idx,
                        Some(l) => {
                            let base = (l + 1) / p * p + idx;
                            if base > l { base } else { base + p }
                        }
                    };
                    self.last_k = Some(k);
                    shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if now <= shared.end {
                        shared.in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(sent) = shared.sent_at(self.c, k) {
                        self.latencies.record(now.saturating_duration_since(sent));
                    }
                    if (k as usize) < shared.pool_len
                        && (k as usize).is_multiple_of(shared.sample_every)
                    {
                        self.samples.push(qm.payload.clone());
                    }
                }
                if max_seq > 0 {
                    let frame = ClientFrame {
                        id: self.next_ack_id,
                        request: Some(Request::Ack(Ack {
                            queue_id: push.queue_id,
                            up_to_seq: max_seq,
                            quiet: true,
                        })),
                    };
                    self.next_ack_id += 2;
                    if self
                        .ws
                        .send(tungstenite::Message::Binary(
                            wire::encode_padded(&frame).into(),
                        ))
                        .await
                        .is_err()
                    {
                        err(&shared);
                        self.closed = true;
                        return Event::Closed;
                    }
                }
                Event::Other
            }
            None => {
                err(&shared);
                Event::Other
            }
        }
    }
}
