//! `voxloop duplex serve`: the PersonaPlex reference server's REST and WebSocket API (ARCHITECTURE §6).
//!
//! - `GET /health`, `GET /api/gpu/status`, `POST /api/gpu/offload`, `POST /api/gpu/release`,
//!   `GET /api/voices`, `GET /api/prompts`: JSON.
//! - `POST /api/offline`: multipart form with `file` (audio, any format and rate the decoder
//!   reads) and optional `voice_prompt`, `text_prompt`, `seed`; answers `audio/wav` (24 kHz mono
//!   16-bit, as long as the input; the part's `Content-Type` names the format, else it is
//!   sniffed) with the text in the `X-Text-Output` header (a JSON string)
//!   and `X-Processing-Time` (seconds). Errors are JSON `{status: "error", error}`.
//! - WebSocket `/api/chat?voice_prompt=&text_prompt=&seed=`: binary messages, first byte the
//!   kind: server `0x00` once the system prompts ran; both ways `0x01` + the next bytes of an
//!   Ogg/Opus stream (24 kHz mono from the server); server `0x02` + UTF-8 text as the model says
//!   it; server `0x05` + an error message before closing (moshi `rust/protocol.md`: `0x03` is a
//!   control message, `0x05` an error; the official web client's `encoder.ts` reads them so). A second conversation while one runs
//!   is closed with code 1013 "busy" (one conversation per model instance).
//!
//! Every route but `/health` is behind the [`Guard`] (credentials, rate limits, origin; see
//! [`crate::api`]); `/api/gpu/offload` and `/api/gpu/release` are admin-only (403 for a user).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::service::{ChatEvent, Duplex, failure, success, wav_bytes};
use super::{DuplexError, FRAME_SAMPLES, SAMPLE_RATE};
use crate::api::Guard;
use crate::audio::oggopus::{OggOpusReader, OggOpusWriter};

/// Message kinds of `/api/chat` (first byte of each binary message).
pub mod kind {
    /// Server: the conversation is ready.
    pub const READY: u8 = 0x00;
    /// Both ways: Ogg/Opus bytes.
    pub const AUDIO: u8 = 0x01;
    /// Server: text the model says.
    pub const TEXT: u8 = 0x02;
    /// Server: an error message, before the socket closes (moshi's protocol; `0x03` is its
    /// control message, `0x04` metadata).
    pub const ERROR: u8 = 0x05;
}

/// WebSocket close code "try again later" (IANA WebSocket close code registry, 1013): another
/// conversation holds the model.
pub const CLOSE_BUSY: u16 = 1013;
/// Close code for a policy violation, e.g. an unknown voice (RFC 6455 §7.4.1, 1008).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for data that cannot be decoded (RFC 6455 §7.4.1, 1007).
pub const CLOSE_BAD_DATA: u16 = 1007;
/// Close code for a server-side failure (RFC 6455 §7.4.1, 1011).
pub const CLOSE_ERROR: u16 = 1011;

/// Opus packet length the server writes, ms.
const OPUS_FRAME_MS: u32 = 20;

#[derive(Clone)]
struct AppState {
    duplex: Arc<Duplex>,
}

/// The routes. `max_upload_bytes` bounds `/api/offline` bodies; `guard` admits callers.
/// Serve with `into_make_service_with_connect_info::<SocketAddr>()` (per-IP rate limits).
pub fn router(duplex: Arc<Duplex>, max_upload_bytes: usize, guard: Arc<Guard>) -> Router {
    use axum::middleware::from_fn_with_state;
    let admin = Router::new()
        .route("/api/gpu/offload", post(offload))
        .route("/api/gpu/release", post(release))
        .layer(from_fn_with_state(guard.clone(), crate::api::admin_only));
    let open = Router::new().route("/health", get(health));
    Router::new()
        .merge(admin)
        .route("/api/gpu/status", get(gpu_status))
        .route("/api/voices", get(voices))
        .route("/api/prompts", get(prompts))
        .route(
            "/api/offline",
            post(offline).layer(DefaultBodyLimit::max(max_upload_bytes)),
        )
        .route("/api/chat", get(chat))
        .layer(from_fn_with_state(guard, crate::api::guard))
        .merge(open)
        .with_state(AppState { duplex })
}

/// An HTTP status for an error: the caller's fault (400), busy (409), no model (503), else 500.
fn status_of(e: &DuplexError) -> StatusCode {
    match e {
        DuplexError::Audio(_) | DuplexError::UnknownVoice(_) | DuplexError::BadTimeout(_) => {
            StatusCode::BAD_REQUEST
        }
        DuplexError::Config { key, .. } if *key == "seed" => StatusCode::BAD_REQUEST,
        DuplexError::Busy => StatusCode::CONFLICT,
        DuplexError::NoModelDir | DuplexError::MissingFile(_) | DuplexError::Load { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(status: StatusCode, error: impl std::fmt::Display) -> Response {
    (status, Json(failure(error))).into_response()
}

async fn health(State(app): State<AppState>) -> Json<Value> {
    let mut health = json!({"status": "healthy"});
    if let (Some(out), Value::Object(fields)) = (health.as_object_mut(), app.duplex.health()) {
        out.extend(fields);
    }
    Json(health)
}

async fn gpu_status(State(app): State<AppState>) -> Json<Value> {
    Json(json!(app.duplex.manager().status()))
}

async fn offload(State(app): State<AppState>) -> Response {
    match app.duplex.manager().offload().await {
        Ok(location) => Json(success(json!({"location": location}))).into_response(),
        Err(e) => error_response(status_of(&e), e),
    }
}

async fn release(State(app): State<AppState>) -> Response {
    match app.duplex.manager().release().await {
        Ok(released) => Json(success(json!({"released": released}))).into_response(),
        Err(e) => error_response(status_of(&e), e),
    }
}

async fn voices() -> Json<Value> {
    Json(json!({"voices": super::voices()}))
}

async fn prompts() -> Json<Value> {
    Json(json!({"prompts": super::prompt_examples()}))
}

/// A `seed` form field or query parameter: absent or empty is `None`.
fn parse_seed(value: Option<&String>) -> Result<Option<i64>, String> {
    match value.map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("`seed` must be an integer, got {s:?}")),
    }
}

/// `X-Text-Output`: the text as a JSON string with every non-ASCII character escaped (header
/// values are visible ASCII).
fn ascii_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in serde_json::to_string(text)
        .unwrap_or_else(|_| "\"\"".into())
        .chars()
    {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

async fn offline(State(app): State<AppState>, mut form: Multipart) -> Response {
    let mut audio: Option<(axum::body::Bytes, String)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return error_response(e.status(), format!("bad multipart body: {e}")),
        };
        let name = field.name().unwrap_or_default().to_string();
        let mime = field
            .content_type()
            .unwrap_or("application/octet-stream")
            .to_string();
        let data = match field.bytes().await {
            Ok(data) => data,
            Err(e) => {
                return error_response(e.status(), format!("bad multipart field {name:?}: {e}"));
            }
        };
        if name == "file" {
            audio = Some((data, mime));
        } else {
            fields.insert(name, String::from_utf8_lossy(&data).into_owned());
        }
    }
    let Some((audio, mime)) = audio else {
        return error_response(StatusCode::BAD_REQUEST, "no `file` field with the audio");
    };
    let seed = match parse_seed(fields.get("seed")) {
        Ok(seed) => seed,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
    };
    let prompt = match app.duplex.prompt(
        fields.get("voice_prompt").map(String::as_str),
        fields.get("text_prompt").map(String::as_str),
        seed,
    ) {
        Ok(prompt) => prompt,
        Err(e) => return error_response(status_of(&e), e),
    };
    let reply = match app.duplex.process_encoded(audio, mime, prompt).await {
        Ok(reply) => reply,
        Err(e) => return error_response(status_of(&e), e),
    };
    let mut response = wav_bytes(&reply.pcm).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/wav"));
    if let Ok(text) = HeaderValue::from_str(&ascii_json(&reply.text)) {
        headers.insert("x-text-output", text);
    }
    if let Ok(time) = HeaderValue::from_str(&format!("{:.3}", reply.processing_time)) {
        headers.insert("x-processing-time", time);
    }
    response
}

async fn chat(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| async move {
        let _active = crate::metrics::get().session("duplex_chat");
        conversation(socket, app.duplex, query).await;
    })
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    tracing::info!(code, reason, "closing duplex chat");
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Sends `0x05` + the message, then closes with `code`.
async fn fail(socket: &mut WebSocket, code: u16, error: &str) {
    let mut message = vec![kind::ERROR];
    message.extend_from_slice(error.as_bytes());
    let _ = socket.send(Message::Binary(message.into())).await;
    // A close reason is at most 123 bytes (RFC 6455 §5.5).
    let reason: String = error.chars().take(100).collect();
    close(socket, code, &reason).await;
}

/// One conversation over `/api/chat`.
async fn conversation(mut socket: WebSocket, duplex: Arc<Duplex>, query: HashMap<String, String>) {
    let seed = match parse_seed(query.get("seed")) {
        Ok(seed) => seed,
        Err(why) => return fail(&mut socket, CLOSE_POLICY, &why).await,
    };
    let prompt = match duplex.prompt(
        query.get("voice_prompt").map(String::as_str),
        query.get("text_prompt").map(String::as_str),
        seed,
    ) {
        Ok(prompt) => prompt,
        Err(e) => return fail(&mut socket, CLOSE_POLICY, &e.to_string()).await,
    };
    let mut chat = match duplex.chat(prompt).await {
        Ok(Some(chat)) => chat,
        Ok(None) => return close(&mut socket, CLOSE_BUSY, "busy").await,
        Err(e) => return fail(&mut socket, CLOSE_ERROR, &e.to_string()).await,
    };
    let mut reader = OggOpusReader::new(SAMPLE_RATE);
    let mut writer = match OggOpusWriter::new(SAMPLE_RATE, OPUS_FRAME_MS) {
        Ok(w) => w,
        Err(e) => return fail(&mut socket, CLOSE_ERROR, &e.to_string()).await,
    };
    // The user's audio cut into model frames, waiting for room in the model's queue.
    let mut heard: Vec<f32> = Vec::new();
    let mut queued: VecDeque<Vec<f32>> = VecDeque::new();
    loop {
        tokio::select! {
            permit = chat.frames.reserve(), if !queued.is_empty() => {
                let Ok(permit) = permit else { break };
                permit.send(queued.pop_front().expect("not empty"));
            }
            // Stop reading while frames wait: the client's sends back up (TCP back-pressure).
            message = socket.recv(), if queued.is_empty() => {
                let data = match message {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                if data.first() != Some(&kind::AUDIO) {
                    continue;
                }
                match reader.push(&data[1..]) {
                    Ok(pcm) => heard.extend(pcm),
                    Err(e) => {
                        return fail(&mut socket, CLOSE_BAD_DATA, &e.to_string()).await;
                    }
                }
                while heard.len() >= FRAME_SAMPLES {
                    queued.push_back(heard.drain(..FRAME_SAMPLES).collect());
                }
            }
            event = chat.events.recv() => {
                let sent = match event {
                    Some(ChatEvent::Ready) => {
                        socket.send(Message::Binary(vec![kind::READY].into())).await
                    }
                    Some(ChatEvent::Step(out)) => {
                        let pages = match writer.push(&out.pcm) {
                            Ok(pages) => pages,
                            Err(e) => return fail(&mut socket, CLOSE_ERROR, &e.to_string()).await,
                        };
                        let mut sent = Ok(());
                        if !pages.is_empty() {
                            let mut message = vec![kind::AUDIO];
                            message.extend(pages);
                            sent = socket.send(Message::Binary(message.into())).await;
                        }
                        if sent.is_ok() && !out.text.is_empty() {
                            let mut message = vec![kind::TEXT];
                            message.extend(out.text.as_bytes());
                            sent = socket.send(Message::Binary(message.into())).await;
                        }
                        sent
                    }
                    Some(ChatEvent::Failed(e)) => {
                        let e = duplex.after_failure(e).await;
                        return fail(&mut socket, CLOSE_ERROR, &e.to_string()).await;
                    }
                    None => break,
                };
                if sent.is_err() {
                    break;
                }
            }
        }
    }
    if reader.corrupt_packets + reader.corrupt_pages > 0 {
        tracing::warn!(
            packets = reader.corrupt_packets,
            pages = reader.corrupt_pages,
            "duplex chat: skipped corrupt Opus packets and Ogg pages"
        );
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// Serves [`router`] on `listener` until `shutdown` completes.
///
/// # Errors
/// The accept loop's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    duplex: Arc<Duplex>,
    max_upload_bytes: usize,
    guard: Arc<Guard>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(duplex, max_upload_bytes, guard)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_is_ascii_json() {
        let header = ascii_json("hé \"there\" 🎵");
        assert!(header.is_ascii());
        assert_eq!(
            serde_json::from_str::<String>(&header).unwrap(),
            "hé \"there\" 🎵"
        );
    }
}
