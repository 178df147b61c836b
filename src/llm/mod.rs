//! Chat models as a stream: text deltas and tool calls (whose arguments may arrive in pieces),
//! then the finish reason and token usage.
//!
//! [`openai`] talks to any OpenAI-compatible `/chat/completions` endpoint (OpenAI, Ollama, vLLM,
//! llama.cpp's server) with server-sent events; [`local`] runs a small GGUF model on the CPU,
//! on llama.cpp's server as a child process ([`llama_cpp`]) or in-process with candle, its
//! tool calls decoded under [`constraint`]. [`ChatModel`] is either, as `[llm] provider` says.

pub mod config;
pub mod constraint;
pub mod llama_cpp;
pub mod local;
pub mod openai;
pub mod qwen2;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt.
    System,
    /// What the user said.
    User,
    /// What the model said or called.
    Assistant,
    /// A tool call's result.
    Tool,
}

/// A tool call the assistant made: `arguments` is the JSON text as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRequest {
    /// The model's id for the call; tool messages answer it.
    pub id: String,
    /// The tool's name as offered.
    pub name: String,
    /// Arguments, JSON text.
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text (empty for an assistant message that only calls tools).
    pub content: String,
    /// Tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallRequest>,
    /// For a tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with `content` and nothing else.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The answer to tool call `id`.
    pub fn tool(id: &str, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(id.into()),
        }
    }
}

/// Tokens a request used, as the endpoint reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt (the conversation and the tools).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

/// What a streaming completion yields, in order: text deltas and tool calls as they complete,
/// then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// More text of the reply.
    Text(String),
    /// A complete tool call (its argument pieces joined).
    ToolCall(ToolCallRequest),
    /// The end: why the model stopped (`stop`, `tool_calls`, `length`, ...) and the usage.
    Done {
        /// Why the model stopped: `stop`, `tool_calls`, `length`, ...
        finish_reason: String,
        /// Tokens used, when the endpoint reported them.
        usage: Option<Usage>,
    },
}

/// Why a completion failed. Each message names the endpoint and the model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// No connection to the endpoint (refused, DNS, TLS).
    #[error("LLM endpoint {url} is unreachable: {reason}")]
    Unreachable {
        /// The endpoint's chat-completions URL.
        url: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// HTTP 401 or 403: the API key is missing or wrong.
    #[error(
        "LLM endpoint {url} refused the API key for model {model:?} (HTTP {status}); check the key's environment variable"
    )]
    Unauthorized {
        /// The endpoint's chat-completions URL.
        url: String,
        /// The model name sent.
        model: String,
        /// The HTTP status code.
        status: u16,
    },
    /// HTTP 404: the endpoint has no such model.
    #[error("LLM endpoint {url} has no model {model:?} (HTTP 404): {body}")]
    NotFound {
        /// The endpoint's chat-completions URL.
        url: String,
        /// The model name sent.
        model: String,
        /// The start of the response body.
        body: String,
    },
    /// Any other HTTP error status.
    #[error("LLM endpoint {url} answered HTTP {status} for model {model:?}: {body}")]
    Status {
        /// The endpoint's chat-completions URL.
        url: String,
        /// The model name sent.
        model: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The event stream could not be parsed.
    #[error("LLM endpoint {url} sent a malformed stream: {reason}")]
    Malformed {
        /// The endpoint's chat-completions URL.
        url: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// Nothing arrived within the time limit.
    #[error("LLM endpoint {url} sent nothing for {} ms", timeout_ms)]
    Timeout {
        /// The endpoint's chat-completions URL.
        url: String,
        /// The time limit in ms.
        timeout_ms: u64,
    },
    /// The API key's environment variable (named here) is not set.
    #[error("LLM: environment variable {0} (API key) is not set")]
    MissingKey(String),
    /// The local model failed to load or run.
    #[error("local model {path}: {reason}")]
    Model {
        /// The GGUF file.
        path: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The endpoint's circuit breaker is open: recent requests failed, this one was not sent.
    #[error("LLM: {0}")]
    Unavailable(String),
    /// The local model's workers stayed taken by other sessions for `[llm] max_wait_ms`.
    #[error("local model: {0}")]
    Busy(#[from] crate::compute::Busy),
}

/// Events of one completion; an `Err` is the last item.
pub type LlmStream = tokio::sync::mpsc::Receiver<Result<LlmEvent, LlmError>>;

/// The chat model `[llm]` names: an OpenAI-compatible endpoint or the local GGUF model.
#[derive(Clone)]
pub enum ChatModel {
    /// An OpenAI-compatible endpoint.
    OpenAi(Box<openai::OpenAiClient>),
    /// The local GGUF model.
    Local(local::LocalModel),
}

impl ChatModel {
    /// The model `config` names; the local one is loaded now (about 0.3 s).
    ///
    /// # Errors
    /// [`LlmError::Model`] when the local model file is missing or unreadable.
    pub fn from_config(config: &crate::llm::config::LlmConfig) -> Result<Self, LlmError> {
        Ok(match config.provider {
            crate::llm::config::LlmProvider::Openai => {
                Self::OpenAi(Box::new(openai::OpenAiClient::new(config)))
            }
            crate::llm::config::LlmProvider::Local => {
                Self::Local(local::LocalModel::load(&config.local_model_path(), config)?)
            }
        })
    }

    /// Starts a completion of `messages` offering `tools`; see
    /// [`openai::OpenAiClient::stream`] and [`local::LocalModel::stream`].
    ///
    /// # Errors
    /// [`LlmError`] when the completion cannot start.
    pub async fn stream(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<LlmStream, LlmError> {
        match self {
            Self::OpenAi(client) => client.stream(messages, tools, cancel).await,
            Self::Local(model) => model.stream(messages, tools, cancel).await,
        }
    }

    /// Prepares for prompts that start with the system messages of `messages` and `tools`:
    /// the local model computes their state now (seconds: a request to llama.cpp's server, or
    /// candle on a blocking thread); an endpoint needs nothing.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the local model fails.
    pub async fn warm_up(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(), LlmError> {
        match self {
            Self::OpenAi(_) => Ok(()),
            Self::Local(model) => model.warm_up_async(messages, tools).await,
        }
    }

    /// Tokens in `text`: counted by the local model's tokenizer; for an endpoint, whose
    /// tokenizer is unknown here, estimated as one token per 4 bytes.
    pub fn count_tokens(&self, text: &str) -> usize {
        match self {
            Self::OpenAi(_) => text.len().div_ceil(4),
            Self::Local(model) => model
                .tokenize(text)
                .map(|ids| ids.len())
                .unwrap_or_else(|_| text.len().div_ceil(4)),
        }
    }

    /// The same model; an endpoint gets a circuit breaker of `config` (`[breaker]`).
    pub fn with_breaker(self, config: &crate::breaker::BreakerConfig) -> Self {
        match self {
            Self::OpenAi(client) => Self::OpenAi(Box::new(client.with_breaker(config))),
            local => local,
        }
    }

    /// The endpoint's circuit breaker (a local model has none).
    pub fn breaker(&self) -> Option<&crate::breaker::Breaker> {
        match self {
            Self::OpenAi(client) => Some(client.breaker()),
            Self::Local(_) => None,
        }
    }

    /// What it is, for logs: the endpoint and model, or the model file.
    pub fn describe(&self) -> String {
        match self {
            Self::OpenAi(client) => client.describe(),
            Self::Local(model) => format!(
                "local {} on {}",
                model.path().display(),
                match model.engine() {
                    crate::llm::config::LocalEngine::LlamaCpp => "llama.cpp",
                    crate::llm::config::LocalEngine::Candle => "candle",
                }
            ),
        }
    }
}

/// OpenAI-style function tools (`{"type": "function", "function": {...}}`), as the tool hub
/// gives them.
pub type FunctionTools = [Value];
