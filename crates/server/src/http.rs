//! The HTTP front: the axum router with the WebSocket endpoint (`/v1/ws`) and `/healthz`, the
//! connection cap, the socket settings, and the listener that drops slow clients (handshake
//! and frame deadlines) and never hands out peer addresses. Nothing else is served.
//! Not for: the connection loop (see `ws`).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use blindpost_wire::WS_PATH;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::service::Service;
use crate::session::SessionLimits;

/// What every request handler shares.
pub struct AppState {
    /// The domain.
    pub service: Arc<Service>,
    /// One permit per open WebSocket connection.
    pub connections: Arc<Semaphore>,
    /// Becomes `true` at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Per-connection limits.
    pub limits: SessionLimits,
    /// Numbers connections for log spans (a counter, never an address).
    pub next_connection: AtomicU64,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(WS_PATH, get(upgrade))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if app.service.healthy().await {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    }
}

async fn upgrade(
    State(app): State<Arc<AppState>>,
    ConnectInfo(ConnInfo(progress)): ConnectInfo<ConnInfo>,
    ws: WebSocketUpgrade,
) -> Response {
    if *app.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Ok(permit) = Arc::clone(&app.connections).try_acquire_owned() else {
        tracing::warn!("connection refused: connection limit reached");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    progress.upgraded();
    ws.max_message_size(crate::ws::SOCKET_MAX_MESSAGE)
        .max_frame_size(crate::ws::SOCKET_MAX_MESSAGE)
        .read_buffer_size(2 * 1024)
        // Frames are written when `ws::write_out` flushes (after each answer and the pushes
        // waiting behind it); the threshold only bounds what one write may gather. Memory:
        // the buffer grows only as far as what was queued.
        .write_buffer_size(crate::ws::WRITE_GATHER_BYTES)
        .on_upgrade(move |socket| {
            let conn = app.next_connection.fetch_add(1, Ordering::Relaxed);
            let span = tracing::debug_span!("conn", conn);
            async move {
                tracing::debug!("connection opened");
                let (service, shutdown) = (Arc::clone(&app.service), app.shutdown.clone());
                crate::ws::serve(socket, service, app.limits, &progress, shutdown).await;
                tracing::debug!("connection closed");
                drop(permit);
            }
            .instrument(span)
        })
}

// ---------------------------------------------------------------------------------------------
// Slow clients

/// The TCP listener, wrapped so every connection carries its [`Progress`] deadlines. It hands
/// axum no peer address at all (`Addr = ()`): nothing past `accept` can log one.
pub struct DeadlineListener {
    inner: TcpListener,
    handshake_timeout: Duration,
    frame_timeout: Duration,
}

impl DeadlineListener {
    /// Wraps `inner`: a connection must finish the WebSocket handshake within
    /// `handshake_timeout` of being accepted, and once upgraded, a frame must arrive whole
    /// within `frame_timeout` of its first byte.
    pub fn new(inner: TcpListener, handshake_timeout: Duration, frame_timeout: Duration) -> Self {
        Self {
            inner,
            handshake_timeout,
            frame_timeout,
        }
    }
}

impl axum::serve::Listener for DeadlineListener {
    type Io = DeadlineStream;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, _peer)) => {
                    // No Nagle: a response and the push after it are two small writes; with
                    // Nagle the second waited for the peer's delayed ACK (~40 ms on Linux).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not disable Nagle's algorithm");
                    }
                    let progress = Arc::new(Progress {
                        frame_timeout: self.frame_timeout,
                        deadline: Mutex::new(Some(Instant::now() + self.handshake_timeout)),
                        upgraded: AtomicBool::new(false),
                    });
                    let stream = DeadlineStream {
                        tcp,
                        progress,
                        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                        sleep_set: false,
                    };
                    return (stream, ());
                }
                // Per-connection failures (reset before accept) are harmless; anything else
                // (out of file descriptors) gets a pause so the loop does not spin.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr().map(|_| ())
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// One connection's deadline: armed at accept for the handshake; disarmed by the upgrade;
/// then armed by the first byte of each frame and disarmed when the frame is complete.
#[derive(Debug)]
pub struct Progress {
    frame_timeout: Duration,
    deadline: Mutex<Option<Instant>>,
    upgraded: AtomicBool,
}

impl Progress {
    /// The handshake is complete: no deadline until the first byte of a frame.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
        self.set(None);
    }

    /// A whole frame has arrived: no deadline until the first byte of the next.
    pub fn frame_done(&self) {
        self.set(None);
    }

    fn set(&self, deadline: Option<Instant>) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = deadline;
        }
    }

    /// The armed deadline, arming the frame deadline if bytes just arrived on an upgraded
    /// connection with none armed.
    fn deadline(&self, bytes_arrived: bool) -> Option<Instant> {
        let Ok(mut d) = self.deadline.lock() else {
            return None;
        };
        if d.is_none() && bytes_arrived && self.upgraded.load(Ordering::Acquire) {
            *d = Some(Instant::now() + self.frame_timeout);
        }
        *d
    }
}

/// What handlers learn about their connection: its [`Progress`], never its address.
#[derive(Debug, Clone)]
pub struct ConnInfo(pub Arc<Progress>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, DeadlineListener>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, DeadlineListener>) -> Self {
        Self(Arc::clone(&stream.io().progress))
    }
}

/// A TCP stream whose reads fail with `TimedOut` once its [`Progress`] deadline passes.
pub struct DeadlineStream {
    tcp: TcpStream,
    progress: Arc<Progress>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Whether `sleep` was set to a deadline and polled since it was last let go: it then
    /// holds the waker of the task that polled it.
    sleep_set: bool,
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        let arrived = buf.filled().len() > before;
        let Some(deadline) = this.progress.deadline(arrived) else {
            if this.sleep_set {
                // Disarmed (the upgrade, or a frame completed): set the sleep to fire now, so
                // the timer wakes and drops the waker it holds. After the handshake that is
                // the waker of hyper's connection task, finished once it handed the socket
                // over; held until the handshake deadline, it kept that task's memory
                // (~1.1 KiB) allocated for 10 s after every connection's upgrade (massif;
                // BENCHMARKS.md, "Idle connections").
                this.sleep.as_mut().reset(Instant::now());
                this.sleep_set = false;
            }
            return read;
        };
        if Instant::now() >= deadline {
            tracing::debug!("slow client dropped");
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client was too slow",
            )));
        }
        if read.is_pending() {
            // Wake up at the deadline even if no byte ever comes.
            this.sleep.as_mut().reset(deadline);
            this.sleep_set = true;
            if this.sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        read
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Wake, Waker};

    use axum::serve::Listener as _;
    use tokio::io::ReadBuf;

    use super::*;

    /// A task's waker, counted: the timer holding a clone keeps the `Arc` (as it would keep
    /// the task's memory) alive.
    struct Task;

    impl Wake for Task {
        fn wake(self: Arc<Self>) {}
    }

    fn poll_once(stream: &mut DeadlineStream, task: &Arc<Task>) -> Poll<std::io::Result<()>> {
        let waker = Waker::from(Arc::clone(task));
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(stream).poll_read(&mut Context::from_waker(&waker), &mut buf)
    }

    /// The handshake runs in hyper's connection task and the frames in the WebSocket task:
    /// once the connection is upgraded, the deadline's timer must not keep holding the
    /// connection task's waker, which kept that finished task's memory allocated until the
    /// handshake deadline.
    #[tokio::test]
    async fn the_upgrade_lets_go_of_the_handshake_tasks_waker() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener =
            DeadlineListener::new(tcp, Duration::from_secs(10), Duration::from_secs(10));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut stream, ()) = listener.accept().await;

        let handshake = Arc::new(Task);
        assert!(poll_once(&mut stream, &handshake).is_pending());
        assert_eq!(
            Arc::strong_count(&handshake),
            3,
            "the socket's read interest and the handshake deadline's timer hold its waker"
        );

        stream.progress.upgraded();
        let frames = Arc::new(Task);
        assert!(poll_once(&mut stream, &frames).is_pending());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            Arc::strong_count(&handshake),
            1,
            "after the upgrade the timer still holds the handshake task's waker"
        );
        // The socket's read interest holds the frames task's waker; no deadline does, since
        // no frame has begun.
        assert_eq!(Arc::strong_count(&frames), 2);
    }
}
