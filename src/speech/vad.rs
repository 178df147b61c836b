//! Voice activity detection, end-of-turn detection and barge-in, on 16 kHz mono PCM.
//!
//! Two well-kept detectors are wired in: earshot (a small neural VAD in pure Rust, 16 ms frames,
//! a voice probability) and WebRTC's VAD (libfvad through `webrtc-vad`, 30 ms frames, a yes/no
//! decision). BENCHMARKS.md compares them on the speech assets with silence and music mixed in;
//! earshot is the default.

use serde::{Deserialize, Serialize};

use super::SPEECH_RATE;
use voxloop_settings::{InvalidSetting, in_range};

/// Which detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VadEngine {
    /// earshot: neural, pure Rust, 256-sample (16 ms) frames.
    #[default]
    Earshot,
    /// WebRTC VAD (libfvad), "aggressive" mode, 480-sample (30 ms) frames.
    Webrtc,
}

/// libfvad's handle is a plain heap object with no thread affinity; it is used from one thread
/// at a time through `&mut`, so moving it between threads is sound.
struct Fvad(webrtc_vad::Vad);
// SAFETY: see above; the handle is never shared, only moved.
unsafe impl Send for Fvad {}

enum Detector {
    Earshot(Box<earshot::Detector>),
    Webrtc(Fvad),
}

/// The verdict on one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadFrame {
    /// Voice probability (earshot), or 0/1 (WebRTC).
    pub probability: f32,
    /// `probability >= threshold`.
    pub speech: bool,
    /// RMS level of the frame, linear (1.0 = full scale).
    pub rms: f32,
    /// Frame length in samples at [`SPEECH_RATE`].
    pub samples: usize,
}

/// A voice activity detector over a stream: push PCM of any length, get a verdict per frame.
pub struct Vad {
    detector: Detector,
    threshold: f32,
    pending: Vec<f32>,
}

impl Vad {
    /// A detector; frames with probability `>= threshold` are speech.
    pub fn new(engine: VadEngine, threshold: f32) -> Self {
        let detector = match engine {
            VadEngine::Earshot => Detector::Earshot(earshot::Detector::default_boxed()),
            VadEngine::Webrtc => Detector::Webrtc(Fvad(webrtc_vad::Vad::new_with_rate_and_mode(
                webrtc_vad::SampleRate::Rate16kHz,
                webrtc_vad::VadMode::Aggressive,
            ))),
        };
        Self {
            detector,
            threshold,
            pending: Vec::new(),
        }
    }

    /// Samples per frame at [`SPEECH_RATE`].
    pub fn frame_samples(&self) -> usize {
        match self.detector {
            Detector::Earshot(_) => 256,
            Detector::Webrtc(_) => 480,
        }
    }

    /// Adds samples (16 kHz mono, [-1, 1]); returns a verdict for each frame now complete.
    pub fn push(&mut self, samples: &[f32]) -> Vec<VadFrame> {
        self.pending.extend_from_slice(samples);
        let n = self.frame_samples();
        let mut frames = Vec::new();
        let mut offset = 0;
        while self.pending.len() - offset >= n {
            let frame = &self.pending[offset..offset + n];
            let probability = match &mut self.detector {
                Detector::Earshot(d) => d.predict_f32(frame).clamp(0.0, 1.0),
                Detector::Webrtc(Fvad(v)) => {
                    let pcm: Vec<i16> = frame
                        .iter()
                        .map(|s| (s.clamp(-1.0, 1.0) * 32767.0) as i16)
                        .collect();
                    if v.is_voice_segment(&pcm).unwrap_or(false) {
                        1.0
                    } else {
                        0.0
                    }
                }
            };
            let rms = (frame.iter().map(|s| s * s).sum::<f32>() / n as f32).sqrt();
            frames.push(VadFrame {
                probability,
                speech: probability >= self.threshold,
                rms,
                samples: n,
            });
            offset += n;
        }
        self.pending.drain(..offset);
        frames
    }
}

/// What the turn detector saw.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEvent {
    /// Speech has lasted `min_speech_ms`: a turn has begun (at `at_ms` of the stream).
    SpeechStart {
        /// When it began, in ms from the start of the stream.
        at_ms: u64,
    },
    /// A finished utterance: its PCM (16 kHz mono, with the pre-roll) and its span in the stream.
    Utterance {
        /// The PCM, 16 kHz mono, pre-roll included.
        pcm: Vec<f32>,
        /// Start, in ms from the start of the stream.
        start_ms: u64,
        /// End, in ms from the start of the stream.
        end_ms: u64,
    },
    /// Speech too short to be a turn (a cough, a click) was dropped.
    Discarded {
        /// Where it began, in ms from the start of the stream.
        start_ms: u64,
        /// Where it ended, in ms from the start of the stream.
        end_ms: u64,
    },
}

/// Cuts a stream into utterances: a turn ends after `end_silence_ms` of silence, shorter speech
/// than `min_speech_ms` is dropped, and an utterance is cut at `max_utterance_ms`.
pub struct TurnDetector {
    vad: Vad,
    config: VadConfig,
    /// Samples seen so far.
    position: usize,
    /// Recent audio when idle (the pre-roll), or the utterance so far.
    buffer: Vec<f32>,
    /// Stream position of `buffer[0]`.
    buffer_start: usize,
    state: TurnState,
}

#[derive(Debug, Clone, Copy)]
enum TurnState {
    Idle,
    Speaking {
        speech: usize,
        silence: usize,
        started: bool,
        last_speech_end: usize,
    },
}

fn ms(samples: usize) -> u64 {
    samples as u64 * 1000 / u64::from(SPEECH_RATE)
}

fn samples(ms: u32) -> usize {
    ms as usize * SPEECH_RATE as usize / 1000
}

impl TurnDetector {
    /// A detector with `config`'s engine, threshold and durations.
    pub fn new(config: &VadConfig) -> Self {
        Self {
            vad: Vad::new(config.engine, config.threshold),
            config: config.clone(),
            position: 0,
            buffer: Vec::new(),
            buffer_start: 0,
            state: TurnState::Idle,
        }
    }

    /// Adds 16 kHz mono samples; returns what happened, with the VAD frames seen (for barge-in).
    pub fn push(&mut self, pcm: &[f32]) -> (Vec<TurnEvent>, Vec<VadFrame>) {
        let frames = self.vad.push(pcm);
        self.buffer.extend_from_slice(pcm);
        let mut events = Vec::new();
        let frame_start = self.position;
        let mut at = frame_start;
        for frame in &frames {
            at += frame.samples;
            self.step(frame, at, &mut events);
        }
        self.position += pcm.len();
        if let TurnState::Idle = self.state {
            // Keep only the pre-roll while idle.
            let keep = samples(self.config.pre_roll_ms).min(self.buffer.len());
            let drop = self.buffer.len() - keep;
            self.buffer.drain(..drop);
            self.buffer_start += drop;
        }
        (events, frames)
    }

    /// Ends the stream: an open utterance is closed.
    pub fn finish(&mut self) -> Vec<TurnEvent> {
        let mut events = Vec::new();
        if let TurnState::Speaking {
            speech,
            last_speech_end,
            ..
        } = self.state
        {
            self.close(speech, last_speech_end, &mut events);
        }
        events
    }

    fn step(&mut self, frame: &VadFrame, frame_end: usize, events: &mut Vec<TurnEvent>) {
        let n = frame.samples;
        match &mut self.state {
            TurnState::Idle if frame.speech => {
                let pre_roll = samples(self.config.pre_roll_ms);
                let start = (frame_end - n)
                    .saturating_sub(pre_roll)
                    .max(self.buffer_start);
                let drop = start - self.buffer_start;
                self.buffer.drain(..drop.min(self.buffer.len()));
                self.buffer_start = start;
                self.state = TurnState::Speaking {
                    speech: n,
                    silence: 0,
                    started: false,
                    last_speech_end: frame_end,
                };
                self.maybe_started(events);
            }
            TurnState::Idle => {}
            TurnState::Speaking {
                speech,
                silence,
                last_speech_end,
                ..
            } => {
                if frame.speech {
                    *speech += n;
                    *silence = 0;
                    *last_speech_end = frame_end;
                } else {
                    *silence += n;
                }
                let (speech, silence, last) = (*speech, *silence, *last_speech_end);
                self.maybe_started(events);
                let length = frame_end - self.buffer_start;
                if silence >= samples(self.config.end_silence_ms) {
                    self.close(speech, last, events);
                } else if length >= samples(self.config.max_utterance_ms) {
                    self.close(speech, frame_end, events);
                }
            }
        }
    }

    fn maybe_started(&mut self, events: &mut Vec<TurnEvent>) {
        if let TurnState::Speaking {
            speech, started, ..
        } = &mut self.state
            && !*started
            && *speech >= samples(self.config.min_speech_ms)
        {
            *started = true;
            events.push(TurnEvent::SpeechStart {
                at_ms: ms(self.buffer_start),
            });
        }
    }

    /// Ends the utterance at stream position `end` (plus a short tail).
    fn close(&mut self, speech: usize, end: usize, events: &mut Vec<TurnEvent>) {
        let start = self.buffer_start;
        let tail = samples(200);
        let end = (end + tail).min(self.buffer_start + self.buffer.len());
        let len = end - start;
        if speech >= samples(self.config.min_speech_ms) {
            events.push(TurnEvent::Utterance {
                pcm: self.buffer[..len].to_vec(),
                start_ms: ms(start),
                end_ms: ms(end),
            });
        } else {
            events.push(TurnEvent::Discarded {
                start_ms: ms(start),
                end_ms: ms(end),
            });
        }
        self.buffer.drain(..len);
        self.buffer_start = end;
        self.state = TurnState::Idle;
    }
}

/// Decides barge-in: speech while the assistant plays must persist for `barge_in_ms` and be
/// louder than the playback by `barge_in_level_ratio` (so the assistant's own voice, heard back
/// through a speaker, does not interrupt it).
#[derive(Debug, Clone)]
pub struct BargeIn {
    needed: usize,
    ratio: f32,
    run: usize,
}

impl BargeIn {
    /// From `[vad]`.
    pub fn new(config: &VadConfig) -> Self {
        Self {
            needed: samples(config.barge_in_ms),
            ratio: config.barge_in_level_ratio,
            run: 0,
        }
    }

    /// One VAD frame of the microphone, while playback is (or is not) running at RMS level
    /// `playback_rms`. True when playback should stop now.
    pub fn on_frame(&mut self, frame: &VadFrame, playing: bool, playback_rms: f32) -> bool {
        if playing && frame.speech && frame.rms > playback_rms * self.ratio {
            self.run += frame.samples;
        } else {
            self.run = 0;
        }
        let trigger = self.run >= self.needed.max(1);
        if trigger {
            self.run = 0;
        }
        trigger
    }
}

/// `[vad]`: voice activity detection, end of turn and barge-in. Durations in ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    /// The detector: `earshot` (default) or `webrtc` (see BENCHMARKS.md for the comparison).
    pub engine: VadEngine,
    /// Voice probability above which a frame counts as speech (0.0..=1.0).
    pub threshold: f32,
    /// Silence that ends a turn.
    pub end_silence_ms: u32,
    /// Shorter speech is ignored (a cough, a click).
    pub min_speech_ms: u32,
    /// An utterance is cut at this length.
    pub max_utterance_ms: u32,
    /// Audio kept from before speech was detected, so the first syllable is not lost.
    pub pre_roll_ms: u32,
    /// Barge-in: speech must last this long during playback to stop it.
    pub barge_in_ms: u32,
    /// Barge-in: the microphone level must exceed the playback level times this (the assistant's
    /// own voice through a speaker must not interrupt it).
    pub barge_in_level_ratio: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            engine: VadEngine::Earshot,
            threshold: 0.7,
            end_silence_ms: 600,
            min_speech_ms: 250,
            max_utterance_ms: 30_000,
            pre_roll_ms: 300,
            barge_in_ms: 32,
            barge_in_level_ratio: 1.5,
        }
    }
}

impl VadConfig {
    /// Checks every `[vad]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `vad.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "vad.threshold",
            self.threshold,
            0.0..=1.0,
            "(a probability)",
        )?;
        in_range(
            "vad.end_silence_ms",
            self.end_silence_ms,
            100..=10_000,
            "milliseconds",
        )?;
        in_range(
            "vad.min_speech_ms",
            self.min_speech_ms,
            0..=5_000,
            "milliseconds",
        )?;
        in_range(
            "vad.max_utterance_ms",
            self.max_utterance_ms,
            1_000..=120_000,
            "milliseconds",
        )?;
        in_range(
            "vad.pre_roll_ms",
            self.pre_roll_ms,
            0..=2_000,
            "milliseconds",
        )?;
        in_range(
            "vad.barge_in_ms",
            self.barge_in_ms,
            0..=2_000,
            "milliseconds",
        )?;
        in_range(
            "vad.barge_in_level_ratio",
            self.barge_in_level_ratio,
            0.0..=100.0,
            "(a ratio)",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(speech: bool, rms: f32) -> VadFrame {
        VadFrame {
            probability: if speech { 1.0 } else { 0.0 },
            speech,
            rms,
            samples: 256,
        }
    }

    #[test]
    fn silence_is_not_speech() {
        for engine in [VadEngine::Earshot, VadEngine::Webrtc] {
            let mut vad = Vad::new(engine, 0.5);
            let frames = vad.push(&vec![0.0; 16_000]);
            assert!(!frames.is_empty());
            assert!(frames.iter().all(|f| !f.speech), "{engine:?}");
        }
    }

    #[test]
    fn barge_in_needs_persistent_speech_louder_than_playback() {
        let config = VadConfig {
            barge_in_ms: 48,
            barge_in_level_ratio: 2.0,
            ..VadConfig::default()
        };
        let mut barge = BargeIn::new(&config);
        // Not while idle.
        assert!(!barge.on_frame(&frame(true, 0.5), false, 0.0));
        // Too quiet against playback at 0.3: the assistant hearing itself.
        for _ in 0..10 {
            assert!(!barge.on_frame(&frame(true, 0.4), true, 0.3));
        }
        // Loud enough, for 3 frames of 16 ms.
        assert!(!barge.on_frame(&frame(true, 0.7), true, 0.3));
        assert!(!barge.on_frame(&frame(true, 0.7), true, 0.3));
        assert!(barge.on_frame(&frame(true, 0.7), true, 0.3));
    }
}
