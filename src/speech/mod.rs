//! Speech (ARCHITECTURE §1): voice activity and turns (VAD), speech to text (ASR, whisper.cpp),
//! text to speech (TTS: Kokoro with its g2p, or espeak-ng), and the sentence splitter that feeds
//! TTS as a reply streams. Built on [`crate::audio`] for PCM, decoding and resampling.

pub mod asr;
pub mod g2p;
pub mod kokoro;
pub mod sentence;
pub mod tts;
pub mod vad;

use crate::audio::Pcm;
use crate::audio::convert::{ConvertError, Converter};

/// Sample rate of speech coming in, in Hz (mono): what whisper and the VAD take, and what a
/// xiaozhi device's uplink carries (its hello's `audio_params.sample_rate`, docs/ARCHITECTURE.md
/// §5). Input of any other rate is resampled to it.
pub const SPEECH_RATE: u32 = 16_000;

/// Converts blocks of any format to 16 kHz mono for the VAD and ASR.
pub struct SpeechInput {
    converter: Converter,
}

impl Default for SpeechInput {
    fn default() -> Self {
        Self {
            converter: Converter::new(SPEECH_RATE, 1),
        }
    }
}

impl SpeechInput {
    /// 16 kHz mono samples for `pcm` (the resampler may hold some back until more arrives).
    ///
    /// # Errors
    /// [`ConvertError`] for a rate that cannot be resampled.
    pub fn push(&mut self, pcm: &Pcm) -> Result<Vec<f32>, ConvertError> {
        self.converter.push(pcm)
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Vec<f32> {
        self.converter.flush()
    }
}
