//! Streaming decode: bytes that arrive in pieces (a paged resource, an HTTP body, a file) to PCM,
//! starting with the first piece.
//!
//! Containers and codecs: MP3, Ogg Vorbis, FLAC, WAV/PCM and MP4 through symphonia; Ogg Opus
//! demuxed by symphonia and decoded with libopus (the `opus` crate); raw PCM given as
//! `audio/pcm;rate=R;channels=C` (signed 16-bit little-endian). The format comes from the MIME
//! type, confirmed by sniffing the first bytes: when they disagree the bytes win (and a warning is
//! logged), since symphonia probes the content whatever the hint.
//!
//! Bad input never panics: a corrupt packet is skipped, a stream that breaks off ends with an
//! error after the PCM decoded so far, and formats with absurd parameters are refused.

use std::io::{Cursor, Read};

use symphonia::core::codecs::CodecParameters;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSourceStream, ReadOnlySource};
use symphonia::core::meta::MetadataOptions;

use super::Pcm;
use crate::media::{file_extension, mime_matches, sniff_container};

/// Highest sample rate accepted, in Hz.
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// Most channels accepted.
pub const MAX_CHANNELS: u16 = 32;

/// Why decoding stopped early or could not start. PCM delivered before it stays valid.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a format voxloop can decode.
    #[error("cannot decode {mime}: {reason}")]
    Unsupported {
        /// The MIME type (declared, or sniffed from the bytes).
        mime: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// Parameters no real audio has.
    #[error("refusing {what} = {value} (allowed: {allowed})")]
    Absurd {
        /// The parameter.
        what: &'static str,
        /// The value the stream declared.
        value: u64,
        /// The range accepted.
        allowed: &'static str,
    },
    /// The container or codec data is broken beyond skipping a packet.
    #[error("corrupt audio after {frames} frames: {reason}")]
    Corrupt {
        /// Frames decoded before the failure.
        frames: u64,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The bytes stopped coming (the source failed).
    #[error("audio input failed after {frames} frames: {reason}")]
    Input {
        /// Frames decoded before the failure.
        frames: u64,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The data held no audio at all (zero length, or no audio track).
    #[error("no audio in the data ({0})")]
    Empty(String),
}

/// Totals of a finished decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSummary {
    /// Sample rate in Hz.
    pub rate: u32,
    /// Channels.
    pub channels: u16,
    /// Frames (samples per channel) decoded.
    pub frames: u64,
    /// Packets skipped as corrupt.
    pub skipped_packets: u64,
}

/// Raw PCM parameters from `audio/pcm;rate=R;channels=C` (also `audio/l16`; defaults 16000 Hz,
/// mono), or `None` for other MIME types.
pub fn raw_pcm_params(mime: &str) -> Option<(u32, u16)> {
    let mut parts = mime.split(';').map(str::trim);
    let essence = parts.next()?.to_ascii_lowercase();
    if !matches!(
        essence.as_str(),
        "audio/pcm" | "audio/l16" | "audio/x-pcm" | "audio/s16le"
    ) {
        return None;
    }
    let (mut rate, mut channels) = (16_000u32, 1u16);
    for part in parts {
        if let Some((key, value)) = part.split_once('=') {
            match key.trim().to_ascii_lowercase().as_str() {
                "rate" => rate = value.trim().parse().unwrap_or(0),
                "channels" => channels = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    Some((rate, channels))
}

fn check_params(rate: u32, channels: u16) -> Result<(), DecodeError> {
    if rate == 0 || rate > MAX_SAMPLE_RATE {
        return Err(DecodeError::Absurd {
            what: "sample rate",
            value: rate.into(),
            allowed: "1 to 384000 Hz",
        });
    }
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(DecodeError::Absurd {
            what: "channel count",
            value: channels.into(),
            allowed: "1 to 32",
        });
    }
    Ok(())
}

/// Decodes the audio file at `path` (format from its extension, else sniffed) to mono samples
/// at `rate` Hz. Blocking.
///
/// # Errors
/// [`DecodeError::Input`] when the file cannot be opened; as [`decode_to_mono`].
pub fn decode_file(path: &std::path::Path, rate: u32) -> Result<Vec<f32>, DecodeError> {
    let input = std::fs::File::open(path).map_err(|e| DecodeError::Input {
        frames: 0,
        reason: format!("{}: {e}", path.display()),
    })?;
    let mime = super::source::mime_for_extension(&path.to_string_lossy())
        .unwrap_or("application/octet-stream");
    decode_to_mono(input, mime, rate)
}

/// Decodes all of `input` as `mime` (`application/octet-stream`: sniffed) to mono samples at
/// `rate` Hz. Blocking.
///
/// # Errors
/// Any [`DecodeError`] of [`decode`]; [`DecodeError::Corrupt`] when resampling fails.
pub fn decode_to_mono(
    input: impl Read + Send + Sync + 'static,
    mime: &str,
    rate: u32,
) -> Result<Vec<f32>, DecodeError> {
    let mut converter = super::convert::Converter::new(rate, 1);
    let mut pcm = Vec::new();
    let mut convert_error = None;
    decode(input, mime, &mut |block| match converter.push(&block) {
        Ok(samples) => {
            pcm.extend(samples);
            true
        }
        Err(e) => {
            convert_error = Some(e);
            false
        }
    })?;
    if let Some(e) = convert_error {
        return Err(DecodeError::Corrupt {
            frames: pcm.len() as u64,
            reason: e.to_string(),
        });
    }
    pcm.extend(converter.flush());
    Ok(pcm)
}

/// Decodes `input` (read in order; reads may block while bytes arrive) as `mime`, calling `out`
/// with each block of PCM in order. `out` returning `false` stops decoding (no error).
///
/// # Errors
/// [`DecodeError`]; `out` has by then received every block decoded before the failure.
pub fn decode(
    input: impl Read + Send + Sync + 'static,
    mime: &str,
    out: &mut dyn FnMut(Pcm) -> bool,
) -> Result<DecodeSummary, DecodeError> {
    let mut decoder = Decoder::open(input, mime)?;
    while let Some(pcm) = decoder.next_block(0)? {
        if !out(pcm) {
            break;
        }
    }
    Ok(decoder.summary())
}

/// A decoder that hands out PCM a block at a time when asked (pull), so that whoever drives it
/// holds no thread while it waits for room downstream ([`spawn_decoder`] decodes each block on
/// the blocking pool and waits for the consumer on the async side). Reads from its input may
/// block while bytes arrive.
pub struct Decoder {
    inner: Inner,
    summary: DecodeSummary,
    /// What the caller asked to decode, for messages.
    mime: String,
    /// The stream ended (or failed); nothing more comes.
    ended: bool,
    /// An error met after PCM that was handed out first; returned by the next call.
    pending_error: Option<DecodeError>,
}

enum Inner {
    /// Signed 16-bit little-endian PCM: the input, a read buffer of about 20 ms, and the bytes
    /// of a partial frame carried to the next read.
    Raw {
        input: Box<dyn Read + Send + Sync>,
        buf: Vec<u8>,
        carry: usize,
    },
    /// A container read by symphonia, one audio track decoded.
    Container {
        format: Box<dyn symphonia::core::formats::FormatReader>,
        codec: Codec,
        track_id: u32,
        samples: Vec<f32>,
    },
}

impl Decoder {
    /// Reads the first bytes of `input` and opens it as `mime` (`application/octet-stream`:
    /// sniffed; when the MIME type and the bytes disagree, the bytes win). Blocks while the first
    /// bytes arrive and, for containers, while symphonia probes the header.
    ///
    /// # Errors
    /// [`DecodeError::Empty`] for zero bytes or no audio track, [`DecodeError::Unsupported`],
    /// [`DecodeError::Absurd`] parameters, [`DecodeError::Input`] when the input fails.
    pub fn open(input: impl Read + Send + Sync + 'static, mime: &str) -> Result<Self, DecodeError> {
        let mut input = input;
        let mut head = vec![0u8; 64];
        let mut filled = 0;
        while filled < head.len() {
            match input.read(&mut head[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(DecodeError::Input {
                        frames: 0,
                        reason: e.to_string(),
                    });
                }
            }
        }
        head.truncate(filled);
        if head.is_empty() {
            return Err(DecodeError::Empty("zero bytes".into()));
        }
        let input = Cursor::new(head.clone()).chain(input);
        if let Some((rate, channels)) = raw_pcm_params(mime) {
            check_params(rate, channels)?;
            // About 20 ms per read.
            let frame_bytes = 2 * channels as usize;
            let block = (rate as usize / 50).max(1) * frame_bytes;
            return Ok(Self::new(
                Inner::Raw {
                    input: Box::new(input),
                    buf: vec![0u8; block],
                    carry: 0,
                },
                rate,
                channels,
                mime,
            ));
        }
        let sniffed = sniff_container(&head);
        let container = match sniffed {
            Some(sniffed) if !mime_matches(mime, sniffed) => {
                tracing::warn!(declared = %mime, sniffed, "MIME type does not match the bytes; decoding by the bytes");
                sniffed.to_string()
            }
            _ => mime.to_string(),
        };
        open_container(input, &container)
    }

    fn new(inner: Inner, rate: u32, channels: u16, mime: &str) -> Self {
        Self {
            inner,
            summary: DecodeSummary {
                rate,
                channels,
                frames: 0,
                skipped_packets: 0,
            },
            mime: mime.to_string(),
            ended: false,
            pending_error: None,
        }
    }

    /// Totals so far: sample rate in Hz, channels, frames delivered, packets skipped.
    pub fn summary(&self) -> DecodeSummary {
        self.summary
    }

    /// The next block of PCM, at least `min_frames` frames (samples per channel) unless the
    /// stream ends first: one packet's worth or more (a 1152-frame MP3 frame, a 20 ms read of raw
    /// PCM), joined up to `min_frames`. `Ok(None)` at the end and after an error. Blocks while
    /// bytes arrive. A corrupt packet is skipped and counted.
    ///
    /// # Errors
    /// [`DecodeError::Input`] when the input fails, [`DecodeError::Corrupt`] when the container
    /// cannot go on, [`DecodeError::Empty`] when the stream ends without one frame decoded. PCM
    /// decoded before an error is returned first; the error comes on the next call.
    pub fn next_block(&mut self, min_frames: usize) -> Result<Option<Pcm>, DecodeError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let DecodeSummary { rate, channels, .. } = self.summary;
        let mut block: Vec<f32> = Vec::new();
        while !self.ended && block.len() / (channels as usize) < min_frames.max(1) {
            match self.next_packet() {
                Ok(Some(samples)) if block.is_empty() => block = samples,
                Ok(Some(samples)) => block.extend_from_slice(&samples),
                Ok(None) => {
                    self.ended = true;
                    if self.summary.frames == 0 {
                        return Err(DecodeError::Empty(match self.inner {
                            Inner::Raw { .. } => "no whole PCM frame".into(),
                            Inner::Container { .. } => format!("{}: no frame decoded", self.mime),
                        }));
                    }
                }
                Err(e) => {
                    self.ended = true;
                    if block.is_empty() {
                        return Err(e);
                    }
                    self.pending_error = Some(e);
                }
            }
        }
        if block.is_empty() {
            return Ok(None);
        }
        Ok(Some(Pcm {
            rate,
            channels,
            samples: block,
        }))
    }

    /// The samples of the next packet (never empty), or `None` at the end.
    fn next_packet(&mut self) -> Result<Option<Vec<f32>>, DecodeError> {
        let frames = self.summary.frames;
        let channels = self.summary.channels;
        let samples = match &mut self.inner {
            Inner::Raw { input, buf, carry } => {
                let frame_bytes = 2 * channels as usize;
                loop {
                    let n = match input.read(&mut buf[*carry..]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(DecodeError::Input {
                                frames,
                                reason: e.to_string(),
                            });
                        }
                    };
                    if n == 0 {
                        // A partial frame at the end is dropped.
                        return Ok(None);
                    }
                    let have = *carry + n;
                    let whole = have - have % frame_bytes;
                    let samples: Vec<f32> = buf[..whole]
                        .chunks_exact(2)
                        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                        .collect();
                    buf.copy_within(whole..have, 0);
                    *carry = have - whole;
                    if !samples.is_empty() {
                        break samples;
                    }
                }
            }
            Inner::Container {
                format,
                codec,
                track_id,
                samples,
            } => loop {
                let packet = match format.next_packet() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => return Ok(None),
                    Err(SymphoniaError::IoError(e))
                        if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        return Ok(None);
                    }
                    Err(SymphoniaError::IoError(e)) => {
                        return Err(DecodeError::Input {
                            frames,
                            reason: e.to_string(),
                        });
                    }
                    Err(e) => {
                        return Err(DecodeError::Corrupt {
                            frames,
                            reason: e.to_string(),
                        });
                    }
                };
                if packet.track_id != *track_id {
                    continue;
                }
                samples.clear();
                if let Err(reason) = codec.decode(&packet, channels, samples) {
                    self.summary.skipped_packets += 1;
                    tracing::debug!(%reason, "skipping a corrupt packet");
                    if self.summary.skipped_packets > 100 && frames == 0 {
                        return Err(DecodeError::Corrupt { frames: 0, reason });
                    }
                    continue;
                }
                if !samples.is_empty() {
                    break std::mem::take(samples);
                }
            },
        };
        self.summary.frames += (samples.len() / channels as usize) as u64;
        Ok(Some(samples))
    }
}

/// Opens a container: probes it, picks the default audio track, makes its codec.
fn open_container(
    input: impl Read + Send + Sync + 'static,
    mime: &str,
) -> Result<Decoder, DecodeError> {
    let unsupported = |reason: String| DecodeError::Unsupported {
        mime: mime.to_string(),
        reason,
    };
    let mss = MediaSourceStream::new(Box::new(ReadOnlySource::new(input)), Default::default());
    let mut hint = Hint::new();
    hint.mime_type(mime);
    let extension = file_extension(mime);
    if extension != "bin" {
        hint.with_extension(if extension == "opus" {
            "ogg"
        } else {
            extension
        });
    }
    let format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymphoniaError::IoError(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
                DecodeError::Input {
                    frames: 0,
                    reason: e.to_string(),
                }
            }
            e => unsupported(e.to_string()),
        })?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| DecodeError::Empty("no audio track".into()))?;
    let track_id = track.id;
    let Some(CodecParameters::Audio(params)) = track.codec_params.clone() else {
        return Err(DecodeError::Empty("no audio track".into()));
    };
    let rate = params.sample_rate.unwrap_or(0);
    let channels = params.channels.as_ref().map_or(0, |c| c.count()) as u16;
    check_params(rate, channels)?;

    let codec = if params.codec == CODEC_ID_OPUS {
        let opus_channels = if channels == 1 {
            opus::Channels::Mono
        } else {
            opus::Channels::Stereo
        };
        if channels > 2 {
            return Err(unsupported(format!(
                "Opus with {channels} channels (mono and stereo only)"
            )));
        }
        Codec::Opus(
            opus::Decoder::new(48_000, opus_channels).map_err(|e| unsupported(e.to_string()))?,
            vec![0f32; 5760 * 2],
        )
    } else {
        let decoder = symphonia::default::get_codecs()
            .make_audio_decoder(&params, &AudioDecoderOptions::default())
            .map_err(|e| unsupported(e.to_string()))?;
        Codec::Symphonia(decoder)
    };
    Ok(Decoder::new(
        Inner::Container {
            format,
            codec,
            track_id,
            samples: Vec::new(),
        },
        rate,
        channels,
        mime,
    ))
}

enum Codec {
    Symphonia(Box<dyn symphonia::core::codecs::audio::AudioDecoder>),
    /// libopus at 48 kHz, with a buffer for the largest packet (120 ms, stereo).
    Opus(opus::Decoder, Vec<f32>),
}

impl Codec {
    /// Decodes one packet into interleaved `samples`, trimmed as the packet says (gapless).
    fn decode(
        &mut self,
        packet: &symphonia::core::packet::Packet,
        channels: u16,
        samples: &mut Vec<f32>,
    ) -> Result<(), String> {
        match self {
            Codec::Symphonia(decoder) => {
                let buffer = decoder.decode(packet).map_err(|e| e.to_string())?;
                buffer.copy_to_vec_interleaved(samples);
                Ok(())
            }
            Codec::Opus(decoder, buf) => {
                let frames = decoder
                    .decode_float(&packet.data, buf, false)
                    .map_err(|e| e.to_string())?;
                let ch = channels as usize;
                let start = (packet.trim_start.get() as usize).min(frames);
                let end = frames
                    .saturating_sub(packet.trim_end.get() as usize)
                    .max(start);
                samples.extend_from_slice(&buf[start * ch..end * ch]);
                Ok(())
            }
        }
    }
}

/// Blocks of PCM as a decoder task produces them; an `Err` is the last item.
pub type PcmReceiver = tokio::sync::mpsc::Receiver<Result<Pcm, DecodeError>>;

/// Blocks of PCM decoded at most this far ahead of the consumer (memory stays bounded): with
/// blocks of [`DECODE_BLOCK_MS`], 300 ms.
const DECODE_AHEAD_BLOCKS: usize = 3;

/// Audio decoded per step, in ms (at least one packet).
const DECODE_BLOCK_MS: u32 = 100;

/// Bytes [`MediaReader::fill`] takes from a media stream ahead of the decoder, at most (one more
/// chunk may go over it).
const READ_AHEAD_BYTES: usize = 64 << 10;

/// Bytes that must be at hand (or the stream over) for a decode step to run on the async task:
/// far more than a 100 ms block of compressed audio reads (1.6 KB of 128 kb/s MP3), so its reads
/// do not run dry. With less, the step is a job on the blocking pool, where a read may wait.
const INLINE_MIN_BYTES: usize = 32 << 10;

/// Reads a [`MediaStream`](crate::media::MediaStream) as a byte stream. Before each decode
/// step the async side moves the chunks that have arrived into this reader's buffer
/// ([`MediaReader::fill`]) and runs the step on the async task only when
/// [`MediaReader::at_hand`] says the bytes are there. A read that finds the buffer empty waits for
/// the next chunk in [`tokio::task::block_in_place`] (on a worker of a multi-threaded runtime the
/// worker's other tasks move to another thread; on a blocking-pool thread it simply blocks). A
/// media error becomes an I/O error after the bytes before it. Clones share one buffer.
#[derive(Clone)]
pub struct MediaReader(std::sync::Arc<std::sync::Mutex<Feed>>);

/// What a [`MediaReader`] holds: the stream (taken out while `fill` waits on it), the chunks
/// received and not yet read, and how the stream ended once it has.
struct Feed {
    media: Option<crate::media::MediaStream>,
    chunks: std::collections::VecDeque<bytes::Bytes>,
    buffered: usize,
    end: Option<Result<(), String>>,
}

impl Feed {
    fn push(&mut self, next: Option<Result<bytes::Bytes, crate::media::MediaError>>) {
        match next {
            Some(Ok(chunk)) => {
                self.buffered += chunk.len();
                if !chunk.is_empty() {
                    self.chunks.push_back(chunk);
                }
            }
            Some(Err(e)) => self.end = Some(Err(e.0)),
            None => self.end = Some(Ok(())),
        }
        if self.end.is_some() {
            // Ends the transfer behind it; what was received stays readable.
            self.media = None;
        }
    }
}

impl MediaReader {
    /// Reads `media` from its start.
    pub fn new(media: crate::media::MediaStream) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Feed {
            media: Some(media),
            chunks: Default::default(),
            buffered: 0,
            end: None,
        })))
    }

    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a decode step: moves the chunks that have arrived into the buffer (up to 64 KiB,
    /// `READ_AHEAD_BYTES`), and unless that makes the bytes [at hand](MediaReader::at_hand),
    /// waits asynchronously for one more chunk or the end, so that a step seldom waits inside
    /// its reads (which would hold a thread). Must not run while a read is in progress on
    /// another thread (the decoder's steps and `fill` take turns).
    pub async fn fill(&self) {
        self.fill_to(1).await;
        if !self.at_hand() {
            let buffered = self.feed().buffered;
            self.fill_to(buffered + 1).await;
        }
    }

    /// Takes the chunks that have arrived, then waits for more until `min` bytes are buffered or
    /// the stream is over.
    async fn fill_to(&self, min: usize) {
        loop {
            let mut media = {
                let mut feed = self.feed();
                while feed.buffered < READ_AHEAD_BYTES.max(min) && feed.end.is_none() {
                    let next = match feed.media.as_mut().map(|m| m.try_next_chunk()) {
                        Some(std::task::Poll::Ready(next)) => next,
                        Some(std::task::Poll::Pending) | None => break,
                    };
                    feed.push(next);
                }
                if feed.buffered >= min || feed.end.is_some() {
                    return;
                }
                match feed.media.take() {
                    Some(media) => media,
                    None => return,
                }
            };
            let next = media.next_chunk().await;
            let mut feed = self.feed();
            feed.media = Some(media);
            feed.push(next);
        }
    }

    /// True when a decode step will not run dry: at least 32 KiB (`INLINE_MIN_BYTES`) are buffered, or
    /// the stream is over and everything left is buffered.
    pub fn at_hand(&self) -> bool {
        let feed = self.feed();
        feed.buffered >= INLINE_MIN_BYTES || feed.end.is_some()
    }
}

impl Read for MediaReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut feed = self.feed();
        loop {
            if let Some(front) = feed.chunks.front_mut() {
                let n = buf.len().min(front.len());
                buf[..n].copy_from_slice(&front.split_to(n));
                if front.is_empty() {
                    feed.chunks.pop_front();
                }
                feed.buffered -= n;
                return Ok(n);
            }
            match &feed.end {
                Some(Ok(())) => return Ok(0),
                Some(Err(e)) => return Err(std::io::Error::other(e.clone())),
                None => {}
            }
            let Some(media) = feed.media.as_mut() else {
                return Err(std::io::Error::other("the media stream is being filled"));
            };
            let next = match media.try_next_chunk() {
                std::task::Poll::Ready(next) => next,
                std::task::Poll::Pending => {
                    tokio::task::block_in_place(|| media.blocking_next_chunk())
                }
            };
            feed.push(next);
        }
    }
}

/// Decodes `input` as `mime`, at most 3 blocks of about 100 ms (`DECODE_AHEAD_BLOCKS`,
/// `DECODE_BLOCK_MS`) ahead of the receiver: opening and each block are short jobs on tokio's blocking pool, and while the
/// receiver has no room an async task waits and no thread is held (a session playing a long
/// track used to hold a blocking thread for all of it, and tokio has 512). A job can still block
/// while the input's bytes arrive. Dropping the receiver stops the decoder before its next
/// block. Must be called within a tokio runtime.
pub fn spawn_decoder(input: impl Read + Send + Sync + 'static, mime: String) -> PcmReceiver {
    spawn_stepped(input, None, mime)
}

/// Decodes a media stream from a tool result (or TTS) as it arrives, as [`spawn_decoder`] does,
/// except that on a multi-threaded runtime a block whose bytes are at hand
/// ([`MediaReader::at_hand`], after [`MediaReader::fill`]) is decoded on the async task itself
/// (MP3 decoding was about 9% of the server's CPU in the device load profile, BENCHMARKS.md):
/// no thread changes hands for it. Blocks whose bytes are still
/// coming (a trickling TTS body) are blocking jobs as in [`spawn_decoder`]. With less than
/// 32 KiB unread and the stream not over, the decoder first waits (asynchronously)
/// for the next chunk: bytes before a pause in the transfer play when it resumes or ends. A
/// receiver dropped during that wait stops the transfer at once.
pub fn decode_media(media: crate::media::MediaStream) -> PcmReceiver {
    let mime = media.mime_type.clone();
    let reader = MediaReader::new(media);
    spawn_stepped(reader.clone(), Some(reader), mime)
}

/// The decoder task: `feed`, when given, is the reader inside `input`, filled before each step.
fn spawn_stepped(
    input: impl Read + Send + Sync + 'static,
    feed: Option<MediaReader>,
    mime: String,
) -> PcmReceiver {
    let (tx, rx) = tokio::sync::mpsc::channel(DECODE_AHEAD_BLOCKS);
    let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    tokio::spawn(async move {
        let lost = |e: tokio::task::JoinError| DecodeError::Input {
            frames: 0,
            reason: format!("the decoder stopped: {e}"),
        };
        if let Some(feed) = &feed {
            tokio::select! {
                () = feed.fill() => {}
                () = tx.closed() => return,
            }
        }
        // Probing may read far (a large tag), so it is a blocking job in every case.
        let opening = mime.clone();
        let opened = tokio::task::spawn_blocking(move || Decoder::open(input, &opening))
            .await
            .unwrap_or_else(|e| Err(lost(e)));
        let mut decoder = match opened {
            Ok(decoder) => decoder,
            Err(e) => {
                tracing::warn!(%mime, error = %e, "cannot decode");
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let step = (decoder.summary().rate * DECODE_BLOCK_MS / 1000) as usize;
        loop {
            let Ok(permit) = tx.reserve().await else {
                return; // nobody listens any more
            };
            if let Some(feed) = &feed {
                // A listener that leaves while the bytes are late stops the transfer now.
                tokio::select! {
                    () = feed.fill() => {}
                    () = tx.closed() => return,
                }
            }
            let inline = multi_thread && feed.as_ref().is_some_and(MediaReader::at_hand);
            let block = if inline {
                decoder.next_block(step)
            } else {
                let job = tokio::task::spawn_blocking(move || {
                    let block = decoder.next_block(step);
                    (decoder, block)
                });
                match job.await {
                    Ok((back, block)) => {
                        decoder = back;
                        block
                    }
                    Err(e) => {
                        permit.send(Err(lost(e)));
                        return;
                    }
                }
            };
            match block {
                Ok(Some(pcm)) => permit.send(Ok(pcm)),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%mime, error = %e, "decode ended with an error");
                    permit.send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read on an async worker that finds nothing buffered waits for the next chunk (in
    /// `block_in_place`; a plain blocking receive there would panic) and then sees the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_runs_dry_on_a_worker_waits_for_the_next_chunk() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let media = crate::media::MediaStream::new(
            "audio/mpeg".into(),
            None,
            "test".into(),
            None,
            rx,
            tokio_util::sync::CancellationToken::new(),
        );
        let mut reader = MediaReader::new(media);
        tx.send(Ok(bytes::Bytes::from_static(b"abc")))
            .await
            .unwrap();
        reader.fill_to(1).await;
        assert!(!reader.at_hand(), "3 bytes and more to come");
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let _ = tx.send(Ok(bytes::Bytes::from_static(b"def"))).await;
        });
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcdef");
        assert!(reader.at_hand(), "the end is known");
    }

    #[test]
    fn raw_pcm_mime_parameters() {
        assert_eq!(
            raw_pcm_params("audio/pcm;rate=24000;channels=2"),
            Some((24000, 2))
        );
        assert_eq!(raw_pcm_params("audio/pcm"), Some((16000, 1)));
        assert_eq!(raw_pcm_params("audio/L16; rate=8000"), Some((8000, 1)));
        assert_eq!(raw_pcm_params("audio/mpeg"), None);
    }

    #[test]
    fn raw_pcm_decodes_and_refuses_absurd_parameters() {
        let bytes: Vec<u8> = [0i16, 16384, -16384, 32767]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let mut got = Vec::new();
        let summary = decode(
            Cursor::new(bytes.clone()),
            "audio/pcm;rate=8000",
            &mut |p| {
                got.extend(p.samples);
                true
            },
        )
        .unwrap();
        assert_eq!(summary.frames, 4);
        assert_eq!(got, [0.0, 0.5, -0.5, 32767.0 / 32768.0]);
        for mime in [
            "audio/pcm;rate=0",
            "audio/pcm;rate=9000000",
            "audio/pcm;rate=8000;channels=0",
            "audio/pcm;channels=99",
        ] {
            let err = decode(Cursor::new(bytes.clone()), mime, &mut |_| true).unwrap_err();
            assert!(matches!(err, DecodeError::Absurd { .. }), "{mime}: {err}");
        }
    }

    #[test]
    fn empty_and_garbage_input_are_clear_errors() {
        let err = decode(Cursor::new(Vec::new()), "audio/mpeg", &mut |_| true).unwrap_err();
        assert!(matches!(err, DecodeError::Empty(_)), "{err}");
        let err = decode(
            Cursor::new(b"this is not audio at all, just text".to_vec()),
            "audio/mpeg",
            &mut |_| true,
        )
        .unwrap_err();
        assert!(
            matches!(err, DecodeError::Unsupported { .. } | DecodeError::Empty(_)),
            "{err}"
        );
    }
}
