//! Where played PCM goes: the speaker (cpal), a WAV file (hound), Opus frames for a device
//! (paced), or nowhere (benchmarks). Every sink takes frames of interleaved `f32` at its own
//! rate and channel count ([`Sink::rate`], [`Sink::channels`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpal::traits::{DeviceTrait as _, HostTrait as _, StreamTrait as _};
use tokio::sync::mpsc;

use super::opus::{FrameEncoder, OpusError, Pacer};

/// Why a sink cannot play.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// No sound card, or it cannot be configured.
    #[error("no usable audio output device ({0}); write to a file with --output OUT.wav")]
    NoDevice(String),
    /// The WAV file could not be written.
    #[error("writing {path}: {reason}")]
    File {
        /// The WAV file.
        path: PathBuf,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// Opus encoding failed.
    #[error(transparent)]
    Opus(#[from] OpusError),
    /// The receiver of device frames is gone (the device disconnected).
    #[error("the device stopped receiving audio")]
    Closed,
    /// Opus packets were written to a sink that takes PCM.
    #[error("encoded frames were written to a sink that takes PCM")]
    NotOpus,
}

/// An audio output.
pub enum Sink {
    /// The default output device (cpal).
    Speaker(SpeakerSink),
    /// A WAV file.
    Wav(WavSink),
    /// Opus frames for a device.
    Opus(OpusSink),
    /// Nowhere, at real-time pace (tests, benchmarks).
    Null(NullSink),
}

impl Sink {
    /// Sample rate in Hz the sink takes.
    pub fn rate(&self) -> u32 {
        match self {
            Sink::Speaker(s) => s.rate,
            Sink::Wav(s) => s.spec.sample_rate,
            Sink::Opus(s) => s.rate,
            Sink::Null(s) => s.rate,
        }
    }

    /// Channels per frame the sink takes.
    pub fn channels(&self) -> u16 {
        match self {
            Sink::Speaker(s) => s.channels,
            Sink::Wav(s) => s.spec.channels,
            Sink::Opus(s) => s.encoder.channels(),
            Sink::Null(s) => s.channels,
        }
    }

    /// Plays interleaved `samples`, waiting as the sink's pace requires (the speaker's buffer,
    /// the device's real-time pacing). Cancel-safe: dropping the future drops these samples.
    ///
    /// # Errors
    /// [`SinkError`] when the output fails.
    pub async fn write(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        match self {
            Sink::Speaker(s) => s.write(samples).await,
            Sink::Wav(s) => s.write(samples),
            Sink::Opus(s) => s.write(samples).await,
            Sink::Null(s) => s.write(samples).await,
        }
    }

    /// Sends one Opus packet encoded elsewhere (the transcode cache), paced like the sink's
    /// own: after what waits in the sink's encoder, padded to a whole frame. The packet must
    /// be in the sink's format (rate, mono, frame length).
    ///
    /// # Errors
    /// [`SinkError::Closed`] when the device is gone; [`SinkError::NotOpus`] for another sink.
    pub async fn write_encoded(&mut self, packet: &[u8]) -> Result<(), SinkError> {
        match self {
            Sink::Opus(s) => {
                s.finish().await?;
                s.send_paced(packet.to_vec()).await
            }
            Sink::Speaker(_) | Sink::Wav(_) | Sink::Null(_) => Err(SinkError::NotOpus),
        }
    }

    /// Drops what is buffered but not yet heard (a stop).
    pub fn clear(&mut self) {
        match self {
            Sink::Speaker(s) => s.ring.lock().expect("ring lock").clear(),
            Sink::Wav(_) => {}
            Sink::Opus(s) => s.clear(),
            Sink::Null(_) => {}
        }
    }

    /// Sends what waits for a whole frame, padded with silence: a device's Opus stream must not
    /// keep the end of a reply until more audio comes. The sink stays open. Other sinks have
    /// nothing waiting.
    ///
    /// # Errors
    /// [`SinkError`] when the output fails.
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Opus(s) => s.finish().await,
            Sink::Speaker(_) | Sink::Wav(_) | Sink::Null(_) => Ok(()),
        }
    }

    /// Plays out what is buffered and closes the output (finalizes the WAV header).
    ///
    /// # Errors
    /// [`SinkError`] when the output fails.
    pub async fn finish(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Speaker(s) => {
                while !s.ring.lock().expect("ring lock").is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
            Sink::Wav(s) => s.finish(),
            Sink::Opus(s) => s.finish().await,
            Sink::Null(_) => Ok(()),
        }
    }
}

/// The default sound card through cpal. The cpal stream lives on its own thread (it is not
/// `Send`); samples reach its callback through a ring buffer of at most `buffer` duration.
pub struct SpeakerSink {
    rate: u32,
    channels: u16,
    ring: Arc<Mutex<VecDeque<f32>>>,
    /// Samples the ring may hold before `write` waits.
    capacity: usize,
    _thread: std::thread::JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
}

impl SpeakerSink {
    /// Opens the default output device at its default rate and channel count, buffering at most
    /// `buffer` ahead of what is heard.
    ///
    /// # Errors
    /// [`SinkError::NoDevice`] when there is no device or it cannot be opened.
    pub fn open(buffer: Duration) -> Result<Self, SinkError> {
        let ring = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let callback_ring = ring.clone();
        let thread = std::thread::Builder::new()
            .name("voxloop-speaker".into())
            .spawn(move || {
                let opened = (|| -> Result<(cpal::Stream, u32, u16), String> {
                    let host = cpal::default_host();
                    let device = host
                        .default_output_device()
                        .ok_or("no default output device")?;
                    let config = device.default_output_config().map_err(|e| e.to_string())?;
                    let (rate, channels) = (config.sample_rate(), config.channels());
                    let stream_config = config.config();
                    let error =
                        |e: cpal::Error| tracing::error!(error = %e, "speaker stream error");
                    let stream = match config.sample_format() {
                        cpal::SampleFormat::F32 => device.build_output_stream(
                            stream_config,
                            move |out: &mut [f32], _: &cpal::OutputCallbackInfo| {
                                fill(&callback_ring, out, |s| s)
                            },
                            error,
                            None,
                        ),
                        cpal::SampleFormat::I16 => device.build_output_stream(
                            stream_config,
                            move |out: &mut [i16], _: &cpal::OutputCallbackInfo| {
                                fill(&callback_ring, out, |s| {
                                    (s.clamp(-1.0, 1.0) * 32767.0) as i16
                                })
                            },
                            error,
                            None,
                        ),
                        other => return Err(format!("sample format {other:?} is not supported")),
                    }
                    .map_err(|e| e.to_string())?;
                    stream.play().map_err(|e| e.to_string())?;
                    Ok((stream, rate, channels))
                })();
                match opened {
                    Ok((stream, rate, channels)) => {
                        let _ = ready_tx.send(Ok((rate, channels)));
                        let _ = stop_rx.recv();
                        drop(stream);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| SinkError::NoDevice(e.to_string()))?;
        let (rate, channels) = ready_rx
            .recv()
            .map_err(|_| SinkError::NoDevice("the audio thread ended".into()))?
            .map_err(SinkError::NoDevice)?;
        let capacity = (rate as f64 * buffer.as_secs_f64()) as usize * channels as usize;
        tracing::info!(rate, channels, "speaker open");
        Ok(Self {
            rate,
            channels,
            ring,
            capacity: capacity.max(1),
            _thread: thread,
            stop: stop_tx,
        })
    }

    async fn write(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        // Wait for room first, so that a cancelled write has pushed nothing.
        loop {
            let queued = self.ring.lock().expect("ring lock").len();
            if queued + samples.len() <= self.capacity.max(samples.len()) {
                break;
            }
            let wait = (queued + samples.len() - self.capacity) as f64
                / (self.rate as f64 * self.channels as f64);
            tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.001, 0.05))).await;
        }
        self.ring
            .lock()
            .expect("ring lock")
            .extend(samples.iter().copied());
        Ok(())
    }
}

impl Drop for SpeakerSink {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

/// The cpal callback: plays what the ring holds, silence for the rest.
fn fill<T: Copy + Default>(ring: &Mutex<VecDeque<f32>>, out: &mut [T], convert: impl Fn(f32) -> T) {
    let mut ring = ring.lock().expect("ring lock");
    for slot in out.iter_mut() {
        *slot = ring.pop_front().map(&convert).unwrap_or_default();
    }
}

/// Everything that would have played, in order, as a 16-bit PCM WAV file.
pub struct WavSink {
    path: PathBuf,
    spec: hound::WavSpec,
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
}

impl WavSink {
    /// Creates (or truncates) `path` for `rate` Hz, `channels`.
    ///
    /// # Errors
    /// [`SinkError::File`] when the file cannot be created.
    pub fn create(path: &Path, rate: u32, channels: u16) -> Result<Self, SinkError> {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec).map_err(|e| SinkError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            spec,
            writer: Some(writer),
        })
    }

    fn write(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        for &s in samples {
            writer
                .write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
                .map_err(|e| SinkError::File {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        if let Some(writer) = self.writer.take() {
            writer.finalize().map_err(|e| SinkError::File {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Opus frames for a device, released at real-time pace a set lead ahead of playback.
pub struct OpusSink {
    rate: u32,
    encoder: FrameEncoder,
    pacer: Pacer,
    frames: mpsc::Sender<Vec<u8>>,
}

impl OpusSink {
    /// Encodes `rate` Hz mono audio in `frame_ms` frames at `bitrate` bits per second and sends
    /// each packet to `frames`, `lead` ahead of real time.
    ///
    /// # Errors
    /// [`SinkError::Opus`] for a setup Opus refuses.
    pub fn new(
        rate: u32,
        frame_ms: u32,
        bitrate: i32,
        lead: Duration,
        frames: mpsc::Sender<Vec<u8>>,
    ) -> Result<Self, SinkError> {
        let mut encoder = FrameEncoder::new(rate, 1, frame_ms)?;
        encoder.set_bitrate(bitrate)?;
        Ok(Self {
            rate,
            encoder,
            pacer: Pacer::new(Duration::from_millis(frame_ms.into()), lead),
            frames,
        })
    }

    /// Sets the encoder's complexity (0..=10, see [`FrameEncoder::set_complexity`]).
    ///
    /// # Errors
    /// [`SinkError::Opus`] outside 0..=10.
    pub fn set_complexity(&mut self, complexity: i32) -> Result<(), SinkError> {
        Ok(self.encoder.set_complexity(complexity)?)
    }

    async fn write(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        for packet in self.encoder.push(samples)? {
            self.send_paced(packet).await?;
        }
        Ok(())
    }

    /// Sends one packet when the pacer lets it go.
    async fn send_paced(&mut self, packet: Vec<u8>) -> Result<(), SinkError> {
        self.pacer.next().await;
        self.frames
            .send(packet)
            .await
            .map_err(|_| SinkError::Closed)
    }

    fn clear(&mut self) {
        // Frames already sent are on the device; start the pace afresh for what comes next.
        self.encoder.clear();
        self.pacer.reset();
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        match self.encoder.finish()? {
            Some(packet) => self.send_paced(packet).await,
            None => Ok(()),
        }
    }
}

/// Discards audio; with `realtime`, at the pace it would play (for timing tests and benches).
pub struct NullSink {
    rate: u32,
    channels: u16,
    /// With real-time pacing: when the first frame was taken.
    realtime: Option<Option<tokio::time::Instant>>,
    /// Frames (samples per channel) taken so far.
    pub frames: u64,
}

impl NullSink {
    /// A null sink for `rate` Hz, `channels`; `realtime` paces writes like a sound card.
    pub fn new(rate: u32, channels: u16, realtime: bool) -> Self {
        Self {
            rate,
            channels,
            realtime: realtime.then_some(None),
            frames: 0,
        }
    }

    async fn write(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        let frames = samples.len() as u64 / self.channels.max(1) as u64;
        if let Some(start) = &mut self.realtime {
            // Returns once the previous frames have "played".
            let start = *start.get_or_insert_with(tokio::time::Instant::now);
            let played = Duration::from_secs_f64(self.frames as f64 / self.rate as f64);
            tokio::time::sleep_until(start + played).await;
        }
        self.frames += frames;
        Ok(())
    }
}
