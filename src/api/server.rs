//! `voxloop serve`'s HTTP API on `[server] bind`: the runtime's tools as an MCP server over
//! streamable HTTP (`/mcp`), the REST bridge (`/v1/mcp/*`, [`super::bridge`]), `/metrics`
//! (Prometheus text), `/health` (liveness) and `/ready` (readiness). Every route but the probes
//! (and `/metrics` with `[server] public_metrics`) is behind the [`Guard`]; every request gets an
//! `x-request-id` (kept if the client sent one) that is on each log line of its span.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmcp::model::{CallToolResult, JsonObject, Tool};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::{Guard, Principal, Role};
use crate::api::config::ServerConfig;
use crate::breaker::Breaker;
use crate::tools::hub::{HubCallError, ToolHub};
use crate::tools::source::{ToolCallError, ToolSource};

/// Where an offered tool lives.
#[derive(Clone)]
enum Source {
    /// The hub, under this offered name.
    Hub,
    /// The co-host, under its own name.
    Cohost(String),
}

/// A co-host's tools, offered by the HTTP API beside the hub's: the duplex model's
/// (`duplex::mcp::DuplexMcp::cohost`). A tool whose name the hub already offers is offered
/// as `{source}_{name}`.
pub struct Cohost {
    /// The source that runs the tools.
    pub source: Arc<dyn ToolSource>,
    /// The tools, under the source's own names.
    pub tools: Vec<Tool>,
    /// Its state, shown as `duplex` by `GET /v1/mcp/status`.
    pub status: Box<dyn Fn() -> Value + Send + Sync>,
}

/// Why a tool call through the API got no result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A `user` called an admin-only tool (HTTP 403).
    #[error("tool {0} needs the admin role")]
    Forbidden(String),
    /// No such tool (HTTP 404).
    #[error("there is no tool {0:?}; GET /v1/mcp/tools lists them")]
    UnknownTool(String),
    /// The call failed before a result: server down, timeout, open breaker (HTTP 502).
    #[error(transparent)]
    Failed(#[from] ToolCallError),
}

impl CallError {
    /// The HTTP status the REST bridge answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            CallError::Forbidden(_) => StatusCode::FORBIDDEN,
            CallError::UnknownTool(_) => StatusCode::NOT_FOUND,
            CallError::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// What the HTTP API serves: the hub's tools (every configured server and the built-in ones),
/// the duplex tools when a PersonaPlex model is configured, and the state behind status pages.
pub struct Runtime {
    hub: Arc<ToolHub>,
    cohost: Option<Cohost>,
    tools: Vec<(Tool, Source)>,
    /// The checks of this surface.
    pub guard: Arc<Guard>,
    config: ServerConfig,
    checks: Checks,
    /// The browser page, when there is a device server for it to talk to.
    web: Option<super::web::WebPage>,
}

/// What the status and readiness pages check besides the hub's servers.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// `/ready`'s bound on reaching each MCP server (`[tools] start_timeout_ms`).
    pub ready_timeout: Duration,
    /// Breakers of upstreams outside the hub (the LLM endpoint, the TTS), for status.
    pub breakers: Vec<Breaker>,
    /// Model files `/ready` requires, by name.
    pub models: Vec<(String, PathBuf)>,
}

impl Runtime {
    /// A runtime over `hub` and, when given, the duplex co-host, serving as `server` says, with
    /// `checks` for its status and readiness pages and, when given, the browser page (`web`).
    pub fn new(
        hub: Arc<ToolHub>,
        cohost: Option<Cohost>,
        guard: Arc<Guard>,
        server: &ServerConfig,
        checks: Checks,
        web: Option<super::web::WebPage>,
    ) -> Arc<Self> {
        let mut tools: Vec<(Tool, Source)> = hub
            .tools()
            .iter()
            .map(|spec| {
                let tool = Tool::new(
                    spec.name.clone(),
                    spec.description.clone(),
                    crate::tools::hub::with_object_type(&spec.input_schema),
                );
                (tool, Source::Hub)
            })
            .collect();
        if let Some(cohost) = &cohost {
            for tool in &cohost.tools {
                let mut tool = tool.clone();
                let own = tool.name.to_string();
                if tools.iter().any(|(t, _)| t.name == tool.name) {
                    tool.name = format!("{}_{own}", cohost.source.name()).into();
                }
                tools.push((tool, Source::Cohost(own)));
            }
        }
        Arc::new(Self {
            hub,
            cohost,
            tools,
            guard,
            config: server.clone(),
            checks,
            web,
        })
    }

    /// `[server]`.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn admin_only(&self, name: &str, source: &Source) -> bool {
        let auth = &self.guard.auth;
        auth.is_admin_tool(name) || matches!(source, Source::Cohost(own) if auth.is_admin_tool(own))
    }

    /// The tools `role` may call, as MCP tools (admin-only ones are hidden from a `user`).
    pub fn tools(&self, role: Role) -> Vec<Tool> {
        self.listed(role).map(|(t, _)| t.clone()).collect()
    }

    /// The tools `role` may call, each with whether it is admin-only.
    pub fn listed(&self, role: Role) -> impl Iterator<Item = (&Tool, bool)> {
        self.tools.iter().filter_map(move |(tool, source)| {
            let admin = self.admin_only(&tool.name, source);
            (role == Role::Admin || !admin).then_some((tool, admin))
        })
    }

    /// Calls the tool offered as `name` for `caller`: the server's result as it sent it.
    ///
    /// # Errors
    /// [`CallError`]: forbidden, unknown, or no result.
    pub async fn call(
        &self,
        caller: &Principal,
        name: &str,
        arguments: JsonObject,
    ) -> Result<CallToolResult, CallError> {
        let Some((_, source)) = self.tools.iter().find(|(t, _)| t.name == name) else {
            return Err(CallError::UnknownTool(name.to_string()));
        };
        if caller.role != Role::Admin && self.admin_only(name, source) {
            tracing::warn!(caller = %caller.name, tool = name, "admin-only tool refused");
            return Err(CallError::Forbidden(name.to_string()));
        }
        match source {
            Source::Cohost(own) => {
                let cohost = self
                    .cohost
                    .as_ref()
                    .expect("co-host tools only with a co-host");
                cohost
                    .source
                    .call_raw(own, arguments, &CancellationToken::new())
                    .await
                    .map_err(CallError::Failed)
            }
            Source::Hub => self
                .hub
                .call_result(name, arguments, &CancellationToken::new())
                .await
                .map_err(|e| match e {
                    HubCallError::UnknownTool(n) => CallError::UnknownTool(n),
                    HubCallError::Failed(why) => CallError::Failed(why),
                }),
        }
    }

    /// `GET /v1/mcp/status`: the servers with their tool counts and breakers, the other
    /// upstreams' breakers, open sessions by surface, and the duplex model's status.
    pub fn status(&self) -> Value {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for spec in self.hub.tools() {
            *counts.entry(spec.server.as_str()).or_default() += 1;
        }
        let failures: BTreeMap<&str, &str> = self
            .hub
            .startup_failures()
            .iter()
            .map(|f| (f.server.as_str(), f.error.as_str()))
            .collect();
        let servers: Vec<Value> = self
            .hub
            .breakers()
            .map(|(name, breaker)| {
                json!({
                    "name": name,
                    "tools": counts.get(name).copied().unwrap_or(0),
                    "breaker": breaker.state(),
                    "startup_error": failures.get(name),
                })
            })
            .collect();
        let mut breakers: Vec<Value> = self
            .hub
            .breakers()
            .map(|(_, breaker)| breaker.status())
            .collect();
        breakers.extend(self.checks.breakers.iter().map(Breaker::status));
        json!({
            "status": "success",
            "servers": servers,
            "breakers": breakers,
            "sessions": crate::metrics::get().sessions(),
            "duplex": self.cohost.as_ref().map(|c| (c.status)()),
        })
    }

    /// `/ready`: each configured server answers, each required model file is there.
    async fn readiness(&self) -> (bool, Vec<Value>) {
        let mut checks = Vec::new();
        let reached = tokio::time::timeout(self.checks.ready_timeout, self.hub.reachable()).await;
        match reached {
            Ok(servers) => {
                for (name, result) in servers {
                    checks.push(json!({
                        "check": format!("mcp:{name}"),
                        "ok": result.is_ok(),
                        "error": result.err().map(|e| e.to_string()),
                    }));
                }
            }
            Err(_) => checks.push(json!({
                "check": "mcp",
                "ok": false,
                "error": format!("servers did not answer within {} ms", self.checks.ready_timeout.as_millis()),
            })),
        }
        for (name, path) in &self.checks.models {
            let ok = path.is_file();
            checks.push(json!({
                "check": format!("model:{name}"),
                "ok": ok,
                "error": (!ok).then(|| format!("{} is missing", path.display())),
            }));
        }
        (checks.iter().all(|c| c["ok"] == true), checks)
    }
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

async fn ready(State(runtime): State<Arc<Runtime>>) -> Response {
    let (ok, checks) = runtime.readiness().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({"ready": ok, "checks": checks}))).into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        crate::metrics::get().render(),
    )
        .into_response()
}

/// Browser origins the MCP endpoint accepts: loopback ones and `[server] allowed_origins`.
fn mcp_origins(config: &ServerConfig) -> Vec<String> {
    let mut origins: Vec<String> = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
        .map(String::from)
        .to_vec();
    origins.extend(config.allowed_origins.iter().cloned());
    origins
}

/// The HTTP API's routes. Serve with `into_make_service_with_connect_info::<SocketAddr>()`
/// (the per-IP rate limit needs the peer).
pub fn router(runtime: Arc<Runtime>) -> Router {
    let guard = runtime.guard.clone();
    let max_body = runtime.config.max_body_bytes;
    let mcp_runtime = runtime.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(super::mcp::RuntimeMcp::new(mcp_runtime.clone())),
        Arc::new(runtime.config.mcp_sessions()),
        StreamableHttpServerConfig::default()
            .with_allowed_origins(mcp_origins(&runtime.config))
            .enforce_origin_validation(),
    );
    let mcp = Router::new()
        .nest_service("/mcp", mcp)
        .layer(from_fn_with_state(
            (guard.clone(), max_body),
            super::mcp_requests,
        ));
    let mut protected = super::bridge::routes()
        .with_state(runtime.clone())
        .merge(mcp);
    let mut open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(runtime.clone());
    if let Some(page) = &runtime.web {
        open = open.merge(super::web::routes(page.clone(), guard.clone()));
    }
    if runtime.config.public_metrics {
        open = open.route("/metrics", get(metrics));
    } else {
        protected = protected.route("/metrics", get(metrics));
    }
    let protected = protected
        .layer(from_fn_with_state(guard, super::guard))
        .layer(DefaultBodyLimit::max(max_body));
    open.merge(protected)
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", id, method = %request.method(), path = request.uri().path())
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Serves [`router`] on `listener` until `shutdown` completes.
///
/// # Errors
/// The accept loop's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runtime: Arc<Runtime>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(runtime).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
