//! The vision endpoint a device's camera tool posts to (`[device] vision_path`, default
//! `/xiaozhi/vision/explain`): the address and bearer token come to the device in device-MCP
//! `initialize` as `capabilities.vision {url, token}` (xiaozhi-esp32 `main/mcp_server.cc`; the
//! PyPI `xiaozhi-sdk` requires them), the request is multipart with a `question` text field and
//! the image as `file` (the firmware's `esp32_camera.cc`, the SDK's `analyze_image`).
//!
//! The answer is `{"success": true, "action": "RESPONSE", "response": TEXT}` from an
//! OpenAI-compatible vision model (`[vision]`); a refusal is `{"success": false, "error",
//! "message"}` with 401 (no live session's token), 400 (no image, not multipart), 413 (over
//! `[vision] max_image_bytes`), 503 (no `[vision] url`) or 502 (the model failed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::device::config::VisionConfig;

/// What the vision endpoint needs: the model's settings, an HTTP client and the tokens given
/// to live sessions.
pub struct Vision {
    config: VisionConfig,
    client: reqwest::Client,
    /// Token -> session id, for the sessions that are open.
    tokens: Mutex<HashMap<String, String>>,
}

/// A session's vision token; forgotten when dropped (the session ended).
pub struct VisionGrant {
    vision: Arc<Vision>,
    /// The bearer token the device presents.
    pub token: String,
}

impl Drop for VisionGrant {
    fn drop(&mut self) {
        self.vision
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.token);
    }
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        axum::Json(json!({"success": false, "error": message, "message": message})),
    )
        .into_response()
}

/// 413: the request is over the image limit.
fn too_large(max_image_bytes: usize) -> Response {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the image is over {max_image_bytes} bytes ([vision] max_image_bytes)"),
    )
}

impl Vision {
    /// The endpoint's state for `config`.
    pub fn new(config: VisionConfig) -> Arc<Self> {
        Arc::new(Self {
            client: reqwest::Client::new(),
            config,
            tokens: Mutex::default(),
        })
    }

    /// The most bytes a request may carry: the image limit and room for the question and the
    /// multipart framing.
    pub fn max_body_bytes(&self) -> usize {
        self.config.max_image_bytes + 64 * 1024
    }

    /// A token for `session`, valid while the grant lives.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn grant(self: &Arc<Self>, session: &str) -> Result<VisionGrant, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let token = format!("vxv_{}", crate::models::hex(&bytes));
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), session.to_string());
        Ok(VisionGrant {
            vision: self.clone(),
            token,
        })
    }

    fn session_of(&self, headers: &HeaderMap) -> Option<String> {
        let credential = crate::api::auth::credential(headers, None)?;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&credential)
            .cloned()
    }

    /// Asks the model `question` about `image` (JPEG or PNG bytes).
    async fn ask(&self, question: &str, image: &[u8], mime: &str) -> Result<String, String> {
        let url = format!("{}/chat/completions", self.config.url.trim_end_matches('/'));
        let data_url = format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(image)
        );
        let body = json!({
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }],
        });
        let mut request = self
            .client
            .post(&url)
            .timeout(Duration::from_millis(self.config.timeout_ms))
            .json(&body);
        if let Some(var) = &self.config.api_key_env {
            let key = std::env::var(var)
                .map_err(|_| format!("[vision] api_key_env: {var} is not set"))?;
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("vision model at {url}: {e}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("vision model at {url}: {e}"))?;
        if !status.is_success() {
            let shown: String = text.chars().take(200).collect();
            return Err(format!(
                "vision model at {url} answered HTTP {status}: {shown}"
            ));
        }
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("vision model at {url} answered no JSON: {e}"))?;
        value["choices"][0]["message"]["content"]
            .as_str()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("vision model at {url} answered no text"))
    }
}

/// `POST {vision_path}`.
pub async fn explain(
    State(vision): State<Arc<Vision>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let Some(session) = vision.session_of(&headers) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "a vision token from an open device session is required (capabilities.vision.token)",
        );
    };
    let mut multipart = match multipart {
        Ok(m) => m,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                format!("expected multipart/form-data with `question` and `file`: {e}"),
            );
        }
    };
    let mut question = None;
    let mut image: Option<(Vec<u8>, String)> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return too_large(vision.config.max_image_bytes);
            }
            Err(e) => return refusal(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")),
        };
        let name = field.name().unwrap_or_default().to_string();
        let mime = field.content_type().unwrap_or("image/jpeg").to_string();
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return too_large(vision.config.max_image_bytes);
            }
            Err(e) => return refusal(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")),
        };
        match name.as_str() {
            "question" => question = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
            "file" | "image" => image = Some((bytes.to_vec(), mime)),
            _ => {}
        }
    }
    let Some((image, mime)) = image.filter(|(b, _)| !b.is_empty()) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "no image: send it as the `file` field",
        );
    };
    if image.len() > vision.config.max_image_bytes {
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the image has {} bytes; at most {} ([vision] max_image_bytes)",
                image.len(),
                vision.config.max_image_bytes
            ),
        );
    }
    if vision.config.url.is_empty() {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "no vision model is configured ([vision] url and model)",
        );
    }
    let question = question
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| "Describe what you see.".into());
    tracing::info!(session = %session, bytes = image.len(), %question, "vision request");
    match vision.ask(&question, &image, &mime).await {
        Ok(answer) => {
            axum::Json(json!({"success": true, "action": "RESPONSE", "response": answer}))
                .into_response()
        }
        Err(e) => {
            tracing::warn!(session = %session, error = %e, "vision request failed");
            refusal(StatusCode::BAD_GATEWAY, e)
        }
    }
}
