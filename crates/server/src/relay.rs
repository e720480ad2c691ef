//! `blindpostd relay`: a volunteer relay. A WebSocket on its secret path becomes a byte tunnel
//! to the one upstream server it was configured with — each binary message from the client is
//! written to a TCP connection the relay opened, and bytes from upstream go back as binary
//! messages. The client runs its own TLS to the upstream inside, so the relay sees only
//! ciphertext. Everything else gets the decoy site. Stores nothing, logs no addresses, bounds
//! tunnels, bandwidth and idleness. Not for: anything that understands the protocol.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::config::RelayConfig;
use crate::decoy::{Decoy, upgrade_or_decoy};
use crate::listener::{ConnInfo, DeadlineListener, Progress};
use crate::rate::TokenBucket;
use crate::tls::Tls;

/// The largest WebSocket message a client may send into a tunnel. Clients write their TLS
/// records (at most ~16 KiB each) as they come; a message past this closes the tunnel.
pub const MAX_TUNNEL_MESSAGE: usize = 256 * 1024;

/// The most bytes read from upstream into one message.
pub const UPSTREAM_CHUNK: usize = 16 * 1024;

/// How long the relay waits for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds a WebSocket message may take to arrive once its first byte has.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds open tunnels get to close at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the relay's handlers share.
struct Relay {
    upstream: String,
    ws_path: String,
    decoy: Decoy,
    tunnels: Arc<Semaphore>,
    bytes_per_sec: u32,
    idle: Duration,
    shutdown: watch::Receiver<bool>,
}

/// Serves the relay on `listener` (TLS if `tls` is given) until `shutdown` completes, then
/// closes the tunnels.
pub async fn run(
    listener: TcpListener,
    tls: Option<Tls>,
    config: &RelayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tunnels = Arc::new(Semaphore::new(config.max_tunnels as usize));
    let relay = Arc::new(Relay {
        upstream: config.upstream.clone(),
        ws_path: config.ws_path.clone(),
        decoy: Decoy::new(config.site.as_deref()),
        tunnels: Arc::clone(&tunnels),
        bytes_per_sec: config.tunnel_bytes_per_sec,
        idle: Duration::from_secs(config.tunnel_idle_secs),
        shutdown: stop_rx.clone(),
    });
    let listener = DeadlineListener::new(
        listener,
        Duration::from_secs(config.handshake_timeout_secs),
        FRAME_TIMEOUT,
    )
    .with_tls(tls.as_ref().map(Tls::source));
    let router = Router::new().fallback(front).with_state(relay);
    let mut serve_stop = stop_rx;
    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<ConnInfo>(),
    )
    .with_graceful_shutdown(async move { crate::stopped(&mut serve_stop).await })
    .await;
    if tokio::time::timeout(SHUTDOWN_GRACE, tunnels.acquire_many(config.max_tunnels))
        .await
        .is_err()
    {
        tracing::warn!("tunnels still open after the grace period");
    }
    signal.abort();
    served
}

async fn front(State(relay): State<Arc<Relay>>, request: Request) -> Response {
    let (ws, ConnInfo(progress)) =
        match upgrade_or_decoy(&relay.ws_path, &relay.decoy, request).await {
            Ok(upgrade) => upgrade,
            Err(decoy) => return decoy,
        };
    let busy = *relay.shutdown.borrow();
    let permit = match Arc::clone(&relay.tunnels).try_acquire_owned() {
        Ok(permit) if !busy => permit,
        _ => {
            tracing::debug!("tunnel refused: tunnel limit reached or shutting down");
            return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
        }
    };
    progress.upgraded();
    ws.max_message_size(MAX_TUNNEL_MESSAGE)
        .max_frame_size(MAX_TUNNEL_MESSAGE)
        .read_buffer_size(4 * 1024)
        .on_upgrade(move |socket| async move {
            tunnel(socket, &relay, &progress).await;
            drop(permit);
        })
}

/// Runs one tunnel until either side closes, it idles too long, or the relay shuts down.
async fn tunnel(socket: WebSocket, relay: &Relay, progress: &Progress) {
    let upstream =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&relay.upstream)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot reach the upstream");
                return;
            }
            Err(_) => {
                tracing::warn!("the upstream did not accept within 10 s");
                return;
            }
        };
    if let Err(e) = upstream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not disable Nagle's algorithm");
    }
    tracing::debug!("tunnel opened");
    let (from_upstream, to_upstream) = upstream.into_split();
    let (to_client, from_client) = socket.split();
    let activity = Activity(Mutex::new(Instant::now()));
    let bucket = || TokenBucket::new(relay.bytes_per_sec, f64::from(relay.bytes_per_sec));
    let mut shutdown = relay.shutdown.clone();
    tokio::select! {
        () = client_to_upstream(from_client, to_upstream, bucket(), &activity, progress) => {}
        () = upstream_to_client(from_upstream, to_client, bucket(), &activity) => {}
        () = activity.idle(relay.idle) => tracing::debug!("tunnel idle; closed"),
        () = crate::stopped(&mut shutdown) => {}
    }
    // Dropping both halves of each side closes them.
    tracing::debug!("tunnel closed");
}

/// When the tunnel last carried a byte.
struct Activity(Mutex<Instant>);

impl Activity {
    fn touch(&self) {
        if let Ok(mut last) = self.0.lock() {
            *last = Instant::now();
        }
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = match self.0.lock() {
                Ok(last) => *last,
                Err(_) => return,
            };
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Binary messages from the client, written to upstream; a text message, a close or an error
/// ends the tunnel.
async fn client_to_upstream(
    mut from_client: SplitStream<WebSocket>,
    mut to_upstream: OwnedWriteHalf,
    mut bucket: TokenBucket,
    activity: &Activity,
    progress: &Progress,
) {
    while let Some(message) = from_client.next().await {
        progress.frame_done();
        let bytes = match message {
            Ok(Message::Binary(bytes)) => bytes,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Text(_) | Message::Close(_)) => return,
            Err(e) => {
                tracing::debug!(error = %e, "client socket error");
                return;
            }
        };
        throttle(&mut bucket, bytes.len()).await;
        if to_upstream.write_all(&bytes).await.is_err() {
            return;
        }
        activity.touch();
    }
}

/// Bytes from upstream, sent to the client as binary messages of at most [`UPSTREAM_CHUNK`];
/// at the upstream's end of stream the client gets a close.
async fn upstream_to_client(
    mut from_upstream: OwnedReadHalf,
    mut to_client: SplitSink<WebSocket, Message>,
    mut bucket: TokenBucket,
    activity: &Activity,
) {
    let mut buf = vec![0u8; UPSTREAM_CHUNK];
    loop {
        let n = match from_upstream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to_client.send(Message::Close(None)).await;
                return;
            }
            Ok(n) => n,
        };
        throttle(&mut bucket, n).await;
        let chunk = axum::body::Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        if to_client.send(Message::Binary(chunk)).await.is_err() {
            return;
        }
        activity.touch();
    }
}

/// Takes `bytes` from the bucket, waiting as long as the bucket's debt needs to be repaid.
async fn throttle(bucket: &mut TokenBucket, bytes: usize) {
    let wait = bucket.take_with_debt(bytes, Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}
