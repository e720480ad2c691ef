//! A server's connection settings as the user gives them and the profile stores them
//! ([`ServerSettings`]), and the same settings parsed and checked ([`Endpoint`]): the WebSocket
//! URL, certificate pins, proxy, TLS name, TCP destination and relays. Parsing enforces the
//! plaintext rule (`ws://` only to loopback unless explicitly overridden). Not for: opening
//! connections (`dial`, `tls`, `tunnel` do that) or choosing a path (`route`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use blindpost_wire::WS_PATH;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest URL, proxy URL or host name accepted, checked before anything is parsed.
const MAX_URL_BYTES: usize = 2048;
/// Most relays one server may have (as many as a server link carries).
pub const MAX_RELAYS: usize = blindpost_wire::link::MAX_LINK_ENDPOINTS;
/// Most certificate pins one server or relay may have (as many as a server link carries).
pub const MAX_PINS: usize = blindpost_wire::link::MAX_LINK_PINS;
/// The prefix of a certificate pin.
const PIN_PREFIX: &str = "sha256:";

/// How to reach one server, as given on the command line and stored in the profile.
/// Strings, so the stored form is readable; [`ServerSettings::check`] parses them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerSettings {
    /// `wss://HOST[:PORT][/PATH]` (or `ws://` for loopback); no path means `/v1/ws`.
    pub url: String,
    /// Certificate pins, `sha256:` + 64 hex digits of the end-entity certificate's DER. When
    /// any is set, the certificate must match one of them instead of chaining to a root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
    /// A proxy every connection goes through: `socks5h://`, `socks5://` or `http://`, with
    /// optional `user:password@`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The TLS server name to send instead of the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// `HOST:PORT` to open the TCP connection to instead of the URL's host and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_to: Option<String>,
    /// Allow `ws://` (no TLS) to a host that is not loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext: bool,
    /// Volunteer relays that tunnel to this server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelaySettings>,
}

/// A volunteer relay: its URL and the pins of its own certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RelaySettings {
    /// `wss://HOST[:PORT]/PATH`: the relay's secret path.
    pub url: String,
    /// Pins of the relay's certificate (empty: verified against roots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
}

impl ServerSettings {
    /// Settings with only a URL: roots-verified TLS, direct, no relays.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks every field (the URL's form, the plaintext rule, pins, proxy, names).
    pub fn check(&self) -> Result<()> {
        Endpoint::parse(self).map(|_| ())
    }

    /// The same settings with the proxy's password replaced by `***`, for showing.
    pub fn redacted(&self) -> Self {
        Self {
            proxy: self.proxy.as_deref().map(redact_proxy),
            ..self.clone()
        }
    }

    /// The same settings with every pin and relay pin in canonical (lowercase) form.
    pub(crate) fn normalized(&self) -> Self {
        let pins = |p: &[String]| p.iter().map(|p| p.trim().to_ascii_lowercase()).collect();
        Self {
            pins: pins(&self.pins),
            relays: self
                .relays
                .iter()
                .map(|r| RelaySettings {
                    url: r.url.clone(),
                    pins: pins(&r.pins),
                })
                .collect(),
            ..self.clone()
        }
    }
}

impl From<&str> for ServerSettings {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<String> for ServerSettings {
    fn from(url: String) -> Self {
        Self::new(url)
    }
}

impl From<&String> for ServerSettings {
    fn from(url: &String) -> Self {
        Self::new(url.as_str())
    }
}

impl RelaySettings {
    /// A relay with its pins.
    pub fn new(url: impl Into<String>, pins: Vec<String>) -> Self {
        Self {
            url: url.into(),
            pins,
        }
    }
}

/// `scheme://user:***@host:port` for a proxy URL with a password; the URL unchanged otherwise.
pub(crate) fn redact_proxy(proxy: &str) -> String {
    let Some((scheme, rest)) = proxy.split_once("://") else {
        return proxy.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{hostport}")
        }
        None => proxy.to_string(),
    }
}

/// A host: a DNS name (lowercased) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// Parses `name`, `1.2.3.4` or `[v6]`.
    fn parse(text: &str, what: &str) -> Result<Self> {
        if let Some(inner) = text.strip_prefix('[') {
            let v6 = inner
                .strip_suffix(']')
                .and_then(|a| a.parse::<Ipv6Addr>().ok())
                .ok_or_else(|| invalid(format!("{what}: {text:?} is not an IPv6 address")))?;
            return Ok(Host::Ip(IpAddr::V6(v6)));
        }
        if let Ok(v4) = text.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        Ok(Host::Name(dns_name(text, what)?))
    }

    /// Whether this host is this machine: 127.0.0.0/8, ::1 or `localhost`.
    pub(crate) fn is_loopback(&self) -> bool {
        match self {
            Host::Name(n) => n == "localhost",
            Host::Ip(ip) => ip.is_loopback(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// A checked DNS name: 1-253 bytes of letters, digits, `-`, `_` and `.`, lowercased.
fn dns_name(text: &str, what: &str) -> Result<String> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !text.starts_with('.')
        && !text.contains("..");
    if !ok {
        return Err(invalid(format!("{what}: {text:?} is not a host name")));
    }
    Ok(text.to_ascii_lowercase())
}

/// Splits `host:port` (host possibly `[v6]`); `None` for the port when there is none.
fn split_host_port<'a>(text: &'a str, what: &str) -> Result<(&'a str, Option<u16>)> {
    let (host, port) = if text.starts_with('[') {
        match text.find(']') {
            Some(end) => {
                let (h, rest) = text.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if rest.is_empty() => (h, None),
                    None => return Err(invalid(format!("{what}: {text:?} is malformed"))),
                }
            }
            None => return Err(invalid(format!("{what}: {text:?} is malformed"))),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid(format!("{what}: {p:?} is not a port number")))?,
        ),
        None => None,
    };
    Ok((host, port))
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsUrl {
    pub(crate) tls: bool,
    pub(crate) host: Host,
    pub(crate) port: u16,
    /// Starts with `/`; [`WS_PATH`] when the URL named none.
    pub(crate) path: String,
}

impl WsUrl {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_URL_BYTES {
            return Err(invalid(format!(
                "a URL of {} bytes is longer than the {MAX_URL_BYTES} accepted",
                text.len()
            )));
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("ws://") {
            (false, rest)
        } else {
            return Err(invalid(format!(
                "server URL {text:?} must start with wss:// (or ws:// for this machine)"
            )));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(invalid(format!("server URL {text:?} has no host")));
        }
        if authority.contains('@') {
            return Err(invalid(format!(
                "server URL {text:?} carries a user name; blindpost URLs have none"
            )));
        }
        let (host, port) = split_host_port(authority, "server URL")?;
        let host = Host::parse(host, "server URL")?;
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        if !path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'#' && b != b'\\')
        {
            return Err(invalid(format!(
                "server URL {text:?}: the path may hold only visible ASCII"
            )));
        }
        let path = if path.is_empty() || path == "/" {
            WS_PATH.to_string()
        } else {
            path.to_string()
        };
        Ok(Self {
            tls,
            host,
            port,
            path,
        })
    }

    /// `host` or `host:port` (the port only when not the scheme's default): the `Host` header.
    pub(crate) fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL, path included.
    pub(crate) fn full(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }
}

impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full())
    }
}

/// A certificate pin: the SHA-256 of an end-entity certificate's DER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pin(pub(crate) [u8; 32]);

impl Pin {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let bytes = lower
            .strip_prefix(PIN_PREFIX)
            .filter(|h| h.len() == 64)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "certificate pin {text:?} must be sha256: and 64 hex digits (the server \
                     prints it as `tls certificate sha256:…`)"
                ))
            })?;
        Ok(Pin(bytes))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", hex::encode(self.0))
    }
}

fn parse_pins(pins: &[String], what: &str) -> Result<Vec<Pin>> {
    if pins.len() > MAX_PINS {
        return Err(invalid(format!(
            "{what} has {} pins; at most {MAX_PINS} are accepted",
            pins.len()
        )));
    }
    pins.iter().map(|p| Pin::parse(p)).collect()
}

/// How the proxy is spoken to and who resolves the destination's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyKind {
    /// SOCKS5, names resolved by the proxy.
    Socks5h,
    /// SOCKS5, names resolved here.
    Socks5,
    /// HTTP CONNECT (names resolved by the proxy).
    HttpConnect,
}

/// A parsed proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Proxy {
    pub(crate) kind: ProxyKind,
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) auth: Option<(String, String)>,
    /// The URL with its password redacted, for messages.
    pub(crate) shown: String,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.write_str(&self.shown)
    }
}

impl Proxy {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_URL_BYTES {
            return Err(invalid("the proxy URL is too long".into()));
        }
        let shown = redact_proxy(text);
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            invalid(format!(
                "proxy {shown:?} must start with socks5h://, socks5:// or http://"
            ))
        })?;
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "socks5h" => ProxyKind::Socks5h,
            "socks5" => ProxyKind::Socks5,
            "http" => ProxyKind::HttpConnect,
            _ => {
                return Err(invalid(format!(
                    "proxy {shown:?} must start with socks5h://, socks5:// or http://"
                )));
            }
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                // SOCKS5 carries each in one length byte (RFC 1929).
                if user.is_empty() || user.len() > 255 || pass.len() > 255 {
                    return Err(invalid(format!(
                        "proxy {shown:?}: user and password must be 1-255 and 0-255 bytes"
                    )));
                }
                (Some((user.to_string(), pass.to_string())), hostport)
            }
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport, "proxy")?;
        let port = port.ok_or_else(|| invalid(format!("proxy {shown:?} needs a port")))?;
        Ok(Self {
            kind,
            host: Host::parse(host, "proxy")?,
            port,
            auth,
            shown,
        })
    }
}

/// A parsed relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelayEndpoint {
    pub(crate) url: WsUrl,
    pub(crate) pins: Vec<Pin>,
}

/// One server's settings, parsed and checked: everything a connection attempt needs.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) url: WsUrl,
    pub(crate) pins: Vec<Pin>,
    pub(crate) proxy: Option<Proxy>,
    /// The TLS name when it differs from the URL's host.
    pub(crate) sni: Option<String>,
    /// The TCP destination when it differs from the URL's host and port.
    pub(crate) connect_to: Option<(Host, u16)>,
    pub(crate) relays: Vec<RelayEndpoint>,
    /// Roots trusted besides the platform's (tests use a private test root).
    pub(crate) extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Endpoint {
    pub(crate) fn parse(s: &ServerSettings) -> Result<Self> {
        let url = WsUrl::parse(&s.url)?;
        plaintext_rule(&url, s.insecure_plaintext)?;
        let pins = parse_pins(&s.pins, &s.url)?;
        if !url.tls && !pins.is_empty() {
            return Err(invalid(format!(
                "{}: a certificate pin needs a wss:// URL",
                s.url
            )));
        }
        let sni = match &s.sni {
            Some(n) if url.tls => Some(dns_name(n, "--sni")?),
            Some(_) => return Err(invalid(format!("{}: --sni needs a wss:// URL", s.url))),
            None => None,
        };
        let connect_to = match &s.connect_to {
            Some(c) => {
                let (host, port) = split_host_port(c, "--connect-to")?;
                let port =
                    port.ok_or_else(|| invalid(format!("--connect-to {c:?} must be HOST:PORT")))?;
                Some((Host::parse(host, "--connect-to")?, port))
            }
            None => None,
        };
        if s.relays.len() > MAX_RELAYS {
            return Err(invalid(format!(
                "{} relays; at most {MAX_RELAYS} are accepted",
                s.relays.len()
            )));
        }
        let mut relays = Vec::with_capacity(s.relays.len());
        for r in &s.relays {
            let relay_url = WsUrl::parse(&r.url)?;
            plaintext_rule(&relay_url, s.insecure_plaintext)?;
            let relay_pins = parse_pins(&r.pins, &r.url)?;
            if !relay_url.tls && !relay_pins.is_empty() {
                return Err(invalid(format!(
                    "relay {}: a certificate pin needs a wss:// URL",
                    r.url
                )));
            }
            if !url.tls {
                return Err(invalid(format!(
                    "relay {}: relays carry TLS to the server; the server URL must be wss://",
                    r.url
                )));
            }
            relays.push(RelayEndpoint {
                url: relay_url,
                pins: relay_pins,
            });
        }
        Ok(Self {
            url,
            pins,
            proxy: s.proxy.as_deref().map(Proxy::parse).transpose()?,
            sni,
            connect_to,
            relays,
            extra_roots: Vec::new(),
        })
    }
}

/// `ws://` only to this machine, unless the user said `--insecure-plaintext`.
fn plaintext_rule(url: &WsUrl, insecure_plaintext: bool) -> Result<()> {
    if url.tls || insecure_plaintext || url.host.is_loopback() {
        return Ok(());
    }
    Err(invalid(format!(
        "refusing {url}: plain ws:// to a host other than this machine would carry everything \
         (receive secrets, tokens, usernames) across the network readable \
         and changeable by anyone on the path; use wss://, or pass --insecure-plaintext to \
         accept that risk"
    )))
}

fn invalid(message: String) -> Error {
    Error::Invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> WsUrl {
        WsUrl::parse(s).unwrap()
    }

    #[test]
    fn urls_get_default_ports_and_the_default_path_only_when_they_name_none() {
        let u = url("wss://example.org");
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/v1/ws"));
        assert_eq!(u.full(), "wss://example.org/v1/ws");
        assert_eq!(url("ws://h").port, 80);
        assert_eq!(url("wss://h:8443/s3cret/ws").path, "/s3cret/ws");
        assert_eq!(
            url("wss://h:8443/s3cret/ws").full(),
            "wss://h:8443/s3cret/ws"
        );
        assert_eq!(url("ws://h:1/").path, "/v1/ws");
        let v6 = url("wss://[2001:db8::1]:9/p");
        assert_eq!(v6.host, Host::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(v6.authority(), "[2001:db8::1]:9");
        for bad in [
            "http://h",
            "ws://",
            "wss://:1",
            "wss://h:0",
            "wss://h:x",
            "wss://[::1",
            "wss://u@h",
            "wss://h/a b",
            "wss://h..x",
        ] {
            assert!(WsUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plaintext_is_only_for_loopback_unless_overridden() {
        for ok in [
            "ws://127.0.0.1:1",
            "ws://127.8.9.10",
            "ws://[::1]:7",
            "ws://localhost:2",
        ] {
            ServerSettings::new(ok).check().unwrap();
        }
        let err = ServerSettings::new("ws://192.0.2.1:1").check().unwrap_err();
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        assert!(err.to_string().contains("readable"), "{err}");
        let mut s = ServerSettings::new("ws://192.0.2.1:1");
        s.insecure_plaintext = true;
        s.check().unwrap();
    }

    #[test]
    fn pins_proxies_and_names_are_checked() {
        let pin = format!("sha256:{}", "Ab".repeat(32));
        let p = Pin::parse(&pin).unwrap();
        assert_eq!(p.to_string(), format!("sha256:{}", "ab".repeat(32)));
        assert!(Pin::parse("sha256:abc").is_err());
        assert!(Pin::parse(&"ab".repeat(32)).is_err());

        let proxy = Proxy::parse("socks5h://alice:hunter2@127.0.0.1:9050").unwrap();
        assert_eq!(proxy.kind, ProxyKind::Socks5h);
        assert_eq!(proxy.auth, Some(("alice".into(), "hunter2".into())));
        assert_eq!(proxy.shown, "socks5h://alice:***@127.0.0.1:9050");
        assert!(!format!("{proxy:?}").contains("hunter2"));
        assert_eq!(
            Proxy::parse("http://[::1]:8080").unwrap().kind,
            ProxyKind::HttpConnect
        );
        assert!(Proxy::parse("socks4://h:1").is_err());
        assert!(Proxy::parse("socks5://h").is_err(), "no port");

        let mut s = ServerSettings::new("ws://127.0.0.1:1");
        s.pins = vec![pin.clone()];
        assert!(s.check().is_err(), "a pin on ws://");
        let mut s = ServerSettings::new("wss://h");
        s.pins = vec![pin];
        s.sni = Some("cdn.example".into());
        s.connect_to = Some("[::1]:8443".into());
        s.proxy = Some("http://u:p@proxy:3128".into());
        s.relays = vec![RelaySettings::new("wss://relay.example/r", vec![])];
        let e = Endpoint::parse(&s).unwrap();
        assert_eq!(e.connect_to, Some((Host::Ip("::1".parse().unwrap()), 8443)));
        assert_eq!(
            s.redacted().proxy.as_deref(),
            Some("http://u:***@proxy:3128")
        );
        s.connect_to = Some("h".into());
        assert!(s.check().is_err(), "--connect-to without a port");
    }

    #[test]
    fn settings_round_trip_through_json_and_old_fields_default() {
        let s: ServerSettings = serde_json::from_str(r#"{"url":"wss://h"}"#).unwrap();
        assert_eq!(s, ServerSettings::new("wss://h"));
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"url":"wss://h"}"#);
        assert!(serde_json::from_str::<ServerSettings>(r#"{"url":"x","evil":1}"#).is_err());
    }
}
