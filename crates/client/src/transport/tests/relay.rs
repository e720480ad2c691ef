//! Through a relay: a relay written here (TLS on its own certificate, a WebSocket on its
//! secret path, every binary message copied to and from a fixed upstream) carries the client's
//! own TLS to the server, whose host name does not even resolve (so it was never looked up or
//! contacted). With the direct path dead, the client moves on to the relay, remembers it, and
//! starts with it next time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::transport::endpoint::{Endpoint, RelaySettings, ServerSettings};
use crate::transport::route::Path;
use crate::transport::tests::support::{Cert, TlsServer, acceptor, round_trip, self_signed};

/// What a test relay reports: its address, how many tunnels it opened, every byte it
/// forwarded upstream.
type RelayHandle = (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<u8>>>);

/// Starts a relay to `upstream` on `path`.
async fn relay(cert: &Cert, upstream: SocketAddr, path: &'static str) -> RelayHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = acceptor(cert);
    let tunnels = Arc::new(AtomicUsize::new(0));
    let count = tunnels.clone();
    let forwarded = Arc::new(Mutex::new(Vec::new()));
    let log = forwarded.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                // The callback's error type is tungstenite's, large by its design.
                #[allow(clippy::result_large_err)]
                let check = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             resp| {
                    assert_eq!(req.uri().path(), path, "the relay's secret path");
                    Ok(resp)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(tls, check)
                    .await
                    .unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut up = TcpStream::connect(upstream).await.unwrap();
                let mut buf = vec![0u8; 8192];
                loop {
                    tokio::select! {
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Binary(b))) => {
                                log.lock().unwrap().extend_from_slice(&b);
                                up.write_all(&b).await.unwrap();
                            }
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                            Some(Ok(_)) => {}
                        },
                        n = up.read(&mut buf) => match n {
                            Ok(0) | Err(_) => { let _ = ws.close(None).await; return; }
                            Ok(n) => {
                                // Split in two messages: chunk boundaries are not record ones.
                                let (a, b) = buf[..n].split_at(n / 2);
                                for part in [a, b] {
                                    if !part.is_empty() {
                                        ws.send(Message::Binary(part.to_vec().into())).await.unwrap();
                                    }
                                }
                                ws.send(Message::Ping(Default::default())).await.unwrap();
                            }
                        },
                    }
                }
            });
        }
    });
    (addr, tunnels, forwarded)
}

#[tokio::test]
async fn tls_to_the_server_runs_inside_the_relay_tunnel() {
    let server_cert = self_signed(&["server.invalid"]);
    let server = TlsServer::start(&server_cert).await;
    let relay_cert = self_signed(&["localhost"]);
    let (relay_addr, tunnels, forwarded) = relay(&relay_cert, server.addr, "/secret-relay").await;
    let relay_url = format!("wss://localhost:{}/secret-relay", relay_addr.port());

    let mut s = ServerSettings::new("wss://server.invalid/v1/ws");
    s.pins = vec![server_cert.pin()];
    s.relays = vec![RelaySettings::new(
        relay_url.clone(),
        vec![relay_cert.pin()],
    )];
    let endpoint = Endpoint::parse(&s).unwrap();
    let route = round_trip(&endpoint, Path::Relay(0)).await.unwrap();
    assert_eq!(
        route.to_string(),
        format!("connected to wss://server.invalid/v1/ws through relay {relay_url}")
    );
    assert_eq!(tunnels.load(Ordering::SeqCst), 1);
    // What the relay passed on is TLS whose ClientHello does not name the server.
    let bytes = forwarded.lock().unwrap().clone();
    assert_eq!(bytes.first(), Some(&0x16), "a TLS handshake record");
    assert!(
        !bytes
            .windows(b"server.invalid".len())
            .any(|w| w == b"server.invalid"),
        "the server's name went through the relay"
    );
    assert!(
        !bytes.windows(6).any(|w| w == b"/v1/ws"),
        "the ws path is inside TLS"
    );

    // The inner TLS is still the server's: a wrong server pin fails through the relay too.
    let mut wrong = s.clone();
    wrong.pins = vec![relay_cert.pin()];
    let err = round_trip(&Endpoint::parse(&wrong).unwrap(), Path::Relay(0))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, crate::Error::Certificate(ref m) if m.starts_with("server certificate")),
        "{err}"
    );
}

#[tokio::test]
async fn the_client_moves_on_to_a_relay_and_remembers_it() {
    let server_cert = self_signed(&["localhost"]);
    let server = TlsServer::start(&server_cert).await;
    let relay_cert = self_signed(&["localhost"]);
    let (relay_addr, tunnels, _) = relay(&relay_cert, server.addr, "/r").await;
    // The direct path: a listener that accepts and hangs up at once (a censor's reset).
    let blocked = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let blocked_port = blocked.local_addr().unwrap().port();
    let resets = Arc::new(AtomicUsize::new(0));
    let count = resets.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = blocked.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    let mut s = ServerSettings::new(format!("wss://localhost:{blocked_port}/v1/ws"));
    s.pins = vec![server_cert.pin()];
    s.relays = vec![RelaySettings::new(
        format!("wss://localhost:{}/r", relay_addr.port()),
        vec![relay_cert.pin()],
    )];
    let dir = tempfile::tempdir().unwrap();
    let mut client = crate::Client::open(dir.path()).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    client.on_connect(move |route| log.lock().unwrap().push(route.to_string()));

    client
        .connect(std::slice::from_ref(&s))
        .await
        .unwrap()
        .close()
        .await;
    assert_eq!(
        (
            resets.load(Ordering::SeqCst),
            tunnels.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    // The next connection starts with the relay: the blocked path is not tried again.
    client
        .connect(std::slice::from_ref(&s))
        .await
        .unwrap()
        .close()
        .await;
    assert_eq!(
        (
            resets.load(Ordering::SeqCst),
            tunnels.load(Ordering::SeqCst)
        ),
        (1, 2)
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| r.contains("through relay wss://localhost:")),
        "{seen:?}"
    );

    // With every path failing, the error has a summary of each attempt.
    let mut dead = s.clone();
    dead.relays = vec![RelaySettings::new(
        format!("wss://localhost:{blocked_port}/r"),
        vec![relay_cert.pin()],
    )];
    let err = client.connect(&[dead]).await.err().unwrap();
    let message = err.to_string();
    assert!(message.contains("directly:"), "{message}");
    assert!(message.contains("through relay"), "{message}");
    assert_eq!(message.matches("; ").count(), 1, "{message}");
}
