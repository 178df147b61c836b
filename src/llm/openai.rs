//! The OpenAI-compatible streaming client: `POST {url}/chat/completions` with `"stream": true`,
//! the answer read as server-sent events (`data: {chunk}` lines, `data: [DONE]` at the end).
//!
//! Text arrives in `choices[0].delta.content`; tool calls in `choices[0].delta.tool_calls[]`,
//! each identified by `index`, its `id` and `function.name` in the first piece and
//! `function.arguments` split over any number of pieces. Connection errors, 429 and 5xx are
//! retried with backoff (a `Retry-After` in seconds is honoured) before any output; 401, 403 and
//! 404 fail at once with an error naming the endpoint and model.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ChatMessage, FunctionTools, LlmError, LlmEvent, Role, ToolCallRequest, Usage};
use crate::llm::config::LlmConfig;

/// A client for one endpoint and model.
#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    config: LlmConfig,
    /// Upstream `llm`: opens after consecutive failed requests, then requests fail fast.
    breaker: crate::breaker::Breaker,
}

pub use super::LlmStream;

/// The wire form of the messages.
fn wire_messages(messages: &[ChatMessage]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut wire = json!({"role": m.role, "content": m.content});
            if !m.tool_calls.is_empty() {
                if m.content.is_empty() {
                    wire["content"] = Value::Null;
                }
                wire["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
            }
            if let (Role::Tool, Some(id)) = (m.role, &m.tool_call_id) {
                wire["tool_call_id"] = json!(id);
            }
            wire
        })
        .collect()
}

impl OpenAiClient {
    /// A client for `config` (`[llm]`).
    pub fn new(config: &LlmConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .expect("a plain HTTP client builds");
        Self {
            http,
            config: config.clone(),
            breaker: crate::breaker::Breaker::new("llm", &Default::default()),
        }
    }

    /// The same client behind a circuit breaker of `config` (`[breaker]`; the default one
    /// otherwise).
    pub fn with_breaker(mut self, config: &crate::breaker::BreakerConfig) -> Self {
        self.breaker = crate::breaker::Breaker::new("llm", config);
        self
    }

    /// Its circuit breaker.
    pub fn breaker(&self) -> &crate::breaker::Breaker {
        &self.breaker
    }

    /// The endpoint and model, for logs.
    pub fn describe(&self) -> String {
        format!("{} model {:?}", self.config.url, self.config.model)
    }

    fn url(&self) -> String {
        format!("{}/chat/completions", self.config.url.trim_end_matches('/'))
    }

    /// Starts a completion of `messages`, offering `tools`. Returns once the endpoint has
    /// accepted the request; the reply streams through the receiver. Cancelling `cancel` (or
    /// dropping the receiver) closes the connection.
    ///
    /// # Errors
    /// [`LlmError`] when the request cannot be made or is refused (after retries);
    /// [`LlmError::Unavailable`] at once while the circuit breaker is open (requests that could
    /// not reach the endpoint, timed out or got a 5xx open it).
    pub async fn stream(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
        cancel: &CancellationToken,
    ) -> Result<LlmStream, LlmError> {
        self.breaker
            .permit()
            .map_err(|open| LlmError::Unavailable(open.to_string()))?;
        let result = self.start(messages, tools, cancel).await;
        match &result {
            Ok(_) => self.breaker.success(),
            Err(
                LlmError::Unreachable { .. }
                | LlmError::Timeout { .. }
                | LlmError::Malformed { .. }
                | LlmError::Status {
                    status: 429 | 500..=599,
                    ..
                },
            ) if !cancel.is_cancelled() => self.breaker.failure(),
            Err(_) => {}
        }
        result
    }

    async fn start(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
        cancel: &CancellationToken,
    ) -> Result<LlmStream, LlmError> {
        let url = self.url();
        let mut body = json!({
            "model": self.config.model,
            "messages": wire_messages(messages),
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        });
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools.to_vec());
        }
        let key = match &self.config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| LlmError::MissingKey(var.clone()))?),
            None => None,
        };
        let mut attempt = 0;
        let response = loop {
            let mut request = self.http.post(&url).json(&body);
            if let Some(key) = &key {
                request = request.bearer_auth(key);
            }
            let timeout = Duration::from_millis(self.config.timeout_ms);
            let sent = tokio::select! {
                r = tokio::time::timeout(timeout, request.send()) => r,
                _ = cancel.cancelled() => return Err(LlmError::Unreachable { url, reason: "cancelled".into() }),
            };
            let retry_after = |attempt: u32| {
                Duration::from_millis(self.config.retry_backoff_ms)
                    .saturating_mul(1 << attempt.min(10))
            };
            let (wait, error) = match sent {
                Err(_) => (
                    retry_after(attempt),
                    LlmError::Timeout {
                        url: url.clone(),
                        timeout_ms: self.config.timeout_ms,
                    },
                ),
                Ok(Err(e)) => (
                    retry_after(attempt),
                    LlmError::Unreachable {
                        url: url.clone(),
                        reason: e.to_string(),
                    },
                ),
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status.is_success() {
                        break response;
                    }
                    let header_wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let code = status.as_u16();
                    let body: String = response
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    let model = self.config.model.clone();
                    match code {
                        401 | 403 => {
                            return Err(LlmError::Unauthorized {
                                url,
                                model,
                                status: code,
                            });
                        }
                        404 => return Err(LlmError::NotFound { url, model, body }),
                        429 | 500..=599 => (
                            header_wait.unwrap_or(retry_after(attempt)),
                            LlmError::Status {
                                url: url.clone(),
                                model,
                                status: code,
                                body,
                            },
                        ),
                        _ => {
                            return Err(LlmError::Status {
                                url,
                                model,
                                status: code,
                                body,
                            });
                        }
                    }
                }
            };
            if attempt >= self.config.retries {
                return Err(error);
            }
            tracing::warn!(%url, attempt, error = %error, wait_ms = wait.as_millis() as u64, "LLM request failed; retrying");
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Err(error),
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let idle = Duration::from_millis(self.config.timeout_ms);
        let token = cancel.clone();
        tokio::spawn(async move {
            let result = read_events(response, &tx, idle, &token, &url).await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }
}

/// Tool call pieces gathered by `index`.
#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

async fn read_events(
    response: reqwest::Response,
    tx: &mpsc::Sender<Result<LlmEvent, LlmError>>,
    idle: Duration,
    cancel: &CancellationToken,
    url: &str,
) -> Result<(), LlmError> {
    let malformed = |reason: String| LlmError::Malformed {
        url: url.to_string(),
        reason,
    };
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut calls: BTreeMap<u64, PartialCall> = BTreeMap::new();
    let (mut finish_reason, mut usage) = (None::<String>, None::<Usage>);
    loop {
        let chunk = tokio::select! {
            c = tokio::time::timeout(idle, body.next()) => c,
            _ = cancel.cancelled() => return Ok(()),
        };
        let chunk = match chunk {
            Err(_) => {
                return Err(LlmError::Timeout {
                    url: url.to_string(),
                    timeout_ms: idle.as_millis() as u64,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(LlmError::Unreachable {
                    url: url.to_string(),
                    reason: e.to_string(),
                });
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return finish(tx, calls, finish_reason, usage).await;
            }
            let value: Value =
                serde_json::from_str(data).map_err(|e| malformed(format!("{e} in {data:?}")))?;
            if let Some(error) = value.get("error") {
                return Err(malformed(format!("error event: {error}")));
            }
            if let Some(u) = value.get("usage").filter(|u| !u.is_null()) {
                usage = serde_json::from_value(u.clone()).ok();
            }
            let Some(choice) = value.get("choices").and_then(|c| c.get(0)) else {
                continue;
            };
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                finish_reason = Some(reason.to_string());
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if let Some(text) = delta.get("content").and_then(Value::as_str)
                && !text.is_empty()
                && tx.send(Ok(LlmEvent::Text(text.to_string()))).await.is_err()
            {
                return Ok(());
            }
            for piece in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = piece.get("index").and_then(Value::as_u64).unwrap_or(0);
                let call = calls.entry(index).or_default();
                if let Some(id) = piece.get("id").and_then(Value::as_str) {
                    call.id = id.to_string();
                }
                if let Some(function) = piece.get("function") {
                    if let Some(name) = function.get("name").and_then(Value::as_str) {
                        call.name.push_str(name);
                    }
                    if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                        call.arguments.push_str(arguments);
                    }
                }
            }
        }
    }
    // The connection closed without [DONE]: what arrived is the answer if it was complete.
    if finish_reason.is_none() {
        return Err(malformed(
            "the stream ended before the model finished".into(),
        ));
    }
    finish(tx, calls, finish_reason, usage).await
}

async fn finish(
    tx: &mpsc::Sender<Result<LlmEvent, LlmError>>,
    calls: BTreeMap<u64, PartialCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
) -> Result<(), LlmError> {
    for (index, call) in calls {
        let id = if call.id.is_empty() {
            format!("call_{index}")
        } else {
            call.id
        };
        let arguments = if call.arguments.trim().is_empty() {
            "{}".to_string()
        } else {
            call.arguments
        };
        let _ = tx
            .send(Ok(LlmEvent::ToolCall(ToolCallRequest {
                id,
                name: call.name,
                arguments,
            })))
            .await;
    }
    let finish_reason = finish_reason.unwrap_or_else(|| "stop".into());
    if let Some(u) = usage {
        crate::metrics::get().llm_tokens(u.prompt_tokens, u.completion_tokens);
    }
    let _ = tx
        .send(Ok(LlmEvent::Done {
            finish_reason,
            usage,
        }))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_take_the_wire_form() {
        let mut assistant = ChatMessage::new(Role::Assistant, "");
        assistant.tool_calls.push(ToolCallRequest {
            id: "c1".into(),
            name: "musicPlayer".into(),
            arguments: "{}".into(),
        });
        let wire = wire_messages(&[
            ChatMessage::new(Role::User, "hi"),
            assistant,
            ChatMessage::tool("c1", "ok"),
        ]);
        assert_eq!(wire[0], json!({"role": "user", "content": "hi"}));
        assert_eq!(wire[1]["content"], Value::Null);
        assert_eq!(wire[1]["tool_calls"][0]["function"]["name"], "musicPlayer");
        assert_eq!(
            wire[2],
            json!({"role": "tool", "content": "ok", "tool_call_id": "c1"})
        );
    }
}
