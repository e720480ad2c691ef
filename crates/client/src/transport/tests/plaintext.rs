//! The plaintext rule at connection time: `ws://` to a host that is not this machine is
//! refused before any connection attempt; loopback names and addresses are accepted, and so
//! is anything with `--insecure-plaintext`.

use std::time::{Duration, Instant};

use crate::Error;
use crate::transport::ServerSettings;

#[tokio::test]
async fn plain_ws_to_another_host_is_refused_at_once_and_loopback_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let client = crate::Client::open(dir.path()).unwrap();
    // 192.0.2.1 (TEST-NET-1) would hang until the connect timeout if anything dialled it.
    let started = Instant::now();
    let err = client
        .connect(&[ServerSettings::new("ws://192.0.2.1:1")])
        .await
        .err()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "it tried to connect"
    );
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains("--insecure-plaintext"), "{message}");
    assert!(message.contains("readable and changeable"), "{message}");

    // Loopback in every spelling gets past the rule (and then finds nothing listening).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for url in [
        format!("ws://127.0.0.1:{closed}"),
        format!("ws://[::1]:{closed}"),
        format!("ws://localhost:{closed}"),
    ] {
        let err = client
            .connect(&[ServerSettings::new(url.as_str())])
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::Unreachable(_)), "{url}: {err}");
    }

    // The explicit override lets it through to the network: now it is a connection failure
    // (a port nothing listens on, here), not a refusal.
    let mut s = ServerSettings::new(format!("ws://127.0.0.1:{closed}"));
    s.insecure_plaintext = true;
    let err = client.connect(&[s]).await.err().unwrap();
    assert!(matches!(err, Error::Unreachable(_)), "{err}");
    let mut s = ServerSettings::new("ws://192.0.2.1:1");
    s.insecure_plaintext = true;
    s.check().unwrap();
}
