//! TLS verification: a pin that matches connects; a wrong pin is one line and nothing else is
//! tried; a certificate from a private root verifies when that root is trusted and not
//! otherwise; `--sni` and `--connect-to` let the TLS name and the TCP destination differ.

use crate::Error;
use crate::transport::endpoint::{Endpoint, RelaySettings, ServerSettings};
use crate::transport::route::Path;
use crate::transport::tests::support::{TlsServer, root_and_leaf, round_trip, self_signed};

fn settings(url: String, pins: Vec<String>) -> ServerSettings {
    let mut s = ServerSettings::new(url);
    s.pins = pins;
    s
}

#[tokio::test]
async fn the_right_pin_connects_and_a_wrong_one_is_one_line_with_no_fallback() {
    let cert = self_signed(&["localhost"]);
    let server = TlsServer::start(&cert).await;
    let url = format!("wss://localhost:{}/v1/ws", server.addr.port());
    let endpoint = Endpoint::parse(&settings(url.clone(), vec![cert.pin()])).unwrap();
    let route = round_trip(&endpoint, Path::Direct).await.unwrap();
    assert_eq!(route.to_string(), format!("connected to {url} directly"));

    // A rotation set: any pin matches.
    let other = self_signed(&["localhost"]);
    let endpoint = Endpoint::parse(&settings(url.clone(), vec![other.pin(), cert.pin()])).unwrap();
    round_trip(&endpoint, Path::Direct).await.unwrap();

    // A wrong pin, with a live relay configured: the error names both fingerprints, and
    // the client neither retries without the pin nor moves on to the relay.
    let relay_cert = self_signed(&["localhost"]);
    let relay = TlsServer::start(&relay_cert).await;
    let mut s = settings(url.clone(), vec![other.pin()]);
    s.relays = vec![RelaySettings::new(
        format!("wss://localhost:{}/r", relay.addr.port()),
        vec![relay_cert.pin()],
    )];
    let dir = tempfile::tempdir().unwrap();
    let client = crate::Client::open(dir.path()).unwrap();
    let before = server.accepted();
    let err = client.connect(&[s]).await.err().unwrap();
    let Error::Certificate(ref message) = err else {
        panic!("not a certificate error: {err}");
    };
    assert_eq!(
        message,
        &format!(
            "server certificate {} does not match the pinned {}",
            cert.pin(),
            other.pin()
        )
    );
    assert!(!message.contains('\n'));
    assert_eq!(server.accepted(), before + 1, "one attempt, no retry");
    assert_eq!(relay.accepted(), 0, "no fallback to another path");
}

#[tokio::test]
async fn a_private_root_verifies_only_when_trusted() {
    let (root, leaf) = root_and_leaf(&["localhost"]);
    let server = TlsServer::start(&leaf).await;
    let url = format!("wss://localhost:{}", server.addr.port());
    let mut endpoint = Endpoint::parse(&ServerSettings::new(url.clone())).unwrap();
    let err = round_trip(&endpoint, Path::Direct).await.err().unwrap();
    let Error::Certificate(message) = err else {
        panic!("not a certificate error: {err}");
    };
    assert!(
        message.starts_with("server certificate sha256:"),
        "{message}"
    );
    assert!(message.contains("not trusted"), "{message}");
    assert!(
        message.contains("no trusted root vouches for it"),
        "{message}"
    );
    assert!(message.contains("--server-pin"), "{message}");

    endpoint.extra_roots = vec![root];
    round_trip(&endpoint, Path::Direct).await.unwrap();
}

#[tokio::test]
async fn sni_and_connect_to_let_the_name_and_the_destination_differ() {
    // The certificate is for the fronting name only; the URL's host does not resolve; the
    // TCP destination is given separately. Verified against roots, so the TLS name counts.
    let (root, leaf) = root_and_leaf(&["front.example"]);
    let server = TlsServer::start(&leaf).await;
    let mut s = ServerSettings::new("wss://hidden.invalid/v1/ws");
    s.sni = Some("front.example".into());
    s.connect_to = Some(format!("127.0.0.1:{}", server.addr.port()));
    let mut endpoint = Endpoint::parse(&s).unwrap();
    endpoint.extra_roots = vec![root.clone()];
    round_trip(&endpoint, Path::Direct).await.unwrap();

    // Without --sni the URL's host is the TLS name, which the certificate does not cover.
    s.sni = None;
    let mut endpoint = Endpoint::parse(&s).unwrap();
    endpoint.extra_roots = vec![root];
    let err = round_trip(&endpoint, Path::Direct).await.err().unwrap();
    assert!(matches!(err, Error::Certificate(_)), "{err}");
}
