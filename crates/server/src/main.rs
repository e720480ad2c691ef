//! `blindpostd`: flags and glue. Resolves the configuration, sets up logging (stderr), binds,
//! prints the one stdout line `blindpostd listening on ADDR`, and runs until SIGINT/SIGTERM.
//! Not for: server logic (see the `blindpost_server` library).

#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use blindpost_server::config::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::resolve(Args::parse())?;
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid log filter {:?}", config.log))?;
    // No timestamps: a log line must not say when anything happened finer than the day
    // (SEIZURE.md). A collector that stamps lines (journald) is the operator's choice.
    tracing_subscriber::fmt()
        .without_time()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    {
        // Tests and scripts read this first stdout line to learn the port.
        let mut out = std::io::stdout().lock();
        writeln!(out, "blindpostd listening on {addr}")?;
        out.flush()?;
    }
    // The database URL may carry a password: log only which backend runs.
    let backend = match config.backend()? {
        blindpost_server::config::Backend::Sqlite(_) => "sqlite",
        blindpost_server::config::Backend::Postgres(_) => "postgres",
    };
    tracing::info!(%addr, backend, "blindpostd started");

    blindpost_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
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
