//! The server over TLS, with the real `blindpostd`: the protocol round trip on the ws path,
//! the handshake deadline covering a stalled ClientHello without stalling `accept`, the admin
//! listener, and certificate files reloaded on SIGHUP without dropping connections.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::tls::*;
use common::*;

type TlsWs = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn wss(addr: SocketAddr, pin: Option<&str>, path: &str) -> TlsWs {
    let tls = tls_connect(addr, pin).await;
    let (ws, response) = tokio_tungstenite::client_async(format!("wss://localhost{path}"), tls)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// Sends a `Ping` request and expects its `Ok`.
async fn ping(ws: &mut TlsWs, id: u64) {
    let frame = ClientFrame {
        id,
        request: Some(Request::Ping(Ping {})),
    };
    ws.send(Message::binary(encode(&frame))).await.unwrap();
    loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        if let Message::Binary(bytes) = message {
            match decode_server(&bytes).unwrap().kind.unwrap() {
                Kind::Response(r) => {
                    assert_eq!(r.id, id);
                    assert!(matches!(r.body, Some(Body::Ok(_))), "{r:?}");
                    return;
                }
                Kind::Push(_) => {}
            }
        }
    }
}

fn self_signed_args(dir: &tempfile::TempDir, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log",
        "warn",
        "--tls",
        "self-signed",
        "--data",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(dir.path().join("data").to_str().unwrap().to_owned());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

async fn start_self_signed(dir: &tempfile::TempDir, extra: &[&str]) -> Binary {
    let args = self_signed_args(dir, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Binary::start(&args, true, true).await
}

#[tokio::test]
async fn the_ws_path_over_tls_speaks_the_protocol_and_the_pin_is_the_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_self_signed(&dir, &[]).await;
    let pin = server.pin.clone().unwrap();
    let mut ws = wss(server.addr, Some(&pin), "/v1/ws").await;
    ping(&mut ws, 1).await;
    ping(&mut ws, 2).await;

    // A wrong pin is refused by the client's verifier.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(&wrong)));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(connector.connect(name, tcp).await.is_err());

    // The same certificate on the next start.
    drop(ws);
    drop(server);
    let again = start_self_signed(&dir, &[]).await;
    assert_eq!(again.pin.unwrap(), pin);
}

#[tokio::test]
async fn a_custom_ws_path_is_the_only_one_that_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_self_signed(&dir, &["--ws-path", "/assets/v2/socket"]).await;
    let pin = server.pin.clone().unwrap();
    let mut ws = wss(server.addr, Some(&pin), "/assets/v2/socket").await;
    ping(&mut ws, 1).await;
    let tls = tls_connect(server.addr, Some(&pin)).await;
    let refused = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404);
        }
        other => panic!("the default path must not upgrade: {other:?}"),
    }
}

#[tokio::test]
async fn health_and_metrics_are_on_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_self_signed(&dir, &["--max-connections", "77"]).await;
    let pin = server.pin.clone().unwrap();
    let mut ws = wss(server.addr, Some(&pin), "/v1/ws").await;
    ping(&mut ws, 1).await;
    let admin = server.admin.unwrap();
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    let answer = exchange(&mut tcp, &http_request("GET", "/healthz", &[])).await;
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, b"ok");
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    let answer = exchange(&mut tcp, &http_request("GET", "/metrics", &[])).await;
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("\nblindpostd_connections_max 77\n"), "{text}");
    assert!(text.contains("\nblindpostd_connections_open 1\n"), "{text}");
    assert!(
        text.contains("\nblindpostd_connections_total 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_stalled_client_hello_neither_stalls_accept_nor_outlives_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_self_signed(&dir, &["--handshake-timeout-secs", "3"]).await;
    let pin = server.pin.clone().unwrap();

    // One connection sends nothing; another stops in the middle of its ClientHello (a record
    // header announcing 512 bytes, and 3 of them).
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut halfway = TcpStream::connect(server.addr).await.unwrap();
    halfway
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A third completes its handshake and the protocol long before the deadline: the stalled
    // handshakes run in their own tasks, not in the accept loop.
    let quick = tokio::time::Instant::now();
    let mut ws = wss(server.addr, Some(&pin), "/v1/ws").await;
    ping(&mut ws, 1).await;
    assert!(
        quick.elapsed() < Duration::from_millis(1500),
        "a handshake behind stalled ones took {:?}",
        quick.elapsed()
    );

    // The stalled ones are dropped at the deadline (3 s), not before and not much after.
    for stalled in [&mut silent, &mut halfway] {
        let answer = read_all(stalled).await;
        assert_clean("stalled", &answer);
        let at = started.elapsed();
        assert!(
            at >= Duration::from_millis(2800) && at < Duration::from_secs(10),
            "dropped after {at:?}"
        );
    }
    // The upgraded connection is not subject to the handshake deadline.
    ping(&mut ws, 2).await;
}

struct CertFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl CertFiles {
    /// Writes a fresh self-signed certificate for localhost; returns its pin.
    fn write_new(&self) -> String {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        // Written through a rename, as a certificate manager would.
        let tmp = self.cert.with_extension("new");
        std::fs::write(&tmp, made.key_pair.serialize_pem()).unwrap();
        std::fs::rename(&tmp, &self.key).unwrap();
        std::fs::write(&tmp, made.cert.pem()).unwrap();
        std::fs::rename(&tmp, &self.cert).unwrap();
        blindpost_server::tls::certificate_pin(made.cert.der())
    }
}

#[tokio::test]
async fn sighup_reloads_certificate_files_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let files = CertFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let pin_a = files.write_new();
    let data = dir.path().join("data");
    let server = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--data",
            data.to_str().unwrap(),
            "--tls-cert",
            files.cert.to_str().unwrap(),
            "--tls-key",
            files.key.to_str().unwrap(),
        ],
        true,
        true,
    )
    .await;
    assert_eq!(server.pin.as_deref(), Some(pin_a.as_str()));
    let tls = tls_connect(server.addr, None).await;
    assert_eq!(peer_pin(&tls), pin_a);
    let (mut old, _) = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
        .await
        .unwrap();
    ping(&mut old, 1).await;

    // A reload that fails keeps certificate A.
    std::fs::write(&files.cert, "garbage").unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(peer_pin(&tls_connect(server.addr, None).await), pin_a);

    let pin_b = files.write_new();
    assert_ne!(pin_a, pin_b);
    server.signal("-HUP");
    eventually(async || peer_pin(&tls_connect(server.addr, None).await) == pin_b).await;
    let mut new = wss(server.addr, Some(&pin_b), "/v1/ws").await;
    ping(&mut new, 1).await;
    // The connection made under certificate A still works.
    ping(&mut old, 2).await;
}

/// Runs `blindpostd ARGS` to its exit; its stderr, asserting it failed without a panic.
fn refused(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blindpostd"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout before a refusal");
    stderr
}

#[test]
fn acme_and_contradictory_tls_flags_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let base = ["--listen", "127.0.0.1:0", "--data", data, "--log", "off"];
    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        refused(&args)
    };
    assert!(
        with(&[
            "--acme",
            "chat.example.org",
            "--acme-directory",
            "http://ca.example/dir"
        ])
        .contains("https://")
    );
    assert!(with(&["--tls-cert", "/nonexistent.pem"]).contains("tls_cert needs tls_key"));
    assert!(
        with(&["--tls", "self-signed", "--acme", "chat.example.org"])
            .contains("choose one certificate source")
    );
    assert!(
        with(&[
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key"
        ])
        .contains("/nonexistent.pem")
    );
    assert!(with(&["--ws-path", "no-slash"]).contains("ws_path"));
}
