//! blindpostd, the blind post office: holds queues of ciphertext under unlinkable pseudonyms,
//! sequences group commits, hands out key packages and keeps the username directory.
//! Entry point: [`run`]. Not for: anything that needs plaintext, identities or addresses.
//!
//! Module map: `config` (settings), `types` (ids, hashes, days), `error` (faults and their wire
//! codes), `store` (storage seam, SQLite, PostgreSQL), `kt` (key transparency: akd
//! directory, keys, epochs), `service` (request rules), `hub` (wake-ups), `session`
//! (per-connection state), `ws` (socket loop), `http` (router), `listener` (slow-client
//! deadlines, lazy TLS handshakes), `tls` (certificates, pins), `acme` (certificates ordered
//! and renewed from an ACME CA), `decoy` (the web site probes see), `admin` (`/healthz`,
//! `/metrics`), `relay` (`blindpostd relay`), `rate` (token buckets), `retention`.

#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod config;
pub mod decoy;
pub mod error;
pub mod http;
pub mod hub;
pub mod kt;
pub mod listener;
pub mod rate;
pub mod relay;
pub mod retention;
pub mod service;
pub mod session;
pub mod store;
pub mod tls;
pub mod types;
pub mod ws;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub use config::Config;

use crate::config::Backend;
use crate::hub::Hub;
use crate::service::Service;
use crate::session::SessionLimits;
use crate::store::{DirectoryStore, PgStore, SqliteStore, Store, StoreError, TransparencyStore};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed to open or close.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The key-transparency directory failed to open.
    #[error("key directory: {0}")]
    Directory(#[from] kt::KtError),
    /// The configuration names no usable backend.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr} (admin): {source}")]
    AdminListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

/// The bound sockets and TLS setup a server runs on; see [`Front::prepare`].
pub struct Front {
    /// The public listener.
    pub listener: TcpListener,
    /// Its TLS, if on.
    pub tls: Option<tls::Tls>,
    /// The admin listener (`/healthz`, `/metrics`), bound when TLS is on.
    pub admin: Option<TcpListener>,
}

impl Front {
    /// Sets up TLS as `config` says (generating a self-signed certificate on first start) and,
    /// with TLS on, binds the admin listener.
    pub async fn prepare(listener: TcpListener, config: &Config) -> Result<Self, RunError> {
        let listen = listener.local_addr().map_err(RunError::Serve)?;
        let mode = config.tls_mode()?;
        let data_dir = config.data_dir.clone();
        let tls =
            tokio::task::spawn_blocking(move || tls::Tls::from_mode(&mode, &data_dir, listen))
                .await
                .map_err(|e| RunError::Serve(std::io::Error::other(e)))??;
        let admin =
            match tls {
                Some(_) => Some(TcpListener::bind(config.admin_listen).await.map_err(
                    |source| RunError::AdminListen {
                        addr: config.admin_listen,
                        source,
                    },
                )?),
                None => None,
            };
        Ok(Self {
            listener,
            tls,
            admin,
        })
    }
}

/// An opened backend behind each of its traits, and (PostgreSQL) its `LISTEN` task.
type Opened = (
    Arc<dyn Store>,
    Arc<dyn DirectoryStore>,
    Arc<dyn TransparencyStore>,
    Option<tokio::task::JoinHandle<()>>,
);

/// [`run_front`] on `listener`, with TLS and the admin listener as `config` says.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let front = Front::prepare(listener, &config).await?;
    run_front(front, config, shutdown).await
}

/// Opens the store (SQLite in `config.data_dir`, or PostgreSQL), running migrations; serves
/// HTTP/WebSocket (TLS if `front` has it) until `shutdown` completes, then closes connections
/// and flushes the store. On PostgreSQL a listener task relays other nodes' wake-ups to the hub.
pub async fn run_front(
    front: Front,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let Front {
        listener,
        tls,
        admin,
    } = front;
    let hub = Arc::new(Hub::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (store, directory, transparency_store, listen): Opened = match config.backend()? {
        Backend::Sqlite(dir) => {
            create_data_dir(dir)?;
            let dir = dir.to_owned();
            let durability = config.durability;
            let store = tokio::task::spawn_blocking(move || {
                SqliteStore::open_with(&dir, Arc::new(types::today), durability)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("open task failed: {e}")))??;
            let store = Arc::new(store);
            (store.clone(), store.clone(), store, None)
        }
        Backend::Postgres(url) => {
            let store = Arc::new(PgStore::open(url, Arc::new(types::today)).await?);
            let listen = store.listen(Arc::clone(&hub) as _, stop_rx.clone());
            (store.clone(), store.clone(), store, Some(listen))
        }
    };
    // On PostgreSQL the keys live in the database; the data directory is not used for them.
    let transparency =
        Arc::new(kt::Transparency::open(transparency_store, &config.data_dir).await?);
    let service = Arc::new(Service::new(
        Arc::clone(&store),
        directory,
        Arc::clone(&transparency),
        hub,
        service::ServiceLimits::from_config(&config),
    ));
    let publisher = tokio::spawn(Arc::clone(&transparency).run_publisher(
        Duration::from_secs(config.directory_publish_interval_secs),
        stop_rx.clone(),
    ));

    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let retention = tokio::spawn(retention::run(
        Arc::clone(&service),
        config.retention_days,
        config.posted_id_retention_days,
        stop_rx.clone(),
    ));

    let connections = Arc::new(Semaphore::new(config.max_connections as usize));
    let state = Arc::new(http::AppState {
        service: Arc::clone(&service),
        connections: Arc::clone(&connections),
        shutdown: stop_rx.clone(),
        limits: SessionLimits::from_config(&config),
        next_connection: std::sync::atomic::AtomicU64::new(1),
        max_connections: config.max_connections,
        ws_path: config.ws_path.clone(),
        decoy: decoy::Decoy::new(config.site.as_deref()),
    });
    let admin = admin.map(|admin| {
        let mut admin_stop = stop_rx.clone();
        let router = admin::router(Arc::clone(&state));
        tokio::spawn(async move {
            let served = axum::serve(admin, router)
                .with_graceful_shutdown(async move { stopped(&mut admin_stop).await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin listener failed");
            }
        })
    });
    let mut serve_stop = stop_rx.clone();
    let with_admin = tls.is_none();
    let listener = http::DeadlineListener::new(
        listener,
        Duration::from_secs(config.handshake_timeout_secs),
        Duration::from_secs(config.frame_timeout_secs),
    )
    .with_tls(tls.as_ref().map(tls::Tls::source));
    let served = axum::serve(
        listener,
        http::router(state, with_admin).into_make_service_with_connect_info::<http::ConnInfo>(),
    )
    .with_graceful_shutdown(async move { stopped(&mut serve_stop).await })
    .await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }

    // WebSocket tasks outlive hyper's graceful shutdown: wait until each has given its
    // connection permit back (they close on the shutdown signal), within the grace period.
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, connections.acquire_many(config.max_connections))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period");
    }
    retention.abort();
    let _ = retention.await;
    publisher.abort();
    let _ = publisher.await;
    if let Some(listen) = listen {
        let _ = listen.await;
    }
    signal.abort();
    service.finish_acks().await;
    store.close().await?;
    tracing::info!("stopped");
    served.map_err(RunError::Serve)
}

/// Completes once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn create_data_dir(dir: &Path) -> Result<(), RunError> {
    create_private_dir(dir).map_err(|source| RunError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}
