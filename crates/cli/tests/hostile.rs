//! A hostile relay between the real `blindpost` and the real `blindpostd`: it decodes every
//! frame and, on command, replays old messages, duplicates, reorders, drops one, withholds a
//! commit from one member (and releases it later), holds everything back until its user
//! commits, or sends garbage. Each test asserts what the user sees: nothing twice, nothing
//! lost that the server had, gaps and forks reported as `gap`/`fork` items, a clean error for
//! garbage, and normal service once the relay behaves. (Forged and external commits need
//! MLS to forge; they are in the client crate's `tests/hostile.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blindpost_wire::{
    self as wire, ClientFrame, QueueMessage, Request, ServerFrame, response, server_frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use util::{Server, User, of_kind, texts};

/// What the relay does to the next messages it delivers to its user.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    /// Forward faithfully.
    Pass,
    /// Append every payload delivered before, once, to the next delivery.
    Replay,
    /// Deliver every message twice.
    Duplicate,
    /// Deliver each batch in reverse order.
    Reverse,
    /// Drop the next message, for good.
    DropNext,
    /// Keep the next message back (until [`Mode::Release`]).
    HoldNext,
    /// Deliver the held messages with the next delivery, then pass.
    Release,
    /// Keep back everything until the user sends a commit, then [`Mode::Release`].
    HoldUntilCommit,
    /// Add messages of random garbage to the next delivery.
    GarbageMessages,
    /// Answer the next request with an undecodable frame.
    GarbageFrame,
}

/// Per-queue translation between the sequence numbers the client sees and the server's, so
/// the relay can add and remove messages and the client's acknowledgements still make sense.
#[derive(Default)]
struct SeqMap {
    next: u64,
    /// (client seq, server seq), ascending in both.
    pairs: Vec<(u64, u64)>,
}

impl SeqMap {
    fn to_server(&self, client_seq: u64) -> u64 {
        self.pairs
            .iter()
            .rev()
            .find(|(c, _)| *c <= client_seq)
            .map_or(0, |(_, s)| *s)
    }

    fn real(&mut self, server_seq: u64) -> u64 {
        if let Some((c, _)) = self.pairs.iter().find(|(_, s)| *s == server_seq) {
            return *c;
        }
        self.next += 1;
        self.pairs.push((self.next, server_seq));
        self.next
    }

    fn injected(&mut self) -> u64 {
        let server = self.pairs.last().map_or(0, |(_, s)| *s);
        self.next += 1;
        self.pairs.push((self.next, server));
        self.next
    }
}

#[derive(Default)]
struct State {
    mode: Option<Mode>,
    seen: Vec<Vec<u8>>,
    queues: HashMap<Vec<u8>, SeqMap>,
    fetches: HashMap<u64, Vec<u8>>,
    /// Server sequence numbers never to deliver (dropped or held).
    hidden: Vec<(Vec<u8>, u64)>,
    held: Vec<(Vec<u8>, Vec<u8>)>,
}

impl State {
    fn mode(&self) -> Mode {
        self.mode.clone().unwrap_or(Mode::Pass)
    }

    /// Rewrite a request's sequence numbers into the server's.
    fn outbound(&mut self, frame: &mut ClientFrame) {
        match &mut frame.request {
            Some(Request::Fetch(f)) => {
                self.fetches.insert(frame.id, f.queue_id.clone());
                f.after_seq = self.map(&f.queue_id).to_server(f.after_seq);
            }
            Some(Request::Subscribe(s)) => {
                s.after_seq = self.map(&s.queue_id).to_server(s.after_seq);
            }
            Some(Request::Ack(a)) => a.up_to_seq = self.map(&a.queue_id).to_server(a.up_to_seq),
            Some(Request::Commit(_)) if self.mode() == Mode::HoldUntilCommit => {
                self.mode = Some(Mode::Release);
            }
            _ => {}
        }
    }

    fn map(&mut self, queue: &[u8]) -> &mut SeqMap {
        self.queues.entry(queue.to_vec()).or_default()
    }

    /// Apply the mode to messages bound for the client.
    fn inbound(&mut self, queue: &[u8], messages: Vec<QueueMessage>) -> Vec<QueueMessage> {
        let mut real: Vec<QueueMessage> = messages
            .into_iter()
            .filter(|m| !self.hidden.contains(&(queue.to_vec(), m.seq)))
            .collect();
        let mode = self.mode();
        if matches!(mode, Mode::DropNext | Mode::HoldNext) && !real.is_empty() {
            let m = real.remove(0);
            self.hidden.push((queue.to_vec(), m.seq));
            if mode == Mode::HoldNext {
                self.held.push((queue.to_vec(), m.payload));
            }
            self.mode = None;
        }
        if mode == Mode::HoldUntilCommit {
            for m in real.drain(..) {
                self.hidden.push((queue.to_vec(), m.seq));
                self.held.push((queue.to_vec(), m.payload));
            }
        }
        if mode == Mode::Reverse {
            real.reverse();
        }
        let mut out = Vec::new();
        for m in real {
            let seq = self.map(queue).real(m.seq);
            self.seen.push(m.payload.clone());
            let copy = (mode == Mode::Duplicate).then(|| m.payload.clone());
            out.push(QueueMessage { seq, ..m });
            if let Some(payload) = copy {
                out.push(self.inject(queue, payload));
            }
        }
        match mode {
            Mode::Replay => {
                for payload in self.seen.clone() {
                    out.push(self.inject(queue, payload));
                }
                self.mode = None;
            }
            Mode::Release => {
                let held: Vec<_> = std::mem::take(&mut self.held);
                let mut released = Vec::new();
                for (q, payload) in held {
                    if q == queue {
                        released.push(self.inject(queue, payload));
                    } else {
                        self.held.push((q, payload));
                    }
                }
                // In the order they were held, ahead of the rest.
                out.splice(0..0, released);
                if self.held.is_empty() {
                    self.mode = None;
                }
            }
            Mode::GarbageMessages => {
                for payload in [vec![], vec![0xff; 7], b"garbage".repeat(50)] {
                    out.push(self.inject(queue, payload));
                }
                self.mode = None;
            }
            _ => {}
        }
        // The client sorts by sequence number; held messages released must come first.
        let mut seqs: Vec<u64> = out.iter().map(|m| m.seq).collect();
        seqs.sort_unstable();
        for (m, s) in out.iter_mut().zip(seqs) {
            m.seq = s;
        }
        out
    }

    fn inject(&mut self, queue: &[u8], payload: Vec<u8>) -> QueueMessage {
        QueueMessage {
            seq: self.map(queue).injected(),
            payload,
        }
    }
}

/// A relay listening on its own port, forwarding to the real server.
struct Relay {
    url: String,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl Relay {
    fn start(upstream: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let upstream = format!("{upstream}{}", wire::WS_PATH);
        let st = state.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(relay_connection(tcp, upstream.clone(), st.clone()));
            }
        });
        Self {
            url,
            state,
            _runtime: runtime,
        }
    }

    fn set(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    fn mode(&self) -> Mode {
        self.state.lock().unwrap().mode()
    }
}

async fn relay_connection(tcp: tokio::net::TcpStream, upstream: String, state: Arc<Mutex<State>>) {
    let Ok(client) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let Ok((server, _)) = tokio_tungstenite::connect_async(&upstream).await else {
        return;
    };
    let (mut c_tx, mut c_rx) = client.split();
    let (mut s_tx, mut s_rx) = server.split();
    let (to_client, mut to_client_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let st = state.clone();
    let garbage = to_client.clone();
    let up = async move {
        while let Some(Ok(msg)) = c_rx.next().await {
            let Message::Binary(bytes) = msg else {
                continue;
            };
            let mut frame = wire::decode_client(&bytes).unwrap();
            {
                let mut s = st.lock().unwrap();
                if s.mode() == Mode::GarbageFrame {
                    s.mode = None;
                    let _ = garbage.send(vec![0xff, 0x01, 0x02, 0x03]);
                    continue;
                }
                s.outbound(&mut frame);
            }
            if s_tx
                .send(Message::Binary(wire::encode(&frame).into()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let down = async move {
        while let Some(Ok(msg)) = s_rx.next().await {
            let Message::Binary(bytes) = msg else {
                continue;
            };
            let mut frame: ServerFrame = wire::decode_server(&bytes).unwrap();
            {
                let mut s = state.lock().unwrap();
                match &mut frame.kind {
                    Some(server_frame::Kind::Push(p)) => {
                        let msgs = std::mem::take(&mut p.messages);
                        p.messages = s.inbound(&p.queue_id, msgs);
                    }
                    Some(server_frame::Kind::Response(r)) => {
                        if let (Some(queue), Some(response::Body::Messages(m))) =
                            (s.fetches.remove(&r.id), r.body.as_mut())
                        {
                            let msgs = std::mem::take(&mut m.messages);
                            m.messages = s.inbound(&queue, msgs);
                        }
                    }
                    None => {}
                }
            }
            if to_client.send(wire::encode(&frame)).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some(bytes) = to_client_rx.recv().await {
            if c_tx.send(Message::Binary(bytes.into())).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = write => {}
    }
}

/// A user whose every connection goes through its own relay.
fn user(server: &Server, name: &str) -> (User, Relay) {
    let relay = Relay::start(&server.url);
    let user = User::setup_at(&relay.url, name);
    (user, relay)
}

#[test]
fn replays_duplicates_and_reordering_never_show_a_message_twice() {
    let server = Server::start();
    let (alice, _a) = user(&server, "alice");
    let (bob, relay) = user(&server, "bob");

    alice.ok(&["send", "@bob", "one"]);
    assert_eq!(bob.receive_texts(), ["one"]);

    // Every message delivered so far, replayed under new sequence numbers.
    relay.set(Mode::Replay);
    let items = bob.receive();
    assert!(items.is_empty(), "replays were shown: {items:?}");
    assert_eq!(relay.mode(), Mode::Pass, "the replay happened");

    relay.set(Mode::Duplicate);
    for t in ["two", "three"] {
        alice.ok(&["send", "@bob", t]);
    }
    assert_eq!(bob.receive_texts(), ["two", "three"]);

    relay.set(Mode::Reverse);
    for t in ["four", "five", "six"] {
        alice.ok(&["send", "@bob", t]);
    }
    let items = bob.receive();
    let mut got = texts(&items);
    got.sort();
    assert_eq!(got, ["five", "four", "six"]);
    assert!(of_kind(&items, "gap").is_empty(), "{items:?}");

    relay.set(Mode::Pass);
    alice.ok(&["send", "@bob", "seven"]);
    assert_eq!(bob.receive_texts(), ["seven"]);
    // History holds each message exactly once (in the order processed).
    let mut history = texts(&bob.json(&["history", "@alice"]));
    history.sort();
    assert_eq!(
        history,
        ["five", "four", "one", "seven", "six", "three", "two"]
    );
}

#[test]
fn a_dropped_message_is_reported_as_a_gap_and_delivery_resumes() {
    let server = Server::start();
    let (alice, _a) = user(&server, "alice");
    let (bob, relay) = user(&server, "bob");

    alice.ok(&["send", "@bob", "first"]);
    assert_eq!(bob.receive_texts(), ["first"]);
    relay.set(Mode::DropNext);
    alice.ok(&["send", "@bob", "dropped"]);
    alice.ok(&["send", "@bob", "after"]);
    let items = bob.receive();
    assert_eq!(texts(&items), ["after"]);
    let gaps = of_kind(&items, "gap");
    assert_eq!(gaps.len(), 1, "{items:?}");
    assert_eq!(gaps[0]["from"], "alice");
    assert_eq!(gaps[0]["chat"], "@alice");
    assert!(gaps[0]["text"].as_str().unwrap().contains("did not arrive"));

    alice.ok(&["send", "@bob", "later"]);
    let items = bob.receive();
    assert_eq!(texts(&items), ["later"]);
    assert!(of_kind(&items, "gap").is_empty(), "{items:?}");
}

#[test]
fn a_commit_withheld_from_one_member_is_reported_and_the_group_recovers() {
    let server = Server::start();
    let (alice, _a) = user(&server, "alice");
    let (bob, _b) = user(&server, "bob");
    let (carol, relay) = user(&server, "carol");
    let (_dave, _d) = user(&server, "dave");

    alice.ok(&["group", "create", "team", "@bob", "@carol"]);
    assert_eq!(of_kind(&carol.receive(), "joined").len(), 1);
    // The server gives carol neither the commit adding dave nor, so she cannot read it, the
    // chat metadata alice sends right after in the new epoch.
    relay.set(Mode::HoldNext);
    alice.ok(&["group", "add", "team", "@dave"]);
    alice.ok(&["send", "team", "welcome dave"]);
    let items = carol.receive();
    assert!(texts(&items).is_empty(), "{items:?}");
    let gaps = of_kind(&items, "gap");
    assert_eq!(gaps.len(), 1, "one alarm for the epoch: {items:?}");
    assert_eq!(gaps[0]["chat"], "team");
    assert!(
        gaps[0]["text"]
            .as_str()
            .unwrap()
            .contains("withheld from us")
    );
    // Bob, not tampered with, sees everything and no alarm.
    let bob_items = bob.receive();
    assert!(of_kind(&bob_items, "gap").is_empty(), "{bob_items:?}");
    assert_eq!(texts(&bob_items), ["welcome dave"]);

    // The server behaves: the commit arrives late; carol catches up and reads new messages.
    relay.set(Mode::Release);
    let items = carol.receive();
    assert_eq!(of_kind(&items, "member_added").len(), 1, "{items:?}");
    alice.ok(&["send", "team", "all here?"]);
    assert_eq!(carol.receive_texts(), ["all here?"]);
    let members: Vec<String> = carol
        .json(&["group", "members", "team"])
        .iter()
        .map(|m| m["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, ["alice", "bob", "carol", "dave"]);
}

/// A message posted before our commit, still unread when the server accepts the commit, is
/// read all the same: the client keeps no past epoch's keys, so it reads its queue, where that
/// message waits ahead of the commit, before it applies its own commit.
#[test]
fn a_message_posted_before_our_commit_is_read_though_no_past_epoch_is_kept() {
    let server = Server::start();
    let (alice, relay) = user(&server, "alice");
    let (bob, _b) = user(&server, "bob");
    let (carol, _c) = user(&server, "carol");

    alice.ok(&["group", "create", "team", "@bob"]);
    assert_eq!(of_kind(&bob.receive(), "joined").len(), 1);
    // Bob's first post follows a commit of his own (a joiner's self-update).
    bob.ok(&["send", "team", "hello"]);
    assert_eq!(alice.receive_texts(), ["hello"]);
    // Until alice commits, the server shows her nothing: bob's message is in her queue, ahead
    // of her commit, unread when the server accepts the commit.
    relay.set(Mode::HoldUntilCommit);
    bob.ok(&["send", "team", "before the commit"]);
    alice.ok(&["group", "add", "team", "@carol"]);
    assert_eq!(
        relay.mode(),
        Mode::Pass,
        "the commit released what was held"
    );

    let items = alice.receive();
    assert_eq!(texts(&items), ["before the commit"], "{items:?}");
    assert!(of_kind(&items, "gap").is_empty(), "{items:?}");
    assert!(of_kind(&items, "fork").is_empty(), "{items:?}");
    assert!(
        of_kind(&items, "member_added").is_empty(),
        "the add command showed its own change already: {items:?}"
    );
    // The group works on in the new epoch, carol included.
    assert_eq!(of_kind(&carol.receive(), "joined").len(), 1);
    bob.ok(&["send", "team", "after the commit"]);
    assert_eq!(alice.receive_texts(), ["after the commit"]);
    assert_eq!(carol.receive_texts(), ["after the commit"]);
}

#[test]
fn garbage_from_the_server_is_a_clean_error_or_skipped_and_loses_nothing() {
    let server = Server::start();
    let (alice, _a) = user(&server, "alice");
    let (bob, relay) = user(&server, "bob");

    alice.ok(&["send", "@bob", "before"]);
    // An undecodable frame: the command fails with a one-line reason, not a panic.
    relay.set(Mode::GarbageFrame);
    let out = bob.run(&["receive", "--json"]);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101), "a panic");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid reply"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Garbage messages inside well-formed frames are skipped; the real one still arrives.
    relay.set(Mode::GarbageMessages);
    let items = bob.receive();
    assert_eq!(texts(&items), ["before"]);
    assert_eq!(relay.mode(), Mode::Pass, "the garbage was delivered");
    alice.ok(&["send", "@bob", "after"]);
    assert_eq!(bob.receive_texts(), ["after"]);
}
