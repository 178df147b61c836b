//! voxloop's configuration: one TOML file, every limit named, defaults that work offline.
//!
//! The file is found by `--config PATH`, else `voxloop.toml` in the current directory if it
//! exists, else the built-in defaults apply. Unknown keys are refused (a typo must not silently
//! fall back to a default), and every value is checked once at start: a wrong one fails with a
//! [`ConfigError::Invalid`] that names the key, the value and what is allowed.
//!
//! `assets/config/voxloop.example.toml` documents every key with its default; a test keeps the
//! two in step.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use mcp_audio::config::MusicConfig;

use crate::tools::paging::MAX_PAGE_BYTES;

/// The file name looked for in the current directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "voxloop.toml";

/// Errors from reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type. The TOML
    /// parser's message points at the line, the key and the value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file named.
        path: PathBuf,
        /// The TOML parser's message: the line, the key and the value.
        message: String,
    },
    /// A value has the right type but is outside what is allowed.
    #[error("config key `{key}` = {value} is not allowed: {allowed}")]
    Invalid {
        /// The dotted key, e.g. `llm.max_tokens`.
        key: String,
        /// The value as written.
        value: String,
        /// What is allowed, with its unit.
        allowed: String,
    },
}

impl From<mcp_audio::config::InvalidSetting> for ConfigError {
    fn from(e: mcp_audio::config::InvalidSetting) -> Self {
        ConfigError::Invalid {
            key: e.key,
            value: e.value,
            allowed: e.allowed,
        }
    }
}

/// The whole configuration. Each section has its own defaults; an absent section is all defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[music]`: the bundled music player MCP server (crates/mcp-audio), which reads this section.
    pub music: MusicConfig,
    /// `[mcp_servers.NAME]`: the MCP servers the tool hub connects to. None configured: the
    /// bundled music server, as `music`.
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    /// `[tools]`: calls, paged media and terminal rules.
    pub tools: ToolsConfig,
    /// `[audio]`: playback and output formats.
    pub audio: AudioConfig,
    /// `[tts]`: text to speech.
    pub tts: TtsConfig,
    /// `[asr]`: speech to text.
    pub asr: AsrConfig,
    /// `[llm]`: the chat model's OpenAI-compatible endpoint.
    pub llm: LlmConfig,
    /// `[vad]`: voice activity, turns and barge-in.
    pub vad: VadConfig,
    /// `[device]`: the smart-speaker server (`voxloop serve`).
    pub device: DeviceConfig,
    /// `[vision]`: the model that answers the device camera's questions.
    pub vision: VisionConfig,
    /// `[auth]`: who may use each network surface (devices, the HTTP API, the duplex server).
    pub auth: AuthConfig,
    /// `[server]`: `voxloop serve`'s HTTP API and the request limits of every HTTP surface.
    pub server: ServerConfig,
    /// `[breaker]`: circuit breakers in front of every upstream (MCP servers, LLM, TTS).
    pub breaker: BreakerConfig,
    /// `[duplex]`: the PersonaPlex co-host.
    pub duplex: DuplexConfig,
    /// The file this configuration was read from, if any (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[audio]`: playback. Rates in Hz, durations in ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    /// Sample rate of WAV output (`--output`); the speaker uses its device's own rate.
    pub output_rate: u32,
    /// Channels of WAV output.
    pub output_channels: u16,
    /// Frame length written to the output: the unit in which a stop takes effect.
    pub frame_ms: u32,
    /// Starting playback volume, percent (perceptual curve).
    pub volume: u8,
    /// How long a volume change takes (a jump would click).
    pub volume_ramp_ms: u32,
    /// Audio buffered ahead of the speaker.
    pub speaker_buffer_ms: u32,
    /// Let a new turn's audio queue behind the old turn's instead of cutting it off.
    pub overlap_turns: bool,
    /// Opus sample rate sent to devices (16000 or 24000).
    pub device_rate: u32,
    /// Opus frame length sent to devices (20 or 60).
    pub device_frame_ms: u32,
    /// How far ahead of real time device frames are sent.
    pub device_lead_ms: u32,
    /// Opus bit rate to devices, bits per second.
    pub device_bitrate: i32,
    /// Opus encoder complexity for devices, 0..=10 (libopus's own default is 10). The encoder is
    /// most of a playing device session's CPU; 4 encodes 1.79 times as fast as 10 at 0.4 dB less
    /// SNR (BENCHMARKS.md, "Audio pipeline": the complexity table).
    pub device_opus_complexity: i32,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            output_rate: 24_000,
            output_channels: 1,
            frame_ms: 20,
            volume: 80,
            volume_ramp_ms: 10,
            speaker_buffer_ms: 100,
            overlap_turns: false,
            device_rate: 24_000,
            device_frame_ms: 60,
            device_lead_ms: 120,
            device_bitrate: crate::pipeline::opus::DEFAULT_BITRATE,
            device_opus_complexity: 4,
        }
    }
}

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
    /// requests wait in the server's queue, first come first served.
    pub engine_slots: u32,
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
            system_prompt: crate::conversation::DEFAULT_SYSTEM_PROMPT.into(),
            history_turns: 10,
            history_tokens: 2048,
            local_model: None,
            engine: LocalEngine::LlamaCpp,
            llama_server: None,
            engine_threads: 0,
            engine_slots: 4,
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

/// `[asr]`: speech to text with whisper.cpp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AsrConfig {
    /// A ggml Whisper model file; default: `ggml-base.bin` in the model directory
    /// (`voxloop models fetch whisper-base`).
    pub model: Option<PathBuf>,
    /// Spoken language: a code such as `en` (the default) or `zh`, or `auto` (detect; about
    /// 1.4 s more per utterance on 2 cores).
    pub language: String,
    /// CPU threads for whisper.cpp.
    pub threads: u32,
    /// Beam search width; 0 or 1 for greedy decoding (the default). Width 5 missed fewer words
    /// of the assistant bench's espeak-ng requests (23.9 % against 27.9 %) but, with the fitted
    /// encoder context, wrote a LibriVox sentence twice and raised tests/it/speech.rs's WER on
    /// human speech past its 10 % bound (BENCHMARKS.md).
    pub beam_size: u32,
    /// Run whisper's encoder over the utterance's length instead of a full 30 s window (much
    /// faster for short commands; see BENCHMARKS.md for the accuracy cost).
    pub fit_context: bool,
    /// Bias whisper towards the words of the moment: its initial prompt lists the titles of the
    /// resources the MCP servers list ([`crate::pipeline::asr::vocabulary_prompt`]). Off by
    /// default: with whisper base it cut the title words missed from 31.8 % to 4.5 %, but
    /// whisper also wrote prompt words into other requests, and whole turns were right less
    /// often (28 against 30 of 45; BENCHMARKS.md).
    pub vocabulary_prompt: bool,
    /// Longest vocabulary prompt in characters (0..=1000; whisper keeps at most 223 tokens of it).
    pub prompt_max_chars: u32,
    /// Text whisper takes to precede every utterance (its initial prompt; the vocabulary prompt,
    /// when on, follows it), which tells the decoder what kind of speech to expect; at most 200
    /// characters, "" for none. Default: [`crate::pipeline::asr::ASSISTANT_CONTEXT`] when
    /// `language` is `en`, none for other languages. On the assistant bench's spoken requests it
    /// cut whisper base's word error rate from 27.9 % to 23.4 %, with no loss on the human
    /// recordings of `assets/speech` (BENCHMARKS.md).
    pub context_prompt: Option<String>,
}

impl Default for AsrConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        Self {
            model: None,
            language: "en".into(),
            threads: cores.min(8),
            beam_size: 0,
            fit_context: true,
            vocabulary_prompt: false,
            prompt_max_chars: 600,
            context_prompt: None,
        }
    }
}

/// `[vad]`: voice activity detection, end of turn and barge-in. Durations in ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    /// The detector: `earshot` (default) or `webrtc` (see BENCHMARKS.md for the comparison).
    pub engine: crate::pipeline::vad::VadEngine,
    /// Voice probability above which a frame counts as speech (0.0..=1.0).
    pub threshold: f32,
    /// Silence that ends a turn.
    pub end_silence_ms: u32,
    /// Shorter speech is ignored (a cough, a click).
    pub min_speech_ms: u32,
    /// An utterance is cut at this length.
    pub max_utterance_ms: u32,
    /// Audio kept from before speech was detected, so the first syllable is not lost.
    pub pre_roll_ms: u32,
    /// Barge-in: speech must last this long during playback to stop it.
    pub barge_in_ms: u32,
    /// Barge-in: the microphone level must exceed the playback level times this (the assistant's
    /// own voice through a speaker must not interrupt it).
    pub barge_in_level_ratio: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            engine: crate::pipeline::vad::VadEngine::Earshot,
            threshold: 0.7,
            end_silence_ms: 600,
            min_speech_ms: 250,
            max_utterance_ms: 30_000,
            pre_roll_ms: 300,
            barge_in_ms: 32,
            barge_in_level_ratio: 1.5,
        }
    }
}

/// Which TTS provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TtsProvider {
    /// Kokoro-82M, a neural voice, offline through ONNX Runtime (`voxloop models fetch`); when
    /// its files are missing, espeak-ng speaks instead (logged once).
    Kokoro,
    /// The `espeak-ng` program (offline; Debian package `espeak-ng`).
    EspeakNg,
    /// An OpenAI-compatible `POST {url}/audio/speech` endpoint.
    Openai,
}

/// `[tts]`: text to speech.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TtsConfig {
    /// `kokoro`, `espeak-ng` or `openai`.
    pub provider: TtsProvider,
    /// Kokoro's voice for English sentences (`af_heart`, `am_michael`, `bf_emma`, ...).
    pub voice_en: String,
    /// Kokoro's voice for Chinese sentences (`zf_xiaobei`, `zm_yunjian`, ...).
    pub voice_zh: String,
    /// The language of every sentence (`en` or `zh`); unset: each sentence's from its script
    /// (Chinese when it holds a Han character).
    pub language: Option<crate::pipeline::g2p::Language>,
    /// Kokoro's speaking rate, 1.0 the voice's own (0.5..=2.0).
    pub speed: f32,
    /// Threads one Kokoro synthesis uses (0: one per core). Syntheses run one at a time.
    pub threads: usize,
    /// Voice: an espeak-ng voice or language (`en-us`, `cmn`, ...) for English sentences (and
    /// for every sentence when `language` is set), or the endpoint's voice name. espeak-ng
    /// speaks Chinese sentences as `cmn` (Mandarin) otherwise.
    pub voice: String,
    /// espeak-ng speaking rate, words per minute.
    pub speed_wpm: u32,
    /// The espeak-ng program.
    pub espeak_command: String,
    /// Base URL of the OpenAI-compatible API (up to `/v1`).
    pub url: String,
    /// Model name sent to the endpoint.
    pub model: String,
    /// Response format asked of the endpoint: `wav`, `mp3`, `opus`, `flac` or `pcm`.
    pub format: String,
    /// Name of the environment variable holding the API key, if the endpoint needs one.
    pub api_key_env: Option<String>,
    /// Time limit to connect, and for the whole request to the endpoint, in ms.
    pub timeout_ms: u64,
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            provider: TtsProvider::Kokoro,
            voice_en: "af_heart".into(),
            voice_zh: "zf_xiaobei".into(),
            language: None,
            speed: 1.0,
            threads: 0,
            voice: "en-us".into(),
            speed_wpm: 170,
            espeak_command: "espeak-ng".into(),
            url: "http://127.0.0.1:8880/v1".into(),
            model: "tts-1".into(),
            format: "wav".into(),
            api_key_env: None,
            timeout_ms: 30_000,
        }
    }
}

/// One MCP server, in the shape MCP hosts use: a child process spoken to over stdio (`command`,
/// `args`, `env`, `cwd`), or a streamable HTTP endpoint (`url`, `headers`, `bearer_token_env`).
/// Exactly one of `command` and `url` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpServerConfig {
    /// Program to start (stdio transport).
    pub command: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables added to voxloop's own for the child.
    pub env: BTreeMap<String, String>,
    /// Working directory of the child (default: voxloop's).
    pub cwd: Option<PathBuf>,
    /// Streamable HTTP endpoint, e.g. `http://127.0.0.1:3001/mcp`.
    pub url: Option<String>,
    /// Extra HTTP headers sent with every request.
    pub headers: BTreeMap<String, String>,
    /// Name of an environment variable holding a bearer token for `Authorization`.
    pub bearer_token_env: Option<String>,
}

/// `[duplex]`: the PersonaPlex co-host (ARCHITECTURE §6). Durations in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DuplexConfig {
    /// Directory with the files of nvidia/personaplex-7b-v1 (`model.safetensors`, Mimi's
    /// `tokenizer-e351c8d8-checkpoint125.safetensors`, `tokenizer_spm_32k_3.model`, `voices/`).
    /// Env `PERSONAPLEX_MODEL_DIR` overrides it.
    pub model_dir: Option<PathBuf>,
    /// Compute device: `auto` (the GPU when built with the `cuda` feature and one is there, else
    /// the CPU), `cpu` or `cuda`.
    pub device: String,
    /// LM weights' dtype: `auto` (bf16 on a GPU, f32 on the CPU), `bf16` or `f32`.
    pub dtype: String,
    /// Seconds without a request before the model is parked in host memory (1..=86400). Env
    /// `GPU_IDLE_TIMEOUT` overrides it.
    pub idle_timeout_s: u64,
    /// The voice when none is asked for (an id of `assets/duplex/voices.toml`).
    pub default_voice: String,
    /// Sampling seed when none is asked for.
    pub seed: u64,
    /// Address and port of `voxloop duplex serve` (the reference server's port).
    pub bind: String,
    /// Longest offline input (`/api/offline`, `process_audio`), seconds of audio.
    pub max_input_s: f64,
    /// Largest `/api/offline` upload, bytes.
    pub max_upload_bytes: usize,
    /// 80 ms frames of a conversation's audio queued for the model before the WebSocket stops
    /// reading (back-pressure on a client that sends faster than the model runs).
    pub chat_queue_frames: usize,
    /// How long a new conversation waits for the model before it is refused as busy (close
    /// code 1013), ms.
    pub chat_wait_ms: u64,
}

impl Default for DuplexConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            device: "auto".into(),
            dtype: "auto".into(),
            idle_timeout_s: 300,
            default_voice: "NATF2".into(),
            seed: 42_424_242,
            bind: "127.0.0.1:8998".into(),
            max_input_s: 600.0,
            max_upload_bytes: 64 << 20,
            chat_queue_frames: 64,
            chat_wait_ms: 1000,
        }
    }
}

/// `[device]`: the xiaozhi-esp32 WebSocket server (ARCHITECTURE §5). Durations in ms, sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Address and port to listen on.
    pub bind: String,
    /// The WebSocket endpoint's path.
    pub path: String,
    /// The OTA endpoint's path (`GET` or `POST`, with or without the trailing slash): where the
    /// firmware learns the WebSocket URL and its token; `{ota_path}activate` is the activation
    /// poll.
    pub ota_path: String,
    /// The WebSocket URL the OTA endpoint gives devices; default `ws://{Host}{path}` from the
    /// request's `Host` header (never a wildcard bind address).
    pub public_url: Option<String>,
    /// Give a device unknown to the store an activation code (the owner approves it with
    /// `voxloop devices approve CODE`); off: unknown devices get no token from OTA.
    pub activation: bool,
    /// The device store (activated devices and their tokens, pending activations); default
    /// `~/.local/share/voxloop/devices.json`.
    pub store: Option<PathBuf>,
    /// How long an activation code waits for approval, seconds.
    pub activation_ttl_s: u64,
    /// Most activations waiting at once (the oldest are dropped first).
    pub max_pending_activations: usize,
    /// Hand the first of `[auth] tokens` to every OTA caller that has no token of its own. This
    /// equals anonymous access to the device surface: anyone who can reach OTA gets a token.
    pub ota_shared_token: bool,
    /// Path of the vision endpoint the device's camera posts images to (`POST`, multipart
    /// `question` + `file`), announced in device-MCP `initialize` as `capabilities.vision`.
    pub vision_path: String,
    /// Path of the admin endpoints for device activations (`GET` list, `POST {path}/approve`
    /// `{code}`, `DELETE {path}/{device_id}`); admin role only.
    pub admin_path: String,
    /// Firmware version the OTA endpoint offers.
    pub firmware_version: String,
    /// Firmware download URL the OTA endpoint offers (empty: none).
    pub firmware_url: String,
    /// Time a device has to send its hello after connecting.
    pub hello_timeout_ms: u64,
    /// A session with no message from the device for this long is closed.
    pub idle_timeout_ms: u64,
    /// Interval of WebSocket pings to the device.
    pub ping_interval_ms: u64,
    /// Largest message (text or binary) a device may send.
    pub max_message_bytes: usize,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// Most sessions at once from one IP address.
    pub max_sessions_per_ip: u32,
    /// Device-side MCP: how long the device has to answer one request (`initialize`,
    /// `tools/list`, `tools/call`) before it fails with a timeout error.
    pub mcp_request_timeout_ms: u64,
    /// Device-side MCP: most `tools/list` pages read (cursor after cursor) at session start.
    pub mcp_max_list_pages: u32,
    /// `listen detect` texts that are only the wake word (compared without case and
    /// punctuation): the device starts listening next, so no turn runs. Any other detect text is
    /// the user's request, as if heard.
    pub wake_words: Vec<String>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8000".into(),
            path: "/xiaozhi/v1/".into(),
            ota_path: "/xiaozhi/ota/".into(),
            public_url: None,
            activation: true,
            store: None,
            activation_ttl_s: 600,
            max_pending_activations: 256,
            ota_shared_token: false,
            vision_path: "/xiaozhi/vision/explain".into(),
            admin_path: "/xiaozhi/admin/devices".into(),
            firmware_version: "1.0.0".into(),
            firmware_url: String::new(),
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            ping_interval_ms: 30_000,
            max_message_bytes: 65_536,
            max_sessions: 1024,
            max_sessions_per_ip: 16,
            mcp_request_timeout_ms: 5_000,
            mcp_max_list_pages: 16,
            wake_words: vec!["你好小智".into(), "hi esp".into(), "hey voxloop".into()],
        }
    }
}

/// `[vision]`: an OpenAI-compatible vision model (chat completions with an `image_url` part)
/// that answers the questions a device's camera tool posts to `[device] vision_path`. No `url`:
/// the endpoint answers that vision is not configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionConfig {
    /// Base URL of the API (`.../v1`); empty: no vision model.
    pub url: String,
    /// The model's name.
    pub model: String,
    /// Environment variable holding the API key, if the endpoint wants one.
    pub api_key_env: Option<String>,
    /// Time for the whole answer, ms.
    pub timeout_ms: u64,
    /// Largest image accepted, bytes (larger: HTTP 413).
    pub max_image_bytes: usize,
    /// Most tokens in the answer.
    pub max_tokens: u32,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: String::new(),
            api_key_env: None,
            timeout_ms: 30_000,
            max_image_bytes: 8 << 20,
            max_tokens: 300,
        }
    }
}

/// A caller's role. `admin` may also use the admin-only tools and endpoints (moving or dropping
/// the GPU model, changing its idle timeout); `user` may use everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May manage the GPU model and everything a user may.
    Admin,
    /// May talk to the assistant and call tools.
    #[default]
    User,
}

impl Role {
    /// `admin` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// `[[auth.api_keys]]`: one API key. Only its SHA-256 is stored (`voxloop auth new-key` makes a
/// key and prints this entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds it, for logs, metrics and the per-key rate limit.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the key, 64 lowercase hex digits.
    pub sha256: String,
}

/// `[auth.jwt]`: JWT bearer tokens (RFC 7519). Signed with HS256 (a shared secret) or RS256 (an
/// RSA key pair; the public key here). `exp`, `iss` and `aud` are required and checked; the
/// `role` claim (`admin` or `user`, default `user`) gives the role, `sub` the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Name of an environment variable holding the HS256 secret (at least 32 bytes).
    pub hs256_secret_env: Option<String>,
    /// PEM file of the RSA public key that verifies RS256 tokens.
    pub rs256_public_key: Option<PathBuf>,
    /// The only accepted `iss`.
    pub issuer: String,
    /// The only accepted `aud`.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret_env: None,
            rs256_public_key: None,
            issuer: String::new(),
            audience: "voxloop".into(),
            leeway_s: 30,
        }
    }
}

/// `[auth]`: who may use the network surfaces: the device WebSocket, `voxloop serve`'s HTTP API
/// (`/mcp`, `/v1/mcp/*`, `/metrics`) and the duplex server (REST, WebSocket, MCP over HTTP).
///
/// Credentials: an API key or a JWT as `Authorization: Bearer ...` (or `X-API-Key`, or the
/// `access_token` query parameter of RFC 6750 §2.3 for browsers' WebSockets). Devices may also
/// present a device token. With no credential configured at all, a surface serves only
/// loopback callers, as `admin`, and refuses to bind to another address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Device tokens any device may present (the firmware's plain bearer token).
    pub tokens: Vec<String>,
    /// Per-device tokens, by `Device-Id`: that device must present its own.
    pub device_tokens: BTreeMap<String, String>,
    /// Accept callers without a credential, as `anonymous_role` (only when set).
    pub allow_anonymous: bool,
    /// The role of callers without a credential when `allow_anonymous` is set.
    pub anonymous_role: Role,
    /// API keys (hashed).
    pub api_keys: Vec<ApiKeyConfig>,
    /// JWT bearer tokens; absent: none accepted.
    pub jwt: Option<JwtConfig>,
    /// Tools only `admin` may call, on every surface (MCP and the REST bridge).
    pub admin_tools: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            device_tokens: BTreeMap::new(),
            allow_anonymous: false,
            anonymous_role: Role::User,
            api_keys: Vec::new(),
            jwt: None,
            admin_tools: ["release_gpu", "offload_gpu", "update_gpu_timeout"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl AuthConfig {
    /// Whether any credential is configured (tokens, API keys or JWT).
    pub fn has_credentials(&self) -> bool {
        !self.tokens.is_empty()
            || !self.device_tokens.is_empty()
            || !self.api_keys.is_empty()
            || self.jwt.is_some()
    }
}

/// `[server]`: `voxloop serve`'s HTTP API (its MCP endpoint, the REST bridge, metrics and
/// probes) and the request limits every HTTP surface applies (the device server's and the
/// duplex server's too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the HTTP API (loopback unless configured).
    pub bind: String,
    /// Browser origins accepted besides loopback ones (`http://localhost:*`,
    /// `http://127.0.0.1:*`, `http://[::1]:*`); a request with another `Origin` gets 403.
    pub allowed_origins: Vec<String>,
    /// Serve `/metrics` without a credential (for a scraper on a trusted network).
    pub public_metrics: bool,
    /// Largest request body (REST bridge, MCP), bytes.
    pub max_body_bytes: usize,
    /// Most requests in one `/v1/mcp/tools/batch` call.
    pub max_batch_requests: usize,
    /// The rate limits' window, seconds.
    pub rate_window_s: u64,
    /// Requests per window for one credential (API key, token subject); 0: no limit.
    pub rate_per_key: u32,
    /// Requests per window from one IP address, before any credential is checked; 0: no limit.
    pub rate_per_ip: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            allowed_origins: Vec::new(),
            public_metrics: false,
            max_body_bytes: 1 << 20,
            max_batch_requests: 100,
            rate_window_s: 60,
            rate_per_key: 600,
            rate_per_ip: 1200,
        }
    }
}

/// `[breaker]`: a circuit breaker per upstream (each MCP server, the LLM endpoint, the TTS). It
/// opens after `failures` consecutive failures, fails fast while open, lets calls through again
/// (half-open) after `open_ms`, and closes on the first success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// Time open before calls are tried again, ms.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_ms: 30_000,
        }
    }
}

/// `[tools]`: limits of the tool hub. Every duration is in milliseconds, every size in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// Time for one tool call; on expiry the call is cancelled (`notifications/cancelled`).
    pub call_timeout_ms: u64,
    /// Time for a server to start and finish the MCP handshake.
    pub start_timeout_ms: u64,
    /// `tools/list` pages read at most per server (a server that keeps sending cursors is cut
    /// off there; a repeated cursor stops at once).
    pub list_max_pages: u32,
    /// Longest message (one JSON-RPC line) read from a stdio MCP server, bytes; a longer one is
    /// dropped and the request that waited for it fails naming this limit.
    pub max_message_bytes: usize,
    /// Wait before restarting a server that died, doubled after each failed start, at most 30 s.
    pub restart_backoff_ms: u64,
    /// Bytes asked for per `resources/read` page of paged audio (ARCHITECTURE §3).
    pub page_bytes: u64,
    /// Pages requested ahead of the one being consumed (0: strictly one at a time).
    pub prefetch: usize,
    /// Time for one page.
    pub page_timeout_ms: u64,
    /// Retries of a page that timed out or failed on the server's side, with doubling backoff.
    pub page_retries: u32,
    /// First retry backoff.
    pub page_retry_backoff_ms: u64,
    /// Bytes one media item may stream at most (a resource that never sends `[DONE]` stops here).
    pub max_media_bytes: u64,
    /// Pages one media item may stream at most.
    pub max_media_pages: u64,
    /// Tool rounds per turn before a spoken fallback (ARCHITECTURE §2, rule 5).
    pub max_tool_rounds: u32,
    /// Call the LLM again after media started playing (ARCHITECTURE §2, rule 2).
    pub continue_after_media: bool,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            call_timeout_ms: 60_000,
            max_message_bytes: 16 << 20,
            start_timeout_ms: 30_000,
            list_max_pages: 50,
            restart_backoff_ms: 1_000,
            page_bytes: crate::tools::paging::DEFAULT_PAGE_BYTES,
            prefetch: 2,
            page_timeout_ms: 30_000,
            page_retries: 2,
            page_retry_backoff_ms: 250,
            max_media_bytes: 512 * 1024 * 1024,
            max_media_pages: 100_000,
            max_tool_rounds: 5,
            continue_after_media: false,
        }
    }
}

impl Config {
    /// Loads the configuration: `path` if given (it must exist), else [`DEFAULT_CONFIG_FILE`] in
    /// the current directory if present, else the defaults. The result has been checked with
    /// [`Config::validate`] and its relative paths resolved against the file's directory.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when a named file cannot be read, [`ConfigError::Parse`] for bad TOML,
    /// unknown keys or wrong types, [`ConfigError::Invalid`] for values out of range.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.clone(),
                message,
            },
            other => other,
        })?;
        // Paths written in the file are relative to it; defaults stay relative to the current
        // directory.
        let base = path.parent().unwrap_or(Path::new(""));
        let table: toml::Table = toml::from_str(&text).unwrap_or_default();
        let written =
            |section: &str, key: &str| table.get(section).and_then(|s| s.get(key)).is_some();
        config
            .music
            .resolve_paths(base, written("music", "library"));
        config.asr.model = config.asr.model.map(|m| base.join(m));
        config.llm.local_model = config.llm.local_model.map(|m| base.join(m));
        if let Some(jwt) = config.auth.jwt.as_mut() {
            jwt.rs256_public_key = jwt.rs256_public_key.take().map(|k| base.join(k));
        }
        for server in config.mcp_servers.values_mut() {
            server.cwd = server.cwd.take().map(|c| base.join(c));
        }
        config.source = Some(path);
        Ok(config)
    }

    /// Adds the servers of a Claude-Desktop-style JSON file (`{"mcpServers": {NAME: {"command",
    /// "args", "env", "cwd"} | {"url", "headers"}}}`, with an optional `"type"` of `stdio`,
    /// `http` or `streamable-http`) to [`Config::mcp_servers`].
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`] for bad JSON or the legacy `sse` type, and
    /// [`ConfigError::Invalid`] for a bad server or a name the TOML file already uses.
    pub fn add_mcp_json(&mut self, path: &Path) -> Result<(), ConfigError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(rename = "mcpServers")]
            mcp_servers: BTreeMap<String, Server>,
        }
        #[derive(Deserialize)]
        struct Server {
            #[serde(rename = "type")]
            kind: Option<String>,
            command: Option<String>,
            #[serde(default)]
            args: Vec<String>,
            #[serde(default)]
            env: BTreeMap<String, String>,
            cwd: Option<PathBuf>,
            url: Option<String>,
            #[serde(default)]
            headers: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let file: File = serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        for (name, server) in file.mcp_servers {
            if let Some(kind) = server.kind.as_deref()
                && !matches!(
                    kind,
                    "stdio" | "http" | "streamable-http" | "streamableHttp"
                )
            {
                return Err(parse_error(format!(
                    "server {name:?}: transport type {kind:?} is not supported (stdio or streamable HTTP)"
                )));
            }
            let config = McpServerConfig {
                command: server.command,
                args: server.args,
                env: server.env,
                cwd: server.cwd,
                url: server.url,
                headers: server.headers,
                bearer_token_env: None,
            };
            config.validate(&name)?;
            if self.mcp_servers.contains_key(&name) {
                return Err(ConfigError::Invalid {
                    key: format!("mcp_servers.{name}"),
                    value: path.display().to_string(),
                    allowed: "a server name not already in the TOML configuration".into(),
                });
            }
            self.mcp_servers.insert(name, config);
        }
        Ok(())
    }

    /// Parses and checks TOML text; relative paths are left as written.
    ///
    /// # Errors
    /// As [`Config::load`]; a parse error's `path` is empty.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its allowed range.
    ///
    /// # Errors
    /// The first [`ConfigError::Invalid`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.music.validate()?;
        let t = &self.tools;
        in_range(
            "tools.max_message_bytes",
            t.max_message_bytes,
            1_024..=1_073_741_824,
            "bytes",
        )?;
        in_range(
            "tools.call_timeout_ms",
            t.call_timeout_ms,
            1..=3_600_000,
            "milliseconds",
        )?;
        in_range(
            "tools.start_timeout_ms",
            t.start_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range(
            "tools.list_max_pages",
            t.list_max_pages,
            1..=10_000,
            "pages",
        )?;
        in_range(
            "tools.restart_backoff_ms",
            t.restart_backoff_ms,
            1..=30_000,
            "milliseconds",
        )?;
        in_range(
            "tools.page_bytes",
            t.page_bytes,
            1..=MAX_PAGE_BYTES,
            "bytes (512 KiB at most, ARCHITECTURE §3)",
        )?;
        in_range("tools.prefetch", t.prefetch, 0..=8, "pages")?;
        in_range(
            "tools.page_timeout_ms",
            t.page_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range("tools.page_retries", t.page_retries, 0..=10, "retries")?;
        in_range(
            "tools.page_retry_backoff_ms",
            t.page_retry_backoff_ms,
            0..=60_000,
            "milliseconds",
        )?;
        in_range(
            "tools.max_media_bytes",
            t.max_media_bytes,
            1..=(64 << 30),
            "bytes",
        )?;
        in_range(
            "tools.max_media_pages",
            t.max_media_pages,
            1..=100_000_000,
            "pages",
        )?;
        in_range("tools.max_tool_rounds", t.max_tool_rounds, 1..=50, "rounds")?;
        for (name, server) in &self.mcp_servers {
            server.validate(name)?;
        }
        let a = &self.audio;
        in_range("audio.output_rate", a.output_rate, 8_000..=192_000, "Hz")?;
        in_range(
            "audio.output_channels",
            a.output_channels,
            1..=8,
            "channels",
        )?;
        in_range("audio.frame_ms", a.frame_ms, 5..=100, "milliseconds")?;
        in_range("audio.volume", a.volume, 0..=100, "percent")?;
        in_range(
            "audio.volume_ramp_ms",
            a.volume_ramp_ms,
            1..=1000,
            "milliseconds",
        )?;
        in_range(
            "audio.speaker_buffer_ms",
            a.speaker_buffer_ms,
            20..=2000,
            "milliseconds",
        )?;
        if ![16_000, 24_000].contains(&a.device_rate) {
            return Err(ConfigError::Invalid {
                key: "audio.device_rate".into(),
                value: a.device_rate.to_string(),
                allowed: "16000 or 24000 Hz (xiaozhi-esp32 downlink)".into(),
            });
        }
        if ![20, 60].contains(&a.device_frame_ms) {
            return Err(ConfigError::Invalid {
                key: "audio.device_frame_ms".into(),
                value: a.device_frame_ms.to_string(),
                allowed: "20 or 60 milliseconds".into(),
            });
        }
        in_range(
            "audio.device_lead_ms",
            a.device_lead_ms,
            0..=2000,
            "milliseconds",
        )?;
        in_range(
            "audio.device_bitrate",
            a.device_bitrate,
            6_000..=256_000,
            "bits per second",
        )?;
        in_range(
            "audio.device_opus_complexity",
            a.device_opus_complexity,
            0..=10,
            "(0 cheapest, 10 best)",
        )?;
        in_range("asr.threads", self.asr.threads, 1..=64, "threads")?;
        in_range("asr.beam_size", self.asr.beam_size, 0..=16, "beams")?;
        in_range(
            "asr.prompt_max_chars",
            self.asr.prompt_max_chars,
            0..=1000,
            "characters",
        )?;
        if let Some(prompt) = &self.asr.context_prompt {
            in_range(
                "asr.context_prompt (length)",
                prompt.chars().count(),
                0..=200,
                "characters",
            )?;
        }
        let lang = &self.asr.language;
        if !(lang == "auto"
            || (2..=3).contains(&lang.len()) && lang.chars().all(|c| c.is_ascii_lowercase()))
        {
            return Err(ConfigError::Invalid {
                key: "asr.language".into(),
                value: format!("{lang:?}"),
                allowed: "\"auto\" or a language code such as \"en\" or \"zh\"".into(),
            });
        }
        let llm = &self.llm;
        if !(llm.url.starts_with("http://") || llm.url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                key: "llm.url".into(),
                value: format!("{:?}", llm.url),
                allowed: "an http:// or https:// URL up to /v1".into(),
            });
        }
        in_range("llm.temperature", llm.temperature, 0.0..=2.0, "")?;
        if let Some(bias) = llm.tool_call_bias {
            in_range("llm.tool_call_bias", bias, 0.0..=20.0, "logits")?;
        }
        in_range(
            "llm.tool_string_max_chars",
            llm.tool_string_max_chars,
            1..=4096,
            "characters",
        )?;
        in_range("llm.max_tokens", llm.max_tokens, 1..=32_768, "tokens")?;
        in_range("llm.engine_threads", llm.engine_threads, 0..=256, "threads")?;
        in_range("llm.engine_slots", llm.engine_slots, 1..=64, "completions")?;
        in_range("llm.engine_nice", llm.engine_nice, 0..=19, "")?;
        in_range(
            "llm.engine_start_timeout_ms",
            llm.engine_start_timeout_ms,
            1000..=600_000,
            "ms",
        )?;
        in_range(
            "llm.volume_step",
            llm.volume_step,
            1..=100,
            "percentage points",
        )?;
        in_range(
            "llm.max_reply_sentences",
            llm.max_reply_sentences,
            1..=100,
            "sentences",
        )?;
        in_range(
            "llm.max_reply_words",
            llm.max_reply_words,
            1..=10_000,
            "words",
        )?;
        in_range(
            "llm.timeout_ms",
            llm.timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range("llm.retries", llm.retries, 0..=10, "retries")?;
        in_range(
            "llm.retry_backoff_ms",
            llm.retry_backoff_ms,
            0..=60_000,
            "milliseconds",
        )?;
        let x = &self.duplex;
        in_range(
            "duplex.idle_timeout_s",
            x.idle_timeout_s,
            1..=86_400,
            "seconds",
        )?;
        for (key, value, allowed) in [
            ("duplex.device", &x.device, ["auto", "cpu", "cuda"]),
            ("duplex.dtype", &x.dtype, ["auto", "bf16", "f32"]),
        ] {
            if !allowed.contains(&value.as_str()) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    value: format!("{value:?}"),
                    allowed: allowed.join(", "),
                });
            }
        }
        let d = &self.device;
        if d.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "device.bind".into(),
                value: format!("{:?}", d.bind),
                allowed: "an address and port such as \"127.0.0.1:8000\"".into(),
            });
        }
        for (key, path) in [
            ("device.path", &d.path),
            ("device.ota_path", &d.ota_path),
            ("device.vision_path", &d.vision_path),
            ("device.admin_path", &d.admin_path),
        ] {
            if !path.starts_with('/') {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    value: format!("{path:?}"),
                    allowed: "a path starting with /".into(),
                });
            }
        }
        in_range(
            "device.hello_timeout_ms",
            d.hello_timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range(
            "device.idle_timeout_ms",
            d.idle_timeout_ms,
            1_000..=86_400_000,
            "milliseconds",
        )?;
        in_range(
            "device.ping_interval_ms",
            d.ping_interval_ms,
            100..=3_600_000,
            "milliseconds",
        )?;
        in_range(
            "device.max_message_bytes",
            d.max_message_bytes,
            1_024..=16_777_216,
            "bytes",
        )?;
        in_range(
            "device.max_sessions",
            d.max_sessions,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "device.max_sessions_per_ip",
            d.max_sessions_per_ip,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "device.mcp_request_timeout_ms",
            d.mcp_request_timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range(
            "device.mcp_max_list_pages",
            d.mcp_max_list_pages,
            1..=1_000,
            "pages",
        )?;
        in_range(
            "device.activation_ttl_s",
            d.activation_ttl_s,
            10..=86_400,
            "seconds",
        )?;
        in_range(
            "device.max_pending_activations",
            d.max_pending_activations,
            1..=100_000,
            "activations",
        )?;
        if d.ota_shared_token && self.auth.tokens.is_empty() {
            return Err(ConfigError::Invalid {
                key: "device.ota_shared_token".into(),
                value: "true".into(),
                allowed: "false, or true with a token in [auth] tokens to hand out".into(),
            });
        }
        let vision = &self.vision;
        in_range(
            "vision.max_image_bytes",
            vision.max_image_bytes,
            1_024..=67_108_864,
            "bytes",
        )?;
        in_range(
            "vision.timeout_ms",
            vision.timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range("vision.max_tokens", vision.max_tokens, 1..=32_768, "tokens")?;
        let v = &self.vad;
        in_range("vad.threshold", v.threshold, 0.0..=1.0, "(a probability)")?;
        in_range(
            "vad.end_silence_ms",
            v.end_silence_ms,
            100..=10_000,
            "milliseconds",
        )?;
        in_range(
            "vad.min_speech_ms",
            v.min_speech_ms,
            0..=5_000,
            "milliseconds",
        )?;
        in_range(
            "vad.max_utterance_ms",
            v.max_utterance_ms,
            1_000..=120_000,
            "milliseconds",
        )?;
        in_range("vad.pre_roll_ms", v.pre_roll_ms, 0..=2_000, "milliseconds")?;
        in_range("vad.barge_in_ms", v.barge_in_ms, 0..=2_000, "milliseconds")?;
        in_range(
            "vad.barge_in_level_ratio",
            v.barge_in_level_ratio,
            0.0..=100.0,
            "(a ratio)",
        )?;
        let tts = &self.tts;
        in_range("tts.speed_wpm", tts.speed_wpm, 80..=500, "words per minute")?;
        in_range(
            "tts.speed",
            tts.speed,
            0.5..=2.0,
            "(1.0: the voice's own rate)",
        )?;
        in_range("tts.threads", tts.threads, 0..=256, "threads")?;
        for (key, voice) in [
            ("tts.voice_en", &tts.voice_en),
            ("tts.voice_zh", &tts.voice_zh),
        ] {
            if voice.is_empty() || !voice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    value: format!("{voice:?}"),
                    allowed: "a Kokoro voice name such as af_heart or zf_xiaobei".into(),
                });
            }
        }
        in_range(
            "tts.timeout_ms",
            tts.timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        if !["wav", "mp3", "opus", "flac", "pcm"].contains(&tts.format.as_str()) {
            return Err(ConfigError::Invalid {
                key: "tts.format".into(),
                value: format!("{:?}", tts.format),
                allowed: "wav, mp3, opus, flac or pcm".into(),
            });
        }
        check_origins("server.allowed_origins", &self.server.allowed_origins)?;
        let sv = &self.server;
        in_range(
            "server.max_body_bytes",
            sv.max_body_bytes,
            1_024..=67_108_864,
            "bytes",
        )?;
        in_range(
            "server.max_batch_requests",
            sv.max_batch_requests,
            1..=10_000,
            "requests",
        )?;
        in_range(
            "server.rate_window_s",
            sv.rate_window_s,
            1..=86_400,
            "seconds",
        )?;
        in_range(
            "server.rate_per_key",
            sv.rate_per_key,
            0..=1_000_000,
            "requests",
        )?;
        in_range(
            "server.rate_per_ip",
            sv.rate_per_ip,
            0..=1_000_000,
            "requests",
        )?;
        let b = &self.breaker;
        in_range("breaker.failures", b.failures, 1..=1_000, "failures")?;
        in_range("breaker.open_ms", b.open_ms, 1..=3_600_000, "milliseconds")?;
        self.validate_auth()
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, allowed: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            allowed: allowed.into(),
        };
        let mut names = std::collections::BTreeSet::new();
        for key in &self.auth.api_keys {
            if key.name.trim().is_empty() || !names.insert(key.name.as_str()) {
                return Err(invalid(
                    "auth.api_keys.name",
                    format!("{:?}", key.name),
                    "a name, different for each key",
                ));
            }
            let hex = key.sha256.len() == 64
                && key
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(invalid(
                    "auth.api_keys.sha256",
                    format!("{:?} (key {:?})", key.sha256, key.name),
                    "64 lowercase hex digits (`voxloop auth new-key` prints them)",
                ));
            }
        }
        if let Some(jwt) = &self.auth.jwt {
            if jwt.hs256_secret_env.is_none() && jwt.rs256_public_key.is_none() {
                return Err(invalid(
                    "auth.jwt",
                    "no key".into(),
                    "hs256_secret_env, rs256_public_key, or both",
                ));
            }
            if jwt.issuer.is_empty() || jwt.audience.is_empty() {
                return Err(invalid(
                    "auth.jwt.issuer",
                    format!("{:?} / audience {:?}", jwt.issuer, jwt.audience),
                    "a non-empty issuer and audience (both are checked)",
                ));
            }
            in_range("auth.jwt.leeway_s", jwt.leeway_s, 0..=3_600, "seconds")?;
        }
        Ok(())
    }

    /// The configuration as TOML, every key present (as `voxloop config` prints it).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config types always serialize to TOML")
    }
}

impl McpServerConfig {
    /// Checks that exactly one transport is given and that its settings make sense.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `mcp_servers.NAME.KEY`.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, allowed: &str| ConfigError::Invalid {
            key: format!("mcp_servers.{name}{key}"),
            value,
            allowed: allowed.to_string(),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "",
                format!("{name:?}"),
                "a server name of letters, digits, '_' and '-'",
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) | (None, None) => Err(invalid(
                "",
                "a table".into(),
                "exactly one of `command` (stdio) and `url` (streamable HTTP)",
            )),
            (Some(command), None) if command.trim().is_empty() => {
                Err(invalid(".command", "\"\"".into(), "a program name or path"))
            }
            (Some(_), None) if !self.headers.is_empty() || self.bearer_token_env.is_some() => {
                Err(invalid(
                    ".headers",
                    "set".into(),
                    "`headers` and `bearer_token_env` only with `url`",
                ))
            }
            (None, Some(url)) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                Err(invalid(
                    ".url",
                    format!("{url:?}"),
                    "an http:// or https:// URL",
                ))
            }
            (None, Some(_))
                if !self.args.is_empty() || !self.env.is_empty() || self.cwd.is_some() =>
            {
                Err(invalid(
                    ".args",
                    "set".into(),
                    "`args`, `env` and `cwd` only with `command`",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A host name (letters, digits, `.` and `-`) or an IP address: no scheme, port or path.
/// Each origin has its scheme (`http://` or `https://`).
fn check_origins(key: &str, origins: &[String]) -> Result<(), ConfigError> {
    match origins
        .iter()
        .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
    {
        Some(origin) => Err(ConfigError::Invalid {
            key: key.into(),
            value: format!("{origin:?}"),
            allowed: "an origin with its scheme, e.g. \"https://app.example:443\"".into(),
        }),
        None => Ok(()),
    }
}

fn in_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    allowed: RangeInclusive<T>,
    unit: &str,
) -> Result<(), ConfigError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        allowed: format!("from {} to {} {unit}", allowed.start(), allowed.end())
            .trim_end()
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn out_of_range_value_names_key_value_and_range() {
        let err = Config::from_toml("[music]\nmax_page_bytes = 600000\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("music.max_page_bytes"), "{text}");
        assert!(text.contains("600000"), "{text}");
        assert!(text.contains("from 1 to 524288 bytes"), "{text}");
    }

    #[test]
    fn a_long_context_prompt_is_refused() {
        let long = "word ".repeat(50);
        let err = Config::from_toml(&format!("[asr]\ncontext_prompt = \"{long}\"\n")).unwrap_err();
        assert!(err.to_string().contains("asr.context_prompt"), "{err}");
        let ok = Config::from_toml("[asr]\ncontext_prompt = \"\"\n").unwrap();
        assert_eq!(ok.asr.context_prompt.as_deref(), Some(""));
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::from_toml("[music]\nlibary = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("libary"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_value() {
        let err = Config::from_toml("[music]\nupstream_timeout_ms = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("upstream_timeout_ms") && text.contains("soon"),
            "{text}"
        );
    }

    #[test]
    fn bad_allow_host_and_origin_are_refused() {
        let err = Config::from_toml("[music]\nallow_hosts = [\"http://x/\"]\n").unwrap_err();
        assert!(err.to_string().contains("music.allow_hosts"), "{err}");
        let err = Config::from_toml("[music]\nallowed_origins = [\"example.com\"]\n").unwrap_err();
        assert!(err.to_string().contains("music.allowed_origins"), "{err}");
        Config::from_toml("[music]\nallow_hosts = [\"cdn.example.com\", \"::1\"]\n").unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(
            &file,
            "[music]\nlibrary = \"songs\"\ncatalog = \"c.toml\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&file)).unwrap();
        assert_eq!(config.music.library, dir.path().join("songs"));
        assert_eq!(config.music.catalog, Some(dir.path().join("c.toml")));
    }

    #[test]
    fn mcp_servers_need_exactly_one_transport() {
        let ok =
            "[mcp_servers.a]\ncommand = \"x\"\n[mcp_servers.b]\nurl = \"http://127.0.0.1:1/mcp\"\n";
        assert_eq!(Config::from_toml(ok).unwrap().mcp_servers.len(), 2);
        for (bad, needle) in [
            ("[mcp_servers.a]\n", "exactly one of"),
            (
                "[mcp_servers.a]\ncommand = \"x\"\nurl = \"http://h/mcp\"\n",
                "exactly one of",
            ),
            ("[mcp_servers.a]\nurl = \"ftp://h\"\n", "mcp_servers.a.url"),
            (
                "[mcp_servers.a]\ncommand = \"x\"\nbearer_token_env = \"T\"\n",
                "only with `url`",
            ),
            ("[mcp_servers.\"a b\"]\ncommand = \"x\"\n", "server name"),
            ("[tools]\nprefetch = 9\n", "tools.prefetch"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn default_paths_stay_relative_to_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(&file, "[llm]\nmodel = \"m\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&file)).unwrap().music.library,
            PathBuf::from("assets/music")
        );
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/voxloop.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
