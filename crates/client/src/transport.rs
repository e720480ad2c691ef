//! One WebSocket connection to a blindpost server: send a request, wait for the response with
//! its id, and queue the pushes that arrive meanwhile. Every server frame is untrusted input:
//! it is size-checked and decoded by `blindpost-wire`, and a response of the wrong shape is a
//! [`Error::BadServerReply`]. Not for deciding what to send: that is the engine's job.

use std::collections::VecDeque;
use std::time::Duration;

use blindpost_wire::{
    self as wire, ClientFrame, Push, Request, WS_PATH, limits::MAX_FRAME_BYTES, response,
    server_frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};

use crate::error::{Error, Result};

/// How long one request may wait for its response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the server.
pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    pushes: VecDeque<Push>,
}

impl Connection {
    /// Connect to `server` (`ws://host:port`, with or without a trailing path).
    pub async fn connect(server: &str) -> Result<Self> {
        let url = ws_url(server)?;
        let mut config = tungstenite::protocol::WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME_BYTES + 64 * 1024);
        config.max_frame_size = Some(MAX_FRAME_BYTES + 64 * 1024);
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true);
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Unreachable(format!("{server}: connection timed out")))?
            .map_err(|e| Error::Unreachable(format!("{server}: {e}")))?;
        Ok(Self {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        })
    }

    /// Send one request and wait for its response body. Server errors become
    /// [`Error::Server`].
    pub async fn call(&mut self, request: Request) -> Result<response::Body> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = wire::encode(&ClientFrame {
            id,
            request: Some(request),
        });
        // The server would drop the connection; say why instead.
        if frame.len() > wire::limits::MAX_FRAME_BYTES {
            return Err(Error::Invalid(format!(
                "a request of {} bytes exceeds the frame limit of {} bytes",
                frame.len(),
                wire::limits::MAX_FRAME_BYTES
            )));
        }
        self.ws
            .send(tungstenite::Message::Binary(frame.into()))
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let wait = async {
            loop {
                match self.read_frame().await? {
                    server_frame::Kind::Push(p) => self.pushes.push_back(p),
                    server_frame::Kind::Response(r) if r.id == id => return Ok(r),
                    server_frame::Kind::Response(r) if r.id == 0 => {
                        // The server could not read our frame at all.
                        return Err(match r.body {
                            Some(response::Body::Error(e)) => server_error(e),
                            _ => Error::BadServerReply("response to an unknown request".into()),
                        });
                    }
                    server_frame::Kind::Response(_) => {
                        return Err(Error::BadServerReply(
                            "response to an unknown request".into(),
                        ));
                    }
                }
            }
        };
        let response: wire::Response = tokio::time::timeout(REQUEST_TIMEOUT, wait)
            .await
            .map_err(|_| Error::Unreachable("the server did not answer in time".into()))??;
        match response.body {
            Some(response::Body::Error(e)) => Err(server_error(e)),
            Some(body) => Ok(body),
            None => Err(Error::BadServerReply("empty response".into())),
        }
    }

    /// The next push: a queued one, or the next to arrive.
    pub async fn next_push(&mut self) -> Result<Push> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        match self.read_frame().await? {
            server_frame::Kind::Push(p) => Ok(p),
            server_frame::Kind::Response(_) => {
                Err(Error::BadServerReply("unsolicited response".into()))
            }
        }
    }

    /// Close the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    async fn read_frame(&mut self) -> Result<server_frame::Kind> {
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or_else(|| Error::Unreachable("the server closed the connection".into()))?
                .map_err(|e| Error::Unreachable(e.to_string()))?;
            match msg {
                tungstenite::Message::Binary(bytes) => {
                    let frame = wire::decode_server(&bytes)
                        .map_err(|e| Error::BadServerReply(e.to_string()))?;
                    return frame
                        .kind
                        .ok_or_else(|| Error::BadServerReply("frame without content".into()));
                }
                tungstenite::Message::Close(_) => {
                    return Err(Error::Unreachable(
                        "the server closed the connection".into(),
                    ));
                }
                // Pings are answered by tungstenite; other frames carry nothing for us.
                _ => continue,
            }
        }
    }
}

fn server_error(e: wire::Error) -> Error {
    Error::Server {
        code: e.code(),
        message: e.message,
        current_epoch: e.current_epoch,
    }
}

/// The WebSocket URL of a server given as `ws://host:port` (the form users type).
pub fn ws_url(server: &str) -> Result<String> {
    let trimmed = server.trim_end_matches('/');
    if let Some(rest) = trimmed.strip_prefix("ws://") {
        if rest.is_empty() {
            return Err(Error::Invalid(format!("server URL {server:?} has no host")));
        }
        if trimmed.ends_with(WS_PATH) {
            Ok(trimmed.to_string())
        } else {
            Ok(format!("{trimmed}{WS_PATH}"))
        }
    } else if trimmed.starts_with("wss://") {
        Err(Error::Invalid(
            "wss:// is not supported by this build yet; put the server behind a local TLS \
             terminator or use ws:// on a trusted network"
                .into(),
        ))
    } else {
        Err(Error::Invalid(format!(
            "server URL {server:?} must start with ws://"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_get_the_websocket_path() {
        assert_eq!(
            ws_url("ws://127.0.0.1:7480").unwrap(),
            "ws://127.0.0.1:7480/v1/ws"
        );
        assert_eq!(ws_url("ws://h:1/").unwrap(), "ws://h:1/v1/ws");
        assert_eq!(ws_url("ws://h:1/v1/ws").unwrap(), "ws://h:1/v1/ws");
        assert!(ws_url("http://h").is_err());
        assert!(ws_url("ws://").is_err());
    }
}
