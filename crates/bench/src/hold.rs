//! Connection-hold mode: open as many idle connections as the file-descriptor limit allows,
//! each with its own queue subscribed with push (what an idle device does), and report the
//! server's resident memory per connection. Not for message traffic.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blindpost_client::ServerSettings;
use blindpost_wire::{CreateQueue, Request, Subscribe};
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::relay::{Ws, call, connect};
use crate::stats;

/// File descriptors kept free for everything else the tool opens.
const SPARE_FDS: u64 = 64;

/// What hold mode measured.
#[derive(Serialize)]
pub struct Summary {
    /// Mode name, `hold`.
    pub mode: &'static str,
    /// Idle subscribed connections held at the end.
    pub connections: usize,
    /// The number asked for (the file-descriptor limit when not given).
    pub target: usize,
    /// The tool's soft file-descriptor limit after raising it.
    pub fd_limit: u64,
    /// Why opening stopped before the target, if it did.
    pub stopped_by: Option<String>,
    /// Server RSS before the first connection, KiB.
    pub server_rss_before_kib: u64,
    /// Server RSS with every connection open and idle, KiB.
    pub server_rss_after_kib: u64,
    /// (after − before) ÷ connections, KiB.
    pub server_rss_per_connection_kib: f64,
    /// Seconds spent opening the connections.
    pub open_secs: f64,
}

/// Open up to `want` connections (all the descriptor limit allows when `None`) spread over
/// `servers`, hold them for `hold`, and measure the servers `pids`.
pub async fn run(
    servers: &[ServerSettings],
    pids: &[u32],
    want: Option<usize>,
    hold: Duration,
) -> Result<Summary> {
    let fd_limit =
        rlimit::increase_nofile_limit(u64::MAX).context("raising the file-descriptor limit")?;
    let target = want.unwrap_or(fd_limit.saturating_sub(SPARE_FDS) as usize);
    let before = stats::sample_all(pids).rss_kib;
    let started = Instant::now();
    let mut held: Vec<Ws> = Vec::with_capacity(target);
    let mut stopped_by = None;
    let mut last_report = Instant::now();
    const BATCH: usize = 64;
    while held.len() < target {
        let n = BATCH.min(target - held.len());
        let base = held.len();
        let opened: Vec<Result<Ws>> = futures_util::stream::iter(0..n)
            .map(|i| open_one(&servers[(base + i) % servers.len()]))
            .buffer_unordered(BATCH)
            .collect()
            .await;
        for r in opened {
            match r {
                Ok(ws) => held.push(ws),
                Err(e) if stopped_by.is_none() => stopped_by = Some(format!("{e:#}")),
                Err(_) => {}
            }
        }
        if stopped_by.is_some() {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "[{:>5.1}s] {} connections open, server RSS {} KiB",
                started.elapsed().as_secs_f64(),
                held.len(),
                stats::sample_all(pids).rss_kib
            );
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    let after = stats::sample_all(pids).rss_kib;
    let connections = held.len();
    drop(held);
    Ok(Summary {
        mode: "hold",
        connections,
        target,
        fd_limit,
        stopped_by,
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        server_rss_per_connection_kib: if connections == 0 {
            0.0
        } else {
            after.saturating_sub(before) as f64 / connections as f64
        },
        open_secs,
    })
}

/// One idle device: connect, create a queue, subscribe it with push.
async fn open_one(server: &ServerSettings) -> Result<Ws> {
    let mut ws = connect(server).await?;
    let mut random = [0u8; 80];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
    let (queue_id, rest) = random.split_at(16);
    let (secret, token) = rest.split_at(32);
    call(
        &mut ws,
        2,
        Request::CreateQueue(CreateQueue {
            queue_id: queue_id.to_vec(),
            receive_secret_hash: Sha256::digest(secret).to_vec(),
            send_token_hash: Sha256::digest(token).to_vec(),
        }),
    )
    .await?;
    call(
        &mut ws,
        4,
        Request::Subscribe(Subscribe {
            queue_id: queue_id.to_vec(),
            receive_secret: secret.to_vec(),
            push: true,
            after_seq: 0,
        }),
    )
    .await?;
    Ok(ws)
}
