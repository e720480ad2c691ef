//! Assembling one connection from layers, for one path: TCP (direct or through the proxy) to
//! the server or the relay; the relay's TLS and WebSocket tunnel when going through a relay;
//! TLS with the server (its pins or roots; SNI from the URL or `--sni`); finally the blindpost
//! WebSocket on the server URL's path (its `Host` header always the URL's host). Through a
//! relay the server's own host name is never resolved or contacted (the relay chooses the
//! upstream, so `--connect-to` applies to the direct path only), and it is not sent as SNI
//! either unless `--sni` asks for a name: the relay's upstream is fixed, so the name routes
//! nothing there, and left out it stays off the relay-to-server hop and out of the relay
//! operator's sight. The certificate is still checked against it (or the pins). Not for: choosing the path
//! (`route`) or speaking the protocol (`Connection`).

use std::time::Duration;

use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, protocol::WebSocketConfig};

use super::dial::{self, BoxIo};
use super::endpoint::{Endpoint, Host, WsUrl};
use super::route::{Path, Route};
use super::tls::{self, Role, Trust};
use super::tunnel::{self, WsTunnel};
use crate::error::{Error, Result};

/// How long one attempt (one path) may take, every layer included.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the WebSocket to `endpoint`'s server over `path`, within [`ATTEMPT_TIMEOUT`].
pub(crate) async fn open(
    endpoint: &Endpoint,
    path: Path,
    config: WebSocketConfig,
) -> Result<(WebSocketStream<BoxIo>, Route)> {
    let route = Route::new(endpoint, path);
    let attempt = async {
        let io = match path {
            Path::Direct => {
                let (host, port) = match &endpoint.connect_to {
                    Some((h, p)) => (h, *p),
                    None => (&endpoint.url.host, endpoint.url.port),
                };
                dial::dial(endpoint.proxy.as_ref(), host, port).await?
            }
            Path::Relay(i) => {
                let relay = endpoint
                    .relays
                    .get(i)
                    .ok_or_else(|| Error::Invalid(format!("no relay number {i} is configured")))?;
                let tcp =
                    dial::dial(endpoint.proxy.as_ref(), &relay.url.host, relay.url.port).await?;
                let outer = if relay.url.tls {
                    let trust = Trust {
                        role: Role::Relay,
                        pins: &relay.pins,
                        extra_roots: &endpoint.extra_roots,
                        send_sni: true,
                    };
                    tls::handshake(tcp, &relay.url.host, &trust).await?
                } else {
                    tcp
                };
                let ws = websocket(outer, &relay.url, tunnel::config())
                    .await
                    .map_err(|e| Error::Unreachable(format!("relay {}: {e}", relay.url)))?;
                Box::new(WsTunnel::new(ws)) as BoxIo
            }
        };
        let io = if endpoint.url.tls {
            let name = match &endpoint.sni {
                Some(n) => Host::Name(n.clone()),
                None => endpoint.url.host.clone(),
            };
            let trust = Trust {
                role: Role::Server,
                pins: &endpoint.pins,
                extra_roots: &endpoint.extra_roots,
                send_sni: path == Path::Direct || endpoint.sni.is_some(),
            };
            tls::handshake(io, &name, &trust).await?
        } else {
            io
        };
        websocket(io, &endpoint.url, config)
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(Ok(ws)) => Ok((ws, route)),
        Ok(Err(Error::Unreachable(reason))) => Err(Error::Unreachable(format!(
            "{}: {reason}",
            describe(&route)
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Unreachable(format!(
            "{}: timed out after {} s",
            describe(&route),
            ATTEMPT_TIMEOUT.as_secs()
        ))),
    }
}

/// `wss://h/p directly` or `wss://h/p through relay wss://r/q` (for failure summaries).
fn describe(route: &Route) -> String {
    route
        .to_string()
        .strip_prefix("connected to ")
        .map(str::to_string)
        .unwrap_or_else(|| route.server.clone())
}

/// The WebSocket client handshake for `url` over an open stream.
async fn websocket(
    io: BoxIo,
    url: &WsUrl,
    config: WebSocketConfig,
) -> Result<WebSocketStream<BoxIo>, tungstenite::Error> {
    let request = padded_request(&url.full())?;
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, io, Some(config)).await?;
    Ok(ws)
}

/// The header that pads the upgrade request.
const PAD_HEADER: &str = "x-pad";

/// The upgrade request for `url`, padded with one header to a frame size bucket, so the first
/// flight inside TLS does not tell the length of the host or the secret path.
fn padded_request(
    url: &str,
) -> Result<tungstenite::handshake::client::Request, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest as _;
    let mut request = url.into_client_request()?;
    let (bytes, _key) = tungstenite::handshake::client::generate_request(request.clone())?;
    // `name: value\r\n`
    let unpadded = bytes.len() + PAD_HEADER.len() + 4;
    let fill = blindpost_wire::padded_len(unpadded) - unpadded;
    let value = tungstenite::http::HeaderValue::from_str(&"0".repeat(fill))
        .map_err(|e| tungstenite::Error::HttpFormat(e.into()))?;
    request.headers_mut().insert(PAD_HEADER, value);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_fall_in_size_buckets_whatever_the_host_and_path() {
        let mut sizes = Vec::new();
        for url in [
            "wss://h/v1/ws",
            "wss://chat.example.org:8443/a-much-longer-secret-path-0123456789",
            "wss://[2001:db8::1]/p",
        ] {
            let request = padded_request(url).unwrap();
            let (bytes, _) = tungstenite::handshake::client::generate_request(request).unwrap();
            sizes.push(bytes.len());
        }
        assert!(sizes.iter().all(|&n| n == 256), "{sizes:?}");
    }
}
