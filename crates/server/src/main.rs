//! `blindpostd`: flags and glue. Resolves the configuration, sets up logging (stderr), binds,
//! prints the stdout lines scripts read (`blindpostd listening on ADDR`, then with file or
//! self-signed TLS `tls certificate sha256:HEX`, then with TLS `blindpostd admin listening on
//! ADDR`; for `blindpostd relay`, `blindpostd relay listening on ADDR` and the pin), reloads
//! certificate files on SIGHUP, and runs until SIGINT/SIGTERM; `blindpostd link` prints the
//! server link and its QR code.
//! Not for: server logic (see the `blindpost_server` library).

#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use blindpost_server::config::{Args, Command, Config, LinkArgs, RelayConfig};
use blindpost_server::tls::Tls;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    match args.command.take() {
        None => server(Config::resolve(args)?).await,
        Some(Command::Relay(args)) => relay(RelayConfig::resolve(args)?).await,
        Some(Command::Link(args)) => link(args),
    }
}

/// `blindpostd link`: the link on one line, then its QR code.
fn link(args: LinkArgs) -> anyhow::Result<()> {
    let (config, request) = args.resolve()?;
    let link = blindpost_server::link::server_link(&config, &request)?.to_uri();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{link}")?;
    match qrcode::QrCode::new(link.as_bytes()) {
        Ok(code) => {
            let art = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .build();
            writeln!(out, "{art}")?;
        }
        Err(e) => writeln!(out, "(no QR code: {e})")?,
    }
    Ok(())
}

async fn relay(config: RelayConfig) -> anyhow::Result<()> {
    init_logging(&config.log)?;
    let (listener, addr) = bind(config.listen).await?;
    let (mode, data_dir) = (config.tls.clone(), config.data_dir.clone());
    let tls = tokio::task::spawn_blocking(move || Tls::from_mode(&mode, &data_dir, addr))
        .await
        .context("TLS setup task failed")?
        .context("TLS")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "blindpostd relay listening on {addr}")?;
        if let Some(pin) = tls.as_ref().and_then(Tls::pin) {
            writeln!(out, "tls certificate {pin}")?;
        }
        out.flush()?;
    }
    if let Some(tls) = &tls {
        tokio::spawn(reload_on_sighup(tls.clone()));
    }
    // The upstream is configuration, not a client's address: it may be logged.
    tracing::info!(%addr, upstream = %config.upstream, tls = tls.is_some(), "relay started");
    blindpost_server::relay::run(listener, tls, &config, shutdown_signal()).await?;
    tracing::info!("relay stopped");
    Ok(())
}

async fn server(config: Config) -> anyhow::Result<()> {
    init_logging(&config.log)?;
    let (listener, addr) = bind(config.listen).await?;
    let front = blindpost_server::Front::prepare(listener, &config).await?;
    let admin = match &front.admin {
        Some(admin) => Some(
            admin
                .local_addr()
                .context("cannot read the admin address")?,
        ),
        None => None,
    };
    {
        // Tests and scripts read these lines: the first to learn the port, the second the pin.
        let mut out = std::io::stdout().lock();
        writeln!(out, "blindpostd listening on {addr}")?;
        if let Some(pin) = front.tls.as_ref().and_then(Tls::pin) {
            writeln!(out, "tls certificate {pin}")?;
        }
        if let Some(admin) = admin {
            writeln!(out, "blindpostd admin listening on {admin}")?;
        }
        out.flush()?;
    }
    if let Some(tls) = &front.tls {
        tokio::spawn(reload_on_sighup(tls.clone()));
    }
    // The database URL may carry a password: log only which backend runs.
    let backend = match config.backend()? {
        blindpost_server::config::Backend::Sqlite(_) => "sqlite",
        blindpost_server::config::Backend::Postgres(_) => "postgres",
    };
    tracing::info!(%addr, backend, tls = front.tls.is_some(), "blindpostd started");

    blindpost_server::run_front(front, config, shutdown_signal()).await?;
    Ok(())
}

/// Binds `listen`; the listener and the address it got (port 0 picks one).
async fn bind(
    listen: std::net::SocketAddr,
) -> anyhow::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    Ok((listener, addr))
}

fn init_logging(log: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(log).with_context(|| format!("invalid log filter {log:?}"))?;
    // No timestamps: a log line must not say when anything happened finer than the day
    // (SEIZURE.md). A collector that stamps lines (journald) is the operator's choice.
    tracing_subscriber::fmt()
        .without_time()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    Ok(())
}

/// Reloads the certificate files on every SIGHUP; a failed reload keeps the old certificate.
async fn reload_on_sighup(tls: Tls) {
    #[cfg(unix)]
    {
        let kind = tokio::signal::unix::SignalKind::hangup();
        let Ok(mut hangups) = tokio::signal::unix::signal(kind) else {
            tracing::warn!("cannot listen for SIGHUP; certificates will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(Some(pin))) => tracing::info!(pin, "TLS certificate reloaded"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the old certificate")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }
    #[cfg(not(unix))]
    drop(tls);
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}
