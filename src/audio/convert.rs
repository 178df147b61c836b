//! Converting PCM to a sink's format: channel down/up-mixing, then resampling (rubato's FFT
//! resampler for a fixed ratio), streaming block by block; and playback volume on a perceptual
//! curve with a short ramp.

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use super::Pcm;

/// Input frames the resampler takes per call.
const CHUNK_FRAMES: usize = 1024;

/// Why a conversion failed (a resampler could not be built for the rates).
#[derive(Debug, thiserror::Error)]
#[error("cannot resample {from} Hz to {to} Hz: {reason}")]
pub struct ConvertError {
    /// The input sample rate in Hz.
    pub from: u32,
    /// The output sample rate in Hz.
    pub to: u32,
    /// rubato's error.
    pub reason: String,
}

/// Mixes interleaved `samples` from `from` channels to `to` channels: mono is copied to every
/// channel; to mono, channels are averaged; otherwise channel `c` takes the average of the input
/// channels `c, c + to, c + 2 to, ...` (so 5.1 to stereo folds odd and even channels).
pub fn mix_channels(samples: &[f32], from: u16, to: u16) -> Vec<f32> {
    let (from, to) = (from.max(1) as usize, to.max(1) as usize);
    if from == to {
        return samples.to_vec();
    }
    let frames = samples.len() / from;
    let mut out = Vec::with_capacity(frames * to);
    for frame in samples.chunks_exact(from) {
        for c in 0..to {
            let (sum, n) = frame
                .iter()
                .skip(c % from)
                .step_by(to)
                .fold((0.0f32, 0usize), |(s, n), x| (s + x, n + 1));
            out.push(if n == 0 {
                frame[c % from]
            } else {
                sum / n as f32
            });
        }
    }
    out
}

/// Streams PCM of any rate and channel count into `rate` Hz, `channels` channels.
/// A change of input rate or channel count between blocks flushes and starts afresh.
pub struct Converter {
    rate: u32,
    channels: u16,
    stage: Option<Stage>,
}

struct Stage {
    in_rate: u32,
    in_channels: u16,
    /// `None` when the rates are equal.
    resampler: Option<Fft<f32>>,
    /// Mixed input waiting for a whole chunk.
    pending: Vec<f32>,
    /// Output frames still to drop (the resampler's delay).
    skip: usize,
    frames_in: u64,
    frames_out: u64,
}

impl Converter {
    /// A converter to `rate` Hz and `channels` channels.
    pub fn new(rate: u32, channels: u16) -> Self {
        Self {
            rate,
            channels,
            stage: None,
        }
    }

    /// Output rate in Hz.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Output channels.
    pub fn channels(&self) -> u16 {
        self.channels
    }

    /// Converts one block; the output (interleaved, `channels` per frame) may be shorter or
    /// longer than the input's duration, as the resampler works in chunks. Call
    /// [`Converter::flush`] at the end of the stream.
    ///
    /// # Errors
    /// [`ConvertError`] when no resampler can be made for the rates.
    pub fn push(&mut self, pcm: &Pcm) -> Result<Vec<f32>, ConvertError> {
        let mut out = Vec::new();
        let same = self
            .stage
            .as_ref()
            .is_some_and(|s| s.in_rate == pcm.rate && s.in_channels == pcm.channels);
        if !same {
            out = self.flush();
            self.stage = Some(self.stage_for(pcm.rate, pcm.channels)?);
        }
        let channels = self.channels;
        let stage = self.stage.as_mut().expect("just made");
        let mixed = mix_channels(&pcm.samples, pcm.channels, channels);
        stage.frames_in += (mixed.len() / channels as usize) as u64;
        let Some(resampler) = stage.resampler.as_mut() else {
            stage.frames_out += (mixed.len() / channels as usize) as u64;
            out.extend(mixed);
            return Ok(out);
        };
        stage.pending.extend(mixed);
        let ch = channels as usize;
        let whole = stage.pending.len() / (CHUNK_FRAMES * ch) * CHUNK_FRAMES;
        let mut offset = 0;
        while offset + CHUNK_FRAMES <= whole {
            let input = InterleavedSlice::new(&stage.pending[offset * ch..], ch, CHUNK_FRAMES)
                .expect("sized");
            let produced = resampler.process(&input, None).map_err(|e| ConvertError {
                from: stage.in_rate,
                to: self.rate,
                reason: e.to_string(),
            })?;
            push_skipping(
                &mut out,
                produced.take_data(),
                &mut stage.skip,
                &mut stage.frames_out,
                ch,
            );
            offset += CHUNK_FRAMES;
        }
        stage.pending.drain(..offset * ch);
        Ok(out)
    }

    /// Ends the stream: the rest of the input, and the resampler's tail, trimmed so that the
    /// output holds `frames_in * rate / in_rate` frames (rounded).
    pub fn flush(&mut self) -> Vec<f32> {
        let Some(mut stage) = self.stage.take() else {
            return Vec::new();
        };
        let ch = self.channels as usize;
        let Some(resampler) = stage.resampler.as_mut() else {
            return Vec::new();
        };
        let expected =
            (stage.frames_in as f64 * self.rate as f64 / stage.in_rate as f64).round() as u64;
        let mut out = Vec::new();
        let mut pending = std::mem::take(&mut stage.pending);
        // Feed the remainder, then silence, until the delayed tail has come out.
        while stage.frames_out < expected {
            let frames = pending.len() / ch;
            pending.resize(CHUNK_FRAMES * ch, 0.0);
            let input = InterleavedSlice::new(&pending[..], ch, CHUNK_FRAMES).expect("sized");
            let indexing = Indexing {
                partial_len: Some(frames),
                ..Indexing::default()
            };
            let produced = match resampler.process(&input, Some(&indexing)) {
                Ok(produced) => produced,
                Err(e) => {
                    tracing::warn!(error = %e, "resampler tail lost");
                    break;
                }
            };
            push_skipping(
                &mut out,
                produced.take_data(),
                &mut stage.skip,
                &mut stage.frames_out,
                ch,
            );
            pending.clear();
        }
        let excess = stage.frames_out.saturating_sub(expected) as usize;
        out.truncate(out.len().saturating_sub(excess * ch));
        out
    }

    fn stage_for(&self, in_rate: u32, in_channels: u16) -> Result<Stage, ConvertError> {
        let resampler = if in_rate == self.rate {
            None
        } else {
            let fft = Fft::<f32>::new(
                in_rate as usize,
                self.rate as usize,
                CHUNK_FRAMES,
                self.channels as usize,
                FixedSync::Input,
            )
            .map_err(|e| ConvertError {
                from: in_rate,
                to: self.rate,
                reason: e.to_string(),
            })?;
            Some(fft)
        };
        let skip = resampler.as_ref().map_or(0, |r| r.output_delay());
        Ok(Stage {
            in_rate,
            in_channels,
            resampler,
            pending: Vec::new(),
            skip,
            frames_in: 0,
            frames_out: 0,
        })
    }
}

fn push_skipping(
    out: &mut Vec<f32>,
    produced: Vec<f32>,
    skip: &mut usize,
    frames_out: &mut u64,
    ch: usize,
) {
    let frames = produced.len() / ch;
    let dropped = (*skip).min(frames);
    *skip -= dropped;
    out.extend_from_slice(&produced[dropped * ch..]);
    *frames_out += (frames - dropped) as u64;
}

/// Linear gain for a volume in percent on a perceptual curve: `(v / 100)^3`, so 50 % is about
/// -18 dB and 10 % about -60 dB; 0 is silence.
pub fn volume_gain(volume: u8) -> f32 {
    (f32::from(volume.min(100)) / 100.0).powi(3)
}

/// Playback volume that moves to a new setting over a short ramp instead of jumping (a jump in
/// gain is a click).
#[derive(Debug, Clone)]
pub struct Volume {
    gain: f32,
    target: f32,
    /// Gain change per frame while ramping.
    step: f32,
    ramp_frames: u32,
}

impl Volume {
    /// Starts at `volume` percent; changes ramp over `ramp_ms` at `rate` Hz.
    pub fn new(volume: u8, rate: u32, ramp_ms: u32) -> Self {
        let gain = volume_gain(volume);
        Self {
            gain,
            target: gain,
            step: 0.0,
            ramp_frames: (rate / 1000 * ramp_ms).max(1),
        }
    }

    /// Sets the target volume in percent; the next frames ramp to it.
    pub fn set(&mut self, volume: u8) {
        self.target = volume_gain(volume);
        self.step = (self.target - self.gain) / self.ramp_frames as f32;
    }

    /// Whether the gain is 1 and stays there (100 %, no ramp under way): samples pass
    /// unchanged.
    pub fn is_unity(&self) -> bool {
        self.gain == 1.0 && self.target == 1.0
    }

    /// Applies the gain to interleaved `samples` in place.
    pub fn apply(&mut self, samples: &mut [f32], channels: u16) {
        for frame in samples.chunks_mut(channels.max(1) as usize) {
            if self.gain != self.target {
                let next = self.gain + self.step;
                let passed = (self.step > 0.0 && next >= self.target)
                    || (self.step < 0.0 && next <= self.target);
                self.gain = if passed || self.step == 0.0 {
                    self.target
                } else {
                    next
                };
            }
            for s in frame {
                *s *= self.gain;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, hz: f32, frames: usize) -> Pcm {
        let samples = (0..frames)
            .map(|i| (i as f32 * hz * std::f32::consts::TAU / rate as f32).sin() * 0.5)
            .collect();
        Pcm {
            rate,
            channels: 1,
            samples,
        }
    }

    #[test]
    fn mixing() {
        assert_eq!(mix_channels(&[1.0, 3.0, 5.0, 7.0], 2, 1), [2.0, 6.0]);
        assert_eq!(mix_channels(&[1.0, 2.0], 1, 2), [1.0, 1.0, 2.0, 2.0]);
        assert_eq!(
            mix_channels(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 6, 2),
            [3.0, 4.0]
        );
    }

    #[test]
    fn resampling_keeps_duration_and_pitch() {
        let input = sine(44_100, 440.0, 44_100);
        let mut converter = Converter::new(16_000, 1);
        let mut out = Vec::new();
        for block in input.samples.chunks(1000) {
            out.extend(
                converter
                    .push(&Pcm {
                        rate: 44_100,
                        channels: 1,
                        samples: block.to_vec(),
                    })
                    .unwrap(),
            );
        }
        out.extend(converter.flush());
        assert_eq!(out.len(), 16_000);
        // Zero crossings of a 440 Hz tone over 1 s: about 880.
        let crossings = out
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        assert!((870..=890).contains(&crossings), "{crossings}");
    }

    #[test]
    fn same_rate_passes_through() {
        let mut converter = Converter::new(16_000, 2);
        let out = converter.push(&sine(16_000, 100.0, 10)).unwrap();
        assert_eq!(out.len(), 20);
        assert!(converter.flush().is_empty());
    }

    #[test]
    fn volume_ramps_without_jumps() {
        assert_eq!(volume_gain(100), 1.0);
        assert_eq!(volume_gain(0), 0.0);
        assert!((volume_gain(50) - 0.125).abs() < 1e-6);
        let mut volume = Volume::new(100, 1000, 10);
        volume.set(0);
        let mut samples = vec![1.0f32; 20];
        volume.apply(&mut samples, 1);
        assert!(
            samples.windows(2).all(|w| w[0] - w[1] <= 0.11),
            "{samples:?}"
        );
        assert_eq!(samples[0], 0.9);
        assert_eq!(samples[19], 0.0);
    }
}
