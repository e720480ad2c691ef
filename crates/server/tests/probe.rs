//! A censor's probes against the real `blindpostd` with `--tls self-signed`: plain HTTP on the
//! TLS port, TLS and HTTP on `/`, on random and admin paths, a WebSocket upgrade on a wrong
//! path, a non-upgrade GET on the real ws path, garbage after a ClientHello, and a replayed
//! first flight. Every answer must be the decoy site's and name nothing of blindpost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::tls::*;
use common::*;

async fn server(dir: &tempfile::TempDir, extra: &[&str]) -> Binary {
    let data = dir.path().join("data");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log",
        "warn",
        "--handshake-timeout-secs",
        "2",
        "--tls",
        "self-signed",
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Binary::start(&args, true, true).await
}

/// One HTTP request over a fresh TLS connection; the raw answer.
async fn over_tls(server: &Binary, request: &[u8]) -> Vec<u8> {
    let mut tls = tls_connect(server.addr, server.pin.as_deref()).await;
    let answer = exchange(&mut tls, request).await;
    assert_clean(&String::from_utf8_lossy(request), &answer);
    answer
}

/// A valid WebSocket upgrade (that also asks to close the connection if it is refused).
const UPGRADE: &[&str] = &[
    "Upgrade: websocket",
    "Connection: close, Upgrade",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
];

/// The first flight a real rustls client sends: its ClientHello records.
fn client_hello() -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(None), name).unwrap();
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    assert_eq!(flight[0], 0x16, "a handshake record");
    flight
}

#[tokio::test]
async fn http_probes_on_any_path_but_the_upgrade_get_the_decoy() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, &[]).await;

    let index = over_tls(&server, &http_request("GET", "/", &[])).await;
    let (status, body) = status_and_body(&index);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(String::from_utf8_lossy(&body).contains("It works!"));
    let head = String::from_utf8_lossy(&index).to_ascii_lowercase();
    assert!(!head.contains("\r\nserver:"), "no Server header: {head}");

    let unknown = status_and_body(&over_tls(&server, &http_request("GET", "/x7Qp2", &[])).await);
    assert_eq!(unknown.0, "HTTP/1.1 404 Not Found");

    let probes: Vec<Vec<u8>> = vec![
        http_request("GET", "/admin/login.php", &[]),
        http_request("GET", "/v1", &[]),
        http_request("GET", "/v1/ws/", &[]),
        http_request("GET", "/api/v1/ws", &[]),
        http_request("GET", "/healthz", &[]),
        http_request("GET", "/metrics", &[]),
        http_request("POST", "/v1/ws", &["Content-Length: 0"]),
        // A plain GET on the real ws path, and malformed upgrades there.
        http_request("GET", "/v1/ws", &[]),
        http_request(
            "GET",
            "/v1/ws",
            &["Upgrade: websocket", "Connection: close, Upgrade"],
        ),
        http_request(
            "GET",
            "/v1/ws",
            &["Upgrade: websocket", "Sec-WebSocket-Version: 13"],
        ),
        // A proper upgrade on wrong paths.
        http_request("GET", "/ws", UPGRADE),
        http_request("GET", "/v1/wss", UPGRADE),
        http_request("GET", "/socket.io/?EIO=4&transport=websocket", UPGRADE),
    ];
    for probe in probes {
        let answer = over_tls(&server, &probe).await;
        assert_eq!(
            status_and_body(&answer),
            unknown,
            "{}",
            String::from_utf8_lossy(&probe)
        );
    }

    // The proper upgrade on the right path is the one that switches protocols.
    let mut tls = tls_connect(server.addr, server.pin.as_deref()).await;
    tls.write_all(&http_request("GET", "/v1/ws", UPGRADE))
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
}

#[tokio::test]
async fn a_site_directory_is_the_decoy_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "<h1>Bakery Schmidt</h1>").unwrap();
    std::fs::write(site.join("menu.txt"), "bread").unwrap();
    let server = server(&dir, &["--site", site.to_str().unwrap()]).await;
    let (status, body) = status_and_body(&over_tls(&server, &http_request("GET", "/", &[])).await);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, b"<h1>Bakery Schmidt</h1>");
    let (_, body) =
        status_and_body(&over_tls(&server, &http_request("GET", "/menu.txt", &[])).await);
    assert_eq!(body, b"bread");
    let unknown = status_and_body(&over_tls(&server, &http_request("GET", "/nope", &[])).await);
    assert_eq!(unknown.0, "HTTP/1.1 404 Not Found");
    for path in ["/v1/ws", "/healthz", "/metrics"] {
        let answer = over_tls(&server, &http_request("GET", path, &[])).await;
        assert_eq!(status_and_body(&answer), unknown, "{path}");
    }
    let answer = over_tls(&server, &http_request("GET", "/elsewhere", UPGRADE)).await;
    assert_eq!(status_and_body(&answer), unknown);
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_no_http_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, &[]).await;
    for request in [
        http_request("GET", "/", &[]),
        http_request("GET", "/v1/ws", UPGRADE),
    ] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let answer = exchange(&mut tcp, &request).await;
        assert_clean("plain http", &answer);
        assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    }
}

#[tokio::test]
async fn garbage_after_a_client_hello_and_a_replayed_first_flight_reveal_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, &[]).await;
    let hello = client_hello();

    // Garbage after a valid ClientHello: a TLS alert at most, then the connection closes.
    for garbage in [vec![0x41u8; 700], (0..=255u8).cycle().take(3000).collect()] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut flight = hello.clone();
        flight.extend_from_slice(&garbage);
        let answer = exchange(&mut tcp, &flight).await;
        assert_clean("garbage after hello", &answer);
    }

    // A replayed first flight: what a real client sent first, sent again on a new
    // connection. The server answers as to any new client (a fresh handshake; the
    // certificate is encrypted under TLS 1.3) and drops it at the handshake deadline.
    let replayed = Arc::new(hello);
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let answer = exchange(&mut tcp, &replayed).await;
        assert_clean("replayed first flight", &answer);
        assert_eq!(answer.first(), Some(&0x16), "a handshake record comes back");
    }

    // A real client still gets served meanwhile.
    let answer = over_tls(&server, &http_request("GET", "/", &[])).await;
    assert_eq!(status_and_body(&answer).0, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn without_tls_the_decoy_answers_too_and_health_stays_on_the_main_listener() {
    let server = start().await;
    let get = async |request: Vec<u8>| {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        exchange(&mut tcp, &request).await
    };
    let unknown = status_and_body(&get(http_request("GET", "/nope", &[])).await);
    assert_eq!(unknown.0, "HTTP/1.1 404 Not Found");
    let answer = get(http_request("GET", "/v1/ws", &[])).await;
    assert_clean("plain GET on the ws path", &answer);
    assert_eq!(status_and_body(&answer), unknown);
    let (status, body) = status_and_body(&get(http_request("GET", "/healthz", &[])).await);
    assert_eq!(
        (status.as_str(), body.as_slice()),
        ("HTTP/1.1 200 OK", &b"ok"[..])
    );
    let (status, body) = status_and_body(&get(http_request("GET", "/metrics", &[])).await);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(String::from_utf8_lossy(&body).contains("blindpostd_connections_max 10000"));
    server.shutdown().await;
}
