//! `[llm]`: the chat model (the local GGUF model, or an OpenAI-compatible endpoint), its
//! default system prompt and tool examples, and the limits of a spoken reply.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// The system prompt of every conversation unless `[llm] system_prompt` says otherwise: short
/// spoken answers, no markup, and what the tools are for.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are voxloop, a voice assistant. Your replies are spoken aloud: answer in one or two short sentences, without lists or markup. Use the tools to play music, set the volume, stop playback, tell the time, or end the conversation.";

/// Example exchanges for the local model, for the bundled music server's tools.
pub const DEFAULT_TOOL_EXAMPLES: &str = r#"User: Play something by Queen.
Assistant: <tool_call>{"name": "musicPlayer", "arguments": {"query": "Queen"}}
User: Put some music on.
Assistant: <tool_call>{"name": "musicPlayer", "arguments": {}}
User: Hi!
Assistant: Hello! What would you like to hear?
User: Make it louder, 80 percent.
Assistant: <tool_call>{"name": "set_volume", "arguments": {"volume": 80}}
User: Stop the music.
Assistant: <tool_call>{"name": "stop_playback", "arguments": {}}
User: How far away is the moon?
Assistant: About 384,000 kilometres."#;

/// Which chat model `[llm]` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// The local GGUF model on the CPU (`local_model`).
    Local,
    /// An OpenAI-compatible endpoint (`url`, `model`, `api_key_env`).
    Openai,
}

/// What runs the local GGUF model (`[llm] engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalEngine {
    /// llama.cpp's `llama-server`, run by voxloop as a child process on loopback (`voxloop
    /// models fetch llama-server` builds it): about 4 times candle's prefill and twice its
    /// decode on 2 cores (BENCHMARKS.md). Falls back to candle, with a warning, when the binary
    /// is missing.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// candle's quantized llama and qwen2 in this process.
    #[serde(rename = "candle")]
    Candle,
}

/// `[llm]`: the chat model: the local GGUF model (default), or an OpenAI-compatible chat
/// completions endpoint (OpenAI, Ollama, vLLM, llama.cpp's server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// `local` or `openai`.
    pub provider: LlmProvider,
    /// The system prompt, first in every request.
    pub system_prompt: String,
    /// User turns kept in the history sent to the model (older turns are dropped with their
    /// replies and tool results).
    pub history_turns: u32,
    /// Most tokens of history sent to the model (the current turn is always kept): counted by
    /// the local model's tokenizer, estimated as 4 characters a token for an endpoint.
    pub history_tokens: u32,
    /// The local model: a GGUF file of the llama (SmolLM2) or qwen2 (Qwen2.5) architecture with
    /// a GPT-2 tokenizer and ChatML; default: Qwen2.5-Coder-0.5B-Instruct in the model directory
    /// (`voxloop models fetch`).
    pub local_model: Option<PathBuf>,
    /// What runs the local model: `"llama.cpp"` (default) or `"candle"`.
    pub engine: LocalEngine,
    /// Engine `llama.cpp`: the `llama-server` binary; default: `llama-server` in the model
    /// directory (`voxloop models fetch llama-server`).
    pub llama_server: Option<PathBuf>,
    /// Engine `llama.cpp`: CPU threads for the model (0: one per core).
    pub engine_threads: u32,
    /// Engine `llama.cpp`: completions run at once (1..=64, default 4), each with its own
    /// context of 4096 tokens (about 50 MB of KV cache each for Qwen2.5-0.5B) and its own
    /// cached prompt, so that several conversations do not evict each other's; further
    /// requests wait in voxloop's queue (`max_wait_ms`), first come first served.
    pub engine_slots: u32,
    /// Local model: most time a completion waits, in arrival order, for one of the engine's
    /// workers (`engine_slots` on llama.cpp, one on candle) while other sessions' completions
    /// run, in ms (0..=600000, default 10000); past it the speaker hears that the assistant
    /// is busy ([`crate::compute`]).
    pub max_wait_ms: u64,
    /// Engine `llama.cpp`: how long the server may take to start and load the model, in ms.
    pub engine_start_timeout_ms: u64,
    /// Engine `llama.cpp`: the server's CPU niceness (0..=19, default 10; setpriority(2)).
    /// While the model writes the rest of a reply, the TTS voices its first sentence and
    /// whisper hears other sessions: with a higher niceness they get the cores first, and
    /// the model takes what is left (BENCHMARKS.md).
    pub engine_nice: u32,
    /// Requests for voxloop's own tools (volume, the time, stop, goodbye) are matched by fixed
    /// English and Chinese patterns and call the tool without the model
    /// ([`crate::conversation::intent`]); everything else goes to the model.
    pub builtin_intents: bool,
    /// Percentage points that "louder" and "quieter" move the volume (1..=100).
    pub volume_step: u32,
    /// Most sentences of one spoken reply (1..=100); the model's stream ends there.
    pub max_reply_sentences: u32,
    /// Most words of one spoken reply (1..=10000; a CJK character counts as a word).
    pub max_reply_words: u32,
    /// Most characters of one request sent to the model (100..=100000): a longer transcript (a
    /// ten-minute ramble) keeps its last this many characters, so the prompt stays bounded.
    pub max_request_chars: u32,
    /// Local model: how much more likely (in logits, 0.0..=20.0) a reply's first token may be text
    /// than the start of a tool call, and the reply still be a tool call. Unset: the model
    /// family's default, 3.0 for SmolLM2 (small models rarely start a call on their own; with
    /// SmolLM2-135M, 3.0 sent 8 of 8 requests for a tool to a call and 1 of 7 others too) and
    /// 0.0 for Qwen2.5 (its own choice; 3.0 turned "Hi, how are you?" into a call).
    pub tool_call_bias: Option<f32>,
    /// Local model: example exchanges shown after the tools (`User:` lines, then the reply or
    /// `<tool_call>{...}`); those calling a tool that is not offered are left out.
    pub tool_examples: String,
    /// Local model: string arguments of a tool call are runs of 1 to 8 words of the user's
    /// request (a song title, an artist), so a small model cannot invent them.
    pub tool_strings_from_request: bool,
    /// Local model: the longest string argument in characters, when they are not copied from
    /// the request.
    pub tool_string_max_chars: u32,
    /// Base URL, up to `/v1` (provider `openai`).
    pub url: String,
    /// Model name the endpoint knows (provider `openai`).
    pub model: String,
    /// Name of the environment variable holding the API key, if the endpoint needs one.
    pub api_key_env: Option<String>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Most tokens per reply.
    pub max_tokens: u32,
    /// Time to connect and for the answer to start, and the longest pause inside a stream, in ms.
    pub timeout_ms: u64,
    /// Retries of a request that could not connect or got 429 or 5xx, before any output.
    pub retries: u32,
    /// First retry's backoff in ms (doubling), unless the endpoint sends `Retry-After`.
    pub retry_backoff_ms: u64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            provider: LlmProvider::Local,
            system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
            history_turns: 10,
            history_tokens: 2048,
            local_model: None,
            engine: LocalEngine::LlamaCpp,
            llama_server: None,
            engine_threads: 0,
            engine_slots: 4,
            max_wait_ms: 10_000,
            engine_nice: 10,
            engine_start_timeout_ms: 60_000,
            builtin_intents: true,
            volume_step: 20,
            max_reply_sentences: 2,
            max_reply_words: 60,
            max_request_chars: 1000,
            tool_call_bias: None,
            tool_examples: DEFAULT_TOOL_EXAMPLES.into(),
            tool_strings_from_request: true,
            tool_string_max_chars: 200,
            url: "http://127.0.0.1:11434/v1".into(),
            model: "llama3.2".into(),
            api_key_env: None,
            temperature: 0.7,
            max_tokens: 256,
            timeout_ms: 30_000,
            retries: 3,
            retry_backoff_ms: 500,
        }
    }
}

impl LlmConfig {
    /// Checks every `[llm]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `llm.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(InvalidSetting {
                key: "llm.url".into(),
                value: format!("{:?}", self.url),
                allowed: "an http:// or https:// URL up to /v1".into(),
            });
        }
        in_range("llm.temperature", self.temperature, 0.0..=2.0, "")?;
        if let Some(bias) = self.tool_call_bias {
            in_range("llm.tool_call_bias", bias, 0.0..=20.0, "logits")?;
        }
        in_range(
            "llm.tool_string_max_chars",
            self.tool_string_max_chars,
            1..=4096,
            "characters",
        )?;
        in_range("llm.max_tokens", self.max_tokens, 1..=32_768, "tokens")?;
        in_range(
            "llm.engine_threads",
            self.engine_threads,
            0..=256,
            "threads",
        )?;
        in_range("llm.engine_slots", self.engine_slots, 1..=64, "completions")?;
        in_range(
            "llm.max_wait_ms",
            self.max_wait_ms,
            0..=600_000,
            "milliseconds",
        )?;
        in_range("llm.engine_nice", self.engine_nice, 0..=19, "")?;
        in_range(
            "llm.engine_start_timeout_ms",
            self.engine_start_timeout_ms,
            1000..=600_000,
            "ms",
        )?;
        in_range(
            "llm.volume_step",
            self.volume_step,
            1..=100,
            "percentage points",
        )?;
        in_range(
            "llm.max_reply_sentences",
            self.max_reply_sentences,
            1..=100,
            "sentences",
        )?;
        in_range(
            "llm.max_reply_words",
            self.max_reply_words,
            1..=10_000,
            "words",
        )?;
        in_range(
            "llm.timeout_ms",
            self.timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range("llm.retries", self.retries, 0..=10, "retries")?;
        in_range(
            "llm.max_request_chars",
            self.max_request_chars,
            100..=100_000,
            "characters",
        )?;
        in_range(
            "llm.retry_backoff_ms",
            self.retry_backoff_ms,
            0..=60_000,
            "milliseconds",
        )?;
        Ok(())
    }

    /// The local model file: `local_model`, else Qwen2.5-0.5B in the model directory.
    pub fn local_model_path(&self) -> PathBuf {
        self.local_model.clone().unwrap_or_else(|| {
            crate::models::spec("qwen2.5-0.5b")
                .map(crate::models::model_path)
                .unwrap_or_default()
        })
    }

    /// The `llama-server` binary: `llama_server`, else the one in the model directory.
    pub fn llama_server_path(&self) -> PathBuf {
        self.llama_server.clone().unwrap_or_else(|| {
            crate::models::spec("llama-server")
                .map(crate::models::model_path)
                .unwrap_or_default()
        })
    }
}
