//! Voice turns: what every surface that hears speech shares between audio in and a turn
//! (ARCHITECTURE §1, "One turn"): speech converted to [`SPEECH_RATE`](crate::speech::SPEECH_RATE) mono, the VAD's turn
//! detection, barge-in against the assistant's own output, and whisper on a blocking thread.
//! `voxloop run` and `listen` feed it microphone or file blocks; a device session feeds it its
//! decoded Opus frames.

use std::sync::Arc;

use crate::audio::Pcm;
use crate::audio::convert::ConvertError;
use crate::speech::SpeechInput;
use crate::speech::asr::{Asr, AsrError, Transcript};
use crate::speech::vad::VadConfig;
use crate::speech::vad::{BargeIn, TurnDetector, TurnEvent};

/// The assistant's output, which barge-in is judged against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Output {
    /// Whether the assistant is busy (thinking, calling a tool, or playing).
    pub busy: bool,
    /// RMS level of what is playing now ([`crate::audio::queue::PlaybackQueue::output_level`]),
    /// so that the assistant's own voice in the microphone is not taken for the user's.
    pub level: f32,
}

/// One finished utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    /// [`SPEECH_RATE`](crate::speech::SPEECH_RATE) mono PCM, with the VAD's pre-roll.
    pub pcm: Vec<f32>,
    /// Where the speech began, in ms from the start of the stream.
    pub start_ms: u64,
    /// Where it ended, in ms from the start of the stream.
    pub end_ms: u64,
}

/// What a block of speech brought.
#[derive(Debug, Default, PartialEq)]
pub struct Heard {
    /// Finished utterances, in order.
    pub utterances: Vec<Utterance>,
    /// Speech over the assistant's output lasted long enough to interrupt it (barge-in).
    pub barge_in: bool,
}

/// Speech in, utterances and barge-ins out. One per stream of speech (a microphone, a file, a
/// device session).
pub struct VoiceInput {
    vad: VadConfig,
    speech: SpeechInput,
    turns: TurnDetector,
    barge: BargeIn,
}

impl VoiceInput {
    /// A listener with `vad`'s engine, threshold, durations and barge-in settings.
    pub fn new(vad: &VadConfig) -> Self {
        Self {
            vad: vad.clone(),
            speech: SpeechInput::default(),
            turns: TurnDetector::new(vad),
            barge: BargeIn::new(vad),
        }
    }

    /// Forgets everything heard so far (a device's `listen start`): a fresh stream.
    pub fn reset(&mut self) {
        *self = Self::new(&self.vad);
    }

    /// Converts a block of any rate and channel count to [`SPEECH_RATE`](crate::speech::SPEECH_RATE) mono, without turn
    /// detection (for a caller that keeps the samples itself, as a device's manual mode does).
    ///
    /// # Errors
    /// [`ConvertError`]: no resampler for the block's rate.
    pub fn convert(&mut self, pcm: &Pcm) -> Result<Vec<f32>, ConvertError> {
        self.speech.push(pcm)
    }

    /// A block of speech in: the utterances it finished and, when `output` is given, whether
    /// the user spoke over the assistant long enough to interrupt it.
    ///
    /// # Errors
    /// [`ConvertError`]: no resampler for the block's rate.
    pub fn push(&mut self, pcm: &Pcm, output: Option<Output>) -> Result<Heard, ConvertError> {
        let samples = self.speech.push(pcm)?;
        Ok(self.hear(&samples, output))
    }

    /// The end of the stream: the rest of the samples heard, an open utterance closed.
    pub fn finish(&mut self) -> Vec<Utterance> {
        let rest = self.speech.finish();
        let mut heard = self.hear(&rest, None);
        heard.utterances.extend(utterances(self.turns.finish()));
        heard.utterances
    }

    /// The samples still in the converter, without turn detection (the end of a manual
    /// utterance).
    pub fn flush(&mut self) -> Vec<f32> {
        self.speech.finish()
    }

    fn hear(&mut self, samples: &[f32], output: Option<Output>) -> Heard {
        let (events, frames) = self.turns.push(samples);
        let mut barge_in = false;
        if let Some(output) = output {
            for frame in &frames {
                barge_in |= self.barge.on_frame(frame, output.busy, output.level);
            }
        }
        Heard {
            utterances: utterances(events),
            barge_in,
        }
    }
}

fn utterances(events: Vec<TurnEvent>) -> Vec<Utterance> {
    events
        .into_iter()
        .filter_map(|event| match event {
            TurnEvent::Utterance {
                pcm,
                start_ms,
                end_ms,
            } => Some(Utterance {
                pcm,
                start_ms,
                end_ms,
            }),
            _ => None,
        })
        .collect()
}

/// Why an utterance could not be transcribed.
#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    /// whisper.cpp failed.
    #[error(transparent)]
    Asr(#[from] AsrError),
    /// The blocking task running whisper panicked or was cancelled.
    #[error("the transcription task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Whisper was busy with other utterances for longer than `[asr] max_wait_ms`.
    #[error("whisper is busy: other utterances kept it longer than asr.max_wait_ms")]
    Busy,
}

/// Transcribes `pcm` ([`SPEECH_RATE`](crate::speech::SPEECH_RATE) mono) with whisper's initial `prompt`, on a blocking
/// thread (whisper is CPU-bound), once whisper is free (one utterance at a time, in the order
/// they came); the time the transcription took in ms comes back with the transcript.
///
/// # Errors
/// [`TranscribeError`]: [`TranscribeError::Busy`] after waiting `[asr] max_wait_ms`.
pub async fn transcribe(
    asr: Arc<Asr>,
    pcm: Vec<f32>,
    prompt: Option<String>,
) -> Result<(Transcript, u64), TranscribeError> {
    let permit = asr.queue().await.map_err(|_| TranscribeError::Busy)?;
    let started = std::time::Instant::now();
    let transcript = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        asr.transcribe_with_prompt(&pcm, prompt.as_deref())
    })
    .await??;
    Ok((transcript, started.elapsed().as_millis() as u64))
}
