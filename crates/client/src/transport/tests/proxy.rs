//! Through proxies: a real SOCKS5 server (`microsocks`) with `socks5h://` reaches a local TLS
//! server by name, and stops reaching it when the proxy is killed; an HTTP CONNECT proxy
//! written here is asked for the server by its host name (a name that does not resolve here,
//! so a local DNS lookup would have failed the test).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Error;
use crate::transport::endpoint::{Endpoint, ServerSettings};
use crate::transport::route::Path;
use crate::transport::tests::support::{TlsServer, round_trip, self_signed};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn through_microsocks_and_not_without_it() {
    if std::process::Command::new("microsocks")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var("BLINDPOST_REQUIRE_NETWORK_TOOLS").as_deref() != Ok("1"),
            "microsocks is required (BLINDPOST_REQUIRE_NETWORK_TOOLS=1) but not installed"
        );
        eprintln!("SKIPPED through_microsocks_and_not_without_it: microsocks is not installed");
        return;
    }
    let cert = self_signed(&["localhost"]);
    let server = TlsServer::start(&cert).await;
    let port = free_port();
    let mut proxy = tokio::process::Command::new("microsocks")
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = ServerSettings::new(format!("wss://localhost:{}/v1/ws", server.addr.port()));
    s.pins = vec![cert.pin()];
    s.proxy = Some(format!("socks5h://127.0.0.1:{port}"));
    let endpoint = Endpoint::parse(&s).unwrap();
    let route = round_trip(&endpoint, Path::Direct).await.unwrap();
    assert_eq!(
        route.to_string(),
        format!(
            "connected to wss://localhost:{}/v1/ws through proxy socks5h://127.0.0.1:{port}",
            server.addr.port()
        )
    );

    proxy.kill().await.unwrap();
    let err = round_trip(&endpoint, Path::Direct).await.err().unwrap();
    assert!(
        matches!(err, Error::Unreachable(ref m) if m.contains("proxy")),
        "{err}"
    );
}

#[tokio::test]
async fn http_connect_names_the_host_and_carries_the_tls() {
    let cert = self_signed(&["server.invalid"]);
    let server = TlsServer::start(&cert).await;
    let upstream = server.addr;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let proxy = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        // The proxy, not the client, resolves the name: here it maps it to the test server.
        let mut up = TcpStream::connect(upstream).await.unwrap();
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
        String::from_utf8(head).unwrap()
    });
    let mut s = ServerSettings::new("wss://server.invalid:8443/v1/ws");
    s.pins = vec![cert.pin()];
    s.proxy = Some(format!("http://user:pw@127.0.0.1:{proxy_port}"));
    let endpoint = Endpoint::parse(&s).unwrap();
    round_trip(&endpoint, Path::Direct).await.unwrap();
    let head = proxy.await.unwrap();
    let first = head.lines().next().unwrap();
    assert_eq!(first, "CONNECT server.invalid:8443 HTTP/1.1");
    assert!(
        head.contains("Proxy-Authorization: Basic dXNlcjpwdw==\r\n"),
        "{head}"
    );
}
