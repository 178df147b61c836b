//! The device server's front door (DESIGN §5): the WebSocket endpoint with its checks before the
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

use super::protocol::{
    AudioParams, BinaryFrame, DeviceMessage, ListenState, ProtocolVersion, ServerMessage,
};
use super::session::{Assistant, DeviceConversation};
use crate::api::Guard;
use crate::config::{Config, DeviceConfig};

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
    /// Per-device tokens, for the OTA answer.
    device_tokens: std::collections::BTreeMap<String, String>,
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

/// The device server's routes: the WebSocket endpoint at `device.path` and the OTA endpoint at
/// `device.ota_path`. Each session holds a conversation with `assistant`; without one, sessions
/// answer the protocol only (hello, limits, errors) and ignore audio. Serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(config: &Config, assistant: Option<Assistant>, guard: Arc<Guard>) -> Router {
    let state = Arc::new(ServerState {
        device: config.device.clone(),
        guard,
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        device_tokens: config.auth.device_tokens.clone(),
        downlink: AudioParams {
            format: "opus".into(),
            sample_rate: config.audio.device_rate,
            channels: 1,
            frame_duration: config.audio.device_frame_ms,
        },
        assistant,
    });
    Router::new()
        .route(&config.device.path, get(upgrade))
        .route(&config.device.ota_path, post(ota))
        .with_state(state)
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
                session(socket, info, state, session_id).await;
                drop(slot);
            }
            .instrument(span)
        })
}

/// What the firmware's OTA check expects (xiaozhi-esp32 `docs/`): where the WebSocket server
/// is and with which token, the server time, and the firmware on offer. The token is the one
/// configured for the asking `Device-Id`, if any (a device id is a MAC address and can be
/// spoofed: do not expose this endpoint beyond the devices' network).
async fn ota(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Json<serde_json::Value> {
    let device = &state.device;
    let url = device
        .public_url
        .clone()
        .unwrap_or_else(|| format!("ws://{}{}", device.bind, device.path));
    let token = headers
        .get("device-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|id| state.device_tokens.get(id))
        .cloned()
        .unwrap_or_default();
    let now = chrono::Local::now();
    Json(json!({
        "websocket": {"url": url, "token": token},
        "server_time": {
            "timestamp": now.timestamp_millis(),
            "timezone_offset": now.offset().local_minus_utc() / 60,
        },
        "firmware": {"version": device.firmware_version, "url": device.firmware_url},
    }))
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
    let app = Guard::new(&config.auth, &config.server, &bind, "device")
        .map(|guard| {
            router(config, assistant, guard).into_make_service_with_connect_info::<SocketAddr>()
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
) {
    let device = &state.device;
    let hello_timeout = Duration::from_millis(device.hello_timeout_ms);
    let hello = tokio::time::timeout(hello_timeout, socket.recv()).await;
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
        Message::Text(
            ServerMessage::Alert {
                session_id: session_id.clone(),
                status: "error".into(),
                message,
                emotion: "confused".into(),
            }
            .to_json()
            .into(),
        )
    };
    let idle = Duration::from_millis(device.idle_timeout_ms);
    let mut ping = tokio::time::interval(Duration::from_millis(device.ping_interval_ms));
    ping.tick().await;
    let closing = loop {
        let message = tokio::select! {
            m = tokio::time::timeout(idle, receiver.next()) => m,
            _ = ping.tick() => {
                if out.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        let message = match message {
            Err(_) => break Some((CLOSE_NORMAL, "idle timeout".to_string())),
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
                        && out.send(alert(e)).await.is_err()
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
                        DeviceMessage::Abort { .. } => c.abort().await,
                        DeviceMessage::Listen {
                            state: ListenState::Detect,
                            text,
                            ..
                        } => c.detect(text.as_deref().unwrap_or_default()).await,
                        DeviceMessage::Mcp { payload } => c.mcp(payload).await,
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
