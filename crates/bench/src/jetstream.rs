//! The equivalent durable workload on NATS JetStream, for the side-by-side ratio: a stream with
//! file storage, one publisher per conversation publishing with ack (awaiting each ack in
//! closed loop, or at fixed times in open loop), and one durable pull consumer with explicit
//! acks receiving everything — the broker set-up an operator would use instead of a relay.
//! Payloads have the byte size of blindpost's MLS ciphertexts; their first 8 bytes carry the
//! (scheduled) send time for latency. Not for anything blindpost-specific.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use crate::relay::{Counters, Pacing};
use crate::stats::Latencies;

const STREAM: &str = "BLINDPOST_BENCH";
const CONSUMER: &str = "blindpost-bench";
/// Publishers sharing one NATS connection.
const PUBLISHERS_PER_CONNECTION: usize = 64;

/// What the JetStream window measured.
pub struct Outcome {
    /// Publishes acknowledged by the server.
    pub published: u64,
    /// Messages the consumer received within the window.
    pub delivered_in_window: u64,
    /// Failed publishes, acks or consumer errors.
    pub errors: u64,
    /// Send→receive latencies.
    pub latencies: Latencies,
}

/// Run the workload for `duration` with `publishers` publishers and `payload_len`-byte messages.
pub async fn run(
    url: &str,
    publishers: usize,
    payload_len: usize,
    duration: Duration,
    drain: Duration,
    pacing: Pacing,
    counters: Arc<Counters>,
) -> Result<Outcome> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let js = jetstream::new(client.clone());
    // A stream left over from an interrupted run would skew the figures.
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec!["blindpost-bench.>".to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating the JetStream stream: {e}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating the JetStream consumer: {e}"))?;
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let in_window = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let consumer_task = {
        let errors = errors.clone();
        let in_window = in_window.clone();
        let counters = counters.clone();
        let stop = stop.clone();
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow!("starting the JetStream consumer: {e}"))?;
        tokio::spawn(async move {
            let mut latencies = Latencies::default();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(100), messages.next());
                let msg = match next.await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                let Ok(msg) = msg else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let now = Instant::now();
                if msg.payload.len() >= 8 {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&msg.payload[..8]);
                    let sent = start + Duration::from_nanos(u64::from_le_bytes(b));
                    latencies.record(now.saturating_duration_since(sent));
                }
                if msg.ack().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                if now <= end {
                    in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        })
    };

    let mut clients = vec![client];
    while clients.len() * PUBLISHERS_PER_CONNECTION < publishers {
        clients.push(async_nats::connect(url).await?);
    }
    let mut tasks = Vec::with_capacity(publishers);
    for p in 0..publishers {
        let js = jetstream::new(clients[p / PUBLISHERS_PER_CONNECTION].clone());
        let errors = errors.clone();
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("blindpost-bench.{p}");
            let mut payload = vec![0x5a_u8; payload_len.max(8)];
            let mut acks = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            let mut k: u64 = 0;
            let mut ok = 0u64;
            loop {
                let sent = match pacing {
                    Pacing::Closed => Instant::now(),
                    Pacing::Open { rate } => {
                        let interval = publishers as f64 / rate;
                        let at = start
                            + Duration::from_secs_f64(
                                interval * p as f64 / publishers as f64 + interval * k as f64,
                            );
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                };
                if sent >= end {
                    break;
                }
                let offset = sent.saturating_duration_since(start).as_nanos() as u64;
                payload[..8].copy_from_slice(&offset.to_le_bytes());
                k += 1;
                match js.publish(subject.clone(), payload.clone().into()).await {
                    Ok(ack) => match pacing {
                        Pacing::Closed => {
                            if ack.await.is_ok() {
                                ok += 1;
                                counters.posted.fetch_add(1, Ordering::Relaxed);
                            } else {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Pacing::Open { .. } => acks.push(ack),
                    },
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for ack in acks {
                if ack.await.is_ok() {
                    ok += 1;
                    counters.posted.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            ok
        }));
    }
    let mut published = 0;
    for t in tasks {
        published += t.await?;
    }
    let drain_until = Instant::now() + drain;
    while Instant::now() < drain_until && counters.delivered.load(Ordering::Relaxed) < published {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let latencies = consumer_task.await?;
    let _ = js.delete_stream(STREAM).await;
    Ok(Outcome {
        published,
        delivered_in_window: in_window.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        latencies,
    })
}
