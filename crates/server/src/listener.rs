//! The TCP listener and its connections: every accepted stream carries a [`Progress`]
//! deadline (handshake, then per frame), performs its TLS handshake lazily on its first poll,
//! in the connection's own task and inside the handshake deadline, never in the accept loop,
//! and never hands out the peer's address. Not for: routing or the WebSocket loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::tls::ConfigSource;

/// The TCP listener, wrapped so every connection carries its [`Progress`] deadlines and, with
/// TLS on, runs its handshake lazily. It hands axum no peer address at all (`Addr = ()`):
/// nothing past `accept` can log one.
pub struct DeadlineListener {
    inner: TcpListener,
    handshake_timeout: Duration,
    frame_timeout: Duration,
    tls: Option<Arc<dyn ConfigSource>>,
}

impl DeadlineListener {
    /// Wraps `inner`: a connection must finish the handshakes (TLS, if on, and WebSocket)
    /// within `handshake_timeout` of being accepted, and once upgraded, a frame must arrive
    /// whole within `frame_timeout` of its first byte.
    pub fn new(inner: TcpListener, handshake_timeout: Duration, frame_timeout: Duration) -> Self {
        Self {
            inner,
            handshake_timeout,
            frame_timeout,
            tls: None,
        }
    }

    /// Serves TLS, with configurations from `source`.
    pub fn with_tls(mut self, source: Option<Arc<dyn ConfigSource>>) -> Self {
        self.tls = source;
        self
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
                    let io = match &self.tls {
                        None => Io::Plain(tcp),
                        // Not awaited here: the connection's task drives it on its first poll.
                        Some(source) => {
                            Io::Handshaking(Box::pin(tls_handshake(tcp, Arc::clone(source))))
                        }
                    };
                    let stream = DeadlineStream {
                        io,
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

/// Reads the ClientHello, asks `source` for the configuration to answer it with, and
/// completes the handshake.
async fn tls_handshake(
    tcp: TcpStream,
    source: Arc<dyn ConfigSource>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let config = source.config_for(&start.client_hello());
    start.into_stream(config).await
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

/// The TLS handshake in progress, boxed so an idle plain connection pays only a pointer.
type Handshake = Pin<Box<dyn Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send>>;

/// A connection's transport, by state: plain TCP; or a TLS handshake, then the TLS stream.
enum Io {
    Plain(TcpStream),
    Handshaking(Handshake),
    Tls(Box<TlsStream<TcpStream>>),
    /// The handshake failed; the connection is finished.
    Failed,
}

/// A connection whose reads fail with `TimedOut` once its [`Progress`] deadline passes; with
/// TLS, the handshake runs on its first poll and counts against the same deadline.
pub struct DeadlineStream {
    io: Io,
    progress: Arc<Progress>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Whether `sleep` was set to a deadline and polled since it was last let go: it then
    /// holds the waker of the task that polled it.
    sleep_set: bool,
}

fn failed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the TLS handshake failed")
}

impl DeadlineStream {
    /// Drives the TLS handshake, if one is in progress, until it completes (`Ready(Ok)`, also
    /// for plain connections), fails, or passes the deadline.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Io::Handshaking(handshake) = &mut self.io else {
            return match self.io {
                Io::Failed => Poll::Ready(Err(failed())),
                _ => Poll::Ready(Ok(())),
            };
        };
        match handshake.as_mut().poll(cx) {
            Poll::Ready(Ok(tls)) => {
                self.io = Io::Tls(Box::new(tls));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                self.io = Io::Failed;
                Poll::Ready(Err(e))
            }
            Poll::Pending => match self.check_deadline(cx, false, true) {
                Some(e) => {
                    self.io = Io::Failed;
                    Poll::Ready(Err(e))
                }
                None => Poll::Pending,
            },
        }
    }

    /// Applies the deadline after a read: `Some(TimedOut)` once it has passed; while the read
    /// is pending, a timer wakes the task at the deadline.
    fn check_deadline(
        &mut self,
        cx: &mut Context<'_>,
        arrived: bool,
        pending: bool,
    ) -> Option<std::io::Error> {
        let Some(deadline) = self.progress.deadline(arrived) else {
            if self.sleep_set {
                // Disarmed (the upgrade, or a frame completed): set the sleep to fire now, so
                // the timer wakes and drops the waker it holds. After the handshake that is
                // the waker of hyper's connection task, finished once it handed the socket
                // over; held until the handshake deadline, it kept that task's memory
                // (~1.1 KiB) allocated for 10 s after every connection's upgrade (massif;
                // BENCHMARKS.md, "Idle connections").
                self.sleep.as_mut().reset(Instant::now());
                self.sleep_set = false;
            }
            return None;
        };
        if Instant::now() >= deadline {
            tracing::debug!("slow client dropped");
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client was too slow",
            ));
        }
        if pending {
            // Wake up at the deadline even if no byte ever comes.
            self.sleep.as_mut().reset(deadline);
            self.sleep_set = true;
            if self.sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        None
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.poll_handshake(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Io::Handshaking(_) | Io::Failed => return Poll::Ready(Err(failed())),
        };
        let arrived = buf.filled().len() > before;
        match this.check_deadline(cx, arrived, read.is_pending()) {
            Some(e) => Poll::Ready(Err(e)),
            None => read,
        }
    }
}

/// Forwards a write-side call to the transport once the handshake is done.
macro_rules! forward {
    ($this:ident, $cx:ident, $call:ident $(, $arg:expr)*) => {{
        match $this.poll_handshake($cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match &mut $this.io {
            Io::Plain(tcp) => Pin::new(tcp).$call($cx $(, $arg)*),
            Io::Tls(tls) => Pin::new(tls.as_mut()).$call($cx $(, $arg)*),
            Io::Handshaking(_) | Io::Failed => Poll::Ready(Err(failed())),
        }
    }};
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        forward!(this, cx, poll_write, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        forward!(this, cx, poll_flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.io {
            Io::Failed => return Poll::Ready(Ok(())),
            // Closing before the handshake finished (a graceful shutdown): drop it, which
            // closes the socket, rather than wait for a client that may never finish.
            Io::Handshaking(_) => {
                this.io = Io::Failed;
                return Poll::Ready(Ok(()));
            }
            Io::Plain(_) | Io::Tls(_) => {}
        }
        forward!(this, cx, poll_shutdown)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        forward!(this, cx, poll_write_vectored, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            // tokio-rustls gathers vectored writes into TLS records.
            Io::Handshaking(_) | Io::Tls(_) => true,
            Io::Failed => false,
        }
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
