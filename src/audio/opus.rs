//! Opus for devices (ARCHITECTURE §5): the frame encoder and decoder smart speakers use (uplink 16 kHz
//! mono 60 ms frames; downlink 16 or 24 kHz, 20 or 60 ms), and a pacer that releases frames at
//! real-time pace a set amount ahead of playback, never in a burst.

use std::time::Duration;

use tokio::time::Instant;

use super::Pcm;

/// Sample rates Opus accepts, in Hz.
pub const OPUS_RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];
/// Frame durations voxloop uses, in ms (Opus allows 2.5 to 120).
pub const FRAME_MS: [u32; 4] = [10, 20, 40, 60];
/// Default bit rate of encoded frames, in bits per second: music to a speaker needs it (a 24 kHz
/// mono round trip keeps over 20 dB SNR; at libopus's own choice of about 32 kb/s it is 13.6 dB,
/// see tests/it/pipeline.rs).
pub const DEFAULT_BITRATE: i32 = 64_000;
/// Largest Opus packet voxloop writes, in bytes.
const MAX_PACKET: usize = 4000;

/// A codec setup Opus refuses, or a packet it cannot decode.
#[derive(Debug, thiserror::Error)]
pub enum OpusError {
    /// A sample rate, channel count or frame size Opus does not take.
    #[error("unsupported Opus setup: {0}")]
    Setup(String),
    /// libopus returned an error.
    #[error("Opus: {0}")]
    Codec(#[from] opus::Error),
}

fn channels(n: u16) -> Result<opus::Channels, OpusError> {
    match n {
        1 => Ok(opus::Channels::Mono),
        2 => Ok(opus::Channels::Stereo),
        n => Err(OpusError::Setup(format!("{n} channels (mono or stereo)"))),
    }
}

fn check(rate: u32, frame_ms: u32) -> Result<(), OpusError> {
    if !OPUS_RATES.contains(&rate) {
        return Err(OpusError::Setup(format!(
            "{rate} Hz (one of {OPUS_RATES:?})"
        )));
    }
    if !FRAME_MS.contains(&frame_ms) {
        return Err(OpusError::Setup(format!(
            "{frame_ms} ms frames (one of {FRAME_MS:?})"
        )));
    }
    Ok(())
}

/// Cuts PCM (already at the encoder's rate and channels) into frames and encodes each as one
/// Opus packet.
pub struct FrameEncoder {
    encoder: opus::Encoder,
    channels: u16,
    frame_samples: usize,
    pending: Vec<f32>,
    out: Vec<u8>,
}

impl FrameEncoder {
    /// An encoder for `rate` Hz, `channels` (1 or 2), `frame_ms` frames, tuned for speech and
    /// music alike (`Application::Audio`), at [`DEFAULT_BITRATE`].
    ///
    /// # Errors
    /// [`OpusError::Setup`] for a rate, channel count or frame length Opus does not take.
    pub fn new(rate: u32, channels_: u16, frame_ms: u32) -> Result<Self, OpusError> {
        check(rate, frame_ms)?;
        let mut encoder = opus::Encoder::new(rate, channels(channels_)?, opus::Application::Audio)?;
        encoder.set_bitrate(opus::Bitrate::Bits(DEFAULT_BITRATE))?;
        Ok(Self {
            encoder,
            channels: channels_,
            frame_samples: (rate / 1000 * frame_ms) as usize * channels_ as usize,
            pending: Vec::new(),
            out: vec![0; MAX_PACKET],
        })
    }

    /// Adds interleaved samples; returns the packets of every frame now complete.
    ///
    /// # Errors
    /// [`OpusError::Codec`] from libopus.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Vec<u8>>, OpusError> {
        self.pending.extend_from_slice(samples);
        let mut packets = Vec::new();
        let mut offset = 0;
        while self.pending.len() - offset >= self.frame_samples {
            let frame = &self.pending[offset..offset + self.frame_samples];
            let n = self.encoder.encode_float(frame, &mut self.out)?;
            packets.push(self.out[..n].to_vec());
            offset += self.frame_samples;
        }
        self.pending.drain(..offset);
        Ok(packets)
    }

    /// Encodes what is left, padded with silence to a whole frame (nothing if nothing is left).
    ///
    /// # Errors
    /// [`OpusError::Codec`] from libopus.
    pub fn finish(&mut self) -> Result<Option<Vec<u8>>, OpusError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        self.pending.resize(self.frame_samples, 0.0);
        let n = self.encoder.encode_float(&self.pending, &mut self.out)?;
        self.pending.clear();
        Ok(Some(self.out[..n].to_vec()))
    }

    /// Sets the bit rate in bits per second.
    ///
    /// # Errors
    /// [`OpusError::Codec`] for a rate libopus refuses (it takes 500 to 512000).
    pub fn set_bitrate(&mut self, bits_per_second: i32) -> Result<(), OpusError> {
        self.encoder
            .set_bitrate(opus::Bitrate::Bits(bits_per_second))?;
        Ok(())
    }

    /// Sets the encoder's complexity, 0 (cheapest) to 10 (libopus's default, best). Below 7 a
    /// float build of libopus skips its tonality analysis (`run_analysis` in
    /// `opus_encoder.c`); BENCHMARKS.md ("Audio pipeline", the complexity table) has the speed
    /// and SNR of each.
    ///
    /// # Errors
    /// [`OpusError::Codec`] outside 0..=10.
    pub fn set_complexity(&mut self, complexity: i32) -> Result<(), OpusError> {
        self.encoder.set_complexity(complexity)?;
        Ok(())
    }

    /// The encoder's lookahead, in samples per channel at its rate: how much decoded output
    /// leads the input (an Ogg/Opus header's pre-skip).
    ///
    /// # Errors
    /// [`OpusError::Codec`] from libopus.
    pub fn lookahead(&mut self) -> Result<u32, OpusError> {
        Ok(self.encoder.get_lookahead()?.max(0) as u32)
    }

    /// Drops samples waiting for a whole frame (after a stop).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// Channels per frame.
    pub fn channels(&self) -> u16 {
        self.channels
    }
}

/// Decodes Opus packets (one frame each, as devices send them) to PCM.
pub struct FrameDecoder {
    decoder: opus::Decoder,
    rate: u32,
    channels: u16,
    buf: Vec<f32>,
}

impl FrameDecoder {
    /// A decoder producing `rate` Hz, `channels` (1 or 2).
    ///
    /// # Errors
    /// [`OpusError::Setup`] for a rate or channel count Opus does not take.
    pub fn new(rate: u32, channels_: u16) -> Result<Self, OpusError> {
        check(rate, 20)?;
        let decoder = opus::Decoder::new(rate, channels(channels_)?)?;
        // Room for the longest Opus frame, 120 ms.
        let buf = vec![0.0; (rate as usize / 1000 * 120) * channels_ as usize];
        Ok(Self {
            decoder,
            rate,
            channels: channels_,
            buf,
        })
    }

    /// Decodes one packet.
    ///
    /// # Errors
    /// [`OpusError::Codec`] for a corrupt packet (the decoder stays usable).
    pub fn decode(&mut self, packet: &[u8]) -> Result<Pcm, OpusError> {
        let frames = self.decoder.decode_float(packet, &mut self.buf, false)?;
        Ok(Pcm {
            rate: self.rate,
            channels: self.channels,
            samples: self.buf[..frames * self.channels as usize].to_vec(),
        })
    }
}

/// Releases frames at real-time pace, `lead` ahead of playback: frame `n` may go out at
/// `start + n * frame - lead`, where `start` is when the first frame went out. The first frames
/// up to `lead` go at once (the device's buffer), then one per frame duration.
#[derive(Debug)]
pub struct Pacer {
    frame: Duration,
    lead: Duration,
    start: Option<Instant>,
    sent: u32,
}

impl Pacer {
    /// A pacer for frames of `frame` duration, running `lead` ahead.
    pub fn new(frame: Duration, lead: Duration) -> Self {
        Self {
            frame,
            lead,
            start: None,
            sent: 0,
        }
    }

    /// Waits until the next frame may go out, then counts it as sent.
    pub async fn next(&mut self) {
        let start = *self.start.get_or_insert_with(Instant::now);
        let due = (start + self.frame * self.sent)
            .checked_sub(self.lead)
            .unwrap_or(start);
        tokio::time::sleep_until(due.max(start)).await;
        self.sent += 1;
    }

    /// How far ahead of real time the frames sent so far are (0 when behind).
    pub fn ahead(&self) -> Duration {
        let Some(start) = self.start else {
            return Duration::ZERO;
        };
        (self.frame * self.sent).saturating_sub(start.elapsed())
    }

    /// Starts over (after a stop: the next frame goes out at once).
    pub fn reset(&mut self) {
        self.start = None;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_setups_opus_does_not_take() {
        assert!(FrameEncoder::new(44_100, 1, 20).is_err());
        assert!(FrameEncoder::new(16_000, 3, 20).is_err());
        assert!(FrameEncoder::new(16_000, 1, 25).is_err());
        assert!(FrameDecoder::new(22_050, 1).is_err());
    }

    #[test]
    fn frames_come_out_whole() {
        let mut encoder = FrameEncoder::new(16_000, 1, 60).unwrap();
        assert!(encoder.push(&vec![0.0; 900]).unwrap().is_empty());
        assert_eq!(encoder.push(&vec![0.0; 900]).unwrap().len(), 1); // 1800 >= 960
        assert!(encoder.finish().unwrap().is_some());
        assert!(encoder.finish().unwrap().is_none());
        let mut decoder = FrameDecoder::new(16_000, 1).unwrap();
        assert!(
            decoder.decode(&[0xff, 0xff, 0xff]).is_err(),
            "garbage is an error, not a panic"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_keeps_the_lead_and_never_bursts() {
        let mut pacer = Pacer::new(Duration::from_millis(60), Duration::from_millis(120));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..10 {
            pacer.next().await;
            times.push(start.elapsed().as_millis());
            assert!(
                pacer.ahead() <= Duration::from_millis(180),
                "{:?}",
                pacer.ahead()
            );
        }
        // Frames 0..=2 at once (0, 60 and 120 ms of audio are within the lead), then every 60 ms.
        assert_eq!(times, [0, 0, 0, 60, 120, 180, 240, 300, 360, 420]);
    }
}
