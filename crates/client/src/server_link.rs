//! Between the profile's server settings and a shareable server link (`blindpost://connect?…`,
//! format in `blindpost_wire::link`): a link's servers with their pins become settings, its
//! relays attach to the first server (a relay's upstream is one node of the deployment); a
//! profile's servers and all their relays become a link. Proxies, TLS names and destinations
//! are the user's local choices and never travel in a link. Not for: the link's syntax.

use blindpost_wire::link::{LinkEndpoint, ServerLink};

use crate::Client;
use crate::error::{Error, Result};
use crate::transport::{RelaySettings, ServerSettings};

/// The servers a link names, as settings (checked); its relays belong to the first server.
pub fn servers_from_link(link: &str) -> Result<Vec<ServerSettings>> {
    let link = ServerLink::parse(link).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut servers: Vec<ServerSettings> = link
        .servers
        .into_iter()
        .map(|s| {
            let mut settings = ServerSettings::new(s.url);
            settings.pins = s.pins;
            settings
        })
        .collect();
    if let Some(first) = servers.first_mut() {
        first.relays = link
            .relays
            .into_iter()
            .map(|r| RelaySettings::new(r.url, r.pins))
            .collect();
    }
    for s in &servers {
        s.check()?;
    }
    Ok(servers)
}

/// The link for `servers`: every server with its pins, every distinct relay with its pins.
pub(crate) fn link_for(servers: &[ServerSettings]) -> String {
    let mut link = ServerLink::default();
    for s in servers {
        link.servers.push(LinkEndpoint {
            url: s.url.clone(),
            pins: s.pins.clone(),
        });
        for r in &s.relays {
            if !link.relays.iter().any(|l| l.url == r.url) {
                link.relays.push(LinkEndpoint {
                    url: r.url.clone(),
                    pins: r.pins.clone(),
                });
            }
        }
    }
    link.to_uri()
}

impl Client {
    /// The link that lets another device reach this profile's servers (`servers share`).
    pub fn share_link(&self) -> Result<String> {
        let servers = self.server_settings()?;
        if servers.is_empty() {
            return Err(Error::NotSetUp);
        }
        Ok(link_for(&servers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profiles_servers_and_relays_survive_the_link_but_local_choices_do_not() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let mut a = ServerSettings::new("wss://a.example/secret");
        a.pins = vec![pin.clone()];
        a.proxy = Some("socks5h://u:pw@127.0.0.1:9050".into());
        a.relays = vec![RelaySettings::new("wss://r.example/q", vec![pin.clone()])];
        let b = ServerSettings::new("wss://b.example:8443/secret");
        let link = link_for(&[a.clone(), b.clone()]);
        assert!(!link.contains("pw"), "{link}");
        let back = servers_from_link(&link).unwrap();
        a.proxy = None;
        assert_eq!(back, vec![a, b]);
        assert!(servers_from_link("blindpost://connect?server=ws://192.0.2.1/x").is_err());
        assert!(servers_from_link("https://example.org").is_err());
    }
}
