//! The server's one configuration type, [`Config`], and how it is resolved at start-up: an
//! optional TOML file (`--config FILE`), then environment variables (`BLINDPOSTD_*`), then
//! command-line flags — later sources win. Not for: runtime state or anything read later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blindpost_wire::WS_PATH;
use blindpost_wire::limits::{
    MAX_GROUP_ROUTES, MAX_PAYLOAD_BYTES, MAX_SUBSCRIPTIONS_PER_CONNECTION,
};
use serde::Deserialize;

pub use crate::acme::{AcmeSettings, LETS_ENCRYPT_DIRECTORY};

/// The longest `ws_path` accepted, in bytes.
pub const MAX_WS_PATH_BYTES: usize = 128;

/// Everything `blindpostd` can be configured with. Every field has a default, so an empty
/// file (or none) is a valid configuration. See `blindpostd.example.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener (HTTPS when `tls` is on). Default
    /// `127.0.0.1:7480`.
    pub listen: SocketAddr,
    /// `off` (plain `ws://`, for loopback and tests) or `self-signed` (a certificate generated
    /// into `data_dir` on first start). Default `off`. `tls_cert`/`tls_key` or `acme_domain`
    /// turn TLS on without it.
    pub tls: TlsSetting,
    /// PEM certificate chain (end-entity first); needs `tls_key`. Reloaded on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Domain to obtain a certificate for by ACME.
    pub acme_domain: Option<String>,
    /// ACME account contact, e.g. `mailto:ops@example.org`.
    pub acme_contact: Option<String>,
    /// ACME directory URL. Default Let's Encrypt production.
    pub acme_directory: String,
    /// An extra PEM root to trust for the ACME directory's own HTTPS (a private CA, Pebble).
    pub acme_ca: Option<PathBuf>,
    /// The one path that upgrades to the protocol. Default `/v1/ws`.
    pub ws_path: String,
    /// Directory of the decoy web site every other request is answered from; without it a
    /// small built-in neutral page.
    pub site: Option<PathBuf>,
    /// With TLS on, the plain HTTP listener of `/healthz` and `/metrics`. Default
    /// `127.0.0.1:7481`. With TLS off they stay on `listen`.
    pub admin_listen: SocketAddr,
    /// Directory holding the SQLite database. Default `./blindpost-data`.
    pub data_dir: PathBuf,
    /// The database: `sqlite` (the file in `data_dir`) or a PostgreSQL URL
    /// (`postgres://user[:password]@host[:port]/database`) shared by every node. Default
    /// `sqlite`. Never logged (a URL may carry a password).
    pub database: String,
    /// What an acknowledgement survives, on SQLite (on PostgreSQL its own `synchronous_commit`
    /// decides). Default `machine`.
    pub durability: Durability,
    /// Days an unacknowledged message is kept before deletion. Default 30.
    pub retention_days: u32,
    /// Days a post's message id is remembered for idempotent retries (within the group's
    /// last 32,768 posts: `store::RESEND_CHUNKS`). Default 7.
    pub posted_id_retention_days: u32,
    /// Most simultaneous WebSocket connections. Default 10 000.
    pub max_connections: u32,
    /// Key-package claims one connection may make per minute, on average. Default 60.
    pub claims_per_minute: u32,
    /// Key-package claims one connection may make in a burst. Default 20.
    pub claim_burst: u32,
    /// Claims one key-package box may serve per hour, whoever asks. Default 60.
    pub box_claims_per_hour: u32,
    /// Claims one key-package box may serve in a burst. Default 30.
    pub box_claim_burst: u32,
    /// Requests one connection may make per second, on average. Default 500.
    pub requests_per_second: u32,
    /// Requests one connection may make in a burst. Default 12 000: a device catching up on
    /// 4096 queues (subscribe, fetch, acknowledge each) must fit in one burst.
    pub request_burst: u32,
    /// Queues one connection may subscribe to. Default and maximum 4096
    /// (`MAX_SUBSCRIPTIONS_PER_CONNECTION`).
    pub max_subscriptions: u32,
    /// Most payload bytes a queue may hold unacknowledged; a post or commit that would pass it
    /// is refused (`LimitExceeded`). Default 64 MiB.
    pub max_queue_bytes: u64,
    /// Most routes (member devices) a group may have. Default and maximum 10 000
    /// (`MAX_GROUP_ROUTES`).
    pub max_group_routes: u32,
    /// Seconds a client has to complete the WebSocket handshake after connecting. Default 10.
    pub handshake_timeout_secs: u64,
    /// Seconds a frame may take to arrive once its first byte has. Default 30.
    pub frame_timeout_secs: u64,
    /// Seconds a frame to the client may take to be written before the connection is dropped.
    /// Default 30.
    pub send_timeout_secs: u64,
    /// Seconds to wait for connections to close at shutdown. Default 10.
    pub shutdown_grace_secs: u64,
    /// Log filter (`tracing` env-filter syntax). Default `info`.
    pub log: String,
    /// Seconds between scheduled key-directory publications (registrations also publish an
    /// epoch at once). Default 60.
    pub directory_publish_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            tls: TlsSetting::Off,
            tls_cert: None,
            tls_key: None,
            acme_domain: None,
            acme_contact: None,
            acme_directory: LETS_ENCRYPT_DIRECTORY.to_owned(),
            acme_ca: None,
            ws_path: WS_PATH.to_owned(),
            site: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7481)),
            data_dir: PathBuf::from("./blindpost-data"),
            database: "sqlite".to_owned(),
            durability: Durability::Machine,
            retention_days: 30,
            posted_id_retention_days: 7,
            max_connections: 10_000,
            claims_per_minute: 60,
            claim_burst: 20,
            box_claims_per_hour: 60,
            box_claim_burst: 30,
            requests_per_second: 500,
            request_burst: 12_000,
            max_subscriptions: 4096,
            max_queue_bytes: 64 * 1024 * 1024,
            max_group_routes: 10_000,
            handshake_timeout_secs: 10,
            frame_timeout_secs: 30,
            send_timeout_secs: 30,
            shutdown_grace_secs: 10,
            log: "info".to_owned(),
            directory_publish_interval_secs: 60,
        }
    }
}

/// What an acknowledged write survives (SQLite). Either way nothing is acknowledged before
/// its transaction commits; the difference is whether the commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every commit is flushed to the disk (`fsync`) before it is acknowledged: it survives a
    /// crash of the server, of the operating system, or a power loss.
    #[default]
    Machine,
    /// Commits are written to the operating system and flushed to the disk by a background
    /// thread every 20 ms: an acknowledged write survives a crash or `kill -9` of blindpostd,
    /// but a power loss or kernel crash can lose the writes of the last moments (what NATS
    /// JetStream promises by default). Several times the throughput on a disk with slow
    /// flushes.
    Process,
}

/// The storage backend a configuration selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend<'a> {
    /// SQLite in this data directory.
    Sqlite(&'a Path),
    /// PostgreSQL at this URL.
    Postgres(&'a str),
}

/// Command-line flags; each also reads its environment variable (a flag wins over it).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "blindpostd",
    version,
    about = "blindpost server: the blind post office",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Run something other than the server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", env = "BLINDPOSTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:7480 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "BLINDPOSTD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long = "data", value_name = "DIR", env = "BLINDPOSTD_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Database: `sqlite` or `postgres://user@host:port/database`.
    #[arg(long, value_name = "URL", env = "BLINDPOSTD_DATABASE")]
    pub database: Option<String>,
    /// What an acknowledgement survives on SQLite: a crash of the machine (flush every
    /// commit) or of the process.
    #[arg(long, value_name = "LEVEL", env = "BLINDPOSTD_DURABILITY")]
    pub durability: Option<Durability>,
    /// Days to keep unacknowledged messages.
    #[arg(long, value_name = "DAYS", env = "BLINDPOSTD_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// Most simultaneous connections.
    #[arg(long, value_name = "N", env = "BLINDPOSTD_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Key-package claims per connection per minute.
    #[arg(long, value_name = "N", env = "BLINDPOSTD_CLAIMS_PER_MINUTE")]
    pub claims_per_minute: Option<u32>,
    /// Log filter, e.g. `info` or `blindpost_server=debug`.
    #[arg(long, value_name = "FILTER", env = "BLINDPOSTD_LOG")]
    pub log: Option<String>,
    /// Seconds a client has to finish the TLS and WebSocket handshakes.
    #[arg(long, value_name = "SECS", env = "BLINDPOSTD_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Address of the admin listener (`/healthz`, `/metrics`) when TLS is on.
    #[arg(long, value_name = "ADDR", env = "BLINDPOSTD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// TLS options.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The protocol path and the decoy site.
    #[command(flatten)]
    pub front: FrontArgs,
}

/// Subcommands of `blindpostd`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// A volunteer relay: tunnels WebSocket messages on its secret path to one upstream
    /// server, and answers everything else as an ordinary web site.
    Relay(RelayArgs),
}

/// The TLS flags, shared by the server and the relay.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// `off` or `self-signed` (generated into the data directory on first start).
    #[arg(long, value_name = "MODE", env = "BLINDPOSTD_TLS")]
    pub tls: Option<TlsSetting>,
    /// PEM certificate chain (reloaded on SIGHUP); needs --tls-key.
    #[arg(long, value_name = "FILE", env = "BLINDPOSTD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "BLINDPOSTD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Obtain and renew a certificate for DOMAIN by ACME.
    #[arg(long = "acme", value_name = "DOMAIN", env = "BLINDPOSTD_ACME")]
    pub acme_domain: Option<String>,
    /// ACME account contact, e.g. mailto:ops@example.org.
    #[arg(long, value_name = "URI", env = "BLINDPOSTD_ACME_CONTACT")]
    pub acme_contact: Option<String>,
    /// ACME directory URL (default Let's Encrypt production).
    #[arg(long, value_name = "URL", env = "BLINDPOSTD_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// Extra PEM root trusted for the ACME directory's HTTPS.
    #[arg(long, value_name = "FILE", env = "BLINDPOSTD_ACME_CA")]
    pub acme_ca: Option<PathBuf>,
}

/// The protocol path and the decoy site flags, shared by the server and the relay.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FrontArgs {
    /// The one path that upgrades to WebSocket (default /v1/ws).
    #[arg(long, value_name = "PATH", env = "BLINDPOSTD_WS_PATH")]
    pub ws_path: Option<String>,
    /// Directory of the decoy web site served on every other path.
    #[arg(long, value_name = "DIR", env = "BLINDPOSTD_SITE")]
    pub site: Option<PathBuf>,
}

/// `off` or `self-signed`: the value of the `tls` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TlsSetting {
    /// No TLS, unless certificate files or ACME are configured.
    #[default]
    Off,
    /// A self-signed certificate kept in the data directory.
    SelfSigned,
}

/// The TLS keys as configured, before [`TlsKeys::resolve`] checks they agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsKeys {
    /// `tls`.
    pub tls: TlsSetting,
    /// `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `acme_domain`.
    pub acme_domain: Option<String>,
    /// `acme_contact`.
    pub acme_contact: Option<String>,
    /// `acme_directory`.
    pub acme_directory: String,
    /// `acme_ca`.
    pub acme_ca: Option<PathBuf>,
}

impl Default for TlsKeys {
    fn default() -> Self {
        Self {
            tls: TlsSetting::Off,
            tls_cert: None,
            tls_key: None,
            acme_domain: None,
            acme_contact: None,
            acme_directory: LETS_ENCRYPT_DIRECTORY.to_owned(),
            acme_ca: None,
        }
    }
}

/// How a listener gets its certificate: the one typed value the TLS keys resolve into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP/WebSocket.
    Off,
    /// Certificate and key from PEM files, reloaded on SIGHUP.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A self-signed certificate generated into the data directory on first start.
    SelfSigned,
    /// A certificate obtained and renewed by ACME.
    Acme(AcmeSettings),
}

impl TlsArgs {
    /// Lays the flags (and their environment variables) over `keys`.
    pub fn apply(self, keys: &mut TlsKeys) {
        let Self {
            tls,
            tls_cert,
            tls_key,
            acme_domain,
            acme_contact,
            acme_directory,
            acme_ca,
        } = self;
        if let Some(v) = tls {
            keys.tls = v;
        }
        if tls_cert.is_some() {
            keys.tls_cert = tls_cert;
        }
        if tls_key.is_some() {
            keys.tls_key = tls_key;
        }
        if acme_domain.is_some() {
            keys.acme_domain = acme_domain;
        }
        if acme_contact.is_some() {
            keys.acme_contact = acme_contact;
        }
        if let Some(v) = acme_directory {
            keys.acme_directory = v;
        }
        if acme_ca.is_some() {
            keys.acme_ca = acme_ca;
        }
    }
}

impl TlsKeys {
    /// The one mode these keys describe, or why they contradict each other.
    pub fn resolve(&self) -> Result<TlsMode, ConfigError> {
        let files = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid("tls_cert needs tls_key (--tls-key)"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid("tls_key needs tls_cert (--tls-cert)"));
            }
        };
        let self_signed = self.tls == TlsSetting::SelfSigned;
        let acme_only = self.acme_contact.is_some()
            || self.acme_ca.is_some()
            || self.acme_directory != LETS_ENCRYPT_DIRECTORY;
        match (files, self_signed, &self.acme_domain) {
            (Some(_), true, _) => Err(ConfigError::Invalid(
                "choose one certificate source: tls_cert/tls_key or tls = \"self-signed\"",
            )),
            (Some(_), _, Some(_)) => Err(ConfigError::Invalid(
                "choose one certificate source: tls_cert/tls_key or acme_domain",
            )),
            (None, true, Some(_)) => Err(ConfigError::Invalid(
                "choose one certificate source: tls = \"self-signed\" or acme_domain",
            )),
            (_, _, None) if acme_only => Err(ConfigError::Invalid(
                "acme_contact, acme_directory and acme_ca need acme_domain (--acme)",
            )),
            (Some((cert, key)), false, None) => Ok(TlsMode::Files { cert, key }),
            (None, true, None) => Ok(TlsMode::SelfSigned),
            (None, false, Some(domain)) => {
                if domain.is_empty()
                    || domain.len() > 253
                    || !domain
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(ConfigError::Invalid(
                        "acme_domain must be a DNS name (letters, digits, '-', '.')",
                    ));
                }
                Ok(TlsMode::Acme(AcmeSettings {
                    domain: domain.clone(),
                    contact: self.acme_contact.clone(),
                    directory: self.acme_directory.clone(),
                    ca: self.acme_ca.clone(),
                }))
            }
            (None, false, None) => Ok(TlsMode::Off),
        }
    }
}

/// Checks a WebSocket path: starts with `/`, only unreserved URL characters
/// (`A-Za-z0-9-._~/`), at most [`MAX_WS_PATH_BYTES`], and not an admin path.
pub fn validate_ws_path(path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') || path.len() > MAX_WS_PATH_BYTES {
        return Err(ConfigError::Invalid(
            "ws_path must start with '/' and be at most 128 bytes",
        ));
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
    {
        return Err(ConfigError::Invalid(
            "ws_path may hold only the characters A-Z a-z 0-9 - . _ ~ /",
        ));
    }
    if path == "/healthz" || path == "/metrics" {
        return Err(ConfigError::Invalid(
            "ws_path must not be /healthz or /metrics",
        ));
    }
    Ok(())
}

/// Checks a decoy site directory exists.
fn validate_site(site: Option<&Path>) -> Result<(), ConfigError> {
    match site {
        Some(dir) if !dir.is_dir() => Err(ConfigError::Invalid("site must be a directory")),
        _ => Ok(()),
    }
}

/// Flags of `blindpostd relay`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RelayArgs {
    /// Listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The server tunnels lead to, HOST:PORT (chosen here, never by a client).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,
    /// Directory for the relay's certificate.
    #[arg(long = "data", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most simultaneous tunnels; further upgrades get 503.
    #[arg(long, value_name = "N")]
    pub max_tunnels: Option<u32>,
    /// Bytes per second each tunnel may carry, in each direction.
    #[arg(long, value_name = "N")]
    pub tunnel_bytes_per_sec: Option<u32>,
    /// Seconds a tunnel may carry nothing before it is closed.
    #[arg(long, value_name = "SECS")]
    pub tunnel_idle_secs: Option<u64>,
    /// Seconds a client has to finish the TLS and WebSocket handshakes.
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Log filter.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// TLS options.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The tunnel path and the decoy site.
    #[command(flatten)]
    pub front: FrontArgs,
}

/// The relay's configuration, resolved from [`RelayArgs`] in [`RelayConfig::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Listen address. Default `127.0.0.1:7443`.
    pub listen: SocketAddr,
    /// Upstream `HOST:PORT`.
    pub upstream: String,
    /// Directory for the certificate. Default `./blindpost-relay-data`.
    pub data_dir: PathBuf,
    /// How the relay gets its certificate.
    pub tls: TlsMode,
    /// The tunnel path. Default `/v1/ws`.
    pub ws_path: String,
    /// The decoy site directory, if any.
    pub site: Option<PathBuf>,
    /// Most simultaneous tunnels. Default 1000.
    pub max_tunnels: u32,
    /// Bytes per second per tunnel and direction. Default 1 MiB.
    pub tunnel_bytes_per_sec: u32,
    /// Idle seconds before a tunnel is closed. Default 300.
    pub tunnel_idle_secs: u64,
    /// Handshake deadline in seconds. Default 10.
    pub handshake_timeout_secs: u64,
    /// Log filter. Default `info`.
    pub log: String,
}

impl RelayConfig {
    /// Resolves and checks the relay's flags.
    pub fn resolve(args: RelayArgs) -> Result<Self, ConfigError> {
        let RelayArgs {
            listen,
            upstream,
            data_dir,
            max_tunnels,
            tunnel_bytes_per_sec,
            tunnel_idle_secs,
            handshake_timeout_secs,
            log,
            tls,
            front,
        } = args;
        let mut keys = TlsKeys::default();
        tls.apply(&mut keys);
        let ws_path = front.ws_path.unwrap_or_else(|| WS_PATH.to_owned());
        validate_ws_path(&ws_path)?;
        validate_site(front.site.as_deref())?;
        validate_upstream(&upstream)?;
        let config = Self {
            listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7443))),
            upstream,
            data_dir: data_dir.unwrap_or_else(|| PathBuf::from("./blindpost-relay-data")),
            tls: keys.resolve()?,
            ws_path,
            site: front.site,
            max_tunnels: max_tunnels.unwrap_or(1000),
            tunnel_bytes_per_sec: tunnel_bytes_per_sec.unwrap_or(1024 * 1024),
            tunnel_idle_secs: tunnel_idle_secs.unwrap_or(300),
            handshake_timeout_secs: handshake_timeout_secs.unwrap_or(10),
            log: log.unwrap_or_else(|| "info".to_owned()),
        };
        if config.max_tunnels == 0 {
            return Err(ConfigError::Invalid("max_tunnels must be at least 1"));
        }
        if config.tunnel_bytes_per_sec < 1024 {
            return Err(ConfigError::Invalid(
                "tunnel_bytes_per_sec must be at least 1024",
            ));
        }
        if config.tunnel_idle_secs == 0 || config.handshake_timeout_secs == 0 {
            return Err(ConfigError::Invalid("timeouts must be at least 1 second"));
        }
        Ok(config)
    }
}

/// Checks `HOST:PORT` (a name or an address, and a port number).
fn validate_upstream(upstream: &str) -> Result<(), ConfigError> {
    let ok = upstream.parse::<SocketAddr>().is_ok()
        || upstream.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid("upstream must be HOST:PORT"))
    }
}

/// Why the configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Resolves the configuration: defaults, then the file named by `args.config`, then the
    /// environment and flags (already merged by clap).
    pub fn resolve(args: Args) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Self::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, args: Args) {
        let Args {
            config: _,
            command: _,
            handshake_timeout_secs,
            admin_listen,
            tls,
            front,
            listen,
            data_dir,
            database,
            durability,
            retention_days,
            max_connections,
            claims_per_minute,
            log,
        } = args;
        if let Some(v) = listen {
            self.listen = v;
        }
        if let Some(v) = data_dir {
            self.data_dir = v;
        }
        if let Some(v) = database {
            self.database = v;
        }
        if let Some(v) = durability {
            self.durability = v;
        }
        if let Some(v) = retention_days {
            self.retention_days = v;
        }
        if let Some(v) = max_connections {
            self.max_connections = v;
        }
        if let Some(v) = claims_per_minute {
            self.claims_per_minute = v;
        }
        if let Some(v) = log {
            self.log = v;
        }
        if let Some(v) = handshake_timeout_secs {
            self.handshake_timeout_secs = v;
        }
        if let Some(v) = admin_listen {
            self.admin_listen = v;
        }
        let mut keys = self.tls_keys();
        tls.apply(&mut keys);
        let TlsKeys {
            tls,
            tls_cert,
            tls_key,
            acme_domain,
            acme_contact,
            acme_directory,
            acme_ca,
        } = keys;
        (self.tls, self.tls_cert, self.tls_key) = (tls, tls_cert, tls_key);
        (self.acme_domain, self.acme_contact) = (acme_domain, acme_contact);
        (self.acme_directory, self.acme_ca) = (acme_directory, acme_ca);
        if let Some(v) = front.ws_path {
            self.ws_path = v;
        }
        if front.site.is_some() {
            self.site = front.site;
        }
    }

    /// The TLS keys of this configuration.
    pub fn tls_keys(&self) -> TlsKeys {
        TlsKeys {
            tls: self.tls,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            acme_domain: self.acme_domain.clone(),
            acme_contact: self.acme_contact.clone(),
            acme_directory: self.acme_directory.clone(),
            acme_ca: self.acme_ca.clone(),
        }
    }

    /// How the listener gets its certificate.
    pub fn tls_mode(&self) -> Result<TlsMode, ConfigError> {
        self.tls_keys().resolve()
    }

    /// Which backend `database` names.
    pub fn backend(&self) -> Result<Backend<'_>, ConfigError> {
        let db = self.database.as_str();
        if db == "sqlite" {
            Ok(Backend::Sqlite(&self.data_dir))
        } else if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            Ok(Backend::Postgres(db))
        } else {
            Err(ConfigError::Invalid(
                "database must be `sqlite` or a postgres:// URL",
            ))
        }
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.backend()?;
        self.tls_mode()?;
        validate_ws_path(&self.ws_path)?;
        validate_site(self.site.as_deref())?;
        if self.retention_days == 0 {
            return Err(ConfigError::Invalid("retention_days must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid("max_connections must be at least 1"));
        }
        if self.directory_publish_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "directory_publish_interval_secs must be at least 1",
            ));
        }
        if self.claim_burst == 0 || self.box_claim_burst == 0 || self.request_burst == 0 {
            return Err(ConfigError::Invalid(
                "claim_burst, box_claim_burst and request_burst must be at least 1",
            ));
        }
        if self.max_subscriptions == 0
            || self.max_subscriptions as usize > MAX_SUBSCRIPTIONS_PER_CONNECTION
        {
            return Err(ConfigError::Invalid(
                "max_subscriptions must be between 1 and 4096",
            ));
        }
        if self.max_group_routes == 0 || self.max_group_routes as usize > MAX_GROUP_ROUTES {
            return Err(ConfigError::Invalid(
                "max_group_routes must be between 1 and 10000",
            ));
        }
        if self.max_queue_bytes < MAX_PAYLOAD_BYTES as u64 {
            return Err(ConfigError::Invalid(
                "max_queue_bytes must be at least the largest payload (4 MiB - 64 KiB)",
            ));
        }
        if self.handshake_timeout_secs == 0
            || self.frame_timeout_secs == 0
            || self.send_timeout_secs == 0
        {
            return Err(ConfigError::Invalid("timeouts must be at least 1 second"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const EXAMPLE: &str = include_str!("../../../blindpostd.example.toml");

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let config = Config::from_toml(EXAMPLE, Path::new("example")).unwrap();
        config.validate().unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn an_empty_file_means_defaults() {
        let config = Config::from_toml("", Path::new("x")).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7480");
        assert_eq!(config.data_dir, PathBuf::from("./blindpost-data"));
        assert_eq!(config.retention_days, 30);
        assert_eq!(config.max_connections, 10_000);
    }

    #[test]
    fn durability_defaults_to_machine_and_can_be_set_by_file_or_flag() {
        assert_eq!(Config::default().durability, Durability::Machine);
        let config = Config::from_toml("durability = \"process\"", Path::new("x")).unwrap();
        assert_eq!(config.durability, Durability::Process);
        assert!(Config::from_toml("durability = \"disk\"", Path::new("x")).is_err());
        let args = Args::try_parse_from(["blindpostd", "--durability", "process"]).unwrap();
        assert_eq!(
            Config::resolve(args).unwrap().durability,
            Durability::Process
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(matches!(
            Config::from_toml("listne = \"127.0.0.1:1\"", Path::new("x")),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\nretention_days = 5\ndata_dir = \"/srv/bp\"\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "blindpostd",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        let config = Config::resolve(args).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:0");
        assert_eq!(config.retention_days, 5);
        assert_eq!(config.data_dir, PathBuf::from("/srv/bp"));
    }

    #[test]
    fn the_database_comes_from_file_env_or_flag_and_must_name_a_backend() {
        let sqlite = Config::from_toml("", Path::new("x")).unwrap();
        assert_eq!(
            sqlite.backend().unwrap(),
            Backend::Sqlite(Path::new("./blindpost-data"))
        );
        let pg = Config::from_toml(
            "database = \"postgres://bp@db.internal/blindpost\"",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            pg.backend().unwrap(),
            Backend::Postgres("postgres://bp@db.internal/blindpost")
        );
        let args = Args::try_parse_from([
            "blindpostd",
            "--database",
            "postgresql://postgres@127.0.0.1/test",
        ])
        .unwrap();
        assert_eq!(
            Config::resolve(args).unwrap().database,
            "postgresql://postgres@127.0.0.1/test"
        );
        let args = Args {
            database: Some("mysql://x".into()),
            ..Args::default()
        };
        assert!(matches!(
            Config::resolve(args),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn tls_keys_come_from_file_env_or_flag_and_resolve_to_one_mode() {
        assert_eq!(Config::default().tls_mode().unwrap(), TlsMode::Off);
        let config = Config::from_toml("tls = \"self-signed\"", Path::new("x")).unwrap();
        assert_eq!(config.tls_mode().unwrap(), TlsMode::SelfSigned);
        let args =
            Args::try_parse_from(["blindpostd", "--tls-cert", "/c.pem", "--tls-key", "/k.pem"])
                .unwrap();
        assert_eq!(
            Config::resolve(args).unwrap().tls_mode().unwrap(),
            TlsMode::Files {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            }
        );
        let args = Args::try_parse_from([
            "blindpostd",
            "--acme",
            "chat.example.org",
            "--acme-contact",
            "mailto:ops@example.org",
            "--acme-directory",
            "https://localhost:14000/dir",
            "--acme-ca",
            "/pebble.pem",
        ])
        .unwrap();
        assert_eq!(
            Config::resolve(args).unwrap().tls_mode().unwrap(),
            TlsMode::Acme(AcmeSettings {
                domain: "chat.example.org".into(),
                contact: Some("mailto:ops@example.org".into()),
                directory: "https://localhost:14000/dir".into(),
                ca: Some("/pebble.pem".into()),
            })
        );
    }

    #[test]
    fn contradictory_tls_keys_are_refused() {
        for flags in [
            &["--tls-cert", "/c.pem"][..],
            &["--tls-key", "/k.pem"],
            &[
                "--tls-cert",
                "/c",
                "--tls-key",
                "/k",
                "--tls",
                "self-signed",
            ],
            &[
                "--tls-cert",
                "/c",
                "--tls-key",
                "/k",
                "--acme",
                "example.org",
            ],
            &["--tls", "self-signed", "--acme", "example.org"],
            &["--acme-contact", "mailto:a@example.org"],
            &["--acme", "exa mple.org"],
        ] {
            let args =
                Args::try_parse_from(std::iter::once("blindpostd").chain(flags.iter().copied()))
                    .unwrap();
            assert!(
                matches!(Config::resolve(args), Err(ConfigError::Invalid(_))),
                "{flags:?} must be refused"
            );
        }
    }

    #[test]
    fn the_ws_path_is_validated() {
        for good in [
            "/v1/ws",
            "/",
            "/a-b.c_d~e/f",
            &format!("/{}", "a".repeat(127)),
        ] {
            assert!(validate_ws_path(good).is_ok(), "{good}");
        }
        for bad in [
            "v1/ws",
            "",
            "/v1/ws?x=1",
            "/a b",
            "/%41",
            "/{id}",
            "/healthz",
            &format!("/{}", "a".repeat(128)),
        ] {
            assert!(validate_ws_path(bad).is_err(), "{bad:?} must be refused");
        }
        let args = Args::try_parse_from(["blindpostd", "--ws-path", "/s3cr3t/sock"]).unwrap();
        assert_eq!(Config::resolve(args).unwrap().ws_path, "/s3cr3t/sock");
        let args = Args::try_parse_from(["blindpostd", "--ws-path", "nope"]).unwrap();
        assert!(Config::resolve(args).is_err());
    }

    #[test]
    fn plain_blindpostd_has_no_subcommand_and_the_relay_resolves_its_own_flags() {
        let args = Args::try_parse_from(["blindpostd", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(args.command.is_none());
        let args = Args::try_parse_from([
            "blindpostd",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "chat.example.org:443",
            "--ws-path",
            "/cdn/assets",
            "--tls",
            "self-signed",
            "--max-tunnels",
            "5",
        ])
        .unwrap();
        let Some(Command::Relay(relay)) = args.command else {
            panic!("expected the relay subcommand");
        };
        let config = RelayConfig::resolve(relay).unwrap();
        assert_eq!(config.upstream, "chat.example.org:443");
        assert_eq!(config.ws_path, "/cdn/assets");
        assert_eq!(config.tls, TlsMode::SelfSigned);
        assert_eq!(config.max_tunnels, 5);
        assert_eq!(config.tunnel_bytes_per_sec, 1024 * 1024);
        assert_eq!(config.tunnel_idle_secs, 300);
        assert_eq!(config.data_dir, PathBuf::from("./blindpost-relay-data"));
        // Server flags do not mix with the subcommand.
        assert!(Args::try_parse_from(["blindpostd", "--listen", "127.0.0.1:0", "relay"]).is_err());
        for upstream in ["nohost", "host:0", ":443", "a b:1", "host:99999"] {
            let relay = RelayArgs {
                upstream: upstream.into(),
                ..RelayArgs::default()
            };
            assert!(RelayConfig::resolve(relay).is_err(), "{upstream:?}");
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let args = Args {
            retention_days: Some(0),
            ..Args::default()
        };
        assert!(matches!(
            Config::resolve(args),
            Err(ConfigError::Invalid(_))
        ));
    }
}
