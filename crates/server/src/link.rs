//! `blindpostd link`: the deployment's shareable server link (`blindpost://connect?…`, see
//! `blindpost_wire::link`), made from the resolved configuration — the public URLs with the
//! secret WebSocket path, the pin of the certificate the server serves (file or self-signed;
//! none for ACME, whose certificate public roots vouch for), and the relays given.
//! Not for: printing (the binary prints it and its QR code).

use std::net::SocketAddr;

use blindpost_wire::link::{LinkEndpoint, ServerLink, check_pin};

use crate::config::{Config, ConfigError, TlsMode};
use crate::tls::{Tls, TlsError};

/// What `blindpostd link` is asked for beside the server's own configuration.
#[derive(Debug, Clone, Default)]
pub struct LinkRequest {
    /// Public URLs of the server's nodes (`wss://HOST[:PORT]`, a path is optional): empty for
    /// the ACME domain or, failing that, the listen address.
    pub urls: Vec<String>,
    /// Relays that tunnel to this server.
    pub relays: Vec<String>,
    /// Their pins: the n-th belongs to the n-th relay.
    pub relay_pins: Vec<String>,
}

/// Why no link could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The certificate could not be read for its pin.
    #[error("certificate: {0}")]
    Tls(#[from] TlsError),
    /// Nothing says where clients reach the server.
    #[error(
        "the server listens on {0}, which clients cannot reach: give its public URL with --url"
    )]
    NoPublicUrl(SocketAddr),
    /// A URL, pin or relay is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// The link for `config`'s server.
pub fn server_link(config: &Config, request: &LinkRequest) -> Result<ServerLink, LinkError> {
    let mode = config.tls_mode()?;
    let scheme = if mode == TlsMode::Off { "ws" } else { "wss" };
    let urls = if request.urls.is_empty() {
        vec![default_url(config, &mode, scheme)?]
    } else {
        request.urls.clone()
    };
    let pins = match &mode {
        TlsMode::Files { .. } | TlsMode::SelfSigned => {
            Tls::from_mode(&mode, &config.data_dir, config.listen)?
                .and_then(|tls| tls.pin())
                .into_iter()
                .collect()
        }
        TlsMode::Off | TlsMode::Acme(_) => Vec::new(),
    };
    if request.relay_pins.len() > request.relays.len() {
        return Err(LinkError::Invalid(
            "more --relay-pin than --relay: each pin belongs to the relay before it".into(),
        ));
    }
    let mut link = ServerLink::default();
    for url in urls {
        link.servers.push(LinkEndpoint {
            url: with_path(&url, &config.ws_path)?,
            pins: pins.clone(),
        });
    }
    for (i, relay) in request.relays.iter().enumerate() {
        let pins: Vec<String> = request.relay_pins.get(i).cloned().into_iter().collect();
        for pin in &pins {
            check_pin(pin).map_err(LinkError::Invalid)?;
        }
        link.relays.push(LinkEndpoint {
            url: relay.clone(),
            pins,
        });
    }
    // The link must read back as itself: every URL is one a client can take.
    ServerLink::parse(&link.to_uri()).map_err(|e| LinkError::Invalid(e.to_string()))
}

/// `wss://DOMAIN[:PORT]` for ACME, else the listen address when it is a concrete one.
fn default_url(config: &Config, mode: &TlsMode, scheme: &str) -> Result<String, LinkError> {
    let port = match (scheme, config.listen.port()) {
        ("wss", 443) | ("ws", 80) => String::new(),
        (_, port) => format!(":{port}"),
    };
    if let TlsMode::Acme(acme) = mode {
        return Ok(format!("{scheme}://{}{port}", acme.domain));
    }
    if config.listen.ip().is_unspecified() || config.listen.port() == 0 {
        return Err(LinkError::NoPublicUrl(config.listen));
    }
    let host = match config.listen {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    Ok(format!("{scheme}://{host}{port}"))
}

/// `url` with the server's WebSocket path, unless it names a path of its own.
fn with_path(url: &str, ws_path: &str) -> Result<String, LinkError> {
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| LinkError::Invalid(format!("{url:?} is not a wss:// (or ws://) URL")))?;
    Ok(match rest.find('/') {
        Some(_) => url.to_string(),
        None => format!("{url}{ws_path}"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_self_signed_server_links_its_public_url_path_and_pin_and_its_relays() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "tls = \"self-signed\"\nws_path = \"/s3cret\"\ndata_dir = {:?}\n",
            dir.path()
        );
        let config = Config::from_toml(&text, Path::new("x")).unwrap();
        let pin = format!("sha256:{}", "ab".repeat(32));
        let link = server_link(
            &config,
            &LinkRequest {
                urls: vec!["wss://chat.example:8443".into()],
                relays: vec!["wss://relay.example/r".into()],
                relay_pins: vec![pin.clone()],
            },
        )
        .unwrap();
        assert_eq!(link.servers.len(), 1);
        assert_eq!(link.servers[0].url, "wss://chat.example:8443/s3cret");
        let served = Tls::from_mode(&TlsMode::SelfSigned, dir.path(), config.listen)
            .unwrap()
            .unwrap()
            .pin()
            .unwrap();
        assert_eq!(link.servers[0].pins, vec![served]);
        assert_eq!(link.relays[0].pins, vec![pin]);
    }

    #[test]
    fn an_acme_server_links_its_domain_without_a_pin() {
        let config = Config::from_toml(
            "acme_domain = \"chat.example.org\"\nlisten = \"0.0.0.0:443\"\n",
            Path::new("x"),
        )
        .unwrap();
        let link = server_link(&config, &LinkRequest::default()).unwrap();
        assert_eq!(link.servers[0].url, "wss://chat.example.org/v1/ws");
        assert!(link.servers[0].pins.is_empty());
    }

    #[test]
    fn without_a_reachable_address_or_with_stray_pins_it_says_what_to_give() {
        let config = Config::from_toml("listen = \"0.0.0.0:7480\"\n", Path::new("x")).unwrap();
        assert!(matches!(
            server_link(&config, &LinkRequest::default()),
            Err(LinkError::NoPublicUrl(_))
        ));
        let request = LinkRequest {
            urls: vec!["ws://127.0.0.1:7480".into()],
            relays: vec![],
            relay_pins: vec![format!("sha256:{}", "00".repeat(32))],
        };
        assert!(matches!(
            server_link(&config, &request),
            Err(LinkError::Invalid(_))
        ));
        let request = LinkRequest {
            urls: vec!["https://chat.example".into()],
            ..LinkRequest::default()
        };
        assert!(server_link(&config, &request).is_err());
    }
}
