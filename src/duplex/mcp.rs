//! `voxloop duplex mcp`: the co-host as an MCP server (stdio, or streamable HTTP at `/mcp`)
//! with the GPU-lifecycle tools of ARCHITECTURE §6. Every result is structured content of the form
//! `{status: "success", ...}` (with `processing_time` in seconds for `process_audio`) or
//! `{status: "error", error}`; an error result also has `isError: true`.

use std::path::PathBuf;
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde_json::{Value, json};

use tokio_util::sync::CancellationToken;

use super::DuplexError;
use super::service::{Duplex, failure, success, wav_bytes};
use crate::tools::source::{BoxFuture, ToolCallError, ToolSource};

/// The tools, in the order `tools/list` gives them.
pub const TOOLS: [&str; 9] = [
    "health_check",
    "get_gpu_status",
    "offload_gpu",
    "release_gpu",
    "update_gpu_timeout",
    "list_available_models",
    "list_voices",
    "get_prompt_examples",
    "process_audio",
];

/// Arguments of `update_gpu_timeout`.
#[derive(JsonSchema)]
#[allow(dead_code)] // only its schema is used; arguments are checked by hand for clear errors
struct TimeoutArgs {
    /// Seconds without a request before the model is moved to host memory, 1 to 86400.
    timeout_seconds: i64,
}

/// Arguments of `process_audio`.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct ProcessArgs {
    /// Path of the user's audio on the server (WAV, FLAC, MP3, Ogg; any sample rate).
    input_file: String,
    /// Where to write the reply, a 24 kHz mono WAV as long as the input; the text goes beside
    /// it with the extension `.txt`.
    output_file: String,
    /// A voice id (`list_voices`) or a path to a `.pt` or audio voice prompt.
    #[schemars(default = "default_voice")]
    voice_prompt: Option<String>,
    /// The role the model plays (wrapped in `<system>` tokens).
    text_prompt: Option<String>,
    /// Sampling seed; -1 or absent for the configured one.
    seed: Option<i64>,
}

fn default_voice() -> Option<String> {
    Some("NATF2".into())
}

/// The name the duplex tools report as their source ([`ToolSource::name`]).
pub const DUPLEX_SOURCE: &str = "duplex";

/// The duplex tools as a source, for the surfaces that offer them beside the hub's
/// (`voxloop serve`'s MCP endpoint and REST bridge). Results are structured content, never
/// media; the call cannot be cancelled once the model runs.
impl ToolSource for DuplexMcp {
    fn name(&self) -> &str {
        DUPLEX_SOURCE
    }

    fn call_raw<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<CallToolResult, ToolCallError>> {
        Box::pin(async move { Ok(self.counted_call(tool, &arguments).await) })
    }
}

/// The duplex MCP server. Cheap to clone: HTTP sessions share the model.
#[derive(Clone)]
pub struct DuplexMcp {
    duplex: Arc<Duplex>,
}

impl DuplexMcp {
    /// A server over `duplex`.
    pub fn new(duplex: Arc<Duplex>) -> Self {
        Self { duplex }
    }

    /// The tools with their input schemas, in [`TOOLS`] order.
    pub fn tools() -> Vec<Tool> {
        // No parameters: still a JSON Schema object (MCP spec, `Tool.inputSchema`).
        let empty = crate::tools::hub::with_object_type(&Arc::new(JsonObject::new()));
        let tool = |name: &'static str, description: &'static str| {
            Tool::new(name, description, empty.clone())
        };
        vec![
            tool(
                "health_check",
                "Is the PersonaPlex co-host alive, are the model files there, where is the model.",
            ),
            tool(
                "get_gpu_status",
                "Where the model is (gpu, cpu, unloaded), idle_time and idle_timeout in seconds, \
                 active_connections, GPU memory in GB where known, and transition statistics.",
            ),
            tool(
                "offload_gpu",
                "Move the model to host memory now, freeing the GPU (refused during a \
                 conversation).",
            ),
            tool(
                "release_gpu",
                "Drop the model from memory entirely (refused during a conversation).",
            ),
            tool(
                "update_gpu_timeout",
                "Set the idle time, in seconds (1 to 86400), after which the model moves to host \
                 memory.",
            )
            .with_input_schema::<TimeoutArgs>(),
            tool(
                "list_available_models",
                "The model this co-host serves and whether its files are present.",
            ),
            tool("list_voices", "The 18 PersonaPlex voices, by id."),
            tool(
                "get_prompt_examples",
                "Example role prompts (assistant, customer service, casual).",
            ),
            tool(
                "process_audio",
                "Offline full-duplex inference: the model's spoken reply to an audio file on the \
                 server, written as a WAV as long as the input, with its text.",
            )
            .with_input_schema::<ProcessArgs>(),
        ]
    }

    /// These tools as the HTTP API's co-host (`voxloop serve`'s `/mcp` and REST bridge),
    /// with the model's status for its status page.
    pub fn cohost(self) -> crate::api::server::Cohost {
        let status = self.clone();
        crate::api::server::Cohost {
            source: Arc::new(self),
            tools: Self::tools(),
            status: Box::new(move || status.status()),
        }
    }

    /// The model's status (`get_gpu_status`).
    pub fn status(&self) -> Value {
        json!(self.duplex.manager().status())
    }

    /// Runs the tool `name` (one of [`TOOLS`]) as its MCP result, counted in the metrics under
    /// the source `duplex`.
    async fn counted_call(&self, name: &str, args: &JsonObject) -> CallToolResult {
        let started = std::time::Instant::now();
        let result = self.call(name, args).await;
        let status = if result.is_error == Some(true) {
            "error"
        } else {
            "success"
        };
        crate::metrics::get().tool_call(DUPLEX_SOURCE, name, status, started.elapsed());
        result
    }

    /// Runs the tool `name` (one of [`TOOLS`]): structured content `{status: "success", ...}`,
    /// or `{status: "error", error}` with `isError` set.
    pub async fn call(&self, name: &str, args: &JsonObject) -> CallToolResult {
        let result = self.run(name, args).await;
        if result["status"] == "success" {
            CallToolResult::structured(result)
        } else {
            CallToolResult::structured_error(result)
        }
    }

    /// Runs one tool; the result in the `{status, ...}` form.
    async fn run(&self, name: &str, args: &JsonObject) -> Value {
        let manager = self.duplex.manager();
        let result: Result<Value, String> = match name {
            "health_check" => Ok(self.duplex.health()),
            "get_gpu_status" => Ok(json!(manager.status())),
            "offload_gpu" => manager
                .offload()
                .await
                .map(|location| json!({"location": location}))
                .map_err(|e| e.to_string()),
            "release_gpu" => manager
                .release()
                .await
                .map(|released| json!({"released": released}))
                .map_err(|e| e.to_string()),
            "update_gpu_timeout" => match integer(args, "timeout_seconds") {
                Ok(Some(seconds)) => manager
                    .set_idle_timeout(seconds)
                    .map(|()| json!({"idle_timeout": seconds}))
                    .map_err(|e| e.to_string()),
                Ok(None) => Err("`timeout_seconds` is required".into()),
                Err(e) => Err(e),
            },
            "list_available_models" => Ok(self.duplex.models()),
            "list_voices" => Ok(json!({"voices": super::voices()})),
            "get_prompt_examples" => Ok(json!({"examples": super::prompt_examples()})),
            "process_audio" => self.process_audio(args).await,
            other => Err(format!(
                "unknown tool {other:?}; tools: {}",
                TOOLS.join(", ")
            )),
        };
        match result {
            Ok(fields) => success(fields),
            Err(e) => failure(e),
        }
    }

    async fn process_audio(&self, args: &JsonObject) -> Result<Value, String> {
        let input = PathBuf::from(string(args, "input_file")?.ok_or("`input_file` is required")?);
        let output =
            PathBuf::from(string(args, "output_file")?.ok_or("`output_file` is required")?);
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            return Err(format!(
                "output directory {} does not exist",
                parent.display()
            ));
        }
        let voice = string(args, "voice_prompt")?;
        let text = string(args, "text_prompt")?;
        let seed = integer(args, "seed")?;
        let prompt = self
            .duplex
            .prompt(voice.as_deref(), text.as_deref(), seed)
            .map_err(|e| e.to_string())?;
        let voice_used = self
            .duplex
            .voice_file(voice.as_deref())
            .map_err(|e| e.to_string())?;
        let reply = self
            .duplex
            .process_file(&input, prompt)
            .await
            .map_err(|e: DuplexError| e.to_string())?;
        let text_file = output.with_extension("txt");
        let write = |path: &PathBuf, bytes: Vec<u8>| {
            let path = path.clone();
            async move {
                tokio::fs::write(&path, bytes)
                    .await
                    .map_err(|e| format!("writing {}: {e}", path.display()))
            }
        };
        write(&output, wav_bytes(&reply.pcm)).await?;
        write(&text_file, format!("{}\n", reply.text).into_bytes()).await?;
        Ok(json!({
            "output_audio": output,
            "output_text": text_file,
            "generated_text": reply.text,
            "voice_used": voice_used,
            "duration": reply.duration_s,
            "processing_time": reply.processing_time,
        }))
    }
}

/// An optional string argument.
fn string(args: &JsonObject, key: &str) -> Result<Option<String>, String> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` must be a string, got {other}")),
    }
}

/// An optional integer argument; whole JSON numbers and decimal strings are accepted (small
/// models often quote numbers).
fn integer(args: &JsonObject, key: &str) -> Result<Option<i64>, String> {
    let bad = |v: &Value| format!("`{key}` must be an integer, got {v}");
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(bad(&Value::Number(n.clone()))),
        },
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(&Value::String(s.clone()))),
        Some(other) => Err(bad(other)),
    }
}

impl ServerHandler for DuplexMcp {
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
        .with_server_info(Implementation::new(
            "voxloop-duplex",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "NVIDIA PersonaPlex, a full-duplex speech-to-speech model, with its GPU \
                 lifecycle: process_audio answers a recording offline; get_gpu_status, \
                 offload_gpu, release_gpu and update_gpu_timeout manage where the model lives.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(Self::tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if !TOOLS.contains(&request.name.as_ref()) {
            return Err(McpError::invalid_params(
                format!(
                    "unknown tool {:?}; tools: {}",
                    request.name,
                    TOOLS.join(", ")
                ),
                None,
            ));
        }
        let args = request.arguments.unwrap_or_default();
        Ok(self.call(&request.name, &args).await.into())
    }
}
