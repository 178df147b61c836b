//! Audio plumbing between "bytes of audio" and "sound out" (ARCHITECTURE §1): streaming decode,
//! resampling and channel mixing, volume, Opus and Ogg/Opus, the playback queue, sinks, sources
//! and microphone input. It knows nothing of speech: [`crate::speech`] builds on it.

pub mod convert;
pub mod decode;
pub mod input;
pub mod oggopus;
pub mod opus;
pub mod queue;
pub mod sink;
pub mod source;
pub mod transcode;

use serde::{Deserialize, Serialize};
use std::time::Duration;
use voxloop_settings::{InvalidSetting, in_range};

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
    /// Music a turn did not replace or stop goes on after the turn's answer: a new request, or
    /// speech over the output, pauses it instead of ending it. `false`: they end it.
    pub resume_media: bool,
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
    /// Starting gain of a device's downlink, percent (0..=100, default 100). A device has its
    /// own volume (its buttons, its speaker tool), so voxloop leaves the audio whole, and the
    /// transcode cache's frames go out as they are (at another gain each frame is decoded and
    /// encoded again). Spoken volume requests still set it on a device without a speaker tool.
    pub device_volume: u8,
    /// MiB of encoded device frames the transcode cache keeps (0..=65536; 0: no cache): a
    /// media resource played to devices is decoded, resampled and encoded once, and its frames
    /// serve every session that plays it ([`transcode`]); the least recently used idle entries
    /// are dropped past this.
    pub transcode_cache_mb: u32,
    /// MiB of encoded device frames kept on disk behind the memory (0..=1048576, default 1024;
    /// 0: none): an entry's frames are written when its fill ends, whole or as far as sessions
    /// played, and a later miss reads them back, in this server or the next
    /// ([`transcode::DiskTier`]). Needs `transcode_cache_mb` above 0.
    pub transcode_cache_disk_mb: u32,
    /// The disk tier's directory; empty (the default): `voxloop/transcode` in the platform
    /// cache directory (`~/.cache/voxloop/transcode` on Linux).
    pub transcode_cache_dir: String,
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
            resume_media: true,
            device_rate: 24_000,
            device_frame_ms: 60,
            device_lead_ms: 120,
            device_bitrate: opus::DEFAULT_BITRATE,
            device_opus_complexity: 4,
            device_volume: 100,
            transcode_cache_mb: 128,
            transcode_cache_disk_mb: 1024,
            transcode_cache_dir: String::new(),
        }
    }
}

impl AudioConfig {
    /// The transcode cache's disk directory: `transcode_cache_dir`, else the platform cache
    /// directory's `voxloop/transcode`.
    pub fn transcode_cache_path(&self) -> std::path::PathBuf {
        if !self.transcode_cache_dir.is_empty() {
            return self.transcode_cache_dir.clone().into();
        }
        dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("voxloop")
            .join("transcode")
    }

    /// Checks every `[audio]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `audio.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range("audio.output_rate", self.output_rate, 8_000..=192_000, "Hz")?;
        in_range(
            "audio.output_channels",
            self.output_channels,
            1..=8,
            "channels",
        )?;
        in_range("audio.frame_ms", self.frame_ms, 5..=100, "milliseconds")?;
        in_range("audio.volume", self.volume, 0..=100, "percent")?;
        in_range(
            "audio.device_volume",
            self.device_volume,
            0..=100,
            "percent",
        )?;
        in_range(
            "audio.transcode_cache_mb",
            self.transcode_cache_mb,
            0..=65_536,
            "MiB",
        )?;
        in_range(
            "audio.transcode_cache_disk_mb",
            self.transcode_cache_disk_mb,
            0..=1_048_576,
            "MiB",
        )?;
        in_range(
            "audio.volume_ramp_ms",
            self.volume_ramp_ms,
            1..=1000,
            "milliseconds",
        )?;
        in_range(
            "audio.speaker_buffer_ms",
            self.speaker_buffer_ms,
            20..=2000,
            "milliseconds",
        )?;
        if ![16_000, 24_000].contains(&self.device_rate) {
            return Err(InvalidSetting {
                key: "audio.device_rate".into(),
                value: self.device_rate.to_string(),
                allowed: "16000 or 24000 Hz (xiaozhi-esp32 downlink)".into(),
            });
        }
        if ![20, 60].contains(&self.device_frame_ms) {
            return Err(InvalidSetting {
                key: "audio.device_frame_ms".into(),
                value: self.device_frame_ms.to_string(),
                allowed: "20 or 60 milliseconds".into(),
            });
        }
        in_range(
            "audio.device_lead_ms",
            self.device_lead_ms,
            0..=2000,
            "milliseconds",
        )?;
        in_range(
            "audio.device_bitrate",
            self.device_bitrate,
            6_000..=256_000,
            "bits per second",
        )?;
        in_range(
            "audio.device_opus_complexity",
            self.device_opus_complexity,
            0..=10,
            "(0 cheapest, 10 best)",
        )?;
        Ok(())
    }
}
