//! Serving safely: what every network surface (the device WebSocket, `voxloop serve`'s HTTP API,
//! the duplex server) checks before a handler runs, and `voxloop serve`'s HTTP API itself.
//!
//! Order of the checks ([`Guard::admit`]): the per-IP rate limit (429), the browser `Origin`
//! (403 unless loopback or `[server] allowed_origins`), the credential (401, [`auth`]), the
//! per-credential rate limit (429; callers without a credential have the per-IP one only). The
//! caller's [`Principal`] then rides in the request's extensions; [`admin_only`] and
//! [`mcp_requests`] refuse a `user` with 403.

pub mod auth;
pub mod bridge;
pub mod config;
pub mod limit;
pub mod mcp;
pub mod server;
pub mod web;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub use auth::{Auth, AuthError, AuthSetupError, Principal, Role};
use limit::{RateLimits, retry_after_s};

use crate::api::config::{AuthConfig, ServerConfig};

/// Browser origins every surface accepts: pages served from this machine.
const LOOPBACK_ORIGINS: [&str; 3] = ["http://localhost", "http://127.0.0.1", "http://[::1]"];

/// The checks of one surface.
pub struct Guard {
    /// Its credentials.
    pub auth: Auth,
    limits: RateLimits,
    origins: Vec<String>,
    /// `device`, `api` or `duplex`, for logs and metrics.
    surface: &'static str,
}

/// `{status: "error", error}` with `status`, counted as a refusal of `surface`.
pub fn refuse(surface: &str, status: StatusCode, error: impl std::fmt::Display) -> Response {
    crate::metrics::get().refusal(surface, status.as_u16());
    (
        status,
        axum::Json(json!({"status": "error", "error": error.to_string()})),
    )
        .into_response()
}

impl Guard {
    /// The checks for a surface bound to `bind`.
    ///
    /// # Errors
    /// [`AuthSetupError`] from [`Auth::new`].
    pub fn new(
        auth: &AuthConfig,
        server: &ServerConfig,
        bind: &str,
        surface: &'static str,
    ) -> Result<Arc<Self>, AuthSetupError> {
        Ok(Self::with_auth(Auth::new(auth, bind)?, server, surface))
    }

    /// The checks of a surface with these credentials.
    pub fn with_auth(auth: Auth, server: &ServerConfig, surface: &'static str) -> Arc<Self> {
        Arc::new(Self {
            auth,
            limits: RateLimits::new(server),
            origins: server.allowed_origins.clone(),
            surface,
        })
    }

    /// Counts one request from `ip` against the per-IP limit, for endpoints that take no
    /// credential (the devices' OTA check).
    ///
    /// # Errors
    /// 429 with `Retry-After` when over the limit.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Box<Response>> {
        self.limits.check_ip(ip).map_err(|wait| {
            tracing::warn!(surface = self.surface, %ip, "rate limit (per IP)");
            Box::new(self.too_many(&format!("too many requests from {ip}"), wait))
        })
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let loopback = LOOPBACK_ORIGINS.iter().any(|base| {
            origin
                .strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        });
        loopback || self.origins.iter().any(|o| o == origin)
    }

    /// Runs the checks for a request from `peer` with `headers` and the URI's `query`.
    /// `device` is `Some(Device-Id)` on the device surface, where device tokens count too.
    ///
    /// # Errors
    /// The refusal to send: 429 with `Retry-After`, 403 (origin), 401 with `WWW-Authenticate`.
    pub fn admit(
        &self,
        peer: Option<IpAddr>,
        headers: &HeaderMap,
        query: Option<&str>,
        device: Option<Option<&str>>,
    ) -> Result<Principal, Box<Response>> {
        if let Some(ip) = peer
            && let Err(wait) = self.limits.check_ip(ip)
        {
            tracing::warn!(surface = self.surface, %ip, "rate limit (per IP)");
            return Err(self
                .too_many(&format!("too many requests from {ip}"), wait)
                .into());
        }
        if let Some(origin) = headers.get(header::ORIGIN)
            && !origin.to_str().is_ok_and(|o| self.origin_allowed(o))
        {
            tracing::warn!(surface = self.surface, ?origin, "origin refused");
            return Err(Box::new(refuse(
                self.surface,
                StatusCode::FORBIDDEN,
                format!("origin {origin:?} is not allowed ([server] allowed_origins)"),
            )));
        }
        let credential = auth::credential(headers, query);
        let principal = match device {
            Some(id) => self.auth.authenticate_device(id, credential.as_deref()),
            None => self.auth.authenticate(credential.as_deref()),
        };
        let principal = principal.map_err(|e| {
            tracing::warn!(surface = self.surface, ?peer, error = %e, "refused");
            crate::metrics::get().refusal(self.surface, 401);
            Box::new(e.into_response())
        })?;
        // Callers without a credential share no key: the per-IP limit is theirs.
        if let Some(id) = &principal.id
            && let Err(wait) = self.limits.check_key(id)
        {
            tracing::warn!(surface = self.surface, caller = %principal.name, "rate limit (per key)");
            return Err(self
                .too_many(&format!("too many requests for {}", principal.name), wait)
                .into());
        }
        Ok(principal)
    }

    /// Counts `calls` more requests for a caller already admitted (each call of a batch past
    /// the first, which [`Guard::admit`] counted): against the credential's bucket, or the
    /// IP's for a caller without one.
    ///
    /// # Errors
    /// 429 with `Retry-After` at the first call over a limit.
    pub fn charge(
        &self,
        peer: Option<IpAddr>,
        principal: &Principal,
        calls: usize,
    ) -> Result<(), Box<Response>> {
        for _ in 0..calls {
            let over = match (&principal.id, peer) {
                (Some(id), _) => self.limits.check_key(id).err().map(|w| (id.clone(), w)),
                (None, Some(ip)) => self.limits.check_ip(ip).err().map(|w| (ip.to_string(), w)),
                (None, None) => None,
            };
            if let Some((who, wait)) = over {
                tracing::warn!(surface = self.surface, caller = %principal.name, "rate limit (batch)");
                return Err(self
                    .too_many(
                        &format!("too many requests for {who} (each call of a batch counts)"),
                        wait,
                    )
                    .into());
            }
        }
        Ok(())
    }

    fn too_many(&self, message: &str, wait: std::time::Duration) -> Response {
        let seconds = retry_after_s(wait);
        let mut response = refuse(
            self.surface,
            StatusCode::TOO_MANY_REQUESTS,
            format!("{message}; retry in {seconds} s"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        response
    }
}

/// The peer's IP, when the server was started with connect info.
fn peer_ip(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// What a handler needs to count a batch's calls ([`Guard::charge`]): the surface's guard and
/// the peer. [`guard`] puts it into the request's extensions.
#[derive(Clone)]
pub struct Meter {
    guard: Arc<Guard>,
    peer: Option<IpAddr>,
}

impl Meter {
    /// [`Guard::charge`] for this request's peer.
    ///
    /// # Errors
    /// As [`Guard::charge`].
    pub fn charge(&self, principal: &Principal, calls: usize) -> Result<(), Box<Response>> {
        self.guard.charge(self.peer, principal, calls)
    }
}

/// Middleware: [`Guard::admit`], then the [`Principal`] and a [`Meter`] go into the request's
/// extensions.
pub async fn guard(State(guard): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let peer = peer_ip(&request);
    let principal = match guard.admit(peer, request.headers(), request.uri().query(), None) {
        Ok(p) => p,
        Err(refusal) => return *refusal,
    };
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(Meter { guard, peer });
    next.run(request).await
}

fn forbidden(surface: &str, what: &str) -> Response {
    refuse(
        surface,
        StatusCode::FORBIDDEN,
        format!("{what} needs the admin role"),
    )
}

/// Middleware behind [`guard`]: only `admin` passes; a `user` gets 403.
pub async fn admin_only(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let admin = request
        .extensions()
        .get::<Principal>()
        .is_some_and(|p| p.role == Role::Admin);
    if !admin {
        let what = request.uri().path().to_string();
        return forbidden(guard.surface, &what);
    }
    next.run(request).await
}

/// The messages of a JSON-RPC body (one message or a batch); none when it is not JSON.
fn messages(body: &[u8]) -> Vec<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items,
        Ok(one) => vec![one],
        Err(_) => Vec::new(),
    }
}

/// The tools a JSON-RPC body calls with `tools/call` (one message or a batch).
fn called_tools(body: &[u8]) -> Vec<String> {
    let messages = messages(body);
    messages
        .iter()
        .filter(|m| m["method"] == "tools/call")
        .filter_map(|m| m["params"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Middleware behind [`guard`] on an MCP endpoint (the MCP server reads bodies itself, past
/// axum's body limit): a POST body is read whole, at most `max_body` bytes (`[server]
/// max_body_bytes`, else 413), each message of a JSON-RPC batch past the first counts against
/// the rate limits ([`Guard::charge`]), and a `user`'s `tools/call` of an admin-only tool is
/// refused with 403 before the MCP server sees it.
pub async fn mcp_requests(
    State((guard, max_body)): State<(Arc<Guard>, usize)>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let admin = request
        .extensions()
        .get::<Principal>()
        .is_some_and(|p| p.role == Role::Admin);
    let (parts, body) = request.into_parts();
    let bytes = match to_bytes(body, max_body).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return refuse(
                guard.surface,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {max_body} bytes ([server] max_body_bytes)"),
            );
        }
    };
    let batch = messages(&bytes).len();
    if batch > 1
        && let Some(principal) = parts.extensions.get::<Principal>()
        && let Err(refusal) = guard.charge(
            parts.extensions.get::<Meter>().and_then(|m| m.peer),
            principal,
            batch - 1,
        )
    {
        return *refusal;
    }
    if !admin
        && let Some(tool) = called_tools(&bytes)
            .into_iter()
            .find(|t| guard.auth.is_admin_tool(t))
    {
        return forbidden(guard.surface, &format!("tool {tool}"));
    }
    // A session this request opens counts against its credential, or its address without one.
    let owner = match parts.extensions.get::<Principal>() {
        Some(Principal { id: Some(id), .. }) => id.clone(),
        _ => match parts.extensions.get::<Meter>().and_then(|m| m.peer) {
            Some(peer) => format!("ip:{peer}"),
            None => "anonymous".into(),
        },
    };
    voxloop_mcp_sessions::as_owner(
        owner,
        next.run(Request::from_parts(parts, Body::from(bytes))),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_loopback_and_configured() {
        let server = ServerConfig {
            allowed_origins: vec!["https://app.example".into()],
            ..ServerConfig::default()
        };
        let g = Guard::new(&AuthConfig::default(), &server, "127.0.0.1:0", "api").unwrap();
        assert!(g.origin_allowed("http://localhost:5173"));
        assert!(g.origin_allowed("http://127.0.0.1"));
        assert!(g.origin_allowed("https://app.example"));
        assert!(!g.origin_allowed("http://localhost.evil.example"));
        assert!(!g.origin_allowed("https://evil.example"));
    }

    #[test]
    fn tools_called_in_a_message_or_a_batch() {
        let one =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"release_gpu"}}"#;
        assert_eq!(called_tools(one), ["release_gpu"]);
        let batch = br#"[{"method":"tools/list"},{"method":"tools/call","params":{"name":"a"}}]"#;
        assert_eq!(called_tools(batch), ["a"]);
        assert!(called_tools(b"not json").is_empty());
    }
}
