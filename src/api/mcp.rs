//! voxloop as an MCP server (`/mcp` on `voxloop serve`'s HTTP API, streamable HTTP): the
//! runtime's tools ([`Runtime`]) with each server's results passed on as they came. The caller
//! is the [`Principal`] the guard put into the HTTP request's extensions (rmcp hands the request
//! parts to the handler); a `user` does not see admin-only tools, and calling one is refused
//! (before that, with HTTP 403, by [`super::mcp_requests`]).

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};

use super::server::{CallError, Runtime};
use super::{Principal, Role};

/// The MCP server of one HTTP session. Cheap to clone.
#[derive(Clone)]
pub struct RuntimeMcp {
    runtime: Arc<Runtime>,
}

impl RuntimeMcp {
    /// A server over `runtime`.
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self { runtime }
    }
}

/// The caller of a request: the guard's principal, or (no HTTP parts: a local transport) a
/// local admin.
fn caller(context: &RequestContext<RoleServer>) -> Principal {
    context
        .extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .unwrap_or_else(|| Principal::unkeyed(super::auth::LOCAL, Role::Admin))
}

impl ServerHandler for RuntimeMcp {
    /// `logging/setLevel` (MCP spec, "Logging"): accepted and recorded in the server's own log.
    /// This server sends no `notifications/message`; its diagnostics go to its tracing log.
    /// (SEP-2577 deprecates logging; clients of the spec versions before it still send this.)
    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        tracing::debug!(level = ?request.level, "MCP client set its logging level");
        Ok(())
    }

    #[allow(deprecated)] // the logging capability, for clients before SEP-2577
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new("voxloop", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "voxloop's tools: those of every MCP server it is configured with, its built-in \
                 tools, and the PersonaPlex co-host's when one is configured. Results are the \
                 servers' own.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let role = caller(&context).role;
        Ok(ListToolsResult::with_all_items(self.runtime.tools(role)))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let caller = caller(&context);
        let arguments = request.arguments.unwrap_or_default();
        match self.runtime.call(&caller, &request.name, arguments).await {
            Ok(result) => Ok(result.into()),
            Err(e @ CallError::UnknownTool(_)) => {
                Err(McpError::invalid_params(e.to_string(), None))
            }
            Err(e @ CallError::Forbidden(_)) => Err(McpError::invalid_request(e.to_string(), None)),
            Err(CallError::Failed(why)) => {
                Ok(CallToolResult::error(vec![ContentBlock::text(why.to_string())]).into())
            }
        }
    }
}
