//! What the transport tests share: certificates made with rcgen, a TLS WebSocket echo server
//! that counts its connections, and a helper that connects and round-trips one message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::error::Result;
use crate::transport::connect;
use crate::transport::endpoint::Endpoint;
use crate::transport::route::{Path, Route};

/// A certificate and its key.
pub(crate) struct Cert {
    pub(crate) der: CertificateDer<'static>,
    pub(crate) key: Vec<u8>,
}

impl Cert {
    /// `sha256:HEX` of the certificate, as the server prints it.
    pub(crate) fn pin(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(self.der.as_ref())))
    }
}

/// A self-signed certificate for `names`.
pub(crate) fn self_signed(names: &[&str]) -> Cert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    Cert {
        der: ck.cert.der().clone(),
        key: ck.key_pair.serialize_der(),
    }
}

/// A private root and a certificate for `names` it signed.
pub(crate) fn root_and_leaf(names: &[&str]) -> (CertificateDer<'static>, Cert) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "blindpost test root");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    (
        ca.der().clone(),
        Cert {
            der: leaf.der().clone(),
            key: leaf_key.serialize_der(),
        },
    )
}

/// A TLS acceptor presenting `cert`.
pub(crate) fn acceptor(cert: &Cert) -> tokio_rustls::TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(crate::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Answers one WebSocket on `io`, echoing binary messages until it closes.
pub(crate) async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(io: S) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_binary() && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// A listening TLS WebSocket echo server.
pub(crate) struct TlsServer {
    pub(crate) addr: SocketAddr,
    /// TCP connections accepted so far.
    pub(crate) accepted: Arc<AtomicUsize>,
}

impl TlsServer {
    pub(crate) async fn start(cert: &Cert) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let acceptor = acceptor(cert);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        ws_echo(tls).await;
                    }
                });
            }
        });
        Self { addr, accepted }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Connects over `path` and round-trips one binary message through the echo server.
pub(crate) async fn round_trip(endpoint: &Endpoint, path: Path) -> Result<Route> {
    let (mut ws, route) = connect::open(endpoint, path, crate::transport::ws_config()).await?;
    ws.send(Message::Binary(b"hello through the layers"[..].into()))
        .await
        .unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_data().as_ref(), b"hello through the layers");
    let _ = ws.close(None).await;
    Ok(route)
}
