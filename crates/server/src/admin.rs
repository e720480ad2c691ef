//! The operator's endpoints: `/healthz` and `/metrics` (Prometheus text format). On the main
//! listener when TLS is off; on the plain admin listener (`admin_listen`) when it is on, so
//! the public port never reveals them. Not for: anything a client uses.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::http::AppState;

/// The admin routes, over the server's state.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// The admin listener's router.
pub fn router(state: Arc<AppState>) -> Router {
    routes().with_state(state)
}

async fn healthz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if app.service.healthy().await {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let max = u64::from(app.max_connections);
    let open = max.saturating_sub(app.connections.available_permits() as u64);
    let accepted = app
        .next_connection
        .load(Ordering::Relaxed)
        .saturating_sub(1);
    let mut text = String::new();
    for (name, kind, help, value) in [
        (
            "blindpostd_connections_open",
            "gauge",
            "WebSocket connections open now.",
            open,
        ),
        (
            "blindpostd_connections_max",
            "gauge",
            "The connection limit (max_connections).",
            max,
        ),
        (
            "blindpostd_connections_total",
            "counter",
            "WebSocket connections accepted since start.",
            accepted,
        ),
    ] {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
