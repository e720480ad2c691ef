//! The self-signed certificate for operators with a bare IP address and no domain: generated
//! with rcgen on first start into the data directory (mode 0600), reused afterwards. Clients
//! trust it by its pin. Not for: loading or serving it (see the parent module).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use super::TlsError;

/// The certificate's file name in the data directory.
pub const CERT_FILE: &str = "tls-self-signed.crt";
/// The key's file name in the data directory.
pub const KEY_FILE: &str = "tls-self-signed.key";

/// How long the certificate is valid: clients pin it, so it should outlive the server.
const VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);

/// The certificate and key files in `data_dir`, generated first if either is missing.
pub fn ensure(data_dir: &Path, listen: SocketAddr) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = data_dir.join(CERT_FILE);
    let key = data_dir.join(KEY_FILE);
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    crate::create_private_dir(data_dir).map_err(|source| TlsError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    let (cert_pem, key_pem) = generate(listen)?;
    // The key first and the certificate last, each written whole and renamed in place: a crash
    // in between leaves no certificate, so the next start generates both again.
    write_private(&key, key_pem.as_bytes())?;
    write_private(&cert, cert_pem.as_bytes())?;
    tracing::info!(file = %cert.display(), "generated a self-signed TLS certificate");
    Ok((cert, key))
}

/// A P-256 key and a certificate for `localhost` and the listen IP (unless unspecified).
fn generate(listen: SocketAddr) -> Result<(String, String), TlsError> {
    let mut names = vec!["localhost".to_owned()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    params.distinguished_name = dn;
    // Dated from now rather than rcgen's fixed defaults, which would mark the certificate.
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + VALIDITY).into();
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file renamed into place.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}
