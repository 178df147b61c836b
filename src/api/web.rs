//! The browser page `voxloop serve` serves at `/` (static files compiled into the binary, no
//! Node toolchain): press Talk, speak, hear the reply, see what was heard, each sentence, and
//! each tool call with its outcome. It speaks the device protocol to the device server, as a
//! speaker does (ARCHITECTURE §5), with Opus encoded and decoded by the browser's WebCodecs,
//! and reads the API's status for its status panel.
//!
//! The page's files hold no secret: a loopback caller gets them without a credential (the page
//! then asks for a token or API key if the API wants one); any other caller needs the API's
//! credential (`?access_token=` in the link), as every other route of the API does.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::Guard;

/// Where the page's WebSocket goes: the device server's port and path (`[device] bind`'s port
/// as bound, `[device] path`), on the host the page was loaded from.
#[derive(Debug, Clone, PartialEq)]
pub struct WebPage {
    /// The device server's TCP port.
    pub device_port: u16,
    /// The device WebSocket's path, e.g. `/xiaozhi/v1/`.
    pub device_path: String,
}

const INDEX: &str = include_str!("../../assets/web/index.html");
const APP: &str = include_str!("../../assets/web/app.js");
const CAPTURE: &str = include_str!("../../assets/web/capture.js");

/// The page's routes: `/` (the page, its script and AudioWorklet inline: one response, so that
/// a link with `?access_token=` is all a browser off loopback needs) and `/web/config.json`
/// (`{device_port, device_path}`).
pub fn routes(page: WebPage, guard: Arc<Guard>) -> Router {
    let config = json!({"device_port": page.device_port, "device_path": page.device_path});
    // Built once; each response shares the bytes.
    let html = axum::body::Bytes::from(page_html());
    Router::new()
        .route(
            "/",
            get(move || {
                let html = html.clone();
                async move {
                    let headers = [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ];
                    (headers, html).into_response()
                }
            }),
        )
        .route(
            "/web/config.json",
            get(move || async move { axum::Json(config) }),
        )
        .layer(from_fn_with_state(guard, loopback_or_guard))
}

/// index.html with capture.js and app.js in place of their markers.
fn page_html() -> String {
    INDEX
        .replace("/* capture.js */", CAPTURE)
        .replace("/* app.js */", APP)
}

/// A loopback caller passes; any other goes through the API's [`super::guard`].
async fn loopback_or_guard(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let loopback = super::peer_ip(&request).is_some_and(|ip: IpAddr| ip.is_loopback());
    if loopback {
        return next.run(request).await;
    }
    super::guard(State(guard), request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::{ApiKeyConfig, AuthConfig, Role, ServerConfig};
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::StatusCode;
    use std::net::SocketAddr;
    use tower::ServiceExt as _;

    async fn get(uri: &str, from: &str) -> (StatusCode, String) {
        let key = "a-test-key";
        let auth = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                name: "tester".into(),
                role: Role::User,
                sha256: crate::api::auth::hash_key(key),
            }],
            ..AuthConfig::default()
        };
        let guard = Guard::new(&auth, &ServerConfig::default(), "0.0.0.0:8080", "api").unwrap();
        let page = WebPage {
            device_port: 8000,
            device_path: "/xiaozhi/v1/".into(),
        };
        let mut request = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let peer: SocketAddr = from.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = routes(page, guard).oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_page_is_one_response_open_on_loopback_and_guarded_elsewhere() {
        let (status, html) = get("/", "127.0.0.1:40000").await;
        assert_eq!(status, StatusCode::OK);
        // The script and the worklet are inline: no marker is left, both are there.
        assert!(!html.contains("/* app.js */") && !html.contains("/* capture.js */"));
        assert!(html.contains("window.voxloopStats") && html.contains("registerProcessor"));
        let (status, config) = get("/web/config.json", "127.0.0.1:40000").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&config).unwrap(),
            json!({"device_port": 8000, "device_path": "/xiaozhi/v1/"})
        );
        // Off loopback: nothing without the credential, the page with it in the link.
        assert_eq!(
            get("/", "192.0.2.7:40000").await.0,
            StatusCode::UNAUTHORIZED
        );
        let wrong = get("/?access_token=wrong", "192.0.2.7:40000").await.0;
        assert_eq!(wrong, StatusCode::UNAUTHORIZED);
        let (status, html) = get("/?access_token=a-test-key", "192.0.2.7:40000").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("data-testid=\"talk\""));
    }
}
