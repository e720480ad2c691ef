//! The relay byte tunnel: a WebSocket to a volunteer relay whose binary messages are chunks
//! of one byte stream to the relay's upstream server, adapted to `AsyncRead + AsyncWrite` so
//! the client can run its own TLS to the server inside it (the relay sees only ciphertext).
//! Buffering is bounded: at most one received message is held, each write sends at most
//! [`MAX_CHUNK`] bytes and waits while tungstenite's write buffer is full. Ping and Pong are
//! not data; Close (or the end of the stream) is end of file; a text message is a protocol
//! error. Not for: opening the relay's WebSocket (`connect`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};

/// Most bytes one written chunk carries (a TLS record and its header fit).
pub(crate) const MAX_CHUNK: usize = 16 * 1024 + 256;
/// Largest message accepted from a relay.
pub(crate) const MAX_RELAY_MESSAGE: usize = 256 * 1024;

/// The WebSocket configuration of a tunnel: messages bounded, a small write buffer.
pub(crate) fn config() -> tungstenite::protocol::WebSocketConfig {
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(MAX_RELAY_MESSAGE);
    config.max_frame_size = Some(MAX_RELAY_MESSAGE);
    config.write_buffer_size = 64 * 1024;
    config.max_write_buffer_size = 4 * MAX_RELAY_MESSAGE;
    config
}

/// A byte stream carried in a WebSocket's binary messages.
pub(crate) struct WsTunnel<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last received message.
    pending: Bytes,
    eof: bool,
}

impl<S> WsTunnel<S> {
    pub(crate) fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsTunnel<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending = this.pending.slice(n..);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None
                | Some(Ok(Message::Close(_)))
                | Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => this.eof = true,
                Some(Ok(Message::Binary(bytes))) => this.pending = bytes,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the relay sent a text message inside the byte tunnel",
                    )));
                }
                // Ping (tungstenite answers it), Pong, raw frames: not data.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsTunnel<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_CHUNK);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
