//! The transcode cache of the device downlink: the Opus frames of a media resource in one
//! device format, encoded once and served to every session that plays it (the approach of media
//! servers such as Navidrome and Jellyfin, which keep transcoded streams).
//!
//! A device session plays a paged resource by decoding it, resampling it to the device's rate
//! and encoding 60 ms Opus frames: about 2 ms of CPU per second of music, 45 % of it in libopus
//! (BENCHMARKS.md). With the cache, the first session that plays a resource starts one fill
//! task (decode, resample, encode, at most [`AHEAD`] ahead of the furthest reader) and every
//! session, the first included, reads the frames from the entry, while it fills and after.
//! Sessions at 100 % volume send the frames as they are; another volume decodes each frame and
//! encodes it again at that gain (the playback queue does it, [`super::queue`]).
//!
//! An entry is keyed by the resource's URI, its size in bytes and MIME type (so that a changed
//! file is another entry) and the [`DownlinkFormat`]. Resources without a URI scheme (inline
//! audio, TTS) or without a size are not cached. Entries are bounded by their total bytes
//! (`[audio] transcode_cache_mb`): past it, the least recently used entries that are complete
//! and that no session reads are dropped. An entry whose fill fails (a corrupt file, a server
//! that dies) is dropped at once, so that the next session tries again; the sessions reading it
//! get the error after the frames they had. A fill that nobody reads any more stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::convert::Converter;
use super::decode::decode_media;
use super::opus::FrameEncoder;
use crate::media::MediaStream;

/// How far a fill may run ahead of the furthest session reading it (then it waits): enough to
/// ride out a slow page, little enough that many fills starting at once do not all encode in
/// a burst (with 20 s, 200 sessions each starting a different track made frames late:
/// BENCHMARKS.md).
pub const AHEAD: Duration = Duration::from_secs(2);

/// The Opus format of a device's downlink: what the frames are encoded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DownlinkFormat {
    /// Sample rate in Hz (mono).
    pub rate: u32,
    /// Frame length in ms.
    pub frame_ms: u32,
    /// Bit rate in bits per second.
    pub bitrate: i32,
    /// libopus complexity (0..=10).
    pub complexity: i32,
}

impl DownlinkFormat {
    /// The downlink `[audio]` configures for devices.
    pub fn from_config(audio: &super::AudioConfig) -> Self {
        Self {
            rate: audio.device_rate,
            frame_ms: audio.device_frame_ms,
            bitrate: audio.device_bitrate,
            complexity: audio.device_opus_complexity,
        }
    }
}

/// One cached Opus frame and the RMS level of the PCM it was encoded from (linear, 1.0 = full
/// scale: barge-in compares the microphone against what plays).
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// One Opus packet of `frame_ms`.
    pub packet: Bytes,
    /// RMS of the frame's samples.
    pub rms: f32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    uri: String,
    size: u64,
    mime: String,
    format: DownlinkFormat,
}

#[derive(Debug, Clone, PartialEq)]
enum Progress {
    /// Frames so far.
    Filling(usize),
    Done,
    Failed(String),
}

struct Entry {
    /// Appended to by the fill only.
    frames: RwLock<Vec<EncodedFrame>>,
    progress: watch::Sender<Progress>,
    bytes: AtomicUsize,
    /// The cache's clock when it was last opened.
    last_used: AtomicU64,
    readers: AtomicUsize,
    /// The furthest frame index a reader has asked for.
    furthest: AtomicUsize,
}

struct State {
    entries: HashMap<Key, Arc<Entry>>,
    clock: u64,
}

/// The cache; share one per process ([`TranscodeCache::new`] in an `Arc`).
pub struct TranscodeCache {
    state: Mutex<State>,
    max_bytes: usize,
}

/// What the cache holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries, complete or filling.
    pub entries: usize,
    /// Bytes of Opus packets in them.
    pub bytes: usize,
}

impl TranscodeCache {
    /// A cache of at most `max_bytes` of frames (entries being read may keep more alive until
    /// their sessions end); 0 caches nothing.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State {
                entries: HashMap::new(),
                clock: 0,
            }),
            max_bytes,
        }
    }

    /// The frames of `media` in `format`: from its entry when there is one (a hit, whether
    /// complete or still filling), else from a new entry that a task starts filling now (a
    /// miss). Gives `media` back when it cannot be cached (no URI scheme, no size, a cache of
    /// 0 bytes).
    ///
    /// # Errors
    /// The media itself, unused, when it is not cached.
    pub fn open(
        self: &Arc<Self>,
        media: MediaStream,
        format: DownlinkFormat,
    ) -> Result<CachedFrames, MediaStream> {
        let Some(size) = media.size else {
            return Err(media);
        };
        if self.max_bytes == 0 || !media.source.contains("://") {
            return Err(media);
        }
        let key = Key {
            uri: media.source.clone(),
            size,
            mime: media.mime_type.clone(),
            format,
        };
        let metrics = crate::metrics::get();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Entries whose sessions have ended since the last fill count as idle now.
        self.evict_locked(&mut state);
        state.clock += 1;
        let clock = state.clock;
        if let Some(entry) = state.entries.get(&key) {
            // Counted as a reader under the lock, so that a fill cannot see no reader and be
            // abandoned between the lookup and the count ([`TranscodeCache::abandon`]).
            let reader = CachedFrames::new(entry.clone(), clock);
            drop(state);
            metrics.transcode_cache(true);
            return Ok(reader);
        }
        let (progress, _) = watch::channel(Progress::Filling(0));
        let entry = Arc::new(Entry {
            frames: RwLock::new(Vec::new()),
            progress,
            bytes: AtomicUsize::new(0),
            last_used: AtomicU64::new(clock),
            readers: AtomicUsize::new(0),
            furthest: AtomicUsize::new(0),
        });
        state.entries.insert(key.clone(), entry.clone());
        // The reader counts before the fill starts, which stops when none is left.
        let reader = CachedFrames::new(entry.clone(), clock);
        drop(state);
        metrics.transcode_cache(false);
        tokio::spawn(fill(Arc::downgrade(self), key, entry, media, format));
        Ok(reader)
    }

    /// Entries and bytes held now.
    pub fn stats(&self) -> CacheStats {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        CacheStats {
            entries: state.entries.len(),
            bytes: state
                .entries
                .values()
                .map(|e| e.bytes.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Drops `key` if it still maps to `entry` (a failed fill).
    fn forget(&self, key: &Key, entry: &Arc<Entry>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .entries
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            state.entries.remove(key);
        }
    }

    /// Drops `key`'s partial `entry` when no session reads it, checked under the lock that
    /// [`Self::open`] counts readers under; `false` when a session has opened it meanwhile.
    fn abandon(&self, key: &Key, entry: &Arc<Entry>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if entry.readers.load(Ordering::Relaxed) > 0 {
            return false;
        }
        if state
            .entries
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            state.entries.remove(key);
        }
        true
    }

    /// Drops the least recently used complete entries that no session reads until the rest
    /// fit in `max_bytes`.
    fn evict(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.evict_locked(&mut state);
    }

    fn evict_locked(&self, state: &mut State) {
        let mut total: usize = state
            .entries
            .values()
            .map(|e| e.bytes.load(Ordering::Relaxed))
            .sum();
        while total > self.max_bytes {
            let idle = state
                .entries
                .iter()
                .filter(|(_, e)| {
                    e.readers.load(Ordering::Relaxed) == 0 && *e.progress.borrow() == Progress::Done
                })
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            let Some(key) = idle else { break };
            if let Some(entry) = state.entries.remove(&key) {
                total -= entry.bytes.load(Ordering::Relaxed);
                tracing::debug!(uri = %key.uri, "transcode cache: evicted");
            }
        }
        crate::metrics::get().transcode_cache_bytes(total);
    }
}

/// Decodes, resamples and encodes `media` into `entry`, at most [`AHEAD`] past the furthest
/// reader; stops when nobody reads it any more.
async fn fill(
    cache: Weak<TranscodeCache>,
    key: Key,
    entry: Arc<Entry>,
    media: MediaStream,
    format: DownlinkFormat,
) {
    let abandoned = || cache.upgrade().is_none_or(|c| c.abandon(&key, &entry));
    let result = encode_into(&entry, media, format, abandoned).await;
    let Some(cache) = cache.upgrade() else { return };
    match result {
        Ok(true) => {
            entry.progress.send_replace(Progress::Done);
            cache.evict();
        }
        Ok(false) => {
            // Every session left (a stop, a barge-in): `abandon` took the partial entry out.
            tracing::debug!(uri = %key.uri, "transcode cache: fill abandoned");
            entry
                .progress
                .send_replace(Progress::Failed("abandoned".into()));
        }
        Err(reason) => {
            tracing::warn!(uri = %key.uri, %reason, "transcode cache: the fill stopped");
            cache.forget(&key, &entry);
            entry.progress.send_replace(Progress::Failed(reason));
        }
    }
}

/// `Ok(true)` when every frame is in, `Ok(false)` when no session reads it any more and
/// `abandoned` took it out of the cache.
async fn encode_into(
    entry: &Entry,
    media: MediaStream,
    format: DownlinkFormat,
    abandoned: impl Fn() -> bool,
) -> Result<bool, String> {
    let mut encoder =
        FrameEncoder::new(format.rate, 1, format.frame_ms).map_err(|e| e.to_string())?;
    encoder
        .set_bitrate(format.bitrate)
        .map_err(|e| e.to_string())?;
    encoder
        .set_complexity(format.complexity)
        .map_err(|e| e.to_string())?;
    let frame_len = (format.rate / 1000 * format.frame_ms) as usize;
    let ahead = (AHEAD.as_millis() as usize / format.frame_ms.max(1) as usize).max(1);
    let frame = Duration::from_millis(format.frame_ms.into());
    let mut pcm = decode_media(media);
    let mut converter = Converter::new(format.rate, 1);
    // Samples encoded into packets not yet levelled: the frames' RMS come from them.
    let mut unlevelled: Vec<f32> = Vec::new();
    loop {
        loop {
            if entry.readers.load(Ordering::Relaxed) == 0 && abandoned() {
                return Ok(false);
            }
            let made = entry.frames.read().unwrap_or_else(|e| e.into_inner()).len();
            if made < entry.furthest.load(Ordering::Relaxed) + ahead {
                break;
            }
            tokio::time::sleep(frame).await;
        }
        let (samples, last) = match pcm.recv().await {
            Some(Ok(block)) => (converter.push(&block).map_err(|e| e.to_string())?, false),
            Some(Err(e)) => return Err(e.to_string()),
            None => (converter.flush(), true),
        };
        unlevelled.extend_from_slice(&samples);
        let mut packets = encoder.push(&samples).map_err(|e| e.to_string())?;
        if last && let Some(packet) = encoder.finish().map_err(|e| e.to_string())? {
            unlevelled.resize(unlevelled.len().div_ceil(frame_len) * frame_len, 0.0);
            packets.push(packet);
        }
        if !packets.is_empty() {
            let mut frames = entry.frames.write().unwrap_or_else(|e| e.into_inner());
            for packet in packets {
                let n = frame_len.min(unlevelled.len());
                let rms =
                    (unlevelled[..n].iter().map(|s| s * s).sum::<f32>() / n.max(1) as f32).sqrt();
                unlevelled.drain(..n);
                entry.bytes.fetch_add(packet.len(), Ordering::Relaxed);
                frames.push(EncodedFrame {
                    packet: Bytes::from(packet),
                    rms,
                });
            }
            let made = frames.len();
            drop(frames);
            entry.progress.send_replace(Progress::Filling(made));
        }
        if last {
            return Ok(true);
        }
    }
}

/// One session's read of an entry, from its first frame.
pub struct CachedFrames {
    entry: Arc<Entry>,
    next: usize,
    progress: watch::Receiver<Progress>,
    failed: bool,
}

impl CachedFrames {
    fn new(entry: Arc<Entry>, clock: u64) -> Self {
        entry.readers.fetch_add(1, Ordering::Relaxed);
        entry.last_used.fetch_max(clock, Ordering::Relaxed);
        let progress = entry.progress.subscribe();
        Self {
            entry,
            next: 0,
            progress,
            failed: false,
        }
    }

    /// The next frame, waiting while the entry fills; `None` at the end.
    ///
    /// # Errors
    /// Why the fill failed, once, after the frames made before it.
    pub async fn next(&mut self) -> Option<Result<EncodedFrame, String>> {
        loop {
            if let Some(frame) = self
                .entry
                .frames
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(self.next)
            {
                self.next += 1;
                self.entry.furthest.fetch_max(self.next, Ordering::Relaxed);
                return Some(Ok(frame.clone()));
            }
            self.entry.furthest.fetch_max(self.next, Ordering::Relaxed);
            let progress = self.progress.borrow_and_update().clone();
            match progress {
                Progress::Filling(made) if made > self.next => continue,
                Progress::Filling(_) => {}
                Progress::Done => return None,
                Progress::Failed(_) if self.failed => return None,
                Progress::Failed(reason) => {
                    self.failed = true;
                    return Some(Err(reason));
                }
            }
            if self.progress.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for CachedFrames {
    fn drop(&mut self) {
        self.entry.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: DownlinkFormat = DownlinkFormat {
        rate: 24_000,
        frame_ms: 60,
        bitrate: 24_000,
        complexity: 4,
    };

    /// A WAV of `seconds` of a 440 Hz tone at 16 kHz, as a resource at `uri`.
    fn tone(uri: &str, seconds: f32) -> MediaStream {
        let rate = 16_000;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut wav = std::io::Cursor::new(Vec::new());
        let mut writer = hound::WavWriter::new(&mut wav, spec).unwrap();
        for i in 0..(rate as f32 * seconds) as u32 {
            let s = (i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 0.3;
            writer.write_sample((s * 32767.0) as i16).unwrap();
        }
        writer.finalize().unwrap();
        let mut media =
            MediaStream::from_bytes("audio/wav".into(), None, Bytes::from(wav.into_inner()));
        media.source = uri.into();
        media
    }

    async fn all(mut frames: CachedFrames) -> Vec<EncodedFrame> {
        let mut out = Vec::new();
        while let Some(frame) = frames.next().await {
            out.push(frame.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_resource_is_encoded_once_for_every_session_and_evicted_when_idle() {
        let cache = Arc::new(TranscodeCache::new(10 << 20));
        let first = cache.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap();
        let second = cache.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap();
        let (a, b) = tokio::join!(all(first), all(second));
        // 2 s in 60 ms frames (the last padded).
        assert_eq!(a.len(), 34);
        let packets = |f: &[EncodedFrame]| f.iter().map(|f| f.packet.clone()).collect::<Vec<_>>();
        assert_eq!(
            packets(&a),
            packets(&b),
            "both sessions get the same frames"
        );
        assert!(a[10].rms > 0.15 && a[10].rms < 0.25, "{}", a[10].rms);
        let third = all(cache.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap()).await;
        assert_eq!(packets(&third), packets(&a));
        assert_eq!(cache.stats().entries, 1);
        // Not cached: no scheme (inline audio, TTS), or no size.
        assert!(cache.open(tone("kokoro", 0.1), FORMAT).is_err());
        let mut unsized_media = tone("audio://t/b", 0.1);
        unsized_media.size = None;
        assert!(cache.open(unsized_media, FORMAT).is_err());
        // Another size is another entry (the file changed).
        let other = all(cache.open(tone("audio://t/a", 1.0), FORMAT).ok().unwrap()).await;
        assert_eq!(other.len(), 17);
        assert_eq!(cache.stats().entries, 2);

        // A bound smaller than two entries: the least recently used idle one goes.
        let small = Arc::new(TranscodeCache::new(
            a.iter().map(|f| f.packet.len()).sum::<usize>() + 10,
        ));
        all(small.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap()).await;
        let held = small.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap();
        all(small.open(tone("audio://t/c", 2.0), FORMAT).ok().unwrap()).await;
        // Over the bound; at the next open, `a` is read by `held` and stays, `c` (idle) goes.
        let again = small.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap();
        assert_eq!(small.stats().entries, 1);
        drop(held);
        assert_eq!(all(again).await.len(), 34);
    }

    #[tokio::test]
    async fn a_fill_nobody_reads_is_dropped_and_the_next_session_fills_anew() {
        let cache = Arc::new(TranscodeCache::new(10 << 20));
        // 30 s: the fill waits 2 s ahead of its reader, which leaves after one frame.
        let mut first = cache
            .open(tone("audio://t/long", 30.0), FORMAT)
            .ok()
            .unwrap();
        assert!(first.next().await.unwrap().is_ok());
        drop(first);
        for _ in 0..100 {
            if cache.stats().entries == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cache.stats().entries, 0, "the abandoned fill is gone");
        let again = all(cache
            .open(tone("audio://t/long", 30.0), FORMAT)
            .ok()
            .unwrap())
        .await;
        assert_eq!(again.len(), 500);
    }

    #[tokio::test]
    async fn a_corrupt_resource_fails_its_readers_and_is_not_kept() {
        let cache = Arc::new(TranscodeCache::new(10 << 20));
        let mut media =
            MediaStream::from_bytes("audio/mpeg".into(), None, Bytes::from_static(&[0x13; 4096]));
        media.source = "audio://t/corrupt".into();
        let mut frames = cache.open(media, FORMAT).ok().unwrap();
        let mut error = None;
        while let Some(frame) = frames.next().await {
            if let Err(e) = frame {
                error = Some(e);
            }
        }
        assert!(error.is_some());
        assert_eq!(cache.stats().entries, 0, "a failed entry is dropped");
    }
}
