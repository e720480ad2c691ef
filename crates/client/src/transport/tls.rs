//! The TLS layer: a rustls client (ring provider, chosen explicitly) that verifies the peer
//! either against the platform's roots (webpki's when the platform has none) or against
//! certificate pins, and a handshake over any boxed stream. A refused certificate becomes one
//! line, [`Error::Certificate`], never a retry without the check. The ClientHello is rustls's
//! ordinary one with ALPN `http/1.1`. Not for: choosing names or destinations (`connect`).

use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

use super::dial::BoxIo;
use super::endpoint::{Host, Pin};
use crate::error::{Error, Result};

/// Whose certificate is checked: named in messages with the flag that pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The blindpost server (inside a relay tunnel too).
    Server,
    /// A relay's own, outer TLS.
    Relay,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Relay => "relay",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Role::Server => "--server-pin",
            Role::Relay => "--relay-pin",
        }
    }
}

/// What the TLS layer checks: pins, or roots (the platform's plus `extra_roots`); and
/// whether the name goes out as SNI (it is checked against the certificate either way).
pub(crate) struct Trust<'a> {
    pub(crate) role: Role,
    pub(crate) pins: &'a [Pin],
    pub(crate) extra_roots: &'a [CertificateDer<'static>],
    pub(crate) send_sni: bool,
}

/// Runs a TLS handshake over `io` for the name `name` and returns the encrypted stream.
pub(crate) async fn handshake(io: BoxIo, name: &Host, trust: &Trust<'_>) -> Result<BoxIo> {
    let config = client_config(trust)?;
    let server_name = match name {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(n) => ServerName::try_from(n.clone())
            .map_err(|_| Error::Invalid(format!("{n:?} is not a TLS server name")))?,
    };
    match TlsConnector::from(config).connect(server_name, io).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(match refusal(&e) {
            Some(message) => Error::Certificate(message),
            None => Error::Unreachable(format!("TLS with {name}: {e}")),
        }),
    }
}

/// The client configuration: explicit ring provider, safe default versions, our verifier,
/// ALPN `http/1.1` (what a browser's WebSocket offers).
pub(crate) fn client_config(trust: &Trust<'_>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = if trust.pins.is_empty() {
        let mut roots = platform_roots().as_ref().clone();
        for root in trust.extra_roots {
            roots
                .add(root.clone())
                .map_err(|e| Error::Invalid(format!("an extra root is unusable: {e}")))?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::Invalid(format!("no usable certificate roots: {e}")))?;
        Arc::new(RootsVerifier {
            inner,
            role: trust.role,
        })
    } else {
        Arc::new(PinVerifier {
            pins: trust.pins.to_vec(),
            algorithms: provider.signature_verification_algorithms,
            role: trust.role,
        })
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_sni = trust.send_sni;
    Ok(Arc::new(config))
}

/// The platform's trusted roots, loaded once; webpki's bundled roots when the platform
/// offers none (a minimal container, say).
fn platform_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::debug!("no platform certificate roots; using the bundled webpki roots");
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(store)
        })
        .clone()
}

/// The one-line reason a verifier refused a certificate, carried through rustls and io
/// errors as an [`OtherError`].
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        message,
    )))))
}

/// Our verifiers' refusal inside the error a TLS handshake returned, if it is one.
fn refusal(e: &std::io::Error) -> Option<String> {
    let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) =
        e.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    inner.downcast_ref::<Refusal>().map(|r| r.0.clone())
}

fn fingerprint(cert: &CertificateDer<'_>) -> Pin {
    Pin(Sha256::digest(cert.as_ref()).into())
}

/// Accepts exactly the pinned end-entity certificates. Chain validation against roots is
/// what the pin replaces; the handshake signature is still verified, with the provider's
/// algorithms, so the peer must hold the pinned certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pins: Vec<Pin>,
    algorithms: WebPkiSupportedAlgorithms,
    role: Role,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if self.pins.contains(&got) {
            return Ok(ServerCertVerified::assertion());
        }
        let pinned = self
            .pins
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let which = if self.pins.len() == 1 {
            "the pinned"
        } else {
            "any of the pinned"
        };
        Err(refuse(format!(
            "{} certificate {got} does not match {which} {pinned}",
            self.role.name()
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why webpki refused a certificate, in words a user can act on (rustls's own text for the
/// rarer cases).
fn untrusted_reason(e: &rustls::Error) -> String {
    use CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return e.to_string();
    };
    match cert {
        C::UnknownIssuer
        | C::BadSignature
        | C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "no trusted root vouches for it".into()
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for that name".into()
        }
        C::Revoked => "it has been revoked".into(),
        _ => e.to_string(),
    }
}

/// webpki's chain validation against roots, with a refusal that names the certificate's
/// fingerprint and how to pin it (a self-signed server's certificate never chains).
#[derive(Debug)]
struct RootsVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
}

impl ServerCertVerifier for RootsVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                refuse(format!(
                    "{} certificate {} for {} is not trusted ({}); if it is the server's own \
                     self-signed certificate, pin it with {} sha256:…",
                    self.role.name(),
                    fingerprint(end_entity),
                    server_name.to_str(),
                    untrusted_reason(&e),
                    self.role.flag(),
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The provider every config is built with (exposed for tests' servers).
#[cfg(test)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
