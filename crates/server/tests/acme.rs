//! ACME for real: Pebble (Let's Encrypt's test CA, Debian `pebble`) validates over TLS-ALPN-01
//! and issues a certificate to the real `blindpostd --acme …` on its own listener; a restart
//! then serves the cached certificate with Pebble gone. A small in-process TLS loop over
//! [`Acme`] ([`ServerUnderTest`]) shows that handshakes fail, without hanging, while no
//! certificate exists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blindpost_server::acme::{Acme, AcmeSettings};
use common::tools::{ChildGuard, free_port, tools_or_skip};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

/// The name Pebble is asked to certify; its DNS (`pebble-challtestsrv`) resolves it to 127.0.0.1.
const DOMAIN: &str = "blindpost-acme.test";

/// Bounds each wait on Pebble or the server; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_a_certificate_over_tls_alpn_01_and_a_restart_serves_it_from_the_cache() {
    if !tools_or_skip("acme", &["pebble", "pebble-challtestsrv"]) {
        return;
    }
    init_tracing();
    let began = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let cache_dir = scratch.path().join("data").join("acme");

    // Pebble's config names the port it validates on, so the server's port is chosen first.
    let port = free_port();
    let mut pebble = Pebble::start(port).await;
    let root = pebble.issuing_root().await;
    let settings = AcmeSettings {
        domain: DOMAIN.to_owned(),
        contact: Some("ops@blindpost-acme.test".to_owned()),
        directory: pebble.directory(),
        ca: Some(pebble.https_ca().to_owned()),
    };

    let data_dir = scratch.path().join("data");
    let server = Blindpostd::start(port, &settings, &data_dir);
    let (chain, response) = wait_for_certificate(server.addr, &root, Some(&mut pebble)).await;
    eprintln!("acme: certificate issued after {:?}", began.elapsed());
    // The decoy site's front page: the real server answered over the issued certificate.
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(chain.len() >= 2, "leaf and Pebble's intermediate");

    let files = cache_files(&cache_dir);
    let cert_file = files
        .iter()
        .find(|f| file_name(f).starts_with("cert-"))
        .unwrap_or_else(|| panic!("a cached certificate in {files:?}"));
    assert!(
        files.iter().any(|f| file_name(f).starts_with("account-")),
        "a cached account key in {files:?}"
    );
    let cached = std::fs::read(cert_file).unwrap();
    let cached_leaf = CertificateDer::pem_slice_iter(&cached)
        .next()
        .expect("a certificate in the cache file")
        .unwrap();
    assert_eq!(
        cached_leaf, chain[0],
        "the cache holds the served certificate"
    );
    assert_private(&cache_dir, &files);

    // Without a CA, a restart can only serve what the cache holds.
    drop(server);
    pebble.stop();
    let restarted = Blindpostd::start(free_port(), &settings, &data_dir);
    let (again, response) = wait_for_certificate(restarted.addr, &root, None).await;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert_eq!(
        again[0], chain[0],
        "the cached certificate, not a new order"
    );
    assert_eq!(cache_files(&cache_dir), files, "nothing new was written");
    eprintln!("acme: whole test took {:?}", began.elapsed());
}

#[tokio::test]
async fn without_a_certificate_handshakes_fail_and_the_server_keeps_serving() {
    init_tracing();
    let scratch = tempfile::tempdir().unwrap();
    // Nothing listens there: every order fails and is retried with back-off.
    let settings = AcmeSettings {
        directory: format!("https://127.0.0.1:{}/dir", free_port()),
        ..AcmeSettings::new(DOMAIN)
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let server = ServerUnderTest::start(listener, settings, &scratch.path().join("acme"));
    let anyone = rustls::pki_types::CertificateDer::from(
        rcgen::generate_simple_self_signed(vec![DOMAIN.to_owned()])
            .unwrap()
            .cert
            .der()
            .to_vec(),
    );
    for _ in 0..3 {
        let attempt = tokio::time::timeout(PATIENCE, fetch(server.addr, &anyone)).await;
        match attempt.expect("the handshake ends instead of hanging") {
            Err(e) => assert!(e.contains("handshake"), "{e}"),
            Ok(_) => panic!("a handshake completed without a certificate"),
        }
    }
    assert_eq!(server.challenges(), 0);
}

// ---------------------------------------------------------------------------------------------
// The servers under test.

/// The real `blindpostd --acme DOMAIN` on `127.0.0.1:port`, killed on drop.
struct Blindpostd {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Blindpostd {
    fn start(port: u16, settings: &AcmeSettings, data_dir: &Path) -> Blindpostd {
        use std::io::BufRead as _;
        let mut command = Command::new(env!("CARGO_BIN_EXE_blindpostd"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0", "--data"])
            .arg(data_dir)
            .args([
                "--acme",
                &settings.domain,
                "--acme-directory",
                &settings.directory,
            ])
            .args(["--log", "warn"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(contact) = &settings.contact {
            command.args(["--acme-contact", contact]);
        }
        if let Some(ca) = &settings.ca {
            command.arg("--acme-ca").arg(ca);
        }
        let mut child = command.spawn().expect("blindpostd starts");
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        stdout.read_line(&mut line).expect("its first line");
        // Its later lines (the admin listener) must find a reader.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("blindpostd listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        Blindpostd { addr, child }
    }
}

impl Drop for Blindpostd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An [`Acme`] behind a TLS accept loop that answers `200` over HTTP/1.1, as the server's
/// acceptor does: a `LazyConfigAcceptor` per connection, the challenge config for TLS-ALPN-01
/// ClientHellos, the ordinary config otherwise. To test `blindpostd` instead, spawn
/// `blindpostd --listen ADDR --data DIR --acme DOMAIN --acme-directory URL --acme-ca FILE`
/// here (with a `ChildGuard`) and drop the challenge count.
struct ServerUnderTest {
    addr: SocketAddr,
    challenges: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerUnderTest {
    fn start(listener: TcpListener, settings: AcmeSettings, cache_dir: &Path) -> ServerUnderTest {
        let addr = listener.local_addr().unwrap();
        let acme = Arc::new(Acme::start(settings, cache_dir).expect("acme starts"));
        let challenges = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&challenges);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acme = Arc::clone(&acme);
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let served = tokio::time::timeout(PATIENCE, serve(tcp, &acme, &counted));
                    if let Ok(Err(e)) = served.await {
                        eprintln!("server under test: connection failed: {e}");
                    }
                });
            }
        });
        ServerUnderTest {
            addr,
            challenges,
            task,
        }
    }

    /// TLS-ALPN-01 validation handshakes completed so far.
    fn challenges(&self) -> usize {
        self.challenges.load(Ordering::SeqCst)
    }
}

impl Drop for ServerUnderTest {
    fn drop(&mut self) {
        // Dropping the task drops its `Acme`, which stops ordering.
        self.task.abort();
    }
}

async fn serve(tcp: TcpStream, acme: &Acme, challenges: &AtomicUsize) -> std::io::Result<()> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    if Acme::is_challenge(&start.client_hello()) {
        let mut tls = start.into_stream(acme.challenge_config()).await?;
        challenges.fetch_add(1, Ordering::SeqCst);
        return tls.shutdown().await;
    }
    let mut tls = start.into_stream(acme.server_config()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .await?;
    tls.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// The client side.

/// Retries [`fetch`] until it succeeds; fails the test (with Pebble's output) after [`PATIENCE`].
async fn wait_for_certificate(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
    mut pebble: Option<&mut Pebble>,
) -> (Vec<CertificateDer<'static>>, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(10), fetch(addr, root)).await {
            Ok(Ok(done)) => return done,
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_owned(),
        };
        if let Some(pebble) = pebble.as_deref_mut() {
            pebble.assert_running();
        }
        if Instant::now() > deadline {
            let output = pebble.map(|p| p.output()).unwrap_or_default();
            panic!("no certificate after {PATIENCE:?}; last error: {last}\n{output}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A TLS handshake to `addr` with SNI [`DOMAIN`], trusting only `root`, then `GET /`: the
/// server's chain and the response.
async fn fetch(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
) -> Result<(Vec<CertificateDer<'static>>, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| format!("root: {e}"))?;
    let mut config = client_config(roots);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(DOMAIN).unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let request = format!("GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
    let response = request_over(&mut tls, &request).await?;
    Ok((chain, response))
}

fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Writes `request`, reads until the server closes.
async fn request_over(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    request: &str,
) -> Result<String, String> {
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // Go's HTTPS server may close without close_notify; what arrived is complete.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    String::from_utf8(response).map_err(|e| format!("response: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The Pebble harness.

/// Pebble and its DNS (`pebble-challtestsrv`, answering 127.0.0.1 for every name), with an
/// HTTPS certificate for its own listeners generated from a fresh CA. Both are killed on drop.
struct Pebble {
    _dir: tempfile::TempDir,
    acme_port: u16,
    management_port: u16,
    https_ca: PathBuf,
    https_ca_der: CertificateDer<'static>,
    dns: ChildGuard,
    pebble: ChildGuard,
}

impl Pebble {
    /// Starts Pebble validating on `tls_port` (TLS-ALPN-01) and waits until it answers.
    async fn start(tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let (https_ca_der, https_ca) = write_https_certificates(dir.path());
        let acme_port = free_port();
        let management_port = free_port();
        let dns_port = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("pebble-cert.pem"),
                "privateKey": dir.path().join("pebble-key.pem"),
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_file = dir.path().join("pebble-config.json");
        std::fs::write(&config_file, config.to_string()).unwrap();

        let dns = ChildGuard::spawn(
            "pebble-challtestsrv",
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{}", free_port())]),
            dir.path(),
        );
        let pebble = ChildGuard::spawn(
            "pebble",
            Command::new("pebble")
                .arg("-config")
                .arg(&config_file)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                // Every order must be validated afresh, by a real connection to the server.
                .env("PEBBLE_AUTHZREUSE", "0")
                .env_remove("PEBBLE_VA_ALWAYS_VALID"),
            dir.path(),
        );
        let mut pebble = Pebble {
            _dir: dir,
            acme_port,
            management_port,
            https_ca,
            https_ca_der,
            dns,
            pebble,
        };
        let deadline = Instant::now() + PATIENCE;
        while pebble.get(pebble.acme_port, "/dir").await.is_err() {
            pebble.assert_running();
            assert!(
                Instant::now() < deadline,
                "Pebble never answered:\n{}",
                pebble.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pebble
    }

    /// The ACME directory URL.
    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The PEM root Pebble's own HTTPS listeners chain to (for `--acme-ca`).
    fn https_ca(&self) -> &Path {
        &self.https_ca
    }

    /// The root Pebble issues under, from its management API.
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let response = self.get(self.management_port, "/roots/0").await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        CertificateDer::pem_slice_iter(response.as_bytes())
            .next()
            .expect("a PEM root in the answer")
            .unwrap()
    }

    /// `GET path` from one of Pebble's HTTPS listeners.
    async fn get(&self, port: u16, path: &str) -> Result<String, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.https_ca_der.clone()).unwrap();
        let connector = TlsConnector::from(Arc::new(client_config(roots)));
        let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        request_over(&mut tls, &request).await
    }

    fn assert_running(&mut self) {
        self.dns.assert_running();
        self.pebble.assert_running();
    }

    fn output(&self) -> String {
        format!(
            "--- pebble:\n{}\n--- pebble-challtestsrv:\n{}",
            self.pebble.output(),
            self.dns.output()
        )
    }

    /// Kills Pebble and its DNS.
    fn stop(&mut self) {
        self.pebble.stop();
        self.dns.stop();
    }
}

/// Writes a fresh CA and, signed by it, Pebble's HTTPS certificate for `127.0.0.1` and
/// `localhost` (`pebble-cert.pem`, `pebble-key.pem`); returns the CA and its PEM file.
fn write_https_certificates(dir: &Path) -> (CertificateDer<'static>, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "blindpost test CA for Pebble's HTTPS");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let ca_file = dir.join("https-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(dir.join("pebble-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();
    (ca.der().clone(), ca_file)
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("blindpost_server=debug"))
        .with_test_writer()
        .try_init();
}

/// The cache directory's files, sorted.
fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The cache directory is 0700 and each file 0600.
fn assert_private(dir: &Path, files: &[PathBuf]) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        for file in files {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, files);
}
