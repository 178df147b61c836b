//! Ogg/Opus streams (RFC 7845): the audio of the PersonaPlex WebSocket (ARCHITECTURE §6), where each
//! side sends a growing Ogg/Opus stream in arbitrary pieces.
//!
//! [`OggOpusWriter`] encodes PCM into Opus packets and wraps each in its own Ogg page, so every
//! frame's bytes can go out at once. [`OggOpusReader`] reads a stream that arrives in pieces
//! (any split, pages across pieces) and yields mono PCM. The container is the `ogg` crate's;
//! the codec is libopus through [`super::opus`].

use ogg::reading::{BasePacketReader, OggPage, PageParser};
use ogg::writing::{PacketWriteEndInfo, PacketWriter};

use super::opus::{FrameDecoder, FrameEncoder, OpusError};

/// The Ogg stream serial number voxloop writes.
const SERIAL: u32 = 0x766f_786c; // "voxl"
/// Opus granule positions count 48 kHz samples whatever the rate (RFC 7845 §4).
const GRANULE_RATE: u64 = 48_000;

/// What can go wrong reading an Ogg/Opus stream.
#[derive(Debug, thiserror::Error)]
pub enum OggOpusError {
    /// The Ogg framing is broken (no capture pattern, bad checksum, truncated page).
    #[error("bad Ogg stream: {0}")]
    Ogg(String),
    /// The first packet is not an `OpusHead` (RFC 7845 §5.1).
    #[error("not an Ogg/Opus stream: the first packet is not OpusHead")]
    NotOpus,
    /// An `OpusHead` with a channel count other than 1 or 2.
    #[error("Ogg/Opus stream with {0} channels (mono or stereo)")]
    Channels(u8),
    /// libopus refused a setup or a packet.
    #[error(transparent)]
    Opus(#[from] OpusError),
}

/// Encodes mono PCM at one rate into an Ogg/Opus stream, one page per Opus packet.
pub struct OggOpusWriter {
    encoder: FrameEncoder,
    pages: PacketWriter<'static, Vec<u8>>,
    rate: u32,
    frame_samples: u64,
    /// Packets written so far.
    packets: u64,
    headers_written: bool,
    pre_skip: u16,
}

impl OggOpusWriter {
    /// A writer of `rate` Hz mono (an Opus rate) in `frame_ms` packets (10, 20, 40 or 60).
    ///
    /// # Errors
    /// [`OpusError::Setup`] for a rate or frame length Opus does not take.
    pub fn new(rate: u32, frame_ms: u32) -> Result<Self, OpusError> {
        let mut encoder = FrameEncoder::new(rate, 1, frame_ms)?;
        let lookahead = encoder.lookahead()?;
        Ok(Self {
            encoder,
            pages: PacketWriter::new(Vec::new()),
            rate,
            frame_samples: u64::from(rate / 1000 * frame_ms),
            packets: 0,
            headers_written: false,
            // In 48 kHz samples (RFC 7845 §5.1).
            pre_skip: (u64::from(lookahead) * GRANULE_RATE / u64::from(rate)) as u16,
        })
    }

    /// Adds mono samples; returns the bytes of every page now complete (the `OpusHead` and
    /// `OpusTags` pages first, on the first call). Empty when no whole frame is ready.
    ///
    /// # Errors
    /// [`OpusError::Codec`] from libopus.
    pub fn push(&mut self, pcm: &[f32]) -> Result<Vec<u8>, OpusError> {
        self.write_headers();
        for packet in self.encoder.push(pcm)? {
            self.write_audio(packet, PacketWriteEndInfo::EndPage);
        }
        Ok(std::mem::take(self.pages.inner_mut()))
    }

    /// Encodes what is left (padded to a frame) and ends the stream; returns the last pages.
    ///
    /// # Errors
    /// [`OpusError::Codec`] from libopus.
    pub fn finish(mut self) -> Result<Vec<u8>, OpusError> {
        self.write_headers();
        // The stream ends on an audio packet: with nothing pending, a frame of silence.
        let last = match self.encoder.finish()? {
            Some(packet) => packet,
            None => {
                let silence = vec![0.0; self.frame_samples as usize];
                self.encoder.push(&silence)?.pop().unwrap_or_default()
            }
        };
        self.write_audio(last, PacketWriteEndInfo::EndStream);
        Ok(self.pages.into_inner())
    }

    fn write_headers(&mut self) {
        if self.headers_written {
            return;
        }
        self.headers_written = true;
        // OpusHead (RFC 7845 §5.1): version 1, 1 channel, pre-skip, input rate, gain 0,
        // channel mapping family 0.
        let mut head = b"OpusHead".to_vec();
        head.push(1);
        head.push(1);
        head.extend_from_slice(&self.pre_skip.to_le_bytes());
        head.extend_from_slice(&self.rate.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes());
        head.push(0);
        // OpusTags (§5.2): vendor string, no comments.
        let vendor = concat!("voxloop ", env!("CARGO_PKG_VERSION"));
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        // Each header packet ends its page (§3). Writing to a Vec cannot fail.
        let _ = self
            .pages
            .write_packet(head, SERIAL, PacketWriteEndInfo::EndPage, 0);
        let _ = self
            .pages
            .write_packet(tags, SERIAL, PacketWriteEndInfo::EndPage, 0);
    }

    fn write_audio(&mut self, packet: Vec<u8>, end: PacketWriteEndInfo) {
        self.packets += 1;
        let granule = u64::from(self.pre_skip)
            + self.packets * self.frame_samples * GRANULE_RATE / u64::from(self.rate);
        let _ = self.pages.write_packet(packet, SERIAL, end, granule);
    }
}

/// Longest run of bytes without an Ogg page the reader skips before giving up (a page is at
/// most 65 307 bytes).
pub const MAX_GARBAGE_BYTES: usize = 65_536;

/// Decodes an Ogg/Opus stream that arrives in pieces (any split, pages across pieces) to mono
/// PCM at a chosen rate; stereo streams are mixed down.
pub struct OggOpusReader {
    buf: Vec<u8>,
    packets: BasePacketReader,
    rate: u32,
    decoder: Option<(FrameDecoder, usize)>,
    tags_seen: bool,
    skipped_bytes: usize,
    /// Opus packets libopus could not decode, skipped.
    pub corrupt_packets: u64,
    /// Pages whose checksum did not match, skipped.
    pub corrupt_pages: u64,
}

impl OggOpusReader {
    /// A reader producing `rate` Hz (an Opus rate: 8, 12, 16, 24 or 48 kHz).
    pub fn new(rate: u32) -> Self {
        Self {
            buf: Vec::new(),
            packets: BasePacketReader::new(),
            rate,
            decoder: None,
            tags_seen: false,
            skipped_bytes: 0,
            corrupt_packets: 0,
            corrupt_pages: 0,
        }
    }

    /// Adds the next bytes of the stream; returns the PCM of every audio packet now complete,
    /// mono at the reader's rate. A corrupt page or Opus packet is skipped and counted.
    ///
    /// # Errors
    /// [`OggOpusError::Ogg`] after [`MAX_GARBAGE_BYTES`] without a page;
    /// [`OggOpusError::NotOpus`] / [`OggOpusError::Channels`] for a bad header. The stream
    /// cannot go on after an error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<f32>, OggOpusError> {
        self.buf.extend_from_slice(bytes);
        let mut pcm = Vec::new();
        while let Some(page) = self.next_page()? {
            if let Err(e) = self.packets.push_page(page) {
                return Err(OggOpusError::Ogg(e.to_string()));
            }
            while let Some(packet) = self.packets.read_packet() {
                self.packet(&packet.data, &mut pcm)?;
            }
        }
        Ok(pcm)
    }

    /// The next whole page in the buffer, skipping bytes before a capture pattern and pages
    /// with a bad checksum.
    fn next_page(&mut self) -> Result<Option<OggPage>, OggOpusError> {
        loop {
            match self.buf.windows(4).position(|w| w == b"OggS") {
                Some(0) => {}
                found => {
                    // Keep a possible start of "OggS" at the end.
                    let drop = found.unwrap_or(self.buf.len().saturating_sub(3));
                    self.skipped_bytes += drop;
                    self.buf.drain(..drop);
                    if self.skipped_bytes > MAX_GARBAGE_BYTES {
                        return Err(OggOpusError::Ogg(format!(
                            "no Ogg page in {} bytes",
                            self.skipped_bytes
                        )));
                    }
                    if found.is_none() {
                        return Ok(None);
                    }
                }
            }
            if self.buf.len() < 27 {
                return Ok(None);
            }
            let header: [u8; 27] = self.buf[..27].try_into().expect("27 bytes");
            let Ok((mut parser, segments)) = PageParser::new(header) else {
                // Not a page after all (bad version byte): look for the next one.
                self.buf.drain(..1);
                self.skipped_bytes += 1;
                continue;
            };
            if self.buf.len() < 27 + segments {
                return Ok(None);
            }
            let body = parser.parse_segments(self.buf[27..27 + segments].to_vec());
            let end = 27 + segments + body;
            if self.buf.len() < end {
                return Ok(None);
            }
            let data = self.buf[27 + segments..end].to_vec();
            match parser.parse_packet_data(data) {
                Ok(page) => {
                    self.buf.drain(..end);
                    self.skipped_bytes = 0;
                    return Ok(Some(page));
                }
                Err(_) => {
                    self.corrupt_pages += 1;
                    self.buf.drain(..1);
                    self.skipped_bytes += 1;
                }
            }
        }
    }

    fn packet(&mut self, data: &[u8], pcm: &mut Vec<f32>) -> Result<(), OggOpusError> {
        let Some((decoder, channels)) = self.decoder.as_mut() else {
            return self.open(data);
        };
        if !self.tags_seen {
            self.tags_seen = true;
            if data.starts_with(b"OpusTags") {
                return Ok(());
            }
        }
        match decoder.decode(data) {
            Ok(block) if *channels == 1 => pcm.extend(block.samples),
            Ok(block) => pcm.extend(
                block
                    .samples
                    .chunks(*channels)
                    .map(|f| f.iter().sum::<f32>() / f.len() as f32),
            ),
            Err(_) => self.corrupt_packets += 1,
        }
        Ok(())
    }

    fn open(&mut self, head: &[u8]) -> Result<(), OggOpusError> {
        if head.len() < 19 || !head.starts_with(b"OpusHead") {
            return Err(OggOpusError::NotOpus);
        }
        let channels = head[9];
        if !(1..=2).contains(&channels) {
            return Err(OggOpusError::Channels(channels));
        }
        let decoder = FrameDecoder::new(self.rate, u16::from(channels))?;
        self.decoder = Some((decoder, usize::from(channels)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, seconds: f32) -> Vec<f32> {
        (0..(rate as f32 * seconds) as usize)
            .map(|i| 0.4 * (std::f32::consts::TAU * 330.0 * i as f32 / rate as f32).sin())
            .collect()
    }

    fn stream(input: &[f32]) -> Vec<u8> {
        let mut writer = OggOpusWriter::new(24_000, 20).unwrap();
        let mut bytes = Vec::new();
        for chunk in input.chunks(1920) {
            bytes.extend(writer.push(chunk).unwrap());
        }
        bytes.extend(writer.finish().unwrap());
        bytes
    }

    fn rms(s: &[f32]) -> f32 {
        (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt()
    }

    /// A stream written in 80 ms pushes and read back in pieces of 37 bytes decodes to as many
    /// samples as were encoded (plus the end-of-stream frame), and to the same tone.
    #[test]
    fn a_stream_split_anywhere_decodes_to_what_was_written() {
        let input = tone(24_000, 1.0);
        let bytes = stream(&input);
        assert!(bytes.starts_with(b"OggS"));
        let mut reader = OggOpusReader::new(24_000);
        let mut decoded = Vec::new();
        for piece in bytes.chunks(37) {
            decoded.extend(reader.push(piece).unwrap());
        }
        assert_eq!(decoded.len(), 24_000 + 480);
        let (got, expected) = (rms(&decoded[2400..24_000]), rms(&input[2400..]));
        assert!((got - expected).abs() < 0.05, "rms {got} vs {expected}");
        assert_eq!((reader.corrupt_pages, reader.corrupt_packets), (0, 0));
    }

    /// Garbage between pages and a page with a flipped byte are skipped; the rest decodes.
    #[test]
    fn garbage_and_a_corrupt_page_are_skipped() {
        let bytes = stream(&tone(24_000, 0.5));
        let mut reader = OggOpusReader::new(24_000);
        let mut decoded = reader.push(&bytes[..200]).unwrap();
        decoded.extend(reader.push(b"some junk in the middle").unwrap());
        let mut rest = bytes[200..].to_vec();
        let flip = rest.windows(4).position(|w| w == b"OggS").unwrap() + 40;
        rest[flip] ^= 0xff;
        decoded.extend(reader.push(&rest).unwrap());
        // The page the junk landed in and the flipped one.
        assert_eq!(reader.corrupt_pages, 2);
        // 25 packets of 480 samples, two lost.
        assert!(decoded.len() >= 23 * 480, "{}", decoded.len());
    }

    #[test]
    fn a_stream_of_only_garbage_is_a_clear_error() {
        let mut reader = OggOpusReader::new(24_000);
        let junk = vec![b'x'; MAX_GARBAGE_BYTES + 10];
        let err = reader.push(&junk).unwrap_err();
        assert!(err.to_string().contains("no Ogg page"), "{err}");
    }

    #[test]
    fn an_ogg_stream_of_something_else_is_not_opus() {
        let mut pages = PacketWriter::new(Vec::new());
        pages
            .write_packet(
                b"\x01vorbis-not-really".to_vec(),
                7,
                PacketWriteEndInfo::EndStream,
                0,
            )
            .unwrap();
        let mut reader = OggOpusReader::new(24_000);
        assert!(matches!(
            reader.push(&pages.into_inner()),
            Err(OggOpusError::NotOpus)
        ));
    }
}
