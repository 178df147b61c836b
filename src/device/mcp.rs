//! Device-side MCP (ARCHITECTURE §5): the device is an MCP server reached through the session's
//! WebSocket, JSON-RPC 2.0 inside `{type:"mcp", payload}`. The client is rmcp's, over a
//! transport made of the session's messages ([`DeviceMcp::on_payload`] in, the session's writer
//! out): after the hello it sends `initialize` (protocol version 2024-11-05, the one the
//! xiaozhi-esp32 firmware answers with), `notifications/initialized`, then pages `tools/list`
//! by `nextCursor`; the device's tools (`self.audio_speaker.set_volume {volume}`,
//! `self.get_device_status`, ...) are offered to the LLM as `device_` plus the name with every
//! character the chat API refuses (outside `[a-zA-Z0-9_-]`) made `_`. Calls go out as
//! `tools/call` and fail after `[device] mcp_request_timeout_ms`; a cancelled or timed-out
//! call is followed by `notifications/cancelled` (MCP spec, "Cancellation"). The device's own
//! requests (`ping`) and notifications are handled by rmcp.
//!
//! One thing rmcp's typed client cannot say: the firmware (and the xiaozhi-sdk) read where to
//! post camera images from a non-standard `capabilities.vision {url, token}` in `initialize`
//! (the firmware's `mcp_server.cc`). The transport adds it to the `initialize` it carries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Message;
use rmcp::ServiceExt as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ClientJsonRpcMessage,
    Implementation, JsonObject, PaginatedRequestParams, ProtocolVersion, ServerJsonRpcMessage,
};
use rmcp::service::{ClientInitializeError, RoleClient, RunningService, ServiceError};
use rmcp::transport::Transport;
use serde_json::{Value, json};
use tokio::sync::{OnceCell, mpsc};
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

/// Messages from the device waiting for the client (a burst of `tools/list` pages and
/// notifications); past it a device's messages are dropped, so the session's receive loop
/// never waits on MCP.
const INCOMING_CAPACITY: usize = 64;

/// Why a request to a device's MCP server got no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceMcpError {
    /// The device session ended before the answer (or before the client started).
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

/// What one device's MCP server may offer (`[device] mcp_max_tools`, `mcp_max_tool_bytes`,
/// `mcp_max_session_bytes`): past each, the device gets an `alert` and the excess is left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McpCaps {
    /// Most tools offered.
    pub max_tools: usize,
    /// Largest tool, in bytes of its JSON.
    pub max_tool_bytes: usize,
    /// Most bytes of MCP messages in a session; past it the tools are off.
    pub max_session_bytes: u64,
}

/// The MCP client side of one device session. Shared by the session's receive loop (which
/// hands it every `mcp` payload) and its turn task (which lists and calls the tools).
pub struct DeviceMcp {
    session_id: String,
    timeout: Duration,
    pager: PagerSettings,
    caps: McpCaps,
    /// The session's writer, for alerts.
    out: mpsc::Sender<Message>,
    /// Bytes of MCP messages the device has sent.
    received: AtomicU64,
    /// Set once the device went past `caps.max_session_bytes`: its messages are ignored.
    off: AtomicBool,
    incoming: mpsc::Sender<ServerJsonRpcMessage>,
    /// The transport until [`DeviceMcp::discover`] starts the client on it.
    transport: Mutex<Option<DeviceTransport>>,
    client: OnceCell<RunningService<RoleClient, ClientConfig>>,
}

/// The session's messages as an rmcp transport: JSON-RPC out as `{type:"mcp", payload}` text
/// frames on the session's writer, in from [`DeviceMcp::on_payload`].
struct DeviceTransport {
    session_id: String,
    out: mpsc::Sender<Message>,
    incoming: mpsc::Receiver<ServerJsonRpcMessage>,
    /// `capabilities.vision {url, token}` for the `initialize` request.
    vision: Option<Value>,
}

impl Transport<RoleClient> for DeviceTransport {
    type Error = DeviceMcpError;

    fn send(
        &mut self,
        item: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), DeviceMcpError>> + Send + 'static {
        let mut payload = serde_json::to_value(&item).unwrap_or(Value::Null);
        if payload["method"] == "initialize"
            && let (Some(vision), Some(capabilities)) = (
                &self.vision,
                payload["params"]["capabilities"].as_object_mut(),
            )
        {
            capabilities.insert("vision".into(), vision.clone());
        }
        let message = ServerMessage::Mcp {
            session_id: self.session_id.clone(),
            payload,
        };
        let out = self.out.clone();
        async move {
            out.send(Message::Text(message.to_json().into()))
                .await
                .map_err(|_| DeviceMcpError::SessionEnded)
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<ServerJsonRpcMessage>> + Send {
        self.incoming.recv()
    }

    async fn close(&mut self) -> Result<(), DeviceMcpError> {
        self.incoming.close();
        Ok(())
    }
}

impl DeviceMcp {
    /// A client that sends through the session's writer `out`; `timeout` bounds each request;
    /// `pager` limits what a result's resource links may read; `caps` what the device may offer.
    /// Nothing is sent until [`DeviceMcp::discover`].
    pub fn new(
        session_id: String,
        out: mpsc::Sender<Message>,
        timeout: Duration,
        pager: PagerSettings,
        caps: McpCaps,
    ) -> Arc<Self> {
        let (incoming, rx) = mpsc::channel(INCOMING_CAPACITY);
        Arc::new(Self {
            transport: Mutex::new(Some(DeviceTransport {
                session_id: session_id.clone(),
                out: out.clone(),
                incoming: rx,
                vision: None,
            })),
            session_id,
            timeout,
            pager,
            caps,
            out,
            received: AtomicU64::new(0),
            off: AtomicBool::new(false),
            incoming,
            client: OnceCell::new(),
        })
    }

    /// One `mcp` payload from the device (`bytes`: the size of the message that carried it),
    /// handed to the client: a response completes its request, a request (`ping`) is answered,
    /// a notification is taken. A payload that is not JSON-RPC is logged and dropped (a request
    /// it answered then times out). Past `caps.max_session_bytes` the client is stopped (its
    /// requests fail, the device's tools are off) and the device gets an `alert`.
    pub fn on_payload(&self, payload: Value, bytes: usize) {
        if self.off.load(Ordering::Relaxed) {
            return;
        }
        let received = self.received.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        if received > self.caps.max_session_bytes {
            self.off.store(true, Ordering::Relaxed);
            if let Some(client) = self.client.get() {
                client.cancellation_token().cancel();
            }
            tracing::warn!(session = %self.session_id, received, "device MCP over its byte cap; its tools are off");
            self.alert(format!(
                "your MCP messages passed {} bytes (device.mcp_max_session_bytes): your tools are off for this session",
                self.caps.max_session_bytes
            ));
            return;
        }
        match serde_json::from_value::<ServerJsonRpcMessage>(payload) {
            Ok(message) => match self.incoming.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(session = %self.session_id, capacity = INCOMING_CAPACITY, "device MCP messages arrive faster than they are read; dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::debug!(session = %self.session_id, "device MCP message after the client ended")
                }
            },
            Err(e) => {
                tracing::warn!(session = %self.session_id, error = %e, "device MCP payload is not JSON-RPC; dropped")
            }
        }
    }

    /// Starts the client: `initialize` (with `capabilities.vision {url, token}` when `vision`
    /// gives them: where the device's camera tool posts images, as the firmware and the
    /// xiaozhi-sdk expect), `notifications/initialized`, then `tools/list` page after page (at
    /// most `max_pages`). The tools come back as offered to the LLM. Runs once a session.
    ///
    /// # Errors
    /// [`DeviceMcpError`]: no answer within the timeout, a JSON-RPC error, an answer that is
    /// not `initialize`'s or `tools/list`'s result, the session ending, or a second call.
    pub async fn discover(
        &self,
        max_pages: u32,
        vision: Option<(&str, &str)>,
    ) -> Result<Vec<ToolSpec>, DeviceMcpError> {
        let mut transport = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(DeviceMcpError::SessionEnded)?;
        transport.vision = vision.map(|(url, token)| json!({"url": url, "token": token}));
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("voxloop", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::V_2024_11_05);
        let client = tokio::time::timeout(self.timeout, info.serve(transport))
            .await
            .map_err(|_| self.timed_out("initialize"))?
            .map_err(initialize_error)?;
        let client = self.client.get_or_init(|| async move { client }).await;
        let mut tools = Vec::new();
        let (mut too_large, mut too_many) = (0usize, 0usize);
        let mut cursor: Option<String> = None;
        for _ in 0..max_pages {
            let params = PaginatedRequestParams::default().with_cursor(cursor.take());
            let page = tokio::time::timeout(self.timeout, client.list_tools(Some(params)))
                .await
                .map_err(|_| self.timed_out("tools/list"))?
                .map_err(|e| service_error("tools/list", e))?;
            for tool in page.tools {
                if serde_json::to_vec(&tool).map_or(usize::MAX, |j| j.len())
                    > self.caps.max_tool_bytes
                {
                    too_large += 1;
                    continue;
                }
                if tools.len() == self.caps.max_tools {
                    too_many += 1;
                    continue;
                }
                let spec = device_tool(tool);
                if tools.iter().any(|t: &ToolSpec| t.name == spec.name) {
                    tracing::warn!(session = %self.session_id, tool = %spec.tool, "device tool name taken; skipped");
                } else {
                    tools.push(spec);
                }
            }
            cursor = page.next_cursor.filter(|c| !c.is_empty());
            if cursor.is_none() || too_many > 0 {
                break;
            }
        }
        if cursor.is_some() && too_many == 0 {
            tracing::warn!(session = %self.session_id, max_pages, "device tools/list still had pages (device.mcp_max_list_pages)");
        }
        if too_many > 0 {
            self.alert(format!(
                "you offer more than {} tools (device.mcp_max_tools): the first {} are used",
                self.caps.max_tools, self.caps.max_tools
            ));
        }
        if too_large > 0 {
            self.alert(format!(
                "{too_large} of your tools are over {} bytes (device.mcp_max_tool_bytes) and were left out",
                self.caps.max_tool_bytes
            ));
        }
        Ok(tools)
    }

    /// Tells the device what was left out, without waiting (a full writer drops it).
    fn alert(&self, message: String) {
        let alert = ServerMessage::alert(&self.session_id, message);
        let _ = self.out.try_send(Message::Text(alert.to_json().into()));
    }

    /// One `tools/call` on the device. Dropping the request (timeout, `cancel`) makes rmcp send
    /// `notifications/cancelled`.
    async fn call_result(
        &self,
        tool: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, DeviceMcpError> {
        let client = self.client.get().ok_or(DeviceMcpError::SessionEnded)?;
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(self.timeout, client.call_tool(params)) => match r {
                Err(_) => Err(self.timed_out("tools/call")),
                Ok(r) => r.map_err(|e| service_error("tools/call", e)),
            },
            _ = cancel.cancelled() => Err(DeviceMcpError::Cancelled),
        };
        match &result {
            Ok(r) => {
                tracing::info!(session = %self.session_id, %tool, ms = started.elapsed().as_millis() as u64, error = r.is_error == Some(true), "device tool call")
            }
            Err(e) => {
                tracing::warn!(session = %self.session_id, %tool, error = %e, "device tool call failed")
            }
        }
        result
    }

    fn timed_out(&self, method: &str) -> DeviceMcpError {
        DeviceMcpError::Timeout {
            method: method.into(),
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }
}

fn initialize_error(e: ClientInitializeError) -> DeviceMcpError {
    match e {
        ClientInitializeError::JsonRpcError(e) => DeviceMcpError::Rpc {
            code: i64::from(e.code.0),
            message: e.message.to_string(),
        },
        ClientInitializeError::ConnectionClosed(_)
        | ClientInitializeError::TransportError { .. } => DeviceMcpError::SessionEnded,
        e => DeviceMcpError::Malformed {
            method: "initialize".into(),
            reason: e.to_string(),
        },
    }
}

fn service_error(method: &str, e: ServiceError) -> DeviceMcpError {
    match e {
        ServiceError::McpError(e) => DeviceMcpError::Rpc {
            code: i64::from(e.code.0),
            message: e.message.to_string(),
        },
        ServiceError::TransportClosed | ServiceError::TransportSend(_) => {
            DeviceMcpError::SessionEnded
        }
        ServiceError::Cancelled { .. } => DeviceMcpError::Cancelled,
        e => DeviceMcpError::Malformed {
            method: method.into(),
            reason: e.to_string(),
        },
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

fn device_tool(tool: rmcp::model::Tool) -> ToolSpec {
    ToolSpec {
        name: offered_name(&tool.name),
        server: DEVICE_SERVER.into(),
        tool: tool.name.to_string(),
        description: tool.description.map(|d| d.to_string()).unwrap_or_default(),
        input_schema: tool.input_schema,
    }
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
