//! Device-side MCP (ARCHITECTURE §5): the device is an MCP server reached through the session's
//! WebSocket, JSON-RPC 2.0 inside `{type:"mcp", payload}`. After the hello the server sends
//! `initialize`, `notifications/initialized`, then pages `tools/list` by `nextCursor`; the
//! device's tools (`self.audio_speaker.set_volume {volume}`, `self.get_device_status`, ...) are
//! offered to the LLM as `device_` plus the name with every character the chat API refuses
//! (outside `[a-zA-Z0-9_-]`) made `_`. Calls go out as `tools/call` and fail after
//! `[device] mcp_request_timeout_ms`; a cancelled call is followed by `notifications/cancelled`
//! (MCP spec, "Cancellation"). Notifications from the device (no `id`) are accepted and logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Message;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::protocol::ServerMessage;
use crate::tools::hub::ToolSpec;
use crate::tools::outcome::RouteContext;
use crate::tools::pager::PagerSettings;
use crate::tools::source::{BoxFuture, ToolCallError, ToolSource};

/// The server name device tools report ([`ToolSpec::server`]).
pub const DEVICE_SERVER: &str = "device";
/// Prefix of a device tool's offered name.
pub const DEVICE_PREFIX: &str = "device_";
/// MCP protocol version sent in `initialize` (the one the xiaozhi-esp32 firmware answers with).
pub const PROTOCOL_VERSION: &str = "2024-11-05";

type Reply = Result<Value, DeviceMcpError>;

/// Why a request to a device's MCP server got no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceMcpError {
    /// The device session ended before the answer.
    #[error("the device session has ended")]
    SessionEnded,
    /// No answer within `[device] mcp_request_timeout_ms`.
    #[error(
        "the device did not answer {method} within {timeout_ms} ms (device.mcp_request_timeout_ms)"
    )]
    Timeout {
        /// The JSON-RPC method asked.
        method: String,
        /// The time limit in ms.
        timeout_ms: u64,
    },
    /// The caller cancelled the request (barge-in); `notifications/cancelled` was sent.
    #[error("cancelled")]
    Cancelled,
    /// The device answered with a JSON-RPC error.
    #[error("the device answered with error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// The error's message.
        message: String,
    },
    /// The answer is not what the method returns.
    #[error("the device's {method} answer is malformed: {reason}")]
    Malformed {
        /// The JSON-RPC method asked.
        method: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The MCP client side of one device session. Shared by the session's receive loop (which
/// hands it every `mcp` payload) and its turn task (which makes requests).
pub struct DeviceMcp {
    session_id: String,
    out: mpsc::Sender<Message>,
    timeout: Duration,
    pager: PagerSettings,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
}

impl DeviceMcp {
    /// A client that sends through the session's writer `out`; `timeout` bounds each request;
    /// `pager` limits what a result's resource links may read.
    pub fn new(
        session_id: String,
        out: mpsc::Sender<Message>,
        timeout: Duration,
        pager: PagerSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            session_id,
            out,
            timeout,
            pager,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        })
    }

    async fn send(&self, payload: Value) -> Result<(), DeviceMcpError> {
        let message = ServerMessage::Mcp {
            session_id: self.session_id.clone(),
            payload,
        };
        self.out
            .send(Message::Text(message.to_json().into()))
            .await
            .map_err(|_| DeviceMcpError::SessionEnded)
    }

    /// Sends a request and waits for its response.
    ///
    /// # Errors
    /// [`DeviceMcpError`]: the device's JSON-RPC `error`, no answer within the timeout, the
    /// session ending, or `cancel` (then `notifications/cancelled` is sent).
    pub async fn request(
        &self,
        method: &str,
        params: Value,
        cancel: &CancellationToken,
    ) -> Result<Value, DeviceMcpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let payload = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        if let Err(e) = self.send(payload).await {
            self.forget(id);
            return Err(e);
        }
        let result = tokio::select! {
            r = tokio::time::timeout(self.timeout, rx) => match r {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => Err(DeviceMcpError::SessionEnded),
                Err(_) => Err(DeviceMcpError::Timeout {
                    method: method.to_string(),
                    timeout_ms: self.timeout.as_millis() as u64,
                }),
            },
            _ = cancel.cancelled() => {
                let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                    "params": {"requestId": id, "reason": "barge-in"}});
                let _ = self.send(note).await;
                Err(DeviceMcpError::Cancelled)
            }
        };
        self.forget(id);
        result
    }

    fn forget(&self, id: u64) {
        self.pending.lock().expect("pending lock").remove(&id);
    }

    /// One `mcp` payload from the device: a response completes its request; a notification is
    /// logged; a request (the device asking us) is answered with "method not found" (-32601).
    pub async fn on_payload(&self, payload: Value) {
        let id = payload.get("id").and_then(Value::as_u64);
        let method = payload.get("method").and_then(Value::as_str);
        match (id, method) {
            (Some(id), None) => {
                let reply = match (payload.get("result"), payload.get("error")) {
                    (Some(result), _) => Ok(result.clone()),
                    (None, Some(error)) => Err(DeviceMcpError::Rpc {
                        code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                        message: error
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("(no message)")
                            .to_string(),
                    }),
                    (None, None) => Err(DeviceMcpError::Malformed {
                        method: "a request".into(),
                        reason: "the response has neither result nor error".into(),
                    }),
                };
                let waiter = self.pending.lock().expect("pending lock").remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => {
                        tracing::warn!(session = %self.session_id, id, "device MCP response to no pending request")
                    }
                }
            }
            (None, Some(method)) => {
                tracing::info!(session = %self.session_id, method, "device MCP notification");
            }
            (Some(id), Some(method)) => {
                tracing::info!(session = %self.session_id, method, "device MCP request refused");
                let answer = json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32601, "message": format!("method {method} not found")}});
                let _ = self.send(answer).await;
            }
            (None, None) => {
                tracing::warn!(session = %self.session_id, %payload, "device MCP payload is not JSON-RPC");
            }
        }
    }

    /// `initialize` (with `capabilities.vision {url, token}` when `vision` gives them: where the
    /// device's camera tool posts images, as the firmware and the xiaozhi-sdk expect),
    /// `notifications/initialized`, then `tools/list` page after page (at most `max_pages`).
    /// The tools come back as offered to the LLM.
    ///
    /// # Errors
    /// A request that fails (see [`DeviceMcp::request`]), or [`DeviceMcpError::Malformed`] for a
    /// `tools/list` result without a `tools` array.
    pub async fn discover(
        &self,
        max_pages: u32,
        vision: Option<(&str, &str)>,
    ) -> Result<Vec<ToolSpec>, DeviceMcpError> {
        let never = CancellationToken::new();
        let capabilities = match vision {
            Some((url, token)) => json!({"vision": {"url": url, "token": token}}),
            None => json!({}),
        };
        let params = json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": capabilities,
            "clientInfo": {"name": "voxloop", "version": env!("CARGO_PKG_VERSION")},
        });
        self.request("initialize", params, &never).await?;
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..max_pages {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = self.request("tools/list", params, &never).await?;
            let listed = page.get("tools").and_then(Value::as_array).ok_or_else(|| {
                DeviceMcpError::Malformed {
                    method: "tools/list".into(),
                    reason: "no tools array".into(),
                }
            })?;
            for tool in listed {
                match device_tool(tool) {
                    Some(spec) if tools.iter().any(|t: &ToolSpec| t.name == spec.name) => {
                        tracing::warn!(session = %self.session_id, tool = %spec.tool, "device tool name taken; skipped");
                    }
                    Some(spec) => tools.push(spec),
                    None => {
                        tracing::warn!(session = %self.session_id, %tool, "device tool without a name; skipped")
                    }
                }
            }
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if cursor.is_none() {
                return Ok(tools);
            }
        }
        tracing::warn!(session = %self.session_id, max_pages, "device tools/list still had pages (device.mcp_max_list_pages)");
        Ok(tools)
    }

    /// One `tools/call` on the device, its answer read as a `CallToolResult`.
    async fn call_result(
        &self,
        tool: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, DeviceMcpError> {
        let params = json!({"name": tool, "arguments": arguments});
        let started = std::time::Instant::now();
        let result = self
            .request("tools/call", params, cancel)
            .await
            .inspect_err(|e| {
                tracing::warn!(session = %self.session_id, %tool, error = %e, "device tool call failed");
            })?;
        let result: CallToolResult =
            serde_json::from_value(result).map_err(|e| DeviceMcpError::Malformed {
                method: "tools/call".into(),
                reason: format!("not a CallToolResult: {e}"),
            })?;
        tracing::info!(session = %self.session_id, %tool, ms = started.elapsed().as_millis() as u64, error = result.is_error == Some(true), "device tool call");
        Ok(result)
    }
}

/// The device's tools as a source: calls go over the session's socket; results are routed like
/// an MCP server's, with resource links read through no connection (the device has no
/// resources voxloop reads).
impl ToolSource for DeviceMcp {
    fn name(&self) -> &str {
        DEVICE_SERVER
    }

    fn route_context(&self, cancel: &CancellationToken) -> RouteContext {
        RouteContext {
            connection: None,
            pager: self.pager,
            cancel: cancel.clone(),
        }
    }

    fn call_raw<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<CallToolResult, ToolCallError>> {
        Box::pin(async move {
            self.call_result(tool, arguments, cancel)
                .await
                .map_err(|e| ToolCallError::Source(Box::new(e)))
        })
    }
}

/// The offered name of device tool `name`: `device_` + `name` with characters outside
/// `[a-zA-Z0-9_-]` made `_`, at most 64 characters (the chat API's limit).
pub fn offered_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut offered = format!("{DEVICE_PREFIX}{clean}");
    offered.truncate(64);
    offered
}

fn device_tool(tool: &Value) -> Option<ToolSpec> {
    let name = tool.get("name")?.as_str()?;
    let schema = match tool.get("inputSchema") {
        Some(Value::Object(schema)) => schema.clone(),
        _ => JsonObject::from_iter([("type".to_string(), json!("object"))]),
    };
    Some(ToolSpec {
        name: offered_name(name),
        server: DEVICE_SERVER.into(),
        tool: name.to_string(),
        description: tool
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        input_schema: Arc::new(schema),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_names_fit_the_chat_api() {
        assert_eq!(
            offered_name("self.audio_speaker.set_volume"),
            "device_self_audio_speaker_set_volume"
        );
        let long = offered_name(&"x.".repeat(60));
        assert_eq!(long.len(), 64);
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
    }
}
