//! TLS helpers for the integration tests: a verifier that trusts a server by its pin (or
//! accepts anything and lets the test read the pin), a TLS connector, the real `blindpostd`
//! binary with the stdout lines it prints, and a raw HTTP/1.1 exchange. Not for: tests.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Duration, PATIENCE, SocketAddr};

/// Trusts the server whose end-entity certificate has `pin`, or (`None`) any server.
#[derive(Debug)]
pub struct PinVerifier {
    pin: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            Some(pin) if *pin != blindpost_server::tls::certificate_pin(end_entity) => Err(
                rustls::Error::General("the certificate does not match the pin".into()),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration trusting `pin` (or anything), offering ALPN `http/1.1`.
pub fn client_config(pin: Option<&str>) -> Arc<ClientConfig> {
    let provider = blindpost_server::tls::provider();
    let verifier = Arc::new(PinVerifier {
        pin: pin.map(str::to_owned),
        provider: Arc::clone(&provider),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// TLS over `io` to `localhost`, trusting `pin` (or anything).
pub async fn tls_over<IO>(io: IO, pin: Option<&str>) -> tokio_rustls::client::TlsStream<IO>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(client_config(pin));
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(PATIENCE, connector.connect(name, io))
        .await
        .expect("the TLS handshake finishes")
        .expect("the TLS handshake succeeds")
}

/// A TLS connection to `addr`, trusting `pin` (or anything).
pub async fn tls_connect(addr: SocketAddr, pin: Option<&str>) -> TlsStream<TcpStream> {
    tls_over(TcpStream::connect(addr).await.unwrap(), pin).await
}

/// The pin of the certificate the server presented on `stream`.
pub fn peer_pin<IO>(stream: &TlsStream<IO>) -> String {
    let certs = stream.get_ref().1.peer_certificates().unwrap();
    blindpost_server::tls::certificate_pin(&certs[0])
}

/// The real binary, and what it printed.
pub struct Binary {
    pub child: tokio::process::Child,
    /// The address of the `... listening on ADDR` line.
    pub addr: SocketAddr,
    /// The `tls certificate sha256:HEX` line's pin.
    pub pin: Option<String>,
    /// The admin listener's address.
    pub admin: Option<SocketAddr>,
}

impl Binary {
    /// Starts `blindpostd ARGS` and reads its stdout lines: the listening line, then (`tls`)
    /// the pin, then (`admin`) the admin line.
    pub async fn start(args: &[&str], tls: bool, admin: bool) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_blindpostd"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next = async || {
            tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .expect("a line in time")
                .unwrap()
                .expect("blindpostd printed a line")
        };
        let first = next().await;
        let addr = first
            .strip_prefix("blindpostd listening on ")
            .or_else(|| first.strip_prefix("blindpostd relay listening on "))
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .unwrap();
        let pin = if tls {
            let line = next().await;
            let pin = line.strip_prefix("tls certificate ").unwrap().to_owned();
            assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");
            assert!(
                pin[7..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
            Some(pin)
        } else {
            None
        };
        let admin = if admin {
            let line = next().await;
            Some(
                line.strip_prefix("blindpostd admin listening on ")
                    .unwrap()
                    .parse()
                    .unwrap(),
            )
        } else {
            None
        };
        Self {
            child,
            addr,
            pin,
            admin,
        }
    }

    /// Sends a signal (`-HUP`, `-TERM`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

/// Everything the peer sends until it closes (or `PATIENCE` passes), errors included as EOF.
pub async fn read_all<IO: tokio::io::AsyncRead + Unpin>(io: &mut IO) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, io.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the peer neither answered nor closed in time"),
        }
    }
}

/// Writes `request` (raw bytes) and reads the whole answer.
pub async fn exchange<IO>(io: &mut IO, request: &[u8]) -> Vec<u8>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(request).await.unwrap();
    io.flush().await.unwrap();
    read_all(io).await
}

/// An HTTP/1.1 request for `path` with `method` and extra header lines, closing after (unless
/// the headers hold their own `Connection`).
pub fn http_request(method: &str, path: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("connection:"))
    {
        r.push_str("Connection: close\r\n");
    }
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// An answer's status line and body (headers dropped: `date` differs between answers).
pub fn status_and_body(answer: &[u8]) -> (String, Vec<u8>) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head.lines().next().unwrap().to_owned();
    (status, answer[end + 4..].to_vec())
}

/// Asserts `bytes` name neither the product nor the protocol nor the admin endpoints.
pub fn assert_clean(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    for word in ["blindpost", "websocket", "healthz", "metrics", "protobuf"] {
        assert!(
            !text.contains(word),
            "{what}: the answer contains {word:?}: {text:?}"
        );
    }
}

/// Waits, within `PATIENCE`, until `check` holds.
pub async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
