//! The tool hub: every configured MCP server and voxloop's built-in tools behind one interface,
//! offered to the LLM as function tools and called by name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::join_all;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use super::builtin::BUILTIN_SERVER;
use super::builtin::{Builtins, builtin_tools};
use super::config::{HubSettings, McpServerConfig};
use super::connection::{Connection, ConnectionError};
use super::outcome::ToolOutcome;
use super::pager::PagerSettings;
use super::source::{McpClient, ToolCallError, ToolSource};
use crate::breaker::Breaker;

/// A tool as offered to the LLM.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The name the LLM calls it by: the tool's own name, or `{server}_{tool}` when several
    /// sources have a tool of that name (built-in tools keep theirs). Always matches
    /// `^[a-zA-Z0-9_-]{1,64}$`, as OpenAI-compatible APIs require.
    pub name: String,
    /// The server it lives on, or [`BUILTIN_SERVER`].
    pub server: String,
    /// Its name on that server.
    pub tool: String,
    /// What it does (from the server).
    pub description: String,
    /// JSON Schema of its arguments (an object schema).
    pub input_schema: Arc<JsonObject>,
}

impl ToolSpec {
    /// The tool in OpenAI's function-tool form:
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`.
    pub fn function_tool(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": Value::Object((*self.input_schema).clone()),
        }})
    }
}

/// One tool call as the LLM made it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The offered name ([`ToolSpec::name`]).
    pub name: String,
    /// Arguments: a JSON object (anything else is an error the LLM hears about).
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments as MCP's `tools/call` takes them: a JSON object (`null`, as some models
    /// send for a tool without parameters, is the empty object).
    ///
    /// # Errors
    /// [`ArgumentsError`] for anything else (its message is for the LLM).
    pub fn arguments_object(&self) -> Result<JsonObject, ArgumentsError> {
        match &self.arguments {
            Value::Object(map) => Ok(map.clone()),
            Value::Null => Ok(JsonObject::new()),
            other => Err(ArgumentsError(other.clone())),
        }
    }
}

/// A tool call's arguments that are not a JSON object (MCP's `tools/call` takes an object).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("arguments must be a JSON object, got {0}")]
pub struct ArgumentsError(pub Value);

/// Why [`ToolHub::call_result`] got no result.
#[derive(Debug, thiserror::Error)]
pub enum HubCallError {
    /// No tool is offered under this name.
    #[error("there is no tool {0:?}")]
    UnknownTool(String),
    /// The call failed before a result (the message names the server and the cause).
    #[error(transparent)]
    Failed(#[from] ToolCallError),
}

/// A server that did not start, as reported at session start.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupFailure {
    /// The server's name in the config.
    pub server: String,
    /// Why it did not start, or why its tools could not be listed.
    pub error: String,
}

/// The hub: the built-in tools and every configured MCP server, each a [`ToolSource`], and the
/// tools they offer under unique names. Cheap to share behind an `Arc`; calls may run
/// concurrently.
pub struct ToolHub {
    /// Every source by its name: the built-in tools and each MCP server.
    sources: BTreeMap<String, Arc<dyn ToolSource>>,
    /// The MCP servers among them (resources, readiness).
    servers: BTreeMap<String, Arc<McpClient>>,
    tools: Vec<ToolSpec>,
    failures: Vec<StartupFailure>,
}

/// The bundled music server: `mcp_audio` beside the running executable, reading the same
/// config file (`config_file`, when there is one).
pub fn default_servers(config_file: Option<&Path>) -> BTreeMap<String, McpServerConfig> {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(PathBuf::from))
        .unwrap_or_default();
    let mut args = Vec::new();
    if let Some(source) = config_file {
        args.extend(["--config".to_string(), source.display().to_string()]);
    }
    let music = McpServerConfig {
        command: Some(dir.join("mcp_audio").display().to_string()),
        args,
        ..McpServerConfig::default()
    };
    BTreeMap::from([("music".to_string(), music)])
}

impl ToolHub {
    /// Starts every server of `config.servers` (the bundled music server when there are
    /// none) in parallel and lists their tools. A server that fails to start, or whose tools
    /// cannot be listed, is reported in [`ToolHub::startup_failures`] and skipped; its
    /// connection stays, and the next call to it tries to start it again.
    pub async fn start(config: HubSettings<'_>) -> ToolHub {
        let servers = if config.servers.is_empty() {
            default_servers(config.config_file)
        } else {
            config.servers.clone()
        };
        let connections: BTreeMap<String, Arc<Connection>> = servers
            .into_iter()
            .map(|(name, server)| {
                let connection = Arc::new(Connection::new(&name, server, config.tools));
                (name, connection)
            })
            .collect();
        let listings = join_all(
            connections
                .values()
                .map(|c| async move { (c.name().to_string(), c.list_tools().await) }),
        )
        .await;
        let mut failures = Vec::new();
        let mut found = Vec::new();
        for (server, listing) in listings {
            match listing {
                Ok(tools) => {
                    for tool in tools {
                        let name = tool.name.to_string();
                        match schema_problem(&tool.input_schema) {
                            Some(problem) => {
                                tracing::warn!(%server, tool = %name, "skipping tool with a broken input schema: {problem}");
                            }
                            None => found.push(ToolSpec {
                                name: name.clone(),
                                server: server.clone(),
                                tool: name,
                                description: tool
                                    .description
                                    .map(|d| d.to_string())
                                    .unwrap_or_default(),
                                input_schema: tool.input_schema.clone(),
                            }),
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(%server, error = %e, "MCP server skipped");
                    failures.push(StartupFailure {
                        server,
                        error: e.to_string(),
                    });
                }
            }
        }
        let mut tools = builtin_tools();
        tools.extend(found);
        let pager = PagerSettings::from(config.tools);
        let mut sources: BTreeMap<String, Arc<dyn ToolSource>> = BTreeMap::new();
        sources.insert(BUILTIN_SERVER.to_string(), Arc::new(Builtins));
        let servers: BTreeMap<String, Arc<McpClient>> = connections
            .into_iter()
            .map(|(name, connection)| {
                let breaker = Breaker::new(&format!("mcp:{name}"), config.breaker);
                let server = Arc::new(McpClient::new(connection, breaker, pager));
                sources.insert(name.clone(), server.clone());
                (name, server)
            })
            .collect();
        ToolHub {
            sources,
            servers,
            tools: assign_names(tools),
            failures,
        }
    }

    /// Titles of the resources every server lists (at most `max` in all), for the ASR's
    /// vocabulary prompt. A server that fails to list them is logged and skipped.
    pub async fn resource_titles(&self, max: usize) -> Vec<String> {
        let listings = join_all(self.servers.values().map(|s| async move {
            let c = s.connection();
            (c.name().to_string(), c.list_resource_titles(max).await)
        }))
        .await;
        let mut titles = Vec::new();
        for (server, listing) in listings {
            match listing {
                Ok(found) => titles.extend(found),
                Err(e) => tracing::warn!(%server, error = %e, "resources/list failed"),
            }
        }
        titles.truncate(max);
        titles
    }

    /// Whether `name` is offered as one of voxloop's built-in tools.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.tools
            .iter()
            .any(|t| t.name == name && t.server == BUILTIN_SERVER)
    }

    /// The tools offered to the LLM: built-in ones first, then each server's in listing order.
    pub fn tools(&self) -> &[ToolSpec] {
        &self.tools
    }

    /// Servers that did not start (or list their tools) at session start.
    pub fn startup_failures(&self) -> &[StartupFailure] {
        &self.failures
    }

    /// The tools in OpenAI's function-tool form:
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`.
    pub fn function_tools(&self) -> Vec<Value> {
        self.tools.iter().map(ToolSpec::function_tool).collect()
    }

    /// Calls the tool offered as `call.name`. Never fails: an unknown tool, bad arguments or a
    /// failed call come back as an error outcome whose text tells the LLM what went wrong.
    pub async fn call(&self, call: &ToolCall, cancel: &CancellationToken) -> ToolOutcome {
        let Some(spec) = self.tools.iter().find(|t| t.name == call.name) else {
            let known: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
            return ToolOutcome::failed(
                &call.name,
                "",
                format!(
                    "there is no tool {:?}; tools: {}",
                    call.name,
                    known.join(", ")
                ),
            );
        };
        let arguments = match call.arguments_object() {
            Ok(arguments) => arguments,
            Err(e) => return ToolOutcome::failed(&spec.name, &spec.server, e),
        };
        self.call_on(&spec.server, &spec.tool, arguments, cancel)
            .await
            .renamed(&spec.name)
    }

    /// Calls `tool` on the source named `server` (an MCP server, or [`BUILTIN_SERVER`]) by their
    /// own names: the `voxloop tools call` path. Never fails, like [`ToolHub::call`].
    pub async fn call_on(
        &self,
        server: &str,
        tool: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> ToolOutcome {
        let Some(source) = self.sources.get(server) else {
            let known: Vec<&str> = self.sources.keys().map(String::as_str).collect();
            return ToolOutcome::failed(
                tool,
                server,
                format!(
                    "there is no MCP server {server:?}; servers: {}",
                    known.join(", ")
                ),
            );
        };
        source.call(tool, arguments, cancel).await
    }

    /// Calls the tool offered as `name` and gives its result as the server sent it, unrouted:
    /// what voxloop's own MCP endpoint and REST bridge forward. A built-in tool's result is its
    /// text.
    ///
    /// # Errors
    /// [`HubCallError::UnknownTool`] for a name not offered; [`HubCallError::Failed`] when the
    /// call got no result (server down, timeout, open breaker).
    pub async fn call_result(
        &self,
        name: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, HubCallError> {
        let spec = self
            .tools
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| HubCallError::UnknownTool(name.to_string()))?;
        let source = self
            .sources
            .get(&spec.server)
            .ok_or_else(|| HubCallError::UnknownTool(name.to_string()))?;
        source
            .call_raw(&spec.tool, arguments, cancel)
            .await
            .map_err(HubCallError::Failed)
    }

    /// Each server's circuit breaker, by server name.
    pub fn breakers(&self) -> impl Iterator<Item = (&str, &Breaker)> {
        self.servers
            .iter()
            .map(|(name, server)| (name.as_str(), server.breaker()))
    }

    /// Whether each server answers now: starts it if needed and lists one page of tools
    /// (bounded by `[tools] start_timeout_ms` and `call_timeout_ms`). For readiness probes.
    ///
    /// Each server's error is its [`ConnectionError`] (start failure, timeout, closed).
    pub async fn reachable(&self) -> Vec<(String, Result<(), ConnectionError>)> {
        join_all(self.servers.iter().map(|(name, s)| async move {
            (name.clone(), s.connection().list_tools().await.map(|_| ()))
        }))
        .await
    }

    /// Runs one round's calls concurrently; the outcomes come back in call order.
    pub async fn call_round(
        &self,
        calls: &[ToolCall],
        cancel: &CancellationToken,
    ) -> Vec<ToolOutcome> {
        join_all(calls.iter().map(|call| self.call(call, cancel))).await
    }
}

/// Why a tool's input schema cannot be offered, if it cannot: it must be an object schema whose
/// `properties` (if any) map names to schemas and whose `required` (if any) lists strings.
fn schema_problem(schema: &JsonObject) -> Option<String> {
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        other => {
            return Some(format!(
                "`type` must be \"object\", got {}",
                other.cloned().unwrap_or(Value::Null)
            ));
        }
    }
    match schema.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            if let Some((name, _)) = props
                .iter()
                .find(|(_, v)| !(v.is_object() || v.is_boolean()))
            {
                return Some(format!("property {name:?} is not a schema"));
            }
        }
        Some(other) => return Some(format!("`properties` must be an object, got {other}")),
    }
    match schema.get("required") {
        None => None,
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => None,
        Some(other) => Some(format!("`required` must be a list of names, got {other}")),
    }
}

/// Makes every offered name unique and API-safe: characters outside `[a-zA-Z0-9_-]` become
/// `_`; a name several sources share is prefixed with the server (`music_set_volume`), except
/// for the built-in tool, which keeps it; names are cut to 64 characters.
fn assign_names(mut tools: Vec<ToolSpec>) -> Vec<ToolSpec> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut count: HashMap<String, usize> = HashMap::new();
    for tool in &tools {
        *count.entry(clean(&tool.tool)).or_default() += 1;
    }
    let mut taken = std::collections::HashSet::new();
    for tool in &mut tools {
        let base = clean(&tool.tool);
        let mut name = if count[&base] > 1 && tool.server != BUILTIN_SERVER {
            format!("{}_{base}", clean(&tool.server))
        } else {
            base
        };
        name.truncate(64);
        let mut unique = name.clone();
        let mut n = 2;
        while !taken.insert(unique.clone()) {
            unique = format!("{}_{n}", &name[..name.len().min(60)]);
            n += 1;
        }
        tool.name = unique;
    }
    tools
}

/// `schema` as MCP requires a tool's `inputSchema` to be: a JSON Schema object with `"type":
/// "object"` (MCP spec, `Tool.inputSchema`; the official Python SDK refuses a whole
/// `tools/list` otherwise). A schema without a `type` gets it; one with a type is kept as it is.
pub fn with_object_type(schema: &Arc<JsonObject>) -> Arc<JsonObject> {
    if schema.contains_key("type") {
        return schema.clone();
    }
    let mut typed = (**schema).clone();
    typed.insert("type".into(), json!("object"));
    typed.entry("properties").or_insert_with(|| json!({}));
    Arc::new(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(server: &str, tool: &str) -> ToolSpec {
        ToolSpec {
            name: String::new(),
            server: server.into(),
            tool: tool.into(),
            description: String::new(),
            input_schema: Arc::new(JsonObject::new()),
        }
    }

    #[test]
    fn clashing_names_get_the_server_prefix_builtins_keep_theirs() {
        let tools = assign_names(vec![
            spec(BUILTIN_SERVER, "set_volume"),
            spec("music", "set_volume"),
            spec("music", "musicPlayer"),
            spec("radio", "play"),
            spec("tv", "play"),
            spec("odd", "weird.name/x"),
        ]);
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "set_volume",
                "music_set_volume",
                "musicPlayer",
                "radio_play",
                "tv_play",
                "weird_name_x"
            ]
        );
    }

    #[test]
    fn broken_schemas_are_found() {
        let schema = |v: Value| v.as_object().cloned().unwrap();
        assert!(schema_problem(&schema(json!({"type": "object"}))).is_none());
        assert!(schema_problem(&schema(json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))).is_none());
        assert!(schema_problem(&schema(json!({"type": "array"}))).is_some());
        assert!(schema_problem(&schema(json!({}))).is_some());
        assert!(schema_problem(&schema(json!({"type": "object", "properties": 5}))).is_some());
        assert!(
            schema_problem(&schema(json!({"type": "object", "properties": {"a": 1}}))).is_some()
        );
        assert!(schema_problem(&schema(json!({"type": "object", "required": "a"}))).is_some());
    }
}
