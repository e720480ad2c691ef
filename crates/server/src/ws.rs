//! The WebSocket connection loop: binary frames in, one response per request and pushes out.
//! Decodes with the wire codec, hands requests to the [`Session`], encodes answers.
//! Not for: protocol rules (see `session` and `service`). Never logs peer addresses or bytes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use blindpost_wire::limits::MAX_FRAME_BYTES;
use blindpost_wire::{DecodeError, ErrorCode, Response, ServerFrame, decode_client, encode};
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
                if let Some(reply) = reply
                    && send(&mut socket, reply.into(), send_timeout).await.is_err()
                {
                    break;
                }
            }
            () = inbox.wait(), if !news => {}
            () = std::future::ready(()), if news => {
                match session.next_push().await {
                    Ok(Some(push)) => {
                        if send(&mut socket, push.into(), send_timeout).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "push failed"),
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

/// Sends one frame; a client that does not read it within `timeout` is dropped (`Err`).
async fn send(socket: &mut WebSocket, frame: ServerFrame, timeout: Duration) -> Result<(), ()> {
    match tokio::time::timeout(timeout, socket.send(Message::Binary(encode(&frame).into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            tracing::debug!("client too slow to read; dropped");
            Err(())
        }
    }
}
