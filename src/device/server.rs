//! The device server's front door (ARCHITECTURE §5): the WebSocket endpoint with its checks before the
//! upgrade (token, protocol version, session limits), the hello exchange, the session's
//! keep-alive and limits, and the OTA endpoint that tells firmware where the server is.
//!
//! Close codes a device may see (RFC 6455 §7.4.1): 1008 (policy: no hello in time, or binary
//! before the hello), 1007 (a binary frame whose header does not match the protocol version),
//! 1009 (a message over `max_message_bytes`), 1000 with reason `idle timeout`. A text message
//! that is not a known JSON message gets an `alert` back and the session goes on. Refusals before
//! the upgrade are HTTP: 401 (token), 400 (protocol version), 503 (session limits).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::activation::{
    ActivateState, DeviceStore, OtaGrant, StoreError, TokenState, default_store_path,
};
use super::protocol::{
    AudioParams, BinaryFrame, DeviceMessage, ListenState, ProtocolVersion, ServerMessage,
    WAKE_WORD_ABORT,
};
use super::session::{DeviceConversation, SessionOptions};
use super::vision::Vision;
use crate::api::{Guard, Principal, Role};
use crate::config::Config;
use crate::conversation::assistant::Assistant;
use crate::device::config::DeviceConfig;

/// Close code: policy violation (RFC 6455 §7.4.1).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: data inconsistent with the message type.
pub const CLOSE_INVALID: u16 = 1007;
/// Close code: a message too big to process.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: the server hit a condition it cannot handle.
pub const CLOSE_INTERNAL: u16 = 1011;

/// Who connected, from headers or (for browsers) query parameters.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// `Device-Id`: the device's MAC address.
    pub device_id: Option<String>,
    /// `Client-Id`: a UUID the firmware keeps.
    pub client_id: Option<String>,
    /// `Protocol-Version`: the binary framing.
    pub version: ProtocolVersion,
    /// The TCP peer.
    pub peer: SocketAddr,
}

/// Shared by every session.
struct ServerState {
    device: DeviceConfig,
    /// Credentials and rate limits (`[auth]`, `[server]`).
    guard: Arc<Guard>,
    /// Sessions open, by peer IP.
    sessions: Mutex<HashMap<IpAddr, u32>>,
    next_session: AtomicU64,
    /// Downlink audio format announced in the server hello.
    downlink: AudioParams,
    /// The token OTA hands to every caller without one, when `ota_shared_token` is on.
    shared_token: Option<String>,
    /// Activated devices and pending activations.
    store: Arc<DeviceStore>,
    /// The camera's vision endpoint and the sessions' tokens for it.
    vision: Arc<Vision>,
    /// The conversation behind each session; `None` answers the protocol only.
    assistant: Option<Assistant>,
}

/// A session slot; freed on drop.
struct Slot {
    state: Arc<ServerState>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut sessions = self
            .state
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = sessions.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.ip);
            }
        }
    }
}

impl ServerState {
    /// Takes a session slot for `ip`, or says which limit refuses it.
    fn take_slot(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let total: u32 = sessions.values().sum();
        if total >= self.device.max_sessions {
            return Err(format!(
                "the server has its maximum of {} sessions (device.max_sessions)",
                self.device.max_sessions
            ));
        }
        let here = sessions.entry(ip).or_insert(0);
        if *here >= self.device.max_sessions_per_ip {
            return Err(format!(
                "{ip} has its maximum of {} sessions (device.max_sessions_per_ip)",
                self.device.max_sessions_per_ip
            ));
        }
        *here += 1;
        Ok(Slot {
            state: self.clone(),
            ip,
        })
    }
}

/// A header, else the query parameter of the same meaning.
fn field(
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    header: &str,
    param: &str,
) -> Option<String> {
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| query.get(param).cloned())
}

/// The device store `[device]` names (`store`, else the default path), with its activation
/// limits.
pub fn device_store(device: &DeviceConfig) -> Arc<DeviceStore> {
    Arc::new(DeviceStore::new(
        device.store.clone().unwrap_or_else(default_store_path),
        device.activation_ttl_s,
        device.max_pending_activations,
    ))
}

/// The device server's routes: the WebSocket endpoint at `device.path`, the OTA endpoint at
/// `device.ota_path` (`GET` or `POST`, with or without the trailing slash) and its activation
/// poll at `{ota_path}activate`, the camera's vision endpoint at `device.vision_path`, and the
/// admin endpoints of activations at `device.admin_path`. Each session holds a conversation
/// with `assistant`; without one, sessions answer the protocol only (hello, limits, errors) and
/// ignore audio. `guard` should know `store`'s tokens ([`crate::api::Auth::with_device_store`]).
/// Serve with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(
    config: &Config,
    assistant: Option<Assistant>,
    guard: Arc<Guard>,
    store: Arc<DeviceStore>,
) -> Router {
    let vision = Vision::new(config.vision.clone());
    let state = Arc::new(ServerState {
        device: config.device.clone(),
        guard,
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        shared_token: config
            .device
            .ota_shared_token
            .then(|| config.auth.tokens.first().cloned())
            .flatten(),
        store,
        downlink: AudioParams {
            format: "opus".into(),
            sample_rate: config.audio.device_rate,
            channels: 1,
            frame_duration: config.audio.device_frame_ms,
        },
        vision: vision.clone(),
        assistant,
    });
    let ota_path = config.device.ota_path.clone();
    let ota_bare = ota_path.trim_end_matches('/').to_string();
    let activate = format!("{ota_bare}/activate");
    let admin = config.device.admin_path.trim_end_matches('/').to_string();
    let mut router = Router::new()
        .route(&config.device.path, get(upgrade))
        .route(&format!("{ota_bare}/"), get(ota).post(ota))
        .route(&activate, post(activate_poll))
        .route(&admin, get(admin_list))
        .route(&format!("{admin}/approve"), post(admin_approve))
        .route(
            &format!("{admin}/{{device_id}}"),
            axum::routing::delete(admin_revoke),
        );
    if !ota_bare.is_empty() {
        router = router.route(&ota_bare, get(ota).post(ota));
    }
    let vision_routes = Router::new()
        .route(&config.device.vision_path, post(super::vision::explain))
        .layer(axum::extract::DefaultBodyLimit::max(
            vision.max_body_bytes(),
        ))
        .with_state(vision);
    router.with_state(state).merge(vision_routes)
}

async fn upgrade(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let device_id = field(&headers, &query, "device-id", "device-id");
    let principal = match state.guard.admit(
        Some(peer.ip()),
        &headers,
        uri.query(),
        Some(device_id.as_deref()),
    ) {
        Ok(p) => p,
        Err(refusal) => return *refusal,
    };
    let version = match ProtocolVersion::parse(
        field(&headers, &query, "protocol-version", "protocol-version").as_deref(),
    ) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let slot = match state.take_slot(peer.ip()) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::warn!(%peer, "device refused: {why}");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
        }
    };
    tracing::debug!(%peer, caller = %principal.name, "device admitted");
    // A pending activation's token opens a session that only speaks the code.
    let activation_code = match (
        &device_id,
        crate::api::auth::credential(&headers, uri.query()),
    ) {
        (Some(id), Some(token)) => match state.store.token_state(id, &token) {
            Ok(TokenState::Pending { code }) => Some(code),
            _ => None,
        },
        _ => None,
    };
    let vision = vision_url(&state.device, &headers);
    let info = DeviceInfo {
        device_id,
        client_id: field(&headers, &query, "client-id", "client-id"),
        version,
        peer,
    };
    let max = state.device.max_message_bytes;
    let session_id = format!(
        "{:08x}-{:04x}",
        chrono::Utc::now().timestamp_subsec_nanos(),
        state.next_session.fetch_add(1, Ordering::Relaxed)
    );
    // Every log line of the session carries its id.
    let span = tracing::info_span!("session", id = %session_id);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            use tracing::Instrument as _;
            async move {
                let _active = crate::metrics::get().session("device");
                let grant = match state.vision.grant(&session_id) {
                    Ok(grant) => Some(grant),
                    Err(e) => {
                        tracing::error!(error = %e, "no vision token");
                        None
                    }
                };
                let options = SessionOptions {
                    activation_code,
                    vision: vision.zip(grant.as_ref().map(|g| g.token.clone())),
                    tool_events: false,
                };
                session(socket, info, state, session_id, options).await;
                drop(grant);
                drop(slot);
            }
            .instrument(span)
        })
}

/// `{status: "error", error}` with `status`, counted as a refusal of the device surface.
fn refuse(status: StatusCode, error: impl std::fmt::Display) -> Response {
    crate::api::refuse("device", status, error)
}

/// A header's value, trimmed; `None` when absent, not text or empty.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn store_failed(e: StoreError) -> Response {
    tracing::error!(error = %e, "device store");
    refuse(StatusCode::INTERNAL_SERVER_ERROR, e)
}

/// `http(s)://` or `ws(s)://` + the `Host` the client used, for URLs the server hands out
/// (never a wildcard bind address). `None` without a usable `Host`.
fn from_host(headers: &HeaderMap, scheme: &str, path: &str) -> Option<String> {
    let host = headers.get("host")?.to_str().ok()?.trim();
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
    valid.then(|| format!("{scheme}://{host}{path}"))
}

/// The WebSocket URL OTA gives devices: `public_url`, else from the request's `Host`.
fn websocket_url(device: &DeviceConfig, headers: &HeaderMap) -> Option<String> {
    device
        .public_url
        .clone()
        .or_else(|| from_host(headers, "ws", &device.path))
}

/// The vision endpoint's URL for a session: beside `public_url` (same host, `ws` -> `http`),
/// else from the upgrade request's `Host`.
fn vision_url(device: &DeviceConfig, headers: &HeaderMap) -> Option<String> {
    if let Some(public) = &device.public_url
        && let Ok(mut url) = url::Url::parse(public)
    {
        let scheme = if url.scheme() == "wss" {
            "https"
        } else {
            "http"
        };
        if url.set_scheme(scheme).is_ok() {
            url.set_path(&device.vision_path);
            url.set_query(None);
            return Some(url.to_string());
        }
    }
    from_host(headers, "http", &device.vision_path)
}

/// What the firmware's OTA check expects (xiaozhi-esp32 `main/ota.cc`; the PyPI `xiaozhi-sdk`
/// reads the same): `websocket {url, token}`, `server_time`, `firmware {version, url}`, and
/// for a device that must be activated, `activation {code, message, challenge, timeout_ms}`.
/// The token is the device's own once activated and asked for by the client it was activated
/// with; a pending activation's otherwise ([`super::activation`]); with `ota_shared_token`, the
/// shared token for devices without one. `Device-Id` is required (400), a `POST` body must be
/// JSON when present (400); calls count against the per-IP rate limit (429).
async fn ota(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refusal) = state.guard.check_ip(peer.ip()) {
        return *refusal;
    }
    if !body.iter().all(u8::is_ascii_whitespace)
        && serde_json::from_slice::<serde_json::Value>(&body).is_err()
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the OTA request body is not JSON (the firmware sends its board information)",
        );
    }
    let Some(device_id) = header(&headers, "device-id") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Device-Id header (the device's MAC address) is required",
        );
    };
    let client_id = header(&headers, "client-id").unwrap_or_default();
    let device = &state.device;
    let Some(url) = websocket_url(device, &headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no Host header to build the WebSocket URL from; set [device] public_url",
        );
    };
    let now = chrono::Local::now();
    let mut answer = json!({
        "websocket": {"url": url, "token": ""},
        "server_time": {
            "timestamp": now.timestamp_millis(),
            "timezone_offset": now.offset().local_minus_utc() / 60,
        },
        "firmware": {"version": device.firmware_version, "url": device.firmware_url},
    });
    let activated = match state.store.snapshot() {
        Ok(data) => data
            .devices
            .get(&device_id)
            .is_some_and(|d| d.client_id == client_id),
        Err(e) => return store_failed(e),
    };
    if !activated && let Some(shared) = &state.shared_token {
        answer["websocket"]["token"] = json!(shared);
        return Json(answer).into_response();
    }
    if !activated && !device.activation {
        tracing::info!(device = %device_id, "OTA: unknown device; activation is off");
        return Json(answer).into_response();
    }
    match state.store.ota(&device_id, &client_id) {
        Ok(OtaGrant::Activated { token }) => {
            answer["websocket"]["token"] = json!(token);
        }
        Ok(OtaGrant::Pending(pending)) => {
            tracing::info!(device = %device_id, code = %pending.code, "OTA: activation pending; approve with `voxloop devices approve {}`", pending.code);
            answer["websocket"]["token"] = json!(pending.token);
            answer["activation"] = json!({
                "code": pending.code,
                "message": super::activation::activation_message(&pending.code),
                "challenge": pending.challenge,
                "timeout_ms": 30_000,
            });
        }
        Err(e) => return store_failed(e),
    }
    Json(answer).into_response()
}

/// `POST {ota_path}activate`: 200 once the device's activation was approved, 202 while it
/// waits, 404 when this device and client have none (the firmware then checks OTA again).
async fn activate_poll(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refusal) = state.guard.check_ip(peer.ip()) {
        return *refusal;
    }
    let Some(device_id) = header(&headers, "device-id") else {
        return refuse(StatusCode::BAD_REQUEST, "the Device-Id header is required");
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let challenge = body["challenge"].as_str();
    match state.store.activate_state(
        &device_id,
        &header(&headers, "client-id").unwrap_or_default(),
        challenge,
    ) {
        Ok(ActivateState::Approved) => {
            Json(json!({"status": "success", "activated": true})).into_response()
        }
        Ok(ActivateState::Waiting) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "waiting", "activated": false})),
        )
            .into_response(),
        Ok(ActivateState::Unknown) => refuse(
            StatusCode::NOT_FOUND,
            "no activation for this device and client; check OTA first",
        ),
        Err(e) => store_failed(e),
    }
}

/// The admin checks of the admin endpoints: a credential with the admin role.
fn admin(
    state: &ServerState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Principal, Box<Response>> {
    let principal = state.guard.admit(Some(peer.ip()), headers, None, None)?;
    if principal.role != Role::Admin {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "device activations need the admin role",
        )));
    }
    Ok(principal)
}

/// `GET {admin_path}`: activated devices (without their tokens) and pending codes.
async fn admin_list(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = admin(&state, peer, &headers) {
        return *refusal;
    }
    match state.store.snapshot() {
        Ok(data) => {
            let devices: Vec<_> = data
                .devices
                .iter()
                .map(|(id, d)| json!({"device_id": id, "client_id": d.client_id, "approved_at": d.approved_at}))
                .collect();
            let pending: Vec<_> = data
                .pending
                .iter()
                .map(
                    |p| json!({"code": p.code, "device_id": p.device_id, "client_id": p.client_id}),
                )
                .collect();
            Json(json!({"status": "success", "devices": devices, "pending": pending}))
                .into_response()
        }
        Err(e) => store_failed(e),
    }
}

/// `POST {admin_path}/approve` `{code}`.
async fn admin_approve(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let principal = match admin(&state, peer, &headers) {
        Ok(p) => p,
        Err(refusal) => return *refusal,
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(code) = body["code"].as_str() else {
        return refuse(StatusCode::BAD_REQUEST, "expected {\"code\": \"123456\"}");
    };
    match state.store.approve(code) {
        Ok(device_id) => {
            tracing::info!(device = %device_id, by = %principal.name, "device activated");
            Json(json!({"status": "success", "device_id": device_id})).into_response()
        }
        Err(e @ StoreError::UnknownCode(_)) => refuse(StatusCode::NOT_FOUND, e),
        Err(e) => store_failed(e),
    }
}

/// `DELETE {admin_path}/{device_id}`.
async fn admin_revoke(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Path(device_id): axum::extract::Path<String>,
) -> Response {
    let principal = match admin(&state, peer, &headers) {
        Ok(p) => p,
        Err(refusal) => return *refusal,
    };
    match state.store.revoke(&device_id) {
        Ok(true) => {
            tracing::info!(device = %device_id, by = %principal.name, "device revoked");
            Json(json!({"status": "success", "device_id": device_id})).into_response()
        }
        Ok(false) => refuse(
            StatusCode::NOT_FOUND,
            format!("device {device_id} is not activated"),
        ),
        Err(e) => store_failed(e),
    }
}

/// Serves [`router`] on `listener` until `shutdown` completes. Sockets get `TCP_NODELAY`: a
/// 60 ms Opus frame or an MCP request is a small write, and Nagle's algorithm would hold it
/// until the previous one is acknowledged (RFC 896; with delayed ACKs, tens of ms).
///
/// # Errors
/// The accept loop's I/O error.
pub fn serve(
    listener: tokio::net::TcpListener,
    config: &Config,
    assistant: Option<Assistant>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
    use axum::serve::ListenerExt as _;
    // The loopback rule of an unprotected server applies to the address actually bound.
    let bind = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.device.bind.clone());
    let store = device_store(&config.device);
    let app = crate::api::Auth::with_device_store(&config.auth, &bind, Some(store.clone()))
        .map(|auth| {
            let guard = Guard::with_auth(auth, &config.server, "device");
            router(config, assistant, guard, store)
                .into_make_service_with_connect_info::<SocketAddr>()
        })
        .map_err(std::io::Error::other);
    async move {
        let app = app?;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    tracing::info!(code, reason, "closing device session");
    let _ = socket.send(close_message(code, reason)).await;
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// One device: the hello, then messages until it leaves, idles out or breaks the protocol.
async fn session(
    mut socket: WebSocket,
    info: DeviceInfo,
    state: Arc<ServerState>,
    session_id: String,
    options: SessionOptions,
) {
    let device = &state.device;
    // The hello must come within `hello_timeout_ms`; WebSocket pings and pongs before it are
    // control frames (RFC 6455 §5.5), not messages, and are passed over.
    let hello_deadline =
        tokio::time::Instant::now() + Duration::from_millis(device.hello_timeout_ms);
    let hello = loop {
        match tokio::time::timeout_at(hello_deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => break other,
        }
    };
    let features = match hello {
        Err(_) => {
            let reason = format!("no hello within {} ms", device.hello_timeout_ms);
            return close(&mut socket, CLOSE_POLICY, &reason).await;
        }
        Ok(None) | Ok(Some(Err(_))) => return,
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
            Ok(DeviceMessage::Hello { features, .. }) => features,
            _ => {
                return close(
                    &mut socket,
                    CLOSE_POLICY,
                    "the first message must be a hello",
                )
                .await;
            }
        },
        Ok(Some(Ok(Message::Binary(_)))) => {
            return close(&mut socket, CLOSE_POLICY, "binary frame before the hello").await;
        }
        Ok(Some(Ok(_))) => {
            return close(
                &mut socket,
                CLOSE_POLICY,
                "the first message must be a hello",
            )
            .await;
        }
    };
    let hello = ServerMessage::Hello {
        transport: "websocket".into(),
        session_id: session_id.clone(),
        audio_params: state.downlink.clone(),
    };
    if socket
        .send(Message::Text(hello.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(
        session = %session_id,
        device = ?info.device_id,
        client = ?info.client_id,
        peer = %info.peer,
        version = info.version.number(),
        mcp = features.mcp,
        "device session started"
    );
    // One writer for everything the session sends: replies, audio frames, pings, the close.
    let (mut sender, mut receiver) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let last = matches!(message, Message::Close(_));
            if sender.send(message).await.is_err() || last {
                break;
            }
        }
    });
    let mut conversation = match &state.assistant {
        Some(assistant) => match DeviceConversation::start(
            assistant.clone(),
            session_id.clone(),
            info.version,
            out.clone(),
            features.mcp,
            SessionOptions {
                tool_events: features.tool_events,
                ..options
            },
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(session = %session_id, error = %e, "device playback setup failed");
                let _ = out
                    .send(close_message(CLOSE_INTERNAL, "audio setup failed"))
                    .await;
                drop(out);
                let _ = writer.await;
                return;
            }
        },
        None => None,
    };
    let alert = |message: String| {
        Message::Text(ServerMessage::alert(&session_id, message).to_json().into())
    };
    // Text messages a second (audio frames are not counted); past the quota they are dropped,
    // with an alert at most once a second.
    let quota =
        std::num::NonZeroU32::new(device.max_messages_per_s).unwrap_or(std::num::NonZeroU32::MIN);
    let messages = governor::RateLimiter::direct(governor::Quota::per_second(quota));
    let mut last_rate_alert: Option<tokio::time::Instant> = None;
    // The idle timeout counts from the device's own last frame (audio, a message, a pong): the
    // server's pings do not keep a silent device's slot.
    let idle = Duration::from_millis(device.idle_timeout_ms);
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(Duration::from_millis(device.ping_interval_ms));
    ping.tick().await;
    let closing = loop {
        let message = tokio::select! {
            m = receiver.next() => Ok(m),
            _ = tokio::time::sleep_until(last_heard + idle) => Err(()),
            _ = ping.tick() => {
                if out.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        if let Ok(Some(Ok(_))) = &message {
            last_heard = tokio::time::Instant::now();
        }
        let message = match message {
            Err(()) => {
                let reason = format!(
                    "idle timeout: nothing from the device for {} ms",
                    device.idle_timeout_ms
                );
                break Some((CLOSE_NORMAL, reason));
            }
            Ok(None) => break None,
            Ok(Some(Err(e))) => {
                // tungstenite refuses an oversized message or frame before reading it, as its
                // `Error::Capacity` ("Space limit exceeded: Message too long: N > MAX"); axum
                // passes it on as text only.
                if e.to_string().contains("Space limit exceeded") {
                    let reason = format!(
                        "message over {} bytes (device.max_message_bytes)",
                        device.max_message_bytes
                    );
                    break Some((CLOSE_TOO_BIG, reason));
                }
                tracing::info!(session = %session_id, error = %e, "device socket failed");
                break None;
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match message {
            Message::Text(text) => text.to_string(),
            Message::Binary(bytes) => match info.version.decode(&bytes) {
                Ok(BinaryFrame::Opus(packet)) => {
                    if let Some(c) = conversation.as_mut()
                        && let Err(e) = c.audio(&packet).await
                        && out.send(alert(e.to_string())).await.is_err()
                    {
                        break None;
                    }
                    continue;
                }
                Ok(BinaryFrame::Json(text)) => text,
                Err(e) => {
                    break Some((
                        CLOSE_INVALID,
                        format!("bad v{} binary frame: {e}", info.version.number()),
                    ));
                }
            },
            Message::Close(_) => break None,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if messages.check().is_err() {
            let now = tokio::time::Instant::now();
            if last_rate_alert.is_none_or(|t| now - t >= Duration::from_secs(1)) {
                last_rate_alert = Some(now);
                tracing::warn!(session = %session_id, "device message flood; dropping");
                let reason = format!(
                    "more than {} messages a second (device.max_messages_per_s): dropped",
                    device.max_messages_per_s
                );
                if out.send(alert(reason)).await.is_err() {
                    break None;
                }
            }
            continue;
        }
        match on_text(&text) {
            Err(e) => {
                if out.send(alert(e)).await.is_err() {
                    break None;
                }
            }
            Ok(message) => {
                if let Some(c) = conversation.as_mut() {
                    match message {
                        DeviceMessage::Listen {
                            state: ListenState::Start,
                            mode,
                            ..
                        } => c.listen_start(mode.unwrap_or_default()),
                        DeviceMessage::Listen {
                            state: ListenState::Stop,
                            ..
                        } => c.listen_stop().await,
                        // The firmware aborts for its wake word before it listens: music is held
                        // for the request, as smart speakers do; any other abort stops it.
                        DeviceMessage::Abort { reason }
                            if reason.as_deref() == Some(WAKE_WORD_ABORT) =>
                        {
                            c.interrupt().await
                        }
                        DeviceMessage::Abort { .. } => c.abort().await,
                        DeviceMessage::Listen {
                            state: ListenState::Detect,
                            text,
                            ..
                        } => c.detect(text.as_deref().unwrap_or_default()).await,
                        DeviceMessage::Mcp { payload } => c.mcp(payload, text.len()).await,
                        DeviceMessage::Hello { .. } => {}
                    }
                }
            }
        }
    };
    if let Some(c) = conversation.as_mut() {
        c.abort().await;
    }
    drop(conversation);
    if let Some((code, reason)) = closing {
        tracing::info!(session = %session_id, code, reason, "closing device session");
        let _ = out.send(close_message(code, &reason)).await;
    }
    drop(out);
    let _ = writer.await;
    tracing::info!(session = %session_id, "device session ended");
}

/// A text message after the hello.
///
/// # Errors
/// What is wrong with it, for an `alert`.
fn on_text(text: &str) -> Result<DeviceMessage, String> {
    serde_json::from_str::<DeviceMessage>(text).map_err(|e| {
        let shown: String = text.chars().take(80).collect();
        format!("not a valid message ({e}): {shown}")
    })
}
