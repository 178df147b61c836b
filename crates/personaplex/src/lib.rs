//! PersonaPlex (NVIDIA's full-duplex speech-to-speech model, a Moshi fine-tune) on candle with
//! kyutai's `moshi` crate: the model's shapes and checkpoint layout ([`arch`]), loading it and
//! running the system prompts and one 80 ms step per frame ([`engine`]), the SentencePiece text
//! tokenizer ([`tokenizer`]) and the `.pt` voice prompts ([`voice`]). Audio in and out is PCM at
//! [`SAMPLE_RATE`]; files of audio are the caller's to decode. The `cuda` feature runs it on an
//! NVIDIA GPU. voxloop's co-host (`voxloop::duplex`) serves it (docs/ARCHITECTURE.md §6).

#![warn(missing_docs)]

pub mod arch;
pub mod engine;
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
