//! The transcode cache of the device downlink: the Opus frames of a media resource in one
//! device format, encoded once and served to every session that plays it (the approach of media
//! servers such as Navidrome and Jellyfin, which keep transcoded streams).
//!
//! A device session plays a paged resource by decoding it, resampling it to the device's rate
//! and encoding 60 ms Opus frames: 2 to 4 ms of CPU per second of music, depending on the
//! machine, about 45 % of it in libopus (BENCHMARKS.md, "Device server load"). With the cache, the first session that plays a resource starts one fill
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
//!
//! With a [`DiskTier`] (`[audio] transcode_cache_disk_mb`), an entry's frames are also written
//! to a file when its fill ends, whole or as far as it got, and a later miss (in this server or
//! a later one) reads them back instead of decoding: a complete file serves at once, without
//! reading the resource; a partial one serves its frames while the fill resumes after them.

pub mod disk;

pub use disk::DiskTier;

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

/// Frames encoded again, and thrown away, before a fill resumes after stored frames: the
/// encoder's state (its overlap and its energy prediction, `celt_encoder.c`) then matches the
/// one that made the stored frames closely: 40.7 dB SNR across the seam against one
/// uninterrupted fill, where a fresh encoder gave 21.4 dB (the resume test).
const WARM_FRAMES: usize = 3;

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

impl Entry {
    /// Adds `frames` at the end and tells the readers.
    fn append(&self, new: Vec<EncodedFrame>) {
        let mut frames = self.frames.write().unwrap_or_else(|e| e.into_inner());
        let bytes: usize = new.iter().map(|f| f.packet.len()).sum();
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        frames.extend(new);
        let made = frames.len();
        drop(frames);
        self.progress.send_replace(Progress::Filling(made));
    }
}

struct State {
    entries: HashMap<Key, Arc<Entry>>,
    clock: u64,
}

/// The cache; share one per process ([`TranscodeCache::new`] in an `Arc`).
pub struct TranscodeCache {
    state: Mutex<State>,
    max_bytes: usize,
    disk: Option<Arc<DiskTier>>,
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
            disk: None,
        }
    }

    /// The cache with `disk` behind it: fills that end are stored there, and misses look there
    /// first.
    pub fn with_disk(mut self, disk: DiskTier) -> Self {
        self.disk = Some(Arc::new(disk));
        self
    }

    /// The cache `[audio]` configures: `transcode_cache_mb` in memory and, when both that and
    /// `transcode_cache_disk_mb` are above 0, a disk tier in `transcode_cache_dir` (the
    /// platform cache directory when empty). A directory that cannot be made is logged, and
    /// the cache runs in memory only.
    pub fn from_config(audio: &super::AudioConfig) -> Self {
        let cache = Self::new(audio.transcode_cache_mb as usize * 1024 * 1024);
        if audio.transcode_cache_mb == 0 || audio.transcode_cache_disk_mb == 0 {
            return cache;
        }
        let dir = audio.transcode_cache_path();
        match DiskTier::open(&dir, u64::from(audio.transcode_cache_disk_mb) * 1024 * 1024) {
            Ok(disk) => cache.with_disk(disk),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "transcode cache: no disk tier");
                cache
            }
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
        mut media: MediaStream,
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
        // The frames serve every session: the asking session's turn no longer stops the
        // transfer (the fill stops when no session reads), and a transfer stopped part way is
        // an error, never a short track kept as whole.
        media.detach();
        let media = media.checked_size();
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

/// Fills `entry`: from the disk tier when it holds the resource (complete: done), then by
/// decoding, resampling and encoding `media` after the frames it had, at most [`AHEAD`] past
/// the furthest reader; stores what it made when it ends; stops when nobody reads it any more.
async fn fill(
    cache: Weak<TranscodeCache>,
    key: Key,
    entry: Arc<Entry>,
    media: MediaStream,
    format: DownlinkFormat,
) {
    let disk = cache.upgrade().and_then(|c| c.disk.clone());
    let mut stored = 0;
    if let Some(disk) = &disk {
        let (disk, k) = (disk.clone(), key.clone());
        if let Ok(Some(found)) = tokio::task::spawn_blocking(move || disk.load(&k)).await {
            stored = found.frames.len();
            entry.append(found.frames);
            if found.complete {
                // Every frame is here: the resource itself is not read.
                drop(media);
                entry.progress.send_replace(Progress::Done);
                if let Some(cache) = cache.upgrade() {
                    cache.evict();
                }
                return;
            }
        }
    }
    let abandoned = || cache.upgrade().is_none_or(|c| c.abandon(&key, &entry));
    let result = encode_into(&entry, media, format, stored, abandoned).await;
    let Some(cache) = cache.upgrade() else { return };
    let keep = |complete: bool| {
        let Some(disk) = disk.clone() else { return };
        let frames = entry
            .frames
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Worth a file: new frames, and a partial of at least a second.
        let second = (1000 / format.frame_ms.max(1)) as usize;
        if frames.len() > stored && (complete || frames.len() >= second) {
            let key = key.clone();
            tokio::task::spawn_blocking(move || disk.store(&key, &frames, complete));
        }
    };
    match result {
        Ok(true) => {
            entry.progress.send_replace(Progress::Done);
            keep(true);
            cache.evict();
        }
        Ok(false) => {
            // Every session left (a stop, a barge-in): `abandon` took the partial entry out.
            tracing::debug!(uri = %key.uri, "transcode cache: fill abandoned");
            keep(false);
            entry
                .progress
                .send_replace(Progress::Failed("abandoned".into()));
        }
        Err(reason) => {
            if entry.readers.load(Ordering::Relaxed) > 0 {
                tracing::warn!(uri = %key.uri, %reason, "transcode cache: the fill stopped");
            } else {
                tracing::debug!(uri = %key.uri, %reason, "transcode cache: the fill stopped");
            }
            cache.forget(&key, &entry);
            entry.progress.send_replace(Progress::Failed(reason));
        }
    }
}

/// Appends the frames of `media` after the first `stored`, which `entry` has already: those are
/// decoded and resampled again but not encoded, except the last [`WARM_FRAMES`] of them, whose
/// packets are thrown away. `Ok(true)` when every frame is in, `Ok(false)` when no session
/// reads it any more and `abandoned` took it out of the cache.
async fn encode_into(
    entry: &Entry,
    media: MediaStream,
    format: DownlinkFormat,
    stored: usize,
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
    // Decoding starts when the first frame is needed: a stored part may cover every session.
    let mut media = Some(media);
    let mut pcm = None;
    let mut converter = Converter::new(format.rate, 1);
    // Samples encoded into packets not yet levelled: the frames' RMS come from them.
    let mut unlevelled: Vec<f32> = Vec::new();
    let warm = stored.min(WARM_FRAMES);
    // Samples of stored frames not to encode at all, then packets to encode and throw away.
    let mut skip_samples = (stored - warm) * frame_len;
    let mut skip_packets = warm;
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
        if pcm.is_none() {
            pcm = media.take().map(decode_media);
        }
        let Some(pcm) = pcm.as_mut() else {
            return Err("the media was already taken".into());
        };
        let (mut samples, last) = match pcm.recv().await {
            Some(Ok(block)) => (converter.push(&block).map_err(|e| e.to_string())?, false),
            Some(Err(e)) => return Err(e.to_string()),
            None => (converter.flush(), true),
        };
        let skip = skip_samples.min(samples.len());
        samples.drain(..skip);
        skip_samples -= skip;
        unlevelled.extend_from_slice(&samples);
        let mut packets = encoder.push(&samples).map_err(|e| e.to_string())?;
        if last && let Some(packet) = encoder.finish().map_err(|e| e.to_string())? {
            unlevelled.resize(unlevelled.len().div_ceil(frame_len) * frame_len, 0.0);
            packets.push(packet);
        }
        let thrown = skip_packets.min(packets.len());
        packets.drain(..thrown);
        unlevelled.drain(..(thrown * frame_len).min(unlevelled.len()));
        skip_packets -= thrown;
        if !packets.is_empty() {
            let frames = packets
                .into_iter()
                .map(|packet| {
                    let n = frame_len.min(unlevelled.len());
                    let rms = (unlevelled[..n].iter().map(|s| s * s).sum::<f32>()
                        / n.max(1) as f32)
                        .sqrt();
                    unlevelled.drain(..n);
                    EncodedFrame {
                        packet: Bytes::from(packet),
                        rms,
                    }
                })
                .collect();
            entry.append(frames);
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
        wav(uri, seconds, |t| {
            (t * 440.0 * std::f32::consts::TAU).sin() * 0.3
        })
    }

    /// A WAV of `seconds` of `signal(t)` (t in seconds) at 16 kHz, as a resource at `uri`.
    fn wav(uri: &str, seconds: f32, signal: impl Fn(f32) -> f32) -> MediaStream {
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
            let s = signal(i as f32 / rate as f32);
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

    /// Waits until `dir` holds `n` stored entries.
    async fn stored(dir: &std::path::Path, n: usize) {
        for _ in 0..250 {
            let files = std::fs::read_dir(dir)
                .unwrap()
                .filter(|f| {
                    let name = f.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(".frames")
                })
                .count();
            if files == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} never held {n} stored entries", dir.display());
    }

    fn on_disk(dir: &std::path::Path) -> TranscodeCache {
        TranscodeCache::new(10 << 20).with_disk(DiskTier::open(dir, 10 << 20).unwrap())
    }

    #[tokio::test]
    async fn a_complete_fill_is_stored_and_a_later_server_serves_it_without_the_resource() {
        let dir = tempfile::tempdir().unwrap();
        let first = Arc::new(on_disk(dir.path()));
        let made = all(first.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap()).await;
        stored(dir.path(), 1).await;
        drop(first);

        // A later server on the same directory, given a resource of the same URI, size and type
        // whose bytes do not decode: the stored frames serve, so the bytes are never read.
        let later = Arc::new(on_disk(dir.path()));
        let size = tone("audio://t/a", 2.0).size.unwrap() as usize;
        let mut garbage =
            MediaStream::from_bytes("audio/wav".into(), None, Bytes::from(vec![0x13; size]));
        garbage.source = "audio://t/a".into();
        let served = all(later.open(garbage, FORMAT).ok().unwrap()).await;
        let packets = |f: &[EncodedFrame]| f.iter().map(|f| f.packet.clone()).collect::<Vec<_>>();
        assert_eq!(packets(&served), packets(&made));
        assert_eq!(served[10].rms, made[10].rms);

        // Another format is another file, made from the resource.
        let other = DownlinkFormat {
            rate: 16_000,
            ..FORMAT
        };
        let other_frames = all(later.open(tone("audio://t/a", 2.0), other).ok().unwrap()).await;
        assert_eq!(other_frames.len(), 34);
        stored(dir.path(), 2).await;

        // A file that does not parse is deleted, the resource is decoded again, and a whole
        // file takes its place.
        let path = dir.path().join(disk::file_name(&Key {
            uri: "audio://t/a".into(),
            size: size as u64,
            mime: "audio/wav".into(),
            format: FORMAT,
        }));
        let data = std::fs::read(&path).unwrap();
        std::fs::write(&path, &data[..data.len() / 2]).unwrap();
        let fresh = Arc::new(on_disk(dir.path()));
        let again = all(fresh.open(tone("audio://t/a", 2.0), FORMAT).ok().unwrap()).await;
        assert_eq!(packets(&again), packets(&made));
        for _ in 0..250 {
            if std::fs::read(&path).is_ok_and(|d| d == data) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the unreadable file was not replaced");
    }

    /// Decodes `frames` with one decoder, as a device does.
    fn decoded(frames: &[EncodedFrame]) -> Vec<f32> {
        let mut decoder = super::super::opus::FrameDecoder::new(FORMAT.rate, 1).unwrap();
        frames
            .iter()
            .flat_map(|f| decoder.decode(&f.packet).unwrap().samples)
            .collect()
    }

    #[tokio::test]
    async fn a_fill_left_part_way_resumes_after_its_stored_frames_without_a_seam() {
        // A sweep from 200 to 2000 Hz over 20 s: every frame differs from the one before.
        let sweep = |uri: &str| {
            wav(uri, 20.0, |t| {
                (std::f32::consts::TAU * (200.0 * t + 45.0 * t * t)).sin() * 0.3
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let first = Arc::new(on_disk(dir.path()));
        let mut reader = first.open(sweep("audio://t/sweep"), FORMAT).ok().unwrap();
        for _ in 0..50 {
            reader.next().await.unwrap().unwrap();
        }
        drop(reader);
        stored(dir.path(), 1).await;
        drop(first);
        // The stored part: the frames the first fill made (50 read, up to AHEAD more).
        let key = Key {
            uri: "audio://t/sweep".into(),
            size: sweep("audio://t/sweep").size.unwrap(),
            mime: "audio/wav".into(),
            format: FORMAT,
        };
        let part = DiskTier::open(dir.path(), 10 << 20)
            .unwrap()
            .load(&key)
            .unwrap();
        assert!(!part.complete);
        let seam = part.frames.len();
        assert!((50..=50 + 34).contains(&seam), "{seam} frames stored");

        let later = Arc::new(on_disk(dir.path()));
        let resumed = all(later.open(sweep("audio://t/sweep"), FORMAT).ok().unwrap()).await;
        let whole = all(Arc::new(TranscodeCache::new(10 << 20))
            .open(sweep("audio://t/sweep"), FORMAT)
            .ok()
            .unwrap())
        .await;
        assert_eq!(resumed.len(), whole.len());
        // The stored frames are served as they are (the resumed ones are usually encoded a
        // little differently, and may come out identical).
        for (r, p) in resumed.iter().zip(&part.frames) {
            assert_eq!(r.packet, p.packet);
        }
        // Decoded as one stream, the resumed frames sound like the whole fill's: the error
        // around the seam is far below the signal.
        let frame_len = (FORMAT.rate / 1000 * FORMAT.frame_ms) as usize;
        let (a, b) = (decoded(&resumed), decoded(&whole));
        let span = (seam - 2) * frame_len..(seam + 10) * frame_len;
        let signal: f32 = b[span.clone()].iter().map(|s| s * s).sum();
        let error: f32 = span.map(|i| (a[i] - b[i]).powi(2)).sum();
        let snr = 10.0 * (signal / error.max(1e-12)).log10();
        // Measured: 40.7 dB; resuming with a fresh encoder and no warm-up frames gave 21.4.
        assert!(
            snr > 30.0,
            "the seam's SNR against the whole fill: {snr:.1} dB"
        );
        for (r, w) in resumed.iter().zip(&whole) {
            assert!((r.rms - w.rms).abs() < 1e-4, "{} vs {}", r.rms, w.rms);
        }
    }

    #[test]
    fn the_disk_tier_keeps_the_most_recently_used_files_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let key = |uri: &str| Key {
            uri: uri.into(),
            size: 1,
            mime: "audio/mpeg".into(),
            format: FORMAT,
        };
        let frames = vec![
            EncodedFrame {
                packet: Bytes::from(vec![7u8; 1000]),
                rms: 0.5,
            };
            10
        ];
        // Room for two files of 10 frames, not three.
        let disk = DiskTier::open(dir.path(), 25_000).unwrap();
        disk.store(&key("audio://a"), &frames, true);
        disk.store(&key("audio://b"), &frames, true);
        assert!(disk.load(&key("audio://a")).is_some(), "a is used again");
        disk.store(&key("audio://c"), &frames, true);
        assert!(
            disk.load(&key("audio://b")).is_none(),
            "b was the least recent"
        );
        let a = disk.load(&key("audio://a")).unwrap();
        assert!(a.complete);
        assert_eq!(a.frames.len(), 10);
        assert!(disk.load(&key("audio://c")).is_some());
        assert!(disk.bytes() <= 25_000);
        // A partial does not replace a complete file; a longer partial replaces a shorter one.
        disk.store(&key("audio://c"), &frames[..3], false);
        assert!(disk.load(&key("audio://c")).unwrap().complete);
        disk.store(&key("audio://p"), &frames[..3], false);
        disk.store(&key("audio://p"), &frames[..5], false);
        let p = disk.load(&key("audio://p")).unwrap();
        assert_eq!((p.frames.len(), p.complete), (5, false));
        // A server started later sees the same files, in the same order of use.
        drop(disk);
        let later = DiskTier::open(dir.path(), 25_000).unwrap();
        assert!(later.load(&key("audio://p")).is_some());
        assert!(later.bytes() <= 25_000);
    }

    /// `media`'s bytes as a transfer that sends 4 KiB at a time and stops when its stream is
    /// cancelled (as the pager does), linked to `turn`.
    fn transfer(media: MediaStream, turn: &tokio_util::sync::CancellationToken) -> MediaStream {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        let (uri, size) = (media.source.clone(), media.size);
        let mut whole = media;
        tokio::spawn(async move {
            while let Some(Ok(bytes)) = whole.next_chunk().await {
                for piece in bytes.chunks(4096) {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        sent = tx.send(Ok(Bytes::copy_from_slice(piece))) => if sent.is_err() { return },
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        MediaStream::new("audio/wav".into(), None, uri, size, rx, token).linked_to(turn)
    }

    #[tokio::test]
    async fn the_first_session_stopping_leaves_the_track_whole_for_the_others() {
        let turn = tokio_util::sync::CancellationToken::new();
        let cache = Arc::new(TranscodeCache::new(10 << 20));
        let first = cache
            .open(transfer(tone("audio://t/shared", 10.0), &turn), FORMAT)
            .ok()
            .unwrap();
        let second = cache
            .open(transfer(tone("audio://t/shared", 10.0), &turn), FORMAT)
            .ok()
            .unwrap();
        // The first session's turn ends (a barge-in) and it stops reading.
        turn.cancel();
        drop(first);
        let heard = all(second).await;
        assert_eq!(heard.len(), 167, "10 s in 60 ms frames");

        // A transfer that ends before the resource's size (stopped part way) is an error for
        // its readers, and nothing of it is kept as whole.
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(on_disk(dir.path()));
        let whole = tone("audio://t/cut", 10.0);
        let size = whole.size;
        let mut bytes = Vec::new();
        let mut source = whole;
        while let Some(Ok(chunk)) = source.next_chunk().await {
            bytes.extend_from_slice(&chunk);
        }
        bytes.truncate(bytes.len() / 2);
        let mut half = MediaStream::from_bytes("audio/wav".into(), None, Bytes::from(bytes));
        (half.source, half.size) = ("audio://t/cut".into(), size);
        let mut reader = cache.open(half, FORMAT).ok().unwrap();
        let (mut frames, mut error) = (0, None);
        while let Some(frame) = reader.next().await {
            match frame {
                Ok(_) => frames += 1,
                Err(e) => error = Some(e),
            }
        }
        let error = error.expect("the short transfer is an error");
        assert!(error.contains("ended after"), "{error}");
        assert!(
            (80..=84).contains(&frames),
            "{frames} frames before the error"
        );
        drop(reader);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing stored"
        );
    }
}
