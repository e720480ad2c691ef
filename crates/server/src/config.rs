//! The server's one configuration type, [`Config`], and how it is resolved at start-up: an
//! optional TOML file (`--config FILE`), then environment variables (`BLINDPOSTD_*`), then
//! command-line flags — later sources win. Not for: runtime state or anything read later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blindpost_wire::limits::{
    MAX_GROUP_ROUTES, MAX_PAYLOAD_BYTES, MAX_SUBSCRIPTIONS_PER_CONNECTION,
};
use serde::Deserialize;

/// Everything `blindpostd` can be configured with. Every field has a default, so an empty
/// file (or none) is a valid configuration. See `blindpostd.example.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the plain HTTP/WebSocket listener. Default `127.0.0.1:7480`.
    pub listen: SocketAddr,
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
    about = "blindpost server: the blind post office"
)]
pub struct Args {
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
