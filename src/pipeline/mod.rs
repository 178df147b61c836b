//! Audio between "bytes of audio" and "sound out" (ARCHITECTURE §1): streaming decode, resampling and
//! channel mixing, volume, Opus for devices, the playback queue, sinks, and TTS.

/// Sample rate of speech coming in, in Hz (mono): what whisper and the VAD take, and what a
/// xiaozhi device's uplink carries (its hello's `audio_params.sample_rate`, docs/ARCHITECTURE.md
/// §5). Input of any other rate is resampled to it.
pub const SPEECH_RATE: u32 = 16_000;

pub mod asr;
pub mod convert;
pub mod decode;
pub mod g2p;
pub mod input;
pub mod kokoro;
pub mod oggopus;
pub mod opus;
pub mod queue;
pub mod sentence;
pub mod sink;
pub mod source;
pub mod tts;
pub mod vad;

use std::time::Duration;

/// A block of PCM: interleaved `f32` samples in [-1, 1], `channels` per frame, at `rate` Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    /// Sample rate in Hz.
    pub rate: u32,
    /// Channels per frame.
    pub channels: u16,
    /// Interleaved samples; `samples.len()` is a multiple of `channels`.
    pub samples: Vec<f32>,
}

impl Pcm {
    /// Frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / self.channels.max(1) as usize
    }

    /// `duration` of silence at `rate` Hz, `channels`.
    pub fn silence(rate: u32, channels: u16, duration: Duration) -> Pcm {
        let frames = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
        Pcm {
            rate,
            channels,
            samples: vec![0.0; frames * channels as usize],
        }
    }

    /// How long the block plays.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.frames() as f64 / self.rate.max(1) as f64)
    }
}
