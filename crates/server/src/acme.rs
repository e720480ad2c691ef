//! Certificates from an ACME CA (Let's Encrypt by default), ordered and renewed by
//! `rustls-acme`'s state machine in a background task and validated over TLS-ALPN-01 on the
//! serving listener itself, with the account key and certificates kept in a private cache
//! directory. Not for: accepting connections (the TLS acceptor asks [`Acme::is_challenge`] per
//! ClientHello and picks [`Acme::challenge_config`] or [`Acme::server_config`]), nor other
//! certificate sources (files, self-signed).
//!
//! **Invariant:** until a certificate exists (first order still running, or failing and being
//! retried with back-off), ordinary handshakes fail; the server keeps running.
//! **Boundary:** nothing here logs the account key, a private key or the contact address.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ClientHello;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::acme::ACME_TLS_ALPN_NAME;
use rustls_acme::{AccountCache, AcmeConfig, AcmeState, CertCache, EventError, EventOk};
use sha2::{Digest, Sha256};

/// Let's Encrypt's production directory, the default for [`AcmeSettings::directory`].
pub const LETS_ENCRYPT_DIRECTORY: &str = rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY;

/// What to ask the ACME CA for, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// The one DNS name the certificate is for; it must resolve to this server, which must be
    /// reachable on port 443 for TLS-ALPN-01 (or the CA's configured validation port).
    pub domain: String,
    /// The account's contact, an email address (`mailto:` is added when missing). Optional at
    /// Let's Encrypt; it is where expiry warnings would go. Never logged.
    #[serde(default)]
    pub contact: Option<String>,
    /// The ACME directory URL (`https://` only). Default [`LETS_ENCRYPT_DIRECTORY`].
    #[serde(default = "default_directory")]
    pub directory: String,
    /// An extra PEM root trusted (beside the webpki roots) for the directory's own HTTPS: for a
    /// private CA or Pebble. Not a root for anything else.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl AcmeSettings {
    /// Settings for `domain` at Let's Encrypt, with no contact and no extra root.
    pub fn new(domain: impl Into<String>) -> AcmeSettings {
        AcmeSettings {
            domain: domain.into(),
            contact: None,
            directory: default_directory(),
            ca: None,
        }
    }
}

fn default_directory() -> String {
    LETS_ENCRYPT_DIRECTORY.to_owned()
}

/// Why ACME could not start. Once started, failures are logged and retried, never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    // The operator's configuration is at fault.
    /// The domain is not a DNS name (an IP address, a wildcard, or malformed).
    #[error("acme domain {domain:?} is not a DNS name")]
    Domain {
        /// The domain as given.
        domain: String,
    },
    /// The directory URL is not `https://`.
    #[error("acme directory {url:?} is not an https:// URL")]
    Directory {
        /// The URL as given.
        url: String,
    },
    /// The extra CA file could not be read.
    #[error("cannot read acme CA {path}: {source}")]
    CaRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The extra CA file holds no certificate rustls accepts as a root.
    #[error("acme CA {path} holds no usable PEM certificate: {reason}")]
    CaPem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The cache directory could not be created or made private.
    #[error("cannot prepare acme cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    // The caller is at fault.
    /// [`Acme::start`] was called outside a tokio runtime.
    #[error("acme needs a tokio runtime to run in")]
    NoRuntime,
    /// rustls refused the configuration (the ring provider offers no safe protocol version).
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Certificates for one domain, kept current by a background task; dropping it stops the task.
#[derive(Debug)]
pub struct Acme {
    server: Arc<ServerConfig>,
    challenge: Arc<ServerConfig>,
    task: tokio::task::JoinHandle<()>,
}

impl Acme {
    /// Starts ordering/renewing in a background tokio task; certificates and the account key
    /// are cached in `cache_dir` (created mode 0700, files 0600, written atomically). A cached
    /// certificate is served at once and renewed when two thirds of its lifetime have passed.
    pub fn start(settings: AcmeSettings, cache_dir: &Path) -> Result<Acme, AcmeError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AcmeError::NoRuntime)?;
        let domain = dns_name(&settings.domain)?;
        if !settings.directory.starts_with("https://") {
            return Err(AcmeError::Directory {
                url: settings.directory,
            });
        }
        let provider = crate::tls::provider();
        let client = acme_client_config(Arc::clone(&provider), settings.ca.as_deref())?;
        prepare_cache_dir(cache_dir)?;

        let state = AcmeConfig::new_with_client_config([domain.as_str()], client)
            .contact(settings.contact.as_deref().map(contact_uri))
            .directory(&settings.directory)
            .cache(PrivateDirCache {
                dir: cache_dir.to_owned(),
            })
            .state();
        let resolver = state.resolver();
        let server = server_config(&provider, resolver.clone(), crate::tls::ALPN_HTTP1)?;
        let challenge = server_config(&provider, resolver, ACME_TLS_ALPN_NAME)?;
        let task = runtime.spawn(drive(state, domain));
        Ok(Acme {
            server,
            challenge,
            task,
        })
    }

    /// The config for ordinary handshakes: its cert resolver is ACME's, ALPN `http/1.1`.
    /// Handshakes fail while no certificate exists yet.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// The config answering TLS-ALPN-01 validation handshakes (ALPN `acme-tls/1`); it only
    /// completes for the domain with an order in progress.
    pub fn challenge_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.challenge)
    }

    /// Whether a ClientHello is an ACME TLS-ALPN-01 validation (its only ALPN is `acme-tls/1`).
    pub fn is_challenge(hello: &ClientHello<'_>) -> bool {
        rustls_acme::is_tls_alpn_challenge(hello)
    }
}

/// The listener asks per ClientHello: a TLS-ALPN-01 validation gets the challenge
/// configuration, everything else the certificate ACME obtained.
impl crate::tls::ConfigSource for Acme {
    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        if Self::is_challenge(hello) {
            self.challenge_config()
        } else {
            self.server_config()
        }
    }
}

impl Drop for Acme {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls the state machine for ever, logging what it did. Failed orders are retried by the
/// state machine itself, after 1 s, 2 s, 4 s … up to 2^16 s.
#[tracing::instrument(name = "acme", skip_all, fields(domain = %domain))]
async fn drive(mut state: AcmeState<io::Error>, domain: String) {
    let mut serving = false;
    while let Some(event) = state.next().await {
        match event {
            Ok(EventOk::DeployedCachedCert) => {
                tracing::info!("serving the cached certificate");
                serving = true;
            }
            Ok(EventOk::DeployedNewCert) if serving => tracing::info!("certificate renewed"),
            Ok(EventOk::DeployedNewCert) => {
                tracing::info!("certificate ordered");
                serving = true;
            }
            Ok(EventOk::CertCacheStore) => tracing::debug!("certificate cached"),
            Ok(EventOk::AccountCacheStore) => tracing::debug!("account key cached"),
            Err(EventError::Order(error)) => {
                tracing::error!(%error, "certificate order failed; retrying after a back-off");
            }
            Err(error @ (EventError::CertCacheLoad(_) | EventError::CachedCertParse(_))) => {
                tracing::error!(%error, "cached certificate unusable; ordering a new one");
            }
            Err(error @ EventError::AccountCacheLoad(_)) => {
                tracing::error!(%error, "cached account key unreadable; using a new account");
            }
            Err(error @ (EventError::CertCacheStore(_) | EventError::AccountCacheStore(_))) => {
                tracing::error!(%error, "cannot write the acme cache; serving from memory");
            }
            Err(error @ EventError::NewCertParse(_)) => {
                tracing::error!(%error, "the CA issued an unusable certificate");
            }
        }
    }
}

/// The domain as rustls will see it in SNI (lower case), if it is a DNS name.
fn dns_name(domain: &str) -> Result<String, AcmeError> {
    let lower = domain.to_ascii_lowercase();
    match ServerName::try_from(lower.as_str()) {
        Ok(ServerName::DnsName(_)) => Ok(lower),
        _ => Err(AcmeError::Domain {
            domain: domain.to_owned(),
        }),
    }
}

/// ACME wants contacts as URIs; an operator types an email address.
fn contact_uri(contact: &str) -> String {
    if contact.starts_with("mailto:") {
        contact.to_owned()
    } else {
        format!("mailto:{contact}")
    }
}

/// The client config for talking to the directory: webpki roots, plus `ca` if given.
fn acme_client_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    ca: Option<&Path>,
) -> Result<Arc<ClientConfig>, AcmeError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|source| AcmeError::CaRead {
            path: path.to_owned(),
            source,
        })?;
        let ca_pem = |reason: String| AcmeError::CaPem {
            path: path.to_owned(),
            reason,
        };
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_pem(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_pem(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_pem("no CERTIFICATE block".to_owned()));
        }
    }
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn server_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<rustls_acme::ResolvesServerCertAcme>,
    alpn: &[u8],
) -> Result<Arc<ServerConfig>, AcmeError> {
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// Creates `dir` (and parents) and makes it private, also when it already existed.
fn prepare_cache_dir(dir: &Path) -> Result<(), AcmeError> {
    let fail = |source| AcmeError::CacheDir {
        path: dir.to_owned(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir).map_err(fail)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    #[cfg(not(unix))]
    builder.create(dir).map_err(fail)?;
    Ok(())
}

/// `rustls-acme`'s cache in a directory, like its `DirCache` but with private files (0600)
/// written atomically (temporary file, fsync, rename), so a crash never leaves a torn account
/// key. Files: `cert-HEX.pem` (the certificate's private key, then its chain) and
/// `account-HEX.der` (the account's PKCS#8 key); HEX is SHA-256 over the domains (or contacts),
/// each followed by a zero byte, then the directory URL — another CA gets other files.
struct PrivateDirCache {
    dir: PathBuf,
}

impl PrivateDirCache {
    fn file(&self, kind: &str, parts: &[String], directory_url: &str, ext: &str) -> PathBuf {
        let mut hash = Sha256::new();
        for part in parts {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update(directory_url.as_bytes());
        let name = format!("{kind}-{}.{ext}", hex::encode(hash.finalize()));
        self.dir.join(name)
    }
}

#[async_trait::async_trait]
impl CertCache for PrivateDirCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        read_if_exists(self.file("cert", domains, directory_url, "pem")).await
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), io::Error> {
        write_private(
            self.file("cert", domains, directory_url, "pem"),
            cert.to_vec(),
        )
        .await
    }
}

#[async_trait::async_trait]
impl AccountCache for PrivateDirCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        read_if_exists(self.file("account", contact, directory_url, "der")).await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), io::Error> {
        write_private(
            self.file("account", contact, directory_url, "der"),
            account.to_vec(),
        )
        .await
    }
}

async fn read_if_exists(path: PathBuf) -> io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes` atomically, the file readable by its owner only.
async fn write_private(path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_must_be_dns_names() {
        assert_eq!(
            dns_name("Chat.Example.ORG").ok().as_deref(),
            Some("chat.example.org")
        );
        for bad in ["", "127.0.0.1", "::1", "exa mple.org", "*.example.org"] {
            assert!(
                matches!(dns_name(bad), Err(AcmeError::Domain { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn contacts_become_mailto_uris() {
        assert_eq!(contact_uri("ops@example.org"), "mailto:ops@example.org");
        assert_eq!(
            contact_uri("mailto:ops@example.org"),
            "mailto:ops@example.org"
        );
    }

    #[test]
    fn the_directory_must_be_https() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime builds without I/O drivers");
        let _guard = runtime.enter();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut settings = AcmeSettings::new("example.org");
        settings.directory = "http://127.0.0.1:14000/dir".to_owned();
        assert!(matches!(
            Acme::start(settings, dir.path()),
            Err(AcmeError::Directory { .. })
        ));
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(matches!(
            Acme::start(AcmeSettings::new("example.org"), dir.path()),
            Err(AcmeError::NoRuntime)
        ));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("writable temporary directory");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        assert!(matches!(
            acme_client_config(provider, Some(&path)),
            Err(AcmeError::CaPem { .. })
        ));
    }

    #[tokio::test]
    async fn cache_files_are_private_and_replaced_whole() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cache_dir = dir.path().join("acme");
        prepare_cache_dir(&cache_dir).expect("cache directory");
        let cache = PrivateDirCache {
            dir: cache_dir.clone(),
        };
        let domains = ["example.org".to_owned()];
        let url = LETS_ENCRYPT_DIRECTORY;
        assert_eq!(cache.load_cert(&domains, url).await.expect("load"), None);
        cache
            .store_cert(&domains, url, b"one")
            .await
            .expect("store");
        cache
            .store_cert(&domains, url, b"two")
            .await
            .expect("store");
        assert_eq!(
            cache
                .load_cert(&domains, url)
                .await
                .expect("load")
                .as_deref(),
            Some(&b"two"[..])
        );
        cache.store_account(&[], url, b"key").await.expect("store");
        let names: Vec<String> = std::fs::read_dir(&cache_dir)
            .expect("readable")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode();
            assert_eq!(mode(&cache_dir) & 0o777, 0o700);
            for name in names {
                assert_eq!(mode(&cache_dir.join(&name)) & 0o777, 0o600, "{name}");
            }
        }
    }
}
