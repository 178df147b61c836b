//! The PersonaPlex co-host (ARCHITECTURE §6): NVIDIA's full-duplex speech-to-speech model (a Moshi
//! fine-tune) run with the `moshi` crate on candle.
//!
//! - [`arch`]: the model's shapes and the checkpoint layout of the Hugging Face repo.
//! - [`engine`]: loading, the system prompts (voice, silence, `<system>` text) and the
//!   80 ms streaming step; offline processing of a whole file.
//! - [`lifecycle`]: where the model lives (GPU, CPU, unloaded) and when it moves.
//! - [`service`], [`server`], [`mcp`]: the co-host's surfaces (REST + WebSocket, MCP).
//! - [`tokenizer`]: the SentencePiece text tokenizer.
//! - [`voice`]: the `.pt` voice prompts.

pub mod arch;
pub mod engine;
pub mod lifecycle;
pub mod mcp;
pub mod server;
pub mod service;
pub mod tokenizer;
pub mod voice;

use std::path::PathBuf;

/// The LM weights' file name in the Hugging Face repo.
pub const MODEL_FILE: &str = "model.safetensors";
/// Mimi's weights' file name in the Hugging Face repo.
pub const MIMI_FILE: &str = "tokenizer-e351c8d8-checkpoint125.safetensors";
/// The SentencePiece model's file name in the Hugging Face repo.
pub const TOKENIZER_FILE: &str = "tokenizer_spm_32k_3.model";
/// Mimi's sample rate, in Hz.
pub const SAMPLE_RATE: u32 = 24_000;
/// Samples per 80 ms frame (12.5 Hz) at [`SAMPLE_RATE`].
pub const FRAME_SAMPLES: usize = 1920;

/// What can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum DuplexError {
    /// No model directory is configured.
    #[error(
        "no PersonaPlex model directory: set [duplex] model_dir or PERSONAPLEX_MODEL_DIR to a directory with the files of nvidia/personaplex-7b-v1"
    )]
    NoModelDir,
    /// A file the model needs is not there.
    #[error("missing model file {0}")]
    MissingFile(PathBuf),
    /// A file cannot be written.
    #[error("cannot write {file}: {reason}")]
    Write {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file is there but cannot be used.
    #[error("cannot load {file}: {reason}")]
    Load {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// A voice id that is not one of the voices, or whose prompt file is absent.
    #[error("unknown voice {0:?}")]
    UnknownVoice(String),
    /// Audio input that cannot be used.
    #[error("bad audio input: {0}")]
    Audio(String),
    /// A setting (config key or environment variable) that cannot be used.
    #[error("{key}: {reason}")]
    Config {
        /// The config key or environment variable.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A conversation holds the model (one per model instance).
    #[error("the model is busy with another conversation")]
    Busy,
    /// An idle timeout outside 1..=86400 seconds.
    #[error("idle timeout {0} s is out of range (1 to 86400 seconds)")]
    BadTimeout(i64),
    /// A tensor operation failed (out of memory, a device error).
    #[error("model computation failed: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for DuplexError {
    fn from(e: candle_core::Error) -> Self {
        DuplexError::Compute(e.to_string())
    }
}

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

/// The voice prompt file for `voice`: a voice id (`NATF2`, or `NATF2.pt` as the reference
/// server names them) resolving to `{model_dir}/voices/{id}.pt` (the repo's files, unpacked
/// from `voices.tgz`) or else `{model_dir}/voices/{id}.wav`; or a path to a `.pt` or audio file.
///
/// # Errors
/// [`DuplexError::UnknownVoice`] when it is neither a known id nor an existing file;
/// [`DuplexError::MissingFile`] when a known id has neither file (naming the `.pt`).
pub fn voice_prompt(model_dir: &std::path::Path, voice: &str) -> Result<PathBuf, DuplexError> {
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
pub fn settings(config: &crate::config::DuplexConfig) -> Result<lifecycle::Settings, DuplexError> {
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
