//! Speech to text with whisper.cpp (whisper-rs) on a ggml Whisper model.

use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;
use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

use crate::config::AsrConfig;
use crate::models::{self, ModelError};

/// Sample rate whisper takes, in Hz (mono `f32`).
pub const ASR_RATE: u32 = 16_000;

/// Why transcription failed.
#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "whisper.cpp could not load {path}: {reason}; fetch it again with `voxloop models fetch whisper-base`"
    )]
    Load { path: PathBuf, reason: String },
    #[error("whisper.cpp: {0}")]
    Whisper(String),
}

/// One transcribed segment; times in ms from the start of the audio.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
}

/// A transcript of one utterance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transcript {
    /// The whole text, segments joined and trimmed.
    pub text: String,
    /// Language whisper used (the configured one, or the detected one for `auto`), e.g. `en`.
    pub language: String,
    pub segments: Vec<Segment>,
}

/// A loaded Whisper model. Transcriptions run one at a time (a state per call).
pub struct Asr {
    context: Mutex<WhisperContext>,
    config: AsrConfig,
}

/// Encoder frames for `samples` of audio when the context is fitted: 50 per second (1500 for
/// 30 s), plus 64 of margin, and never under 300 (6 s): with less, whisper base repeated or
/// misheard short commands in our measurements (BENCHMARKS.md).
pub fn fitted_context(samples: usize) -> i32 {
    let frames = samples as u64 * 50 / u64::from(ASR_RATE) + 64;
    frames.clamp(300, 1500) as i32
}

impl Asr {
    /// Loads the model of `config` (`[asr] model`, else whisper-base in the model directory),
    /// after checking that it is a ggml file.
    ///
    /// # Errors
    /// [`AsrError::Model`] (missing or corrupt, naming the fetch command) or [`AsrError::Load`].
    pub fn load(config: &AsrConfig) -> Result<Self, AsrError> {
        whisper_rs::install_logging_hooks();
        let path = config
            .model
            .clone()
            .unwrap_or_else(|| models::model_path(models::spec("whisper-base").expect("known")));
        models::check_ggml("whisper-base", &path)?;
        let context = WhisperContext::new_with_params(&path, WhisperContextParameters::default())
            .map_err(|e| AsrError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            context: Mutex::new(context),
            config: config.clone(),
        })
    }

    /// Transcribes `pcm`: mono samples at [`ASR_RATE`]. Blocking (seconds of CPU on long audio):
    /// call it from a blocking thread in async code.
    ///
    /// # Errors
    /// [`AsrError::Whisper`] when whisper.cpp fails.
    pub fn transcribe(&self, pcm: &[f32]) -> Result<Transcript, AsrError> {
        let strategy = match self.config.beam_size {
            0 | 1 => SamplingStrategy::Greedy { best_of: 1 },
            beam_size => SamplingStrategy::BeamSearch {
                beam_size: beam_size as i32,
                patience: -1.0,
            },
        };
        let mut params = FullParams::new(strategy);
        let language = self.config.language.as_str();
        params.set_language(if language == "auto" {
            None
        } else {
            Some(language)
        });
        params.set_n_threads(self.config.threads as i32);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_print_special(false);
        params.set_no_context(true);
        params.set_suppress_blank(true);
        let context = self.context.lock().expect("asr lock");
        let mut state = context
            .create_state()
            .map_err(|e| AsrError::Whisper(e.to_string()))?;
        // Whisper needs at least 1 s; pad short utterances with silence.
        let mut audio = pcm.to_vec();
        if audio.len() < ASR_RATE as usize + 1600 {
            audio.resize(ASR_RATE as usize + 1600, 0.0);
        }
        if self.config.fit_context {
            params.set_audio_ctx(fitted_context(audio.len()));
        }
        state
            .full(params, &audio)
            .map_err(|e| AsrError::Whisper(e.to_string()))?;
        let detected = whisper_rs::get_lang_str(state.full_lang_id_from_state()).unwrap_or("?");
        let mut segments = Vec::new();
        for segment in state.as_iter() {
            let text = segment
                .to_str_lossy()
                .map_err(|e| AsrError::Whisper(e.to_string()))?
                .trim()
                .to_string();
            if text.is_empty() {
                continue;
            }
            // whisper.cpp timestamps are in 10 ms units.
            segments.push(Segment {
                start_ms: segment.start_timestamp().max(0) as u64 * 10,
                end_ms: segment.end_timestamp().max(0) as u64 * 10,
                text,
            });
        }
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let language = if language == "auto" {
            detected.to_string()
        } else {
            language.to_string()
        };
        Ok(Transcript {
            text: text.trim().to_string(),
            language,
            segments,
        })
    }
}
