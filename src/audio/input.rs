//! Live sources: the microphone (cpal), and a device's stream of Opus frames (16 kHz mono,
//! 60 ms, ARCHITECTURE §5). Audio files go through [`super::source`]. Every source yields [`Pcm`]
//! blocks; `speech::SpeechInput` turns any of them into 16 kHz mono for the VAD and ASR.

use std::sync::mpsc as std_mpsc;

use cpal::traits::{DeviceTrait as _, HostTrait as _, StreamTrait as _};
use tokio::sync::mpsc;

use super::Pcm;
use super::opus::FrameDecoder;

/// Why a source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// No capture device could be opened (cpal's message).
    #[error("no usable microphone ({0}); give an audio file with --input FILE")]
    NoMicrophone(String),
    /// A device's Opus frame could not be decoded.
    #[error(transparent)]
    Opus(#[from] super::opus::OpusError),
}

/// The default input device, recording until dropped.
pub struct Microphone {
    stop: std_mpsc::Sender<()>,
    _thread: std::thread::JoinHandle<()>,
}

impl Drop for Microphone {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

impl Microphone {
    /// Opens the default microphone at its default format; its blocks arrive on the receiver
    /// (at the device's rate and channels).
    ///
    /// # Errors
    /// [`InputError::NoMicrophone`] when there is no input device or it cannot be opened.
    pub fn open() -> Result<(Self, mpsc::Receiver<Pcm>), InputError> {
        let (tx, rx) = mpsc::channel(64);
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("voxloop-microphone".into())
            .spawn(move || {
                let opened = (|| -> Result<cpal::Stream, String> {
                    let device = cpal::default_host()
                        .default_input_device()
                        .ok_or("no default input device")?;
                    let config = device.default_input_config().map_err(|e| e.to_string())?;
                    let (rate, channels) = (config.sample_rate(), config.channels());
                    let error =
                        |e: cpal::Error| tracing::error!(error = %e, "microphone stream error");
                    let send = move |samples: Vec<f32>| {
                        // A consumer that falls behind loses blocks rather than stalling the device.
                        let _ = tx.try_send(Pcm {
                            rate,
                            channels,
                            samples,
                        });
                    };
                    let stream = match config.sample_format() {
                        cpal::SampleFormat::F32 => device.build_input_stream(
                            config.config(),
                            move |data: &[f32], _: &cpal::InputCallbackInfo| send(data.to_vec()),
                            error,
                            None,
                        ),
                        cpal::SampleFormat::I16 => device.build_input_stream(
                            config.config(),
                            move |data: &[i16], _: &cpal::InputCallbackInfo| {
                                send(data.iter().map(|&s| f32::from(s) / 32768.0).collect())
                            },
                            error,
                            None,
                        ),
                        other => return Err(format!("sample format {other:?} is not supported")),
                    }
                    .map_err(|e| e.to_string())?;
                    stream.play().map_err(|e| e.to_string())?;
                    Ok(stream)
                })();
                match opened {
                    Ok(stream) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.recv();
                        drop(stream);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| InputError::NoMicrophone(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| InputError::NoMicrophone("the audio thread ended".into()))?
            .map_err(InputError::NoMicrophone)?;
        Ok((
            Self {
                stop: stop_tx,
                _thread: thread,
            },
            rx,
        ))
    }
}

/// Decodes a device's Opus frames (one packet each) to PCM at `rate` Hz mono. A corrupt packet
/// becomes one frame of silence (`frame_ms` long) with a warning, so timing is kept.
///
/// # Errors
/// [`InputError::Opus`] for a rate Opus does not take.
pub fn opus_frames(
    mut packets: mpsc::Receiver<Vec<u8>>,
    rate: u32,
    frame_ms: u32,
) -> Result<mpsc::Receiver<Pcm>, InputError> {
    let mut decoder = FrameDecoder::new(rate, 1)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(packet) = packets.recv().await {
            let pcm = decoder.decode(&packet).unwrap_or_else(|e| {
                tracing::warn!(error = %e, bytes = packet.len(), "corrupt Opus frame; silence instead");
                Pcm::silence(rate, 1, std::time::Duration::from_millis(frame_ms.into()))
            });
            if tx.send(pcm).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
