//! Where tools come from, behind one trait: an MCP server, voxloop's built-in tools, a device's
//! own MCP server (`device::mcp`). The hub and the turn loop call every tool through
//! [`ToolSource`] and never ask which kind of source it is (ARCHITECTURE §1).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{CallToolResult, JsonObject};
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, ConnectionError};
use super::outcome::{RouteContext, ToolOutcome};
use super::pager::PagerSettings;
use crate::breaker::Breaker;

/// Why a tool call got no result (a result that reports a failure, `isError`, is still a
/// result).
#[derive(Debug, thiserror::Error)]
pub enum ToolCallError {
    /// The source's circuit breaker is open: calls are refused for a while.
    #[error(transparent)]
    BreakerOpen(#[from] crate::breaker::Open),
    /// The MCP server could not be reached or did not answer (start, timeout, closed,
    /// oversized message, an rmcp error).
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// Another source's own error (a device's MCP request, for one).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// A future a [`ToolSource`] returns (boxed, so that sources can be `dyn ToolSource`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A place tools are called: it knows its name and how to call a tool by the tool's own name.
pub trait ToolSource: Send + Sync {
    /// The source's name, as [`ToolOutcome::server`] and `ToolSpec::server` give it: an MCP
    /// server's name in the config, `voxloop` for the built-in tools, `device` for a device.
    fn name(&self) -> &str;

    /// Calls `tool` (the source's own name for it) with `arguments` and routes the result
    /// (ARCHITECTURE §2): media to play, text for the model, actions. Never fails: a failed
    /// call is an error outcome whose text tells the model what went wrong.
    ///
    /// By default: [`ToolSource::call_raw`], its result routed with
    /// [`ToolSource::route_context`].
    fn call<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(async move {
            match self.call_raw(tool, arguments, cancel).await {
                Ok(result) => {
                    ToolOutcome::from_result(tool, self.name(), result, &self.route_context(cancel))
                }
                Err(e) => ToolOutcome::failed(tool, self.name(), e),
            }
        })
    }

    /// What routing this source's results needs: the connection its paged resources are read
    /// through and the pager's limits, cancelled by `cancel`. By default a source without
    /// resources ([`RouteContext::without_resources`]).
    fn route_context(&self, cancel: &CancellationToken) -> RouteContext {
        RouteContext::without_resources(cancel)
    }

    /// Calls `tool` and gives its result as the source produced it, unrouted: what voxloop's
    /// MCP endpoint and REST bridge forward.
    ///
    /// # Errors
    /// [`ToolCallError`]: the call got no result (a source that is down, a timeout, an open
    /// breaker); its message names the source.
    fn call_raw<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<CallToolResult, ToolCallError>>;
}

/// voxloop's MCP client of one configured server, as a tool source: its connection, its
/// circuit breaker (upstream `mcp:{server}`) and the pager limits its paged resources are read
/// with. Every call is counted in the metrics (`voxloop_tool_calls_total`, `voxloop_tool_call_duration_seconds`).
pub struct McpClient {
    connection: Arc<Connection>,
    breaker: Breaker,
    pager: PagerSettings,
}

impl McpClient {
    /// A source over `connection`, guarded by `breaker`.
    pub fn new(connection: Arc<Connection>, breaker: Breaker, pager: PagerSettings) -> Self {
        Self {
            connection,
            breaker,
            pager,
        }
    }

    /// The server's connection (resources, tool lists, readiness).
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// The server's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// One `tools/call` through the breaker, counted in the metrics.
    async fn request(
        &self,
        tool: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, ToolCallError> {
        let server = self.connection.name();
        let metrics = crate::metrics::get();
        if let Err(open) = self.breaker.permit() {
            metrics.tool_call(server, tool, "failed", Duration::ZERO);
            tracing::warn!(%server, %tool, "tool call refused: {open}");
            return Err(open.into());
        }
        let started = Instant::now();
        let result = self.connection.call_tool(tool, arguments, cancel).await;
        let took = started.elapsed();
        match &result {
            Ok(r) => {
                self.breaker.success();
                let status = if r.is_error == Some(true) {
                    "error"
                } else {
                    "success"
                };
                metrics.tool_call(server, tool, status, took);
                tracing::info!(%server, %tool, ms = took.as_millis() as u64, status, "tool call");
            }
            // Cancelled by the caller (barge-in), or answered with a JSON-RPC error: the
            // server is alive.
            Err(ConnectionError::Cancelled { .. }) => {}
            Err(ConnectionError::Service {
                source: rmcp::service::ServiceError::McpError(_),
                ..
            }) => {
                self.breaker.success();
                metrics.tool_call(server, tool, "error", took);
            }
            Err(e) => {
                self.breaker.failure();
                metrics.tool_call(server, tool, "failed", took);
                tracing::warn!(%server, %tool, error = %e, "tool call failed");
            }
        }
        Ok(result?)
    }
}

impl ToolSource for McpClient {
    fn name(&self) -> &str {
        self.connection.name()
    }

    fn route_context(&self, cancel: &CancellationToken) -> RouteContext {
        RouteContext {
            connection: Some(self.connection.clone()),
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
        Box::pin(self.request(tool, arguments, cancel))
    }
}
