//! The PersonaPlex co-host (ARCHITECTURE §6): NVIDIA's full-duplex speech-to-speech model (a Moshi
//! fine-tune), whose code is the `personaplex` crate (crates/personaplex), served here.
//!
//! - [`arch`], [`engine`], [`tokenizer`], [`voice`]: re-exported from `personaplex`: the
//!   model's shapes and checkpoint layout; loading, the system prompts and the 80 ms step; the
//!   SentencePiece tokenizer; the `.pt` voice prompts.
//! - [`lifecycle`]: where the model lives (GPU, CPU, unloaded) and when it moves.
//! - [`service`], [`server`], [`mcp`]: the co-host's surfaces (REST + WebSocket, MCP).

pub mod config;
pub mod lifecycle;
pub mod mcp;
pub mod server;
pub mod service;

use std::path::PathBuf;

pub use personaplex::{
    DuplexError, FRAME_SAMPLES, MIMI_FILE, MODEL_FILE, SAMPLE_RATE, TOKENIZER_FILE, arch, engine,
    tokenizer, voice,
};

/// One of PersonaPlex's voices (`assets/duplex/voices.toml`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Voice {
    /// The id, e.g. `NATF2`.
    pub id: String,
    /// A display name.
    pub name: String,
    /// What it sounds like, as far as its id says.
    pub description: String,
}

/// An example text prompt (`assets/duplex/prompts.toml`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptExample {
    /// The id, e.g. `assistant`.
    pub id: String,
    /// A display name.
    pub name: String,
    /// The role text.
    pub text: String,
}

#[derive(serde::Deserialize)]
struct VoiceFile {
    voice: Vec<Voice>,
}

#[derive(serde::Deserialize)]
struct PromptFile {
    prompt: Vec<PromptExample>,
}

/// The 18 voices, in file order.
pub fn voices() -> Vec<Voice> {
    toml::from_str::<VoiceFile>(include_str!("../../assets/duplex/voices.toml"))
        .expect("assets/duplex/voices.toml is valid")
        .voice
}

/// The prompt examples (assistant, customer service, casual).
pub fn prompt_examples() -> Vec<PromptExample> {
    toml::from_str::<PromptFile>(include_str!("../../assets/duplex/prompts.toml"))
        .expect("assets/duplex/prompts.toml is valid")
        .prompt
}

/// The voice prompt for `voice`: a voice id (`NATF2`, or `NATF2.pt` as the reference server
/// names them) resolving to `{model_dir}/voices/{id}.pt` (the repo's files, unpacked from
/// `voices.tgz`) or else `{model_dir}/voices/{id}.wav`; or a path to a `.pt` or audio file. An
/// audio file is decoded here ([`voice_from_file`]).
///
/// # Errors
/// [`DuplexError::UnknownVoice`] when it is neither a known id nor an existing file;
/// [`DuplexError::MissingFile`] when a known id has neither file (naming the `.pt`);
/// [`DuplexError::Audio`] when the audio file cannot be decoded.
pub fn voice_prompt(
    model_dir: &std::path::Path,
    voice: &str,
) -> Result<engine::VoicePrompt, DuplexError> {
    voice_from_file(&voice_file(model_dir, voice)?)
}

/// A voice prompt from a file: a `.pt` voice prompt as it is, any other file decoded as audio
/// to mono PCM at [`SAMPLE_RATE`].
///
/// # Errors
/// [`DuplexError::Audio`] naming the file when it cannot be decoded or has no audio.
pub fn voice_from_file(path: &std::path::Path) -> Result<engine::VoicePrompt, DuplexError> {
    if voice::is_embeddings(path) {
        return Ok(engine::VoicePrompt::Embeddings(path.to_path_buf()));
    }
    let pcm = crate::audio::decode::decode_file(path, SAMPLE_RATE)
        .map_err(|e| DuplexError::Audio(format!("voice prompt {}: {e}", path.display())))?;
    if pcm.is_empty() {
        return Err(DuplexError::Audio(format!(
            "voice prompt {} has no audio",
            path.display()
        )));
    }
    Ok(engine::VoicePrompt::Audio(pcm))
}

/// The file of `voice`: a voice id's `.pt` or `.wav` under `{model_dir}/voices`, or a path to
/// a file (see [`voice_prompt`]).
///
/// # Errors
/// As [`voice_prompt`], but for decoding.
pub fn voice_file(model_dir: &std::path::Path, voice: &str) -> Result<PathBuf, DuplexError> {
    let id = voice.strip_suffix(".pt").unwrap_or(voice);
    if voices().iter().any(|v| v.id == id) {
        let dir = model_dir.join("voices");
        let (pt, wav) = (dir.join(format!("{id}.pt")), dir.join(format!("{id}.wav")));
        return if pt.is_file() {
            Ok(pt)
        } else if wav.is_file() {
            Ok(wav)
        } else {
            Err(DuplexError::MissingFile(pt))
        };
    }
    let path = PathBuf::from(voice);
    if path.is_file() {
        Ok(path)
    } else {
        Err(DuplexError::UnknownVoice(voice.to_string()))
    }
}

/// The lifecycle settings of `[duplex]`, with `PERSONAPLEX_MODEL_DIR` and `GPU_IDLE_TIMEOUT`
/// applied and the device chosen.
///
/// # Errors
/// [`DuplexError::Config`] for a `GPU_IDLE_TIMEOUT` that is not a number or a `cuda` device this
/// build or machine lacks. (The timeout's range is checked by [`lifecycle::ModelManager::new`].)
pub fn settings(
    config: &crate::duplex::config::DuplexConfig,
) -> Result<lifecycle::Settings, DuplexError> {
    let model_dir = std::env::var_os("PERSONAPLEX_MODEL_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| config.model_dir.clone());
    let idle_timeout_s = match std::env::var("GPU_IDLE_TIMEOUT") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| DuplexError::Config {
            key: "GPU_IDLE_TIMEOUT",
            reason: format!("{v:?} is not a number of seconds"),
        })?,
        _ => config.idle_timeout_s,
    };
    let device = match config.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0).map_err(|e| DuplexError::Config {
            key: "duplex.device",
            reason: format!("no CUDA device (build with --features cuda): {e}"),
        })?,
        _ => candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu),
    };
    let dtype = match (config.dtype.as_str(), device.is_cpu()) {
        ("bf16", _) | ("auto", false) => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    Ok(lifecycle::Settings {
        model_dir,
        device,
        dtype,
        idle_timeout_s,
    })
}
