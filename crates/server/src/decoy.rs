//! The decoy: what every request other than a WebSocket upgrade on the secret path gets, so a
//! probe sees an ordinary web site. Either a directory of static files (`site`) or a small
//! built-in neutral page. Shared by the server and the relay. Not for: anything that names
//! the product or the protocol — no answer from here may.

use std::path::Path;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts as _, Request};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use tower::ServiceExt as _;
use tower_http::services::ServeDir;

use crate::listener::ConnInfo;

/// The built-in page at `/`: a web server's generic default.
const INDEX: &str = "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome</title>\n</head>\n<body>\n\
<h1>It works!</h1>\n<p>This web server is running, but has no content yet.</p>\n</body>\n</html>\n";

/// The built-in answer everywhere else.
const NOT_FOUND: &str = "<!DOCTYPE html>\n<html>\n<head>\n<title>404 Not Found</title>\n</head>\n\
<body>\n<h1>Not Found</h1>\n<p>The requested URL was not found on this server.</p>\n</body>\n</html>\n";

/// The decoy web site.
#[derive(Debug, Clone)]
pub enum Decoy {
    /// The built-in neutral page.
    BuiltIn,
    /// Static files from a directory (`/` serves `index.html`).
    Site(ServeDir),
}

impl Decoy {
    /// The site in `dir`, or the built-in page.
    pub fn new(dir: Option<&Path>) -> Self {
        match dir {
            Some(dir) => Self::Site(ServeDir::new(dir)),
            None => Self::BuiltIn,
        }
    }

    /// Answers `request` as the web site would.
    pub async fn respond(&self, request: Request) -> Response {
        match self {
            Self::BuiltIn => built_in(request.method(), request.uri().path()),
            Self::Site(dir) => match dir.clone().oneshot(request).await {
                Ok(response) => response.map(axum::body::Body::new),
                Err(never) => match never {},
            },
        }
    }
}

fn built_in(method: &Method, path: &str) -> Response {
    let html = [(header::CONTENT_TYPE, "text/html; charset=utf-8")];
    if path != "/" && path != "/index.html" {
        return (StatusCode::NOT_FOUND, html, NOT_FOUND).into_response();
    }
    if method == Method::GET || method == Method::HEAD {
        (StatusCode::OK, html, INDEX).into_response()
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response()
    }
}

/// A valid WebSocket upgrade on `ws_path` with its connection's progress, or else the decoy's
/// answer to the request (any other path or method, a plain GET on `ws_path`, a malformed
/// upgrade): the upgrade extractor's own rejections, which name the protocol, never reach the
/// client.
pub async fn upgrade_or_decoy(
    ws_path: &str,
    decoy: &Decoy,
    request: Request,
) -> Result<(WebSocketUpgrade, ConnInfo), Response> {
    if request.uri().path() != ws_path || request.method() != Method::GET {
        return Err(decoy.respond(request).await);
    }
    let (mut parts, body) = request.into_parts();
    let conn = parts
        .extensions
        .get::<ConnectInfo<ConnInfo>>()
        .map(|ConnectInfo(info)| info.clone());
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &()).await;
    match (upgrade, conn) {
        (Ok(upgrade), Some(conn)) => Ok((upgrade, conn)),
        _ => Err(decoy.respond(Request::from_parts(parts, body)).await),
    }
}
