//! `blindpostd relay` end to end with real binaries: a TLS server, a relay with a
//! self-signed certificate in front of it, and a client that opens a WebSocket on the relay's
//! secret path and runs its own TLS and WebSocket to the server inside the tunnel. Also: the
//! relay's decoy on other paths, and its tunnel limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use common::tls::*;
use common::*;
use futures_util::Sink;
use tokio::io::ReadBuf;

type Outer = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A relay tunnel as a byte stream: each write is one binary message, each binary message
/// read is bytes.
struct Tunnel {
    ws: Outer,
    pending: Vec<u8>,
    offset: usize,
}

impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.offset < self.pending.len() {
                let n = buf.remaining().min(self.pending.len() - self.offset);
                let start = self.offset;
                buf.put_slice(&self.pending[start..start + n]);
                self.offset += n;
                return Poll::Ready(Ok(()));
            }
            match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(bytes))) => {
                    self.pending = bytes.to_vec();
                    self.offset = 0;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::other("text in a tunnel")));
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(std::io::Error::other)?;
        Pin::new(&mut self.ws)
            .start_send(Message::binary(buf.to_vec()))
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(std::io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(std::io::Error::other)
    }
}

const RELAY_PATH: &str = "/static/cdn-7f3a";

async fn open_tunnel(relay: &Binary) -> Result<Outer, tokio_tungstenite::tungstenite::Error> {
    let tls = tls_connect(relay.addr, relay.pin.as_deref()).await;
    tokio_tungstenite::client_async(format!("wss://localhost{RELAY_PATH}"), tls)
        .await
        .map(|(ws, _)| ws)
}

async fn ping_through(inner: &mut WebSocketStream<impl AsyncRead + AsyncWrite + Unpin>, id: u64) {
    let frame = ClientFrame {
        id,
        request: Some(Request::Ping(Ping {})),
    };
    inner.send(Message::binary(encode(&frame))).await.unwrap();
    loop {
        let message = tokio::time::timeout(PATIENCE, inner.next())
            .await
            .expect("an answer through the relay")
            .unwrap()
            .unwrap();
        if let Message::Binary(bytes) = message
            && let Kind::Response(r) = decode_server(&bytes).unwrap().kind.unwrap()
        {
            assert_eq!(r.id, id);
            assert!(matches!(r.body, Some(Body::Ok(_))), "{r:?}");
            return;
        }
    }
}

use tokio::io::{AsyncRead, AsyncWrite};

#[tokio::test]
async fn a_client_reaches_the_server_through_the_relay_with_its_own_tls_inside() {
    let dir = tempfile::tempdir().unwrap();
    let server_data = dir.path().join("server");
    let server = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--tls",
            "self-signed",
            "--data",
            server_data.to_str().unwrap(),
        ],
        true,
        true,
    )
    .await;
    let upstream = server.addr.to_string();
    let relay_data = dir.path().join("relay");
    let relay = Binary::start(
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--ws-path",
            RELAY_PATH,
            "--tls",
            "self-signed",
            "--data",
            relay_data.to_str().unwrap(),
            "--max-tunnels",
            "1",
            "--log",
            "warn",
        ],
        true,
        false,
    )
    .await;
    assert_ne!(relay.pin, server.pin, "the relay has its own certificate");
    assert!(relay_data.join("tls-self-signed.crt").is_file());

    // The tunnel, then TLS to the server pinned by its own pin, then the protocol.
    let tunnel = Tunnel {
        ws: open_tunnel(&relay).await.unwrap(),
        pending: Vec::new(),
        offset: 0,
    };
    let inner_tls = tls_over(tunnel, server.pin.as_deref()).await;
    assert_eq!(peer_pin(&inner_tls), server.pin.clone().unwrap());
    let (mut inner, response) = tokio_tungstenite::client_async("wss://localhost/v1/ws", inner_tls)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ping_through(&mut inner, 1).await;
    ping_through(&mut inner, 2).await;

    // With --max-tunnels 1, a second tunnel is refused like a busy web server.
    match open_tunnel(&relay).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body = response.body().clone().unwrap_or_default();
            assert_clean("busy relay", &body);
        }
        other => panic!("a second tunnel must be refused: {:?}", other.map(|_| ())),
    }

    // Any other path is the decoy, the same as a plain server's.
    let mut tls = tls_connect(relay.addr, relay.pin.as_deref()).await;
    let decoy = exchange(&mut tls, &http_request("GET", "/v1/ws", &[])).await;
    assert_clean("relay decoy", &decoy);
    let mut tls = tls_connect(server.addr, server.pin.as_deref()).await;
    let server_decoy = exchange(&mut tls, &http_request("GET", "/v1/ws", &[])).await;
    assert_eq!(status_and_body(&decoy), status_and_body(&server_decoy));
    assert_eq!(status_and_body(&decoy).0, "HTTP/1.1 404 Not Found");
    let mut tls = tls_connect(relay.addr, relay.pin.as_deref()).await;
    let index = exchange(&mut tls, &http_request("GET", "/", &[])).await;
    assert_eq!(status_and_body(&index).0, "HTTP/1.1 200 OK");

    // Closing the tunnel frees its place.
    drop(inner);
    let mut second = None;
    eventually(async || {
        second = open_tunnel(&relay).await.ok();
        second.is_some()
    })
    .await;
}

/// A relay in front of a TCP echo server (any TCP server will do as the upstream), with
/// `extra` flags.
async fn echo_relay(dir: &tempfile::TempDir, extra: &[&str]) -> Binary {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let data = dir.path().join("relay");
    let mut args = vec![
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream_addr,
        "--ws-path",
        RELAY_PATH,
        "--tls",
        "self-signed",
        "--data",
        data.to_str().unwrap(),
        "--log",
        "warn",
    ];
    args.extend_from_slice(extra);
    Binary::start(&args, true, false).await
}

/// Reads binary messages until `len` bytes arrived.
async fn receive(ws: &mut Outer, len: usize) {
    let mut got = 0;
    while got < len {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn tunnels_are_throttled_and_closed_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let relay = echo_relay(
        &dir,
        &["--tunnel-bytes-per-sec", "4096", "--tunnel-idle-secs", "1"],
    )
    .await;
    let mut ws = open_tunnel(&relay).await.unwrap();
    // 4 KiB of burst, then 8 KiB more at 4 KiB/s: about 2 s.
    let started = tokio::time::Instant::now();
    for _ in 0..12 {
        ws.send(Message::binary(vec![7u8; 1024])).await.unwrap();
    }
    receive(&mut ws, 12 * 1024).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "12 KiB at 4 KiB/s with a 4 KiB burst took only {took:?}"
    );
    // Then nothing for a second: the relay closes the tunnel.
    let idle = tokio::time::Instant::now();
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle tunnel is closed");
    assert!(
        idle.elapsed() >= Duration::from_millis(500),
        "{:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn a_text_message_closes_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let relay = echo_relay(&dir, &[]).await;
    let mut ws = open_tunnel(&relay).await.unwrap();
    ws.send(Message::binary(b"echo me".to_vec())).await.unwrap();
    let echoed = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
    assert_eq!(
        echoed.unwrap().unwrap(),
        Message::binary(b"echo me".to_vec())
    );
    ws.send(Message::text("hello")).await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the tunnel closes after a text message");
}
