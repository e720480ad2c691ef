//! The HTTP front: the router that sends a WebSocket upgrade on the secret path (`ws_path`) to
//! the connection loop and everything else to the decoy site, the connection cap and the
//! socket settings; `/healthz` and `/metrics` join it only when TLS is off.
//! Not for: the connection loop (see `ws`), deadlines and TLS (see `listener`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument as _;

use crate::decoy::{Decoy, upgrade_or_decoy};
pub use crate::listener::{ConnInfo, DeadlineListener, DeadlineStream, Progress};
use crate::service::Service;
use crate::session::SessionLimits;

/// What every request handler shares.
pub struct AppState {
    /// The domain.
    pub service: Arc<Service>,
    /// One permit per open WebSocket connection.
    pub connections: Arc<Semaphore>,
    /// The number of permits `connections` started with.
    pub max_connections: u32,
    /// Becomes `true` at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Per-connection limits.
    pub limits: SessionLimits,
    /// Numbers connections for log spans (a counter, never an address).
    pub next_connection: AtomicU64,
    /// The one path that upgrades to the protocol.
    pub ws_path: String,
    /// What every other request gets.
    pub decoy: Decoy,
}

/// The public router; with `admin`, `/healthz` and `/metrics` are on it too (TLS off).
pub fn router(state: Arc<AppState>, admin: bool) -> Router {
    let router = if admin {
        crate::admin::routes()
    } else {
        Router::new()
    };
    router.fallback(front).with_state(state)
}

async fn front(State(app): State<Arc<AppState>>, request: Request) -> Response {
    match upgrade_or_decoy(&app.ws_path, &app.decoy, request).await {
        Ok((ws, ConnInfo(progress))) => upgrade(app, progress, ws),
        Err(decoy) => decoy,
    }
}

fn upgrade(app: Arc<AppState>, progress: Arc<Progress>, ws: WebSocketUpgrade) -> Response {
    if *app.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Ok(permit) = Arc::clone(&app.connections).try_acquire_owned() else {
        tracing::warn!("connection refused: connection limit reached");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    progress.upgraded();
    ws.max_message_size(crate::ws::SOCKET_MAX_MESSAGE)
        .max_frame_size(crate::ws::SOCKET_MAX_MESSAGE)
        .read_buffer_size(2 * 1024)
        // Frames are written when `ws::write_out` flushes (after each answer and the pushes
        // waiting behind it); the threshold only bounds what one write may gather. Memory:
        // the buffer grows only as far as what was queued.
        .write_buffer_size(crate::ws::WRITE_GATHER_BYTES)
        .on_upgrade(move |socket| {
            let conn = app.next_connection.fetch_add(1, Ordering::Relaxed);
            let span = tracing::debug_span!("conn", conn);
            async move {
                tracing::debug!("connection opened");
                let (service, shutdown) = (Arc::clone(&app.service), app.shutdown.clone());
                crate::ws::serve(socket, service, app.limits, &progress, shutdown).await;
                tracing::debug!("connection closed");
                drop(permit);
            }
            .instrument(span)
        })
}
