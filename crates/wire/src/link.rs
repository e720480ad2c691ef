//! The shareable server link, `blindpost://connect?…`: everything a client needs to reach a
//! deployment — the server URLs with their certificate pins (which also carry the secret
//! WebSocket path) and the volunteer relays with theirs. `blindpostd link` and `blindpost
//! servers share` print it (and a QR code of it); `blindpost setup --server-link` takes it.
//! Not for: checking that a URL is safe to connect to (the client's transport does that).
//!
//! The form is a query string, readable and QR-friendly:
//! `blindpost://connect?server=wss://h:443/p&pin=sha256:HEX&relay=wss://r/q&relay_pin=sha256:HEX`.
//! A `pin` belongs to the `server` before it, a `relay_pin` to the `relay` before it; each
//! may repeat (several pins, for rotation). Unknown keys are refused, so a link from a newer
//! version fails loudly instead of silently losing a relay or a pin.

/// The scheme and fixed prefix of every link.
pub const LINK_PREFIX: &str = "blindpost://connect?";
/// The longest link accepted, checked before anything is parsed.
pub const MAX_LINK_BYTES: usize = 4096;
/// Most servers or relays one link may name.
pub const MAX_LINK_ENDPOINTS: usize = 16;
/// Most pins one endpoint may carry.
pub const MAX_LINK_PINS: usize = 4;
/// The prefix of a certificate pin.
pub const PIN_PREFIX: &str = "sha256:";

/// A parsed server link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerLink {
    /// The deployment's server nodes, in the order they are tried.
    pub servers: Vec<LinkEndpoint>,
    /// Volunteer relays that tunnel to the deployment.
    pub relays: Vec<LinkEndpoint>,
}

/// One server or relay in a link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkEndpoint {
    /// Its URL (`wss://HOST[:PORT]/PATH`, or `ws://` for loopback), path included.
    pub url: String,
    /// Certificate pins (`sha256:` + 64 lowercase hex digits); empty: verified by roots.
    pub pins: Vec<String>,
}

/// Why a link could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Longer than [`MAX_LINK_BYTES`].
    #[error("the link is {len} bytes long; at most {MAX_LINK_BYTES} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not a `blindpost://connect?` link, or malformed.
    #[error("not a blindpost server link: {0}")]
    Malformed(String),
}

impl ServerLink {
    /// Parses a link. Every URL must be `ws://` or `wss://` and free of characters that
    /// would need escaping; every pin must be well formed; at least one server is required.
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let text = text.trim();
        if text.len() > MAX_LINK_BYTES {
            return Err(LinkError::TooLong { len: text.len() });
        }
        let query = text
            .strip_prefix(LINK_PREFIX)
            .ok_or_else(|| malformed(format!("it must start with {LINK_PREFIX}")))?;
        let mut link = ServerLink::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| malformed(format!("{pair:?} is not key=value")))?;
            match key {
                "server" | "relay" => {
                    check_url(value)?;
                    let list = if key == "server" {
                        &mut link.servers
                    } else {
                        &mut link.relays
                    };
                    if list.len() == MAX_LINK_ENDPOINTS {
                        return Err(malformed(format!("more than {MAX_LINK_ENDPOINTS} {key}s")));
                    }
                    list.push(LinkEndpoint {
                        url: value.to_string(),
                        pins: Vec::new(),
                    });
                }
                "pin" | "relay_pin" => {
                    check_pin(value).map_err(malformed)?;
                    let list = if key == "pin" {
                        &mut link.servers
                    } else {
                        &mut link.relays
                    };
                    let owner = if key == "pin" { "server" } else { "relay" };
                    let endpoint = list
                        .last_mut()
                        .ok_or_else(|| malformed(format!("{key} before any {owner}")))?;
                    if endpoint.pins.len() == MAX_LINK_PINS {
                        return Err(malformed(format!("more than {MAX_LINK_PINS} pins")));
                    }
                    endpoint.pins.push(value.to_string());
                }
                other => return Err(malformed(format!("unknown key {other:?}"))),
            }
        }
        if link.servers.is_empty() {
            return Err(malformed("it names no server".into()));
        }
        Ok(link)
    }

    /// The link as text; [`ServerLink::parse`] gives back the same value.
    pub fn to_uri(&self) -> String {
        let mut parts = Vec::new();
        for (key, pin_key, list) in [
            ("server", "pin", &self.servers),
            ("relay", "relay_pin", &self.relays),
        ] {
            for endpoint in list {
                parts.push(format!("{key}={}", endpoint.url));
                for pin in &endpoint.pins {
                    parts.push(format!("{pin_key}={pin}"));
                }
            }
        }
        format!("{LINK_PREFIX}{}", parts.join("&"))
    }
}

/// Checks a certificate pin's form: `sha256:` and 64 lowercase hex digits.
pub fn check_pin(pin: &str) -> Result<(), String> {
    let hex = pin
        .strip_prefix(PIN_PREFIX)
        .ok_or_else(|| format!("pin {pin:?} must start with {PIN_PREFIX}"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "pin {pin:?} must be {PIN_PREFIX} and 64 lowercase hex digits"
        ));
    }
    Ok(())
}

/// A URL in a link: `ws://` or `wss://`, a host, and only characters that need no escaping
/// in a query string (so `&`, `=`, `#`, spaces and controls cannot smuggle keys in).
fn check_url(url: &str) -> Result<(), LinkError> {
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| malformed(format!("{url:?} is not a ws:// or wss:// URL")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(malformed(format!("{url:?} has no host")));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~/:[]".contains(&b);
    if !rest.bytes().all(allowed) {
        return Err(malformed(format!(
            "{url:?} holds a character a link cannot carry"
        )));
    }
    Ok(())
}

fn malformed(reason: String) -> LinkError {
    LinkError::Malformed(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN_A: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const PIN_B: &str = "sha256:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn sample() -> ServerLink {
        ServerLink {
            servers: vec![
                LinkEndpoint {
                    url: "wss://chat.example:8443/s3cret-path".into(),
                    pins: vec![PIN_A.into(), PIN_B.into()],
                },
                LinkEndpoint {
                    url: "wss://[2001:db8::1]/s3cret-path".into(),
                    pins: vec![],
                },
            ],
            relays: vec![LinkEndpoint {
                url: "wss://relay.example/r".into(),
                pins: vec![PIN_B.into()],
            }],
        }
    }

    #[test]
    fn a_link_round_trips_with_pins_in_their_places() {
        let link = sample();
        let uri = link.to_uri();
        assert_eq!(
            uri,
            format!(
                "blindpost://connect?server=wss://chat.example:8443/s3cret-path&pin={PIN_A}\
                 &pin={PIN_B}&server=wss://[2001:db8::1]/s3cret-path\
                 &relay=wss://relay.example/r&relay_pin={PIN_B}"
            )
        );
        assert_eq!(ServerLink::parse(&uri).unwrap(), link);
    }

    #[test]
    fn malformed_links_are_refused_with_a_reason() {
        let cases = [
            "https://example.org/",
            "blindpost://connect?",
            "blindpost://connect?relay=wss://r/p",
            &format!("blindpost://connect?pin={PIN_A}&server=wss://h/p"),
            "blindpost://connect?server=wss://h/p&pin=sha256:abc",
            "blindpost://connect?server=http://h/p",
            "blindpost://connect?server=wss:///p",
            "blindpost://connect?server=wss://h/p%26relay=x",
            "blindpost://connect?server=wss://h/p&colour=blue",
            "blindpost://connect?server",
        ];
        for case in cases {
            assert!(
                matches!(ServerLink::parse(case), Err(LinkError::Malformed(_))),
                "{case} was accepted"
            );
        }
    }

    #[test]
    fn oversized_links_are_refused_before_parsing() {
        let long = format!("{LINK_PREFIX}server=wss://h/{}", "a".repeat(MAX_LINK_BYTES));
        assert!(matches!(
            ServerLink::parse(&long),
            Err(LinkError::TooLong { .. })
        ));
        let many = format!(
            "{LINK_PREFIX}{}",
            vec!["server=wss://h/p"; MAX_LINK_ENDPOINTS + 1].join("&")
        );
        assert!(ServerLink::parse(&many).is_err());
    }

    #[test]
    fn pins_must_be_sha256_and_lowercase_hex() {
        assert!(check_pin(PIN_A).is_ok());
        assert!(check_pin(&PIN_A.to_uppercase()).is_err());
        assert!(check_pin(&PIN_A.replace("sha256:", "sha1:")).is_err());
        assert!(check_pin(&PIN_A[..PIN_A.len() - 1]).is_err());
    }
}
