//! The WebSocket test harness shared by the server's integration tests: `blindpost_server::run`
//! on port 0 with a fresh data directory, a `tokio-tungstenite` client speaking the wire types,
//! and request builders; `tools` drives external programs (Pebble, proxies). Not for: tests
//! themselves.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod tools;

pub use std::collections::VecDeque;
pub use std::net::SocketAddr;
pub use std::time::Duration;

pub use blindpost_server::Config;
pub use blindpost_wire::limits::MAX_FRAME_BYTES;
pub use blindpost_wire::response::Body;
pub use blindpost_wire::server_frame::Kind;
pub use blindpost_wire::{
    Ack, ClaimKeyPackage, ClientFrame, Commit, CreateGroup, CreateQueue,
    DIRECTORY_SIGNATURE_CONTEXT, Device, DirectoryEntry, ErrorCode, Fetch, LookupUser, Ping, Post,
    PublishKeyPackages, Push, QueueMessage, RegisterUser, Request, Response, Route,
    SignedDirectoryEntry, Subscribe, decode_server, encode,
};
pub use ed25519_dalek::{Signer, SigningKey};
pub use futures_util::{SinkExt, StreamExt};
pub use prost::Message as _;
pub use sha2::{Digest, Sha256};
pub use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
pub use tokio::net::{TcpListener, TcpStream};
pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod tls;

/// Guards against a hung test; never an assertion about speed.
pub const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Harness

pub struct Server {
    pub addr: SocketAddr,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), blindpost_server::RunError>>,
    pub _dir: tempfile::TempDir,
}

pub async fn start() -> Server {
    start_with(|_| {}).await
}

pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config {
        listen: addr,
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    adjust(&mut config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(blindpost_server::run(listener, config, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

impl Server {
    pub async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub next_id: u64,
    pub pushes: VecDeque<Push>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
            .await
            .unwrap();
        Self {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }

    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    pub async fn frame(&mut self) -> Kind {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a frame arrives")
                .expect("the connection is open")
                .unwrap();
            match message {
                Message::Binary(bytes) => return decode_server(&bytes).unwrap().kind.unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// The next response (pushes seen meanwhile are kept for `push`).
    pub async fn response(&mut self) -> Response {
        loop {
            match self.frame().await {
                Kind::Response(r) => return r,
                Kind::Push(p) => self.pushes.push_back(p),
            }
        }
    }

    pub async fn request(&mut self, request: Request) -> Body {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            id,
            request: Some(request),
        };
        self.send(Message::binary(encode(&frame))).await;
        let response = self.response().await;
        assert_eq!(response.id, id);
        response.body.unwrap()
    }

    pub async fn ok(&mut self, request: Request) {
        match self.request(request).await {
            Body::Ok(_) => {}
            other => panic!("expected Ok, got {other:?}"),
        }
    }

    pub async fn error(&mut self, request: Request) -> blindpost_wire::Error {
        match self.request(request).await {
            Body::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub async fn push(&mut self) -> Push {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        match self.frame().await {
            Kind::Push(p) => p,
            Kind::Response(r) => panic!("unexpected response {r:?}"),
        }
    }

    /// Pushed messages of `queue` until `count` have arrived.
    pub async fn pushed(&mut self, queue: &[u8], count: usize) -> Vec<QueueMessage> {
        let mut got = Vec::new();
        while got.len() < count {
            let p = self.push().await;
            assert_eq!(p.queue_id, queue);
            got.extend(p.messages);
        }
        got
    }
}

pub fn error_response(r: &Response) -> &blindpost_wire::Error {
    match &r.body {
        Some(Body::Error(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// A queue's id and secrets, derived from one byte.
pub struct Q {
    pub id: Vec<u8>,
    pub receive: Vec<u8>,
    pub send: Vec<u8>,
}

pub fn q(n: u8) -> Q {
    Q {
        id: vec![n; 16],
        receive: vec![n ^ 0x11; 32],
        send: vec![n ^ 0x22; 32],
    }
}

pub fn create_queue(q: &Q) -> Request {
    Request::CreateQueue(CreateQueue {
        queue_id: q.id.clone(),
        receive_secret_hash: sha(&q.receive),
        send_token_hash: sha(&q.send),
    })
}

pub fn subscribe(q: &Q, push: bool) -> Request {
    Request::Subscribe(Subscribe {
        queue_id: q.id.clone(),
        receive_secret: q.receive.clone(),
        push,
        after_seq: 0,
    })
}

pub fn route(q: &Q) -> Route {
    Route {
        queue_id: q.id.clone(),
        send_token: q.send.clone(),
    }
}

pub fn post(group: &[u8], epoch: u64, token: &[u8], id: u8, payload: &[u8]) -> Request {
    Request::Post(Post {
        group_id: group.to_vec(),
        epoch,
        posting_token: token.to_vec(),
        message_id: vec![id; 16],
        payload: payload.to_vec(),
        skip_subscribed: false,
        fresh_id: false,
    })
}

pub fn fetch(q: &Q) -> Request {
    Request::Fetch(Fetch {
        queue_id: q.id.clone(),
        after_seq: 0,
        limit: 0,
    })
}

pub async fn fetched(c: &mut Client, q: &Q) -> Vec<(u64, Vec<u8>)> {
    match c.request(fetch(q)).await {
        Body::Messages(m) => m.messages.into_iter().map(|m| (m.seq, m.payload)).collect(),
        other => panic!("expected messages, got {other:?}"),
    }
}

/// Creates queue 1 and a group (id 7s, epoch 0, token 1s) routed to it.
pub async fn queue_and_group(c: &mut Client) -> (Q, Vec<u8>, Vec<u8>) {
    let a = q(1);
    c.ok(create_queue(&a)).await;
    let group = vec![7u8; 32];
    let token = vec![1u8; 32];
    c.ok(Request::CreateGroup(CreateGroup {
        group_id: group.clone(),
        epoch: 0,
        posting_token_hash: sha(&token),
        routes: vec![route(&a)],
    }))
    .await;
    (a, group, token)
}
