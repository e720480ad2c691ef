//! The retention task: hourly (and once at start-up) deletes unacknowledged messages older
//! than the retention period and post idempotency keys older than theirs.
//! Not for: deleting anything a client still may legitimately fetch within the period.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::service::Service;

/// How often retention runs.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// Runs until shutdown.
pub async fn run(
    service: Arc<Service>,
    retention_days: u32,
    posted_id_days: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::stopped(&mut shutdown) => break,
            _ = tick.tick() => {}
        }
        match service
            .expire(crate::types::today(), retention_days, posted_id_days)
            .await
        {
            Ok(expired) => tracing::info!(
                messages = expired.messages,
                posted_ids = expired.posted_ids,
                "retention pass done"
            ),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}
