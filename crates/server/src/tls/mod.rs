//! TLS for the listeners: the certificate pin, PEM loading, the rustls server configuration,
//! and the [`ConfigSource`] that picks a configuration for each ClientHello (file and
//! self-signed certificates here, reloadable on SIGHUP; ACME plugs in as another source).
//! Not for: the handshake itself (see `listener`, which runs it inside the handshake deadline).

mod self_signed;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ClientHello;
use sha2::{Digest as _, Sha256};

use crate::config::TlsMode;

/// The largest certificate or key file read, in bytes (checked before reading it).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The ALPN protocol offered: WebSocket runs over HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than any certificate or key.
    #[error("{0}: larger than 1 MiB, not a certificate or key file")]
    TooLarge(PathBuf),
    /// The certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    /// A PEM file could not be parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// rustls refused the certificate and key (a key that does not match, say).
    #[error("certificate {cert} and key {key} do not make a TLS configuration: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The self-signed certificate could not be generated.
    #[error("cannot generate the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// ACME could not be started (its settings or its cache directory).
    #[error("ACME: {0}")]
    Acme(#[from] crate::acme::AcmeError),
}

/// The pin clients use for a certificate: `sha256:` and the lowercase hex SHA-256 of its DER.
pub fn certificate_pin(cert: &CertificateDer<'_>) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert.as_ref())))
}

/// The crypto provider every configuration is built with (never a process default).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where the server configuration for one ClientHello comes from. The listener asks once per
/// connection, after reading the ClientHello and before answering it. An ACME source answers a
/// ClientHello whose ALPN is `acme-tls/1` with its challenge configuration.
pub trait ConfigSource: Send + Sync + 'static {
    /// The configuration to answer `hello` with.
    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig>;
}

/// A listener's TLS: the source of configurations, and (file and self-signed certificates)
/// the files it reloads on SIGHUP.
#[derive(Clone)]
pub struct Tls {
    source: Arc<dyn ConfigSource>,
    files: Option<Arc<FileCerts>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Sets up TLS for `mode`: loads the files, or generates (first start) and loads the
    /// self-signed certificate in `data_dir` for `listen`. `None` when TLS is off.
    pub fn from_mode(
        mode: &TlsMode,
        data_dir: &Path,
        listen: SocketAddr,
    ) -> Result<Option<Self>, TlsError> {
        let files = match mode {
            TlsMode::Off => return Ok(None),
            TlsMode::Files { cert, key } => FileCerts::load(cert.clone(), key.clone())?,
            TlsMode::SelfSigned => {
                let (cert, key) = self_signed::ensure(data_dir, listen)?;
                FileCerts::load(cert, key)?
            }
            TlsMode::Acme(settings) => {
                let acme = crate::acme::Acme::start(settings.clone(), &data_dir.join("acme"))?;
                return Ok(Some(Self::from_source(Arc::new(acme))));
            }
        };
        let files = Arc::new(files);
        Ok(Some(Self {
            source: Arc::clone(&files) as Arc<dyn ConfigSource>,
            files: Some(files),
        }))
    }

    /// TLS from another source (ACME), without files to reload or a pin to print.
    pub fn from_source(source: Arc<dyn ConfigSource>) -> Self {
        Self {
            source,
            files: None,
        }
    }

    /// The source of configurations, for the listener.
    pub fn source(&self) -> Arc<dyn ConfigSource> {
        Arc::clone(&self.source)
    }

    /// The pin of the end-entity certificate now served (file and self-signed certificates).
    pub fn pin(&self) -> Option<String> {
        self.files.as_ref().map(|f| f.pin())
    }

    /// Reads the certificate files again; new handshakes use them, open connections keep
    /// theirs. On failure the old certificate stays. Returns the new pin (`None` for a source
    /// without files).
    pub fn reload(&self) -> Result<Option<String>, TlsError> {
        match &self.files {
            Some(files) => files.reload().map(Some),
            None => Ok(None),
        }
    }
}

/// A certificate and key from PEM files, and the configuration built from them.
pub struct FileCerts {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    pin: String,
}

impl FileCerts {
    /// Loads `cert` (chain, end-entity first) and `key`.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let loaded = load(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: RwLock::new(loaded),
        })
    }

    /// The pin of the certificate now served.
    pub fn pin(&self) -> String {
        match self.current.read() {
            Ok(c) => c.pin.clone(),
            Err(poisoned) => poisoned.into_inner().pin.clone(),
        }
    }

    /// Loads the files again and swaps the configuration in; on failure keeps the old one.
    pub fn reload(&self) -> Result<String, TlsError> {
        let loaded = load(&self.cert, &self.key)?;
        let pin = loaded.pin.clone();
        match self.current.write() {
            Ok(mut c) => *c = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(pin)
    }
}

impl ConfigSource for FileCerts {
    fn config_for(&self, _hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c.config),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().config),
        }
    }
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = read_limited(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    };
    let pin = certificate_pin(leaf);
    let key_pem = read_limited(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let config = server_config(chain, key).map_err(|source| TlsError::Config {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    })?;
    Ok(Loaded {
        config: Arc::new(config),
        pin,
    })
}

/// A server configuration for one certificate chain: the explicit ring provider, the safe
/// default protocol versions, ALPN `http/1.1`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// Reads a file of at most [`MAX_PEM_BYTES`].
fn read_limited(path: &Path) -> Result<Vec<u8>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge(path.to_owned()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_sha256_of_the_der_in_lowercase_hex() {
        let der = CertificateDer::from(b"abc".to_vec());
        assert_eq!(
            certificate_pin(&der),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn self_signed_certificates_are_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = Tls::from_mode(&TlsMode::SelfSigned, &data, listen)
            .unwrap()
            .unwrap();
        let pin = first.pin().unwrap();
        assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&data), 0o700);
            assert_eq!(mode(&data.join("tls-self-signed.key")), 0o600);
            assert_eq!(mode(&data.join("tls-self-signed.crt")), 0o600);
        }
        let again = Tls::from_mode(&TlsMode::SelfSigned, &data, listen)
            .unwrap()
            .unwrap();
        assert_eq!(again.pin().unwrap(), pin, "reused on the next start");
    }

    #[test]
    fn a_failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (cert, key) = self_signed::ensure(dir.path(), listen).unwrap();
        let tls = Tls::from_mode(
            &TlsMode::Files {
                cert: cert.clone(),
                key,
            },
            dir.path(),
            listen,
        )
        .unwrap()
        .unwrap();
        let pin = tls.pin().unwrap();
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.pin().unwrap(), pin);
    }
}
