//! The HTTP front: the axum router with the WebSocket endpoint (`/v1/ws`) and `/healthz`, the
//! connection cap and the socket settings. Nothing else is served.
//! Not for: the connection loop (see `ws`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use blindpost_wire::WS_PATH;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument as _;

use crate::service::Service;
use crate::session::SessionLimits;

/// What every request handler shares.
pub struct AppState {
    /// The domain.
    pub service: Arc<Service>,
    /// One permit per open WebSocket connection.
    pub connections: Arc<Semaphore>,
    /// Becomes `true` at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Per-connection limits.
    pub limits: SessionLimits,
    /// Numbers connections for log spans (a counter, never an address).
    pub next_connection: AtomicU64,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(WS_PATH, get(upgrade))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if app.service.healthy().await {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    }
}

async fn upgrade(State(app): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    if *app.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Ok(permit) = Arc::clone(&app.connections).try_acquire_owned() else {
        tracing::warn!("connection refused: connection limit reached");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    ws.max_message_size(crate::ws::SOCKET_MAX_MESSAGE)
        .max_frame_size(crate::ws::SOCKET_MAX_MESSAGE)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            let conn = app.next_connection.fetch_add(1, Ordering::Relaxed);
            let span = tracing::debug_span!("conn", conn);
            async move {
                tracing::debug!("connection opened");
                let (service, shutdown) = (Arc::clone(&app.service), app.shutdown.clone());
                crate::ws::serve(socket, service, app.limits, shutdown).await;
                tracing::debug!("connection closed");
                drop(permit);
            }
            .instrument(span)
        })
}
