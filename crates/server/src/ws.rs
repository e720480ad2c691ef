//! The WebSocket connection loop: binary frames in, one response per request and pushes out.
//! Decodes with the wire codec, hands requests to the [`Session`], encodes answers.
//! Not for: protocol rules (see `session` and `service`). Never logs peer addresses or bytes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use blindpost_wire::limits::MAX_FRAME_BYTES;
use blindpost_wire::{DecodeError, ErrorCode, Response, ServerFrame, decode_client, encode_padded};
use futures_util::SinkExt;
use tokio::sync::watch;

use crate::error::{BadRequest, Limit, Refusal, to_wire};
use crate::http::Progress;
use crate::service::Service;
use crate::session::{Session, SessionLimits};

/// The largest WebSocket message the socket layer accepts: a bit above `MAX_FRAME_BYTES`, so
/// a frame just over the limit reaches the codec and gets a `TooLarge` answer.
pub const SOCKET_MAX_MESSAGE: usize = MAX_FRAME_BYTES + 64 * 1024;

/// WebSocket close code "going away", sent at shutdown.
const CLOSE_GOING_AWAY: u16 = 1001;

/// Serves one upgraded connection until the client leaves, the socket fails or the server
/// shuts down. Requests are handled one at a time, in order; pushes go out between them.
pub async fn serve(
    mut socket: WebSocket,
    service: Arc<Service>,
    limits: SessionLimits,
    progress: &Progress,
    mut shutdown: watch::Receiver<bool>,
) {
    let send_timeout = limits.send_timeout;
    let mut session = Session::new(service, limits);
    let inbox = Arc::clone(session.inbox());
    loop {
        let news = inbox.has_news();
        tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => {
                let close = CloseFrame { code: CLOSE_GOING_AWAY, reason: "server shutting down".into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                break;
            }
            incoming = socket.recv() => {
                progress.frame_done();
                let reply = match incoming {
                    Some(Ok(Message::Binary(bytes))) => handle_binary(&mut session, &bytes).await,
                    Some(Ok(Message::Text(_))) if session.admit() => Some(Response::error(
                        0,
                        ErrorCode::Malformed,
                        "text frames are not part of the protocol; send binary frames",
                    )),
                    Some(Ok(Message::Text(_))) => Some(rate_limited()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "socket error");
                        break;
                    }
                };
                // Boxed, like request dispatch: inline, this future would enlarge every idle
                // connection's task (measured: 7.91 → 8.06 KiB per connection).
                let written = Box::pin(write_out(
                    &mut socket,
                    &mut session,
                    reply.map(Into::into),
                    send_timeout,
                ));
                if written.await.is_err() {
                    break;
                }
            }
            () = inbox.wait(), if !news => {}
            () = std::future::ready(()), if news => {
                let written = Box::pin(write_out(&mut socket, &mut session, None, send_timeout));
                if written.await.is_err() {
                    break;
                }
            }
        }
    }
}

async fn handle_binary(session: &mut Session, bytes: &[u8]) -> Option<Response> {
    Some(match decode_client(bytes) {
        // The session takes the rate budget itself, to answer under the frame's id.
        Ok(frame) => return session.handle(frame).await,
        Err(_) if !session.admit() => rate_limited(),
        Err(DecodeError::TooLarge { len }) => to_wire(
            0,
            &BadRequest::TooLarge {
                what: "frame",
                len,
                limit: MAX_FRAME_BYTES,
            }
            .into(),
        ),
        Err(e) => to_wire(0, &BadRequest::Malformed(e.to_string()).into()),
    })
}

fn rate_limited() -> Response {
    to_wire(0, &Refusal::LimitExceeded(Limit::RequestRate).into())
}

/// Most bytes `write_out` gathers before the socket layer writes them out by itself.
pub const WRITE_GATHER_BYTES: usize = 4 * SOCKET_MAX_MESSAGE;

/// Pushes written behind one answer (or one wake-up) at most, before the loop looks at the
/// socket again.
const PUSHES_PER_WRITE: usize = 8;

/// Writes `first` (an answer, if any) and then the pushes already waiting (at most
/// [`PUSHES_PER_WRITE`]) with one flush: a post's answer and its echo to the poster's own
/// queue leave in one system call (`send` was the largest cost of the connection tasks, perf).
/// A client that does not take them within `timeout` is dropped (`Err`).
async fn write_out(
    socket: &mut WebSocket,
    session: &mut Session,
    first: Option<ServerFrame>,
    timeout: Duration,
) -> Result<(), ()> {
    let work = async {
        let mut queued = false;
        if let Some(frame) = first {
            socket
                .feed(Message::Binary(encode_padded(&frame).into()))
                .await?;
            queued = true;
        }
        for _ in 0..PUSHES_PER_WRITE {
            if !session.inbox().has_news() {
                break;
            }
            match session.next_push().await {
                Ok(Some(push)) => {
                    let frame = ServerFrame::from(push);
                    socket
                        .feed(Message::Binary(encode_padded(&frame).into()))
                        .await?;
                    queued = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "push failed");
                    break;
                }
            }
        }
        if queued {
            socket.flush().await?;
        }
        Ok::<(), axum::Error>(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            tracing::debug!("client too slow to read; dropped");
            Err(())
        }
    }
}
