//! One WebSocket connection to a blindpost server: send a request, wait for the response with
//! its id, and queue the pushes that arrive meanwhile; while waiting for pushes, ping every
//! [`KEEPALIVE`] and call the connection dead when a ping goes unanswered. Every server frame
//! is untrusted input: it is size-checked and decoded by `blindpost-wire`, and a response of
//! the wrong shape is a [`Error::BadServerReply`]. How the bytes get there (TLS, proxy, relay)
//! is the submodules' concern; what to send is the engine's.

mod connect;
mod dial;
mod endpoint;
mod http_connect;
mod route;
mod tls;
mod tunnel;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use blindpost_wire::{
    self as wire, ClientFrame, Push, Request, limits::MAX_FRAME_BYTES, response, server_frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::{WebSocketStream, tungstenite};

pub use dial::{BoxIo, Io};
pub(crate) use endpoint::Endpoint;
pub use endpoint::{MAX_PINS, MAX_RELAYS, RelaySettings, ServerSettings};
pub use route::Route;
pub(crate) use route::{Path, memo, order};

use crate::error::{Error, Result};

/// How long one request may wait for its response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle connection waiting for pushes sends a WebSocket Ping; a Ping still
/// unanswered one interval later means the connection is dead.
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// The WebSocket limits of a client connection: one blindpost frame and some slack.
fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(MAX_FRAME_BYTES + 64 * 1024);
    config.max_frame_size = Some(MAX_FRAME_BYTES + 64 * 1024);
    config
}

/// Opens a WebSocket to the server `settings` describe, trying the direct path and then each
/// relay (each attempt bounded), and says which way it went. For tools that speak the wire
/// protocol themselves (the load generator); `config` sets the WebSocket limits and buffers.
pub async fn open_websocket(
    settings: &ServerSettings,
    config: tungstenite::protocol::WebSocketConfig,
) -> Result<(WebSocketStream<BoxIo>, Route)> {
    let endpoint = Endpoint::parse(settings)?;
    let mut failures = Vec::new();
    for path in order(&endpoint, None) {
        match connect::open(&endpoint, path, config).await {
            Ok(opened) => return Ok(opened),
            Err(Error::Unreachable(reason)) => failures.push(reason),
            Err(e) => return Err(e),
        }
    }
    Err(Error::Unreachable(failures.join("; ")))
}

/// A connection to the server.
pub struct Connection {
    ws: WebSocketStream<BoxIo>,
    next_id: u64,
    pushes: VecDeque<Push>,
    /// When the next keepalive Ping is due.
    next_ping: Instant,
    /// Whether a Ping was sent and nothing has arrived since.
    ping_unanswered: bool,
}

impl Connection {
    /// Connects to the server of `endpoint` over `path`.
    pub(crate) async fn open(endpoint: &Endpoint, path: Path) -> Result<(Self, Route)> {
        let (ws, route) = connect::open(endpoint, path, ws_config()).await?;
        let conn = Self {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
            next_ping: Instant::now() + KEEPALIVE,
            ping_unanswered: false,
        };
        Ok((conn, route))
    }

    /// Send one request and wait for its response body. Server errors become
    /// [`Error::Server`].
    pub async fn call(&mut self, request: Request) -> Result<response::Body> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = wire::encode_padded(&ClientFrame {
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

    /// The next push: a queued one, or the next to arrive. While waiting, a Ping goes out
    /// every [`KEEPALIVE`]; when one is still unanswered at the next, the connection is dead
    /// ([`Error::Unreachable`]). Cancel-safe: a caller may wrap it in a timeout and call again.
    pub async fn next_push(&mut self) -> Result<Push> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        loop {
            if Instant::now() >= self.next_ping {
                if self.ping_unanswered {
                    return Err(Error::Unreachable(format!(
                        "the server did not answer a keepalive ping within {} s",
                        KEEPALIVE.as_secs()
                    )));
                }
                self.ping_unanswered = true;
                self.next_ping = Instant::now() + KEEPALIVE;
                self.ws
                    .send(tungstenite::Message::Ping(Default::default()))
                    .await
                    .map_err(|e| Error::Unreachable(e.to_string()))?;
            }
            let next_ping = self.next_ping;
            let frame = tokio::select! {
                frame = self.read_frame() => frame?,
                () = tokio::time::sleep_until(next_ping) => continue,
            };
            match frame {
                server_frame::Kind::Push(p) => return Ok(p),
                server_frame::Kind::Response(_) => {
                    return Err(Error::BadServerReply("unsolicited response".into()));
                }
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
            // Anything from the server shows the connection is alive.
            self.ping_unanswered = false;
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
                // Pings are answered by tungstenite; Pongs and other frames carry no data.
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

/// The WebSocket URL of a server given as `wss://host[:port][/path]` or `ws://…` (the forms
/// users type): the default path `/v1/ws` added when none is given, default ports dropped.
/// Checks the form only; connecting also applies the plaintext rule.
pub fn ws_url(server: &str) -> Result<String> {
    Ok(endpoint::WsUrl::parse(server)?.full())
}

#[cfg(test)]
mod url_tests {
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
        assert_eq!(ws_url("wss://h:443").unwrap(), "wss://h/v1/ws");
        assert_eq!(ws_url("wss://h/secret").unwrap(), "wss://h/secret");
    }
}
