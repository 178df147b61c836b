//! voxloop: a voice-assistant runtime. Speech in, an LLM that may call MCP tools, speech and
//! music out. docs/ARCHITECTURE.md has the layers, the data flow and the protocol facts; the
//! README has the commands.
//!
//! Modules, lowest layer first (ARCHITECTURE §1):
//! - [`media`]: a stream of audio bytes with its MIME type, and MIME sniffing.
//! - [`config`]: the one TOML file, every limit named.
//! - [`breaker`], [`metrics`]: circuit breakers per upstream; the Prometheus registry.
//! - [`compute`]: the bounded, ordered queues in front of ASR, the local chat model and TTS.
//! - [`tools`]: the tool hub: MCP servers, built-in tools, routing of results, paged media.
//! - [`audio`]: audio plumbing: decode, resample, volume, Opus, the playback queue, sinks, input.
//! - [`speech`]: VAD, ASR (whisper.cpp), TTS (Kokoro, espeak-ng), the sentence splitter.
//! - [`models`]: model files and fetching them from the package registries.
//! - [`llm`]: chat models as a stream of text and tool calls (the local GGUF model, or
//!   OpenAI-compatible endpoints).
//! - [`conversation`]: the turn loop joining the model, the tools and the playback queue.
//! - [`device`]: the smart-speaker device protocol (xiaozhi-esp32 WebSocket).
//! - [`api`]: serving safely (keys, JWTs, rate limits) and `voxloop serve`'s HTTP API.
//! - [`duplex`]: the PersonaPlex co-host (full-duplex speech model, its GPU lifecycle).

#![warn(missing_docs)]

pub mod api;
pub mod audio;
pub mod breaker;
pub mod compute;
pub mod config;
pub mod conversation;
pub mod device;
pub mod duplex;
pub mod llm;
pub mod media;
pub mod metrics;
pub mod models;
pub mod speech;
pub mod tools;

/// Installs the `tracing` subscriber: human-readable lines on **stderr** (stdout may carry a
/// protocol, as with MCP over stdio), filtered by `RUST_LOG` (default: `info`, with symphonia's
/// per-file chatter at `error`), coloured only when stderr is a terminal.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,symphonia=error,rmcp=warn,whisper_rs=warn")
    });
    // A second call (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
