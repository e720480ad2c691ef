//! Which way to a server to try: directly, or through one of its relays. The way that last
//! worked goes first (the profile remembers it per server, so the next command starts with
//! it); the others follow in their configured order. [`Route`] tells the user which way a
//! connection took. Not for: opening connections (`connect`) or storing (`Client`).

use std::fmt;

use super::endpoint::Endpoint;

/// One way to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// TCP (maybe through the proxy) to the server, TLS with the server.
    Direct,
    /// A WebSocket byte tunnel through the relay with this index, TLS with the server inside.
    Relay(usize),
}

/// The profile's name for a path: `direct`, or the relay's URL.
pub(crate) fn memo(endpoint: &Endpoint, path: Path) -> String {
    match path {
        Path::Direct => "direct".to_string(),
        Path::Relay(i) => endpoint
            .relays
            .get(i)
            .map(|r| r.url.full())
            .unwrap_or_default(),
    }
}

/// The paths to try, in order: the remembered one (if it is still configured) first, then
/// direct and the relays as configured.
pub(crate) fn order(endpoint: &Endpoint, remembered: Option<&str>) -> Vec<Path> {
    let mut paths = vec![Path::Direct];
    paths.extend((0..endpoint.relays.len()).map(Path::Relay));
    if let Some(r) = remembered
        && let Some(i) = paths.iter().position(|&p| memo(endpoint, p) == r)
    {
        let first = paths.remove(i);
        paths.insert(0, first);
    }
    paths
}

/// How a connection reached its server (for `-v`; the proxy's password is never in it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// The server's URL, path included.
    pub server: String,
    /// The relay's URL, when the connection goes through one.
    pub relay: Option<String>,
    /// The proxy (password redacted), when the connection goes through one.
    pub proxy: Option<String>,
}

impl Route {
    pub(crate) fn new(endpoint: &Endpoint, path: Path) -> Self {
        Self {
            server: endpoint.url.full(),
            relay: match path {
                Path::Direct => None,
                Path::Relay(i) => endpoint.relays.get(i).map(|r| r.url.full()),
            },
            proxy: endpoint.proxy.as_ref().map(|p| p.shown.clone()),
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connected to {}", self.server)?;
        match (&self.relay, &self.proxy) {
            (None, None) => f.write_str(" directly"),
            (None, Some(p)) => write!(f, " through proxy {p}"),
            (Some(r), None) => write!(f, " through relay {r}"),
            (Some(r), Some(p)) => write!(f, " through relay {r} via proxy {p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::endpoint::{RelaySettings, ServerSettings};

    #[test]
    fn the_remembered_path_goes_first_and_a_stale_memory_is_ignored() {
        let mut s = ServerSettings::new("wss://h/p");
        s.relays = vec![
            RelaySettings::new("wss://r1/a", vec![]),
            RelaySettings::new("wss://r2/b", vec![]),
        ];
        let e = Endpoint::parse(&s).unwrap();
        assert_eq!(
            order(&e, None),
            vec![Path::Direct, Path::Relay(0), Path::Relay(1)]
        );
        assert_eq!(
            order(&e, Some("wss://r2/b")),
            vec![Path::Relay(1), Path::Direct, Path::Relay(0)]
        );
        assert_eq!(order(&e, Some("wss://gone/x")).len(), 3);
        assert_eq!(memo(&e, Path::Relay(0)), "wss://r1/a");
        assert_eq!(
            Route::new(&e, Path::Relay(1)).to_string(),
            "connected to wss://h/p through relay wss://r2/b"
        );
        s.proxy = Some("socks5h://u:secret@127.0.0.1:9050".into());
        let e = Endpoint::parse(&s).unwrap();
        assert_eq!(
            Route::new(&e, Path::Direct).to_string(),
            "connected to wss://h/p through proxy socks5h://u:***@127.0.0.1:9050"
        );
    }
}
