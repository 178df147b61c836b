//! The playback queue (ARCHITECTURE §1): segments (TTS sentences, media streams) play in order into one
//! sink, with events for each, volume that applies at once (ramped), and a stop that silences
//! output within one frame and drops what was queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{Mutex, Notify, broadcast, watch};

use super::convert::{Converter, Volume};
use super::decode::{PcmReceiver, decode_media};
use super::opus::FrameDecoder;
use super::sink::Sink;
use super::transcode::{CachedFrames, DownlinkFormat, TranscodeCache};
use crate::media::MediaStream;

/// Frames over which [`PlaybackQueue::output_level`] takes the loudest: the echo of what played
/// reaches a microphone late and lingers (at 20 ms frames, 160 ms).
pub const LEVEL_WINDOW: usize = 8;

/// What a segment is, for events and history.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SegmentKind {
    /// A spoken sentence and its text.
    Sentence {
        /// The sentence, as it is spoken.
        text: String,
    },
    /// A media item (a song, a tool's audio) and its title.
    Media {
        /// The title to show, if known.
        title: Option<String>,
    },
}

/// Why playback stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Everything queued has played.
    Finished,
    /// The user spoke over it.
    BargeIn,
    /// A stop command (a tool, the user).
    StopCommand,
    /// A new turn replaced the old one's audio.
    NewTurn,
    /// The sink failed.
    Error(String),
}

/// Something the queue did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum QueueEvent {
    /// Segment `id` started playing.
    SegmentStart {
        /// The segment id the queue gave it.
        id: u64,
        /// What started.
        segment: SegmentKind,
    },
    /// Segment `id` ended: `played` of it went to the sink; `error` if its source failed.
    SegmentEnd {
        /// The segment id the queue gave it.
        id: u64,
        /// How much of it played, in ms.
        played_ms: u64,
        /// Why it ended early, if it failed.
        error: Option<String>,
    },
    /// Playback stopped; for anything but `Finished`, what was queued was dropped.
    Stopped {
        /// Why it stopped.
        reason: StopReason,
    },
}

/// Queue settings.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Frame length written to the sink, in ms (the unit of stop latency).
    pub frame_ms: u32,
    /// Starting volume, percent.
    pub volume: u8,
    /// Volume ramp, in ms.
    pub ramp_ms: u32,
    /// Let a new turn's audio queue behind the old turn's instead of cutting it off.
    pub overlap_turns: bool,
}

impl QueueSettings {
    /// From `[audio]`.
    pub fn from_config(audio: &crate::audio::AudioConfig) -> Self {
        Self {
            frame_ms: audio.frame_ms,
            volume: audio.volume,
            ramp_ms: audio.volume_ramp_ms,
            overlap_turns: audio.overlap_turns,
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            frame_ms: 20,
            volume: 80,
            ramp_ms: 10,
            overlap_turns: false,
        }
    }
}

struct Pending {
    id: u64,
    kind: SegmentKind,
    source: Source,
}

/// Where a segment's audio comes from.
enum Source {
    /// PCM, converted, volume applied and written to the sink frame by frame.
    Pcm(PcmReceiver),
    /// Opus frames of `frame_ms` from the transcode cache, for an Opus sink of their format.
    Encoded(CachedFrames, u32),
}

/// How a segment's playing ended.
struct Played {
    /// Frames (per channel) that went to the sink.
    frames: u64,
    /// Why it ended early, if its source failed.
    error: Option<String>,
    /// A stop (or a sink failure) ended it.
    stopped: bool,
}

struct Shared {
    pending: Mutex<VecDeque<Pending>>,
    wake: Notify,
    /// Bumped by every stop; the player drops its segment when it changes.
    generation: AtomicU64,
    stop_reason: std::sync::Mutex<Option<StopReason>>,
    stopped: Notify,
    closing: AtomicBool,
    volume: AtomicU8,
    /// Loudest frame RMS over the last [`LEVEL_WINDOW`] frames written, as `f32` bits (0 when
    /// idle).
    level: AtomicU32,
    next_id: AtomicU64,
    events: broadcast::Sender<QueueEvent>,
    busy: watch::Sender<bool>,
}

impl Shared {
    fn emit(&self, event: QueueEvent) {
        let _ = self.events.send(event);
    }

    fn take_reason(&self) -> Option<StopReason> {
        self.stop_reason.lock().expect("stop lock").take()
    }

    /// Returns once a stop newer than `generation` happened.
    async fn stop_since(&self, generation: u64) {
        loop {
            if self.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            self.stopped.notified().await;
        }
    }
}

/// The queue. Cloning gives another handle to the same queue; when the last handle is dropped
/// the player finishes the sink and ends.
#[derive(Clone)]
pub struct PlaybackQueue {
    shared: Arc<Shared>,
    settings: QueueSettings,
    player: Arc<Player>,
    /// Media goes through this cache, in this format ([`PlaybackQueue::with_transcode_cache`]).
    transcode: Option<(Arc<TranscodeCache>, DownlinkFormat)>,
}

struct Player {
    shared: Arc<Shared>,
    handle: std::sync::Mutex<Option<tokio::task::JoinHandle<Sink>>>,
}

impl Drop for Player {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

impl PlaybackQueue {
    /// Starts a player task writing into `sink`.
    pub fn new(sink: Sink, settings: QueueSettings) -> Self {
        let (events, _) = broadcast::channel(256);
        let (busy, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            generation: AtomicU64::new(0),
            stop_reason: std::sync::Mutex::new(None),
            stopped: Notify::new(),
            closing: AtomicBool::new(false),
            volume: AtomicU8::new(settings.volume.min(100)),
            level: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            events,
            busy,
        });
        let handle = tokio::spawn(play(shared.clone(), sink, settings));
        let player = Arc::new(Player {
            shared: shared.clone(),
            handle: std::sync::Mutex::new(Some(handle)),
        });
        Self {
            shared,
            settings,
            player,
            transcode: None,
        }
    }

    /// The same queue, with media ([`Self::enqueue_media`]) played from `cache` in `format`:
    /// for a queue whose sink is a device's Opus sink of that format. At 100 % volume the
    /// cached frames go out as they are; at another volume each is decoded and encoded again.
    pub fn with_transcode_cache(
        mut self,
        cache: Arc<TranscodeCache>,
        format: DownlinkFormat,
    ) -> Self {
        self.transcode = Some((cache, format));
        self
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<QueueEvent> {
        self.shared.events.subscribe()
    }

    /// Queues a segment of PCM behind what is queued; returns its id.
    pub async fn enqueue(&self, kind: SegmentKind, pcm: PcmReceiver) -> u64 {
        self.push(kind, Source::Pcm(pcm)).await
    }

    /// Queues a media stream behind what is queued: through the transcode cache when the queue
    /// has one and the media can be cached ([`TranscodeCache::open`]), else decoded here.
    /// Returns its id.
    pub async fn enqueue_media(&self, kind: SegmentKind, media: MediaStream) -> u64 {
        let source = match &self.transcode {
            Some((cache, format)) => match cache.open(media, *format) {
                Ok(frames) => Source::Encoded(frames, format.frame_ms),
                Err(media) => Source::Pcm(decode_media(media)),
            },
            None => Source::Pcm(decode_media(media)),
        };
        self.push(kind, source).await
    }

    async fn push(&self, kind: SegmentKind, source: Source) -> u64 {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        {
            // `busy` changes only under the pending lock, so the player never sees it set
            // before the segment is there (it would report Stopped and idle with it queued).
            let mut pending = self.shared.pending.lock().await;
            pending.push_back(Pending { id, kind, source });
            self.shared.busy.send_replace(true);
        }
        self.shared.wake.notify_one();
        id
    }

    /// Stops playback within one frame: the sink's buffer is dropped, and so is every queued
    /// segment. Emits [`QueueEvent::Stopped`] with `reason`.
    pub async fn stop(&self, reason: StopReason) {
        self.shared.pending.lock().await.clear();
        *self.shared.stop_reason.lock().expect("stop lock") = Some(reason);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.stopped.notify_one();
        self.shared.wake.notify_one();
    }

    /// A new turn begins: unless `overlap_turns` is set, the old turn's audio stops.
    pub async fn new_turn(&self) {
        if !self.settings.overlap_turns && self.is_busy() {
            self.stop(StopReason::NewTurn).await;
        }
    }

    /// Sets the volume in percent (0..=100); it applies from the next frame, ramped.
    pub fn set_volume(&self, volume: u8) {
        self.shared.volume.store(volume.min(100), Ordering::SeqCst);
    }

    /// The volume in percent.
    pub fn volume(&self) -> u8 {
        self.shared.volume.load(Ordering::SeqCst)
    }

    /// RMS level (linear, 1.0 = full scale) of the loudest of the last [`LEVEL_WINDOW`] frames
    /// written to the sink; 0 when idle. Barge-in compares the microphone against it.
    pub fn output_level(&self) -> f32 {
        f32::from_bits(self.shared.level.load(Ordering::SeqCst))
    }

    /// True while something plays or is queued.
    pub fn is_busy(&self) -> bool {
        *self.shared.busy.borrow()
    }

    /// Waits until nothing plays and nothing is queued.
    pub async fn idle(&self) {
        let mut busy = self.shared.busy.subscribe();
        let _ = busy.wait_for(|b| !b).await;
    }

    /// Waits until the queue is idle, then ends the player and returns its sink, finished (a
    /// WAV file's header written). `None` if another handle already closed it.
    pub async fn close(self) -> Option<Sink> {
        self.idle().await;
        let handle = self.player.handle.lock().expect("player lock").take()?;
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        handle.await.ok()
    }
}

/// The player task: takes segments in order and writes their PCM to the sink frame by frame.
async fn play(shared: Arc<Shared>, mut sink: Sink, settings: QueueSettings) -> Sink {
    let (rate, channels) = (sink.rate(), sink.channels());
    let frame_len = (rate as usize * settings.frame_ms as usize / 1000).max(1) * channels as usize;
    let mut output = OutputState {
        volume: Volume::new(shared.volume.load(Ordering::SeqCst), rate, settings.ramp_ms),
        level: shared.volume.load(Ordering::SeqCst),
        recent: VecDeque::with_capacity(LEVEL_WINDOW),
    };
    loop {
        let next = shared.pending.lock().await.pop_front();
        let Some(segment) = next else {
            shared.level.store(0, Ordering::SeqCst);
            output.recent.clear();
            // Nothing more to play: what waits for a whole frame goes out now.
            let was_busy = *shared.busy.borrow();
            if was_busy && let Err(e) = sink.flush().await {
                tracing::error!(error = %e, "flushing the audio output");
            }
            {
                let pending = shared.pending.lock().await;
                if !pending.is_empty() {
                    // Queued while this task looked or flushed: play it, stay busy.
                    continue;
                }
                shared.busy.send_replace(false);
            }
            match shared.take_reason() {
                Some(reason) => shared.emit(QueueEvent::Stopped { reason }),
                None if was_busy => shared.emit(QueueEvent::Stopped {
                    reason: StopReason::Finished,
                }),
                None => {}
            }
            if shared.closing.load(Ordering::SeqCst) {
                if let Err(e) = sink.finish().await {
                    tracing::error!(error = %e, "finishing the audio output");
                }
                return sink;
            }
            shared.wake.notified().await;
            continue;
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        shared.busy.send_replace(true);
        shared.emit(QueueEvent::SegmentStart {
            id: segment.id,
            segment: segment.kind.clone(),
        });
        let played = match segment.source {
            Source::Pcm(pcm) => {
                play_pcm(&shared, &mut sink, pcm, generation, frame_len, &mut output).await
            }
            Source::Encoded(frames, frame_ms) => {
                play_encoded(
                    &shared,
                    &mut sink,
                    frames,
                    frame_ms,
                    generation,
                    &mut output,
                )
                .await
            }
        };
        shared.emit(QueueEvent::SegmentEnd {
            id: segment.id,
            played_ms: played.frames * 1000 / rate as u64,
            error: played.error,
        });
        if played.stopped {
            sink.clear();
            shared.level.store(0, Ordering::SeqCst);
            output.recent.clear();
            if let Some(reason) = shared.take_reason() {
                shared.emit(QueueEvent::Stopped { reason });
            }
            let pending = shared.pending.lock().await;
            if pending.is_empty() {
                shared.busy.send_replace(false);
            }
        }
    }
}

/// The player's gain and the level of what it wrote, across segments.
struct OutputState {
    volume: Volume,
    /// The volume `volume` was last set to, in percent.
    level: u8,
    /// RMS of the last [`LEVEL_WINDOW`] frames written.
    recent: VecDeque<f32>,
}

impl OutputState {
    /// Takes up a volume set since the last frame (ramped).
    fn follow(&mut self, shared: &Shared) {
        let now = shared.volume.load(Ordering::SeqCst);
        if now != self.level {
            self.volume.set(now);
            self.level = now;
        }
    }

    /// A frame of level `rms` was written: the loudest of the recent ones is the output level.
    fn record(&mut self, shared: &Shared, rms: f32) {
        if self.recent.len() == LEVEL_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(rms);
        let loudest = self.recent.iter().copied().fold(0.0f32, f32::max);
        shared.level.store(loudest.to_bits(), Ordering::SeqCst);
    }
}

fn rms(samples: &[f32]) -> f32 {
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32).sqrt()
}

/// Plays one segment of PCM: converted to the sink's rate and channels, volume applied, in
/// frames of `frame_len` samples.
async fn play_pcm(
    shared: &Shared,
    sink: &mut Sink,
    mut pcm: PcmReceiver,
    generation: u64,
    frame_len: usize,
    output: &mut OutputState,
) -> Played {
    let (rate, channels) = (sink.rate(), sink.channels());
    let mut converter = Converter::new(rate, channels);
    let mut buffer: Vec<f32> = Vec::new();
    let (mut played, mut error, mut stopped) = (0u64, None, false);
    'segment: loop {
        let block = tokio::select! {
            block = pcm.recv() => block,
            _ = shared.stop_since(generation) => { stopped = true; break 'segment; }
        };
        let end = !matches!(block, Some(Ok(_)));
        let converted = match block {
            Some(Ok(pcm)) => converter.push(&pcm),
            Some(Err(e)) => {
                error = Some(e.to_string());
                Ok(converter.flush())
            }
            None => Ok(converter.flush()),
        };
        match converted {
            Ok(samples) => buffer.extend(samples),
            Err(e) => {
                error = Some(e.to_string());
                break 'segment;
            }
        }
        let mut offset = 0;
        while buffer.len() - offset >= frame_len || (end && offset < buffer.len()) {
            let n = frame_len.min(buffer.len() - offset);
            let frame = &mut buffer[offset..offset + n];
            output.follow(shared);
            output.volume.apply(frame, channels);
            let written = tokio::select! {
                r = sink.write(frame) => Some(r),
                _ = shared.stop_since(generation) => None,
            };
            match written {
                None => {
                    stopped = true;
                    break 'segment;
                }
                Some(Err(e)) => {
                    *shared.stop_reason.lock().expect("stop lock") =
                        Some(StopReason::Error(e.to_string()));
                    error = Some(e.to_string());
                    stopped = true;
                    break 'segment;
                }
                Some(Ok(())) => {
                    played += (n / channels as usize) as u64;
                    output.record(shared, rms(frame));
                }
            }
            offset += n;
        }
        buffer.drain(..offset);
        if end {
            break;
        }
    }
    Played {
        frames: played,
        error,
        stopped,
    }
}

/// Plays one segment of cached Opus frames of `frame_ms` (the sink is an Opus sink of their
/// format): each goes out as it is at 100 % volume, else decoded, the gain applied, and
/// encoded again by the sink.
async fn play_encoded(
    shared: &Shared,
    sink: &mut Sink,
    mut frames: CachedFrames,
    frame_ms: u32,
    generation: u64,
    output: &mut OutputState,
) -> Played {
    let rate = sink.rate();
    let mut decoder: Option<FrameDecoder> = None;
    let mut played = Played {
        frames: 0,
        error: None,
        stopped: false,
    };
    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            _ = shared.stop_since(generation) => { played.stopped = true; break; }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                played.error = Some(e);
                break;
            }
            Some(Ok(frame)) => frame,
        };
        output.follow(shared);
        let (written, level) = if output.volume.is_unity() {
            let written = tokio::select! {
                r = sink.write_encoded(&frame.packet) => Some(r),
                _ = shared.stop_since(generation) => None,
            };
            (written, frame.rms)
        } else {
            let decoded = match decoder.as_mut() {
                Some(d) => d.decode(&frame.packet),
                None => {
                    FrameDecoder::new(rate, 1).and_then(|d| decoder.insert(d).decode(&frame.packet))
                }
            };
            let mut samples = match decoded {
                Ok(pcm) => pcm.samples,
                Err(e) => {
                    played.error = Some(e.to_string());
                    break;
                }
            };
            output.volume.apply(&mut samples, 1);
            let written = tokio::select! {
                r = sink.write(&samples) => Some(r),
                _ = shared.stop_since(generation) => None,
            };
            (written, rms(&samples))
        };
        match written {
            None => {
                played.stopped = true;
                break;
            }
            Some(Err(e)) => {
                *shared.stop_reason.lock().expect("stop lock") =
                    Some(StopReason::Error(e.to_string()));
                played.error = Some(e.to_string());
                played.stopped = true;
                break;
            }
            Some(Ok(())) => {
                played.frames += u64::from(rate / 1000 * frame_ms);
                output.record(shared, level);
            }
        }
    }
    played
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::Pcm;
    use crate::audio::sink::NullSink;

    /// `voxloop play` enqueues and closes at once. The player once saw `busy` set before the
    /// segment was queued, reported `Stopped` and went idle with the segment still waiting
    /// (CI: "played 0.50 s" missing). Every run must report the segment, then `Stopped`; the
    /// window is narrow, so it runs many times (before the fix: caught within 20 000 runs in
    /// each of 3 tries).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_queued_then_closed_is_reported_before_stopped() {
        for run in 0..20_000 {
            let queue = PlaybackQueue::new(
                Sink::Null(NullSink::new(16_000, 1, false)),
                QueueSettings::default(),
            );
            let mut events = queue.events();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(Ok(Pcm {
                rate: 16_000,
                channels: 1,
                samples: vec![0.1; 800],
            }))
            .await
            .unwrap();
            drop(tx);
            queue.enqueue(SegmentKind::Media { title: None }, rx).await;
            let Some(Sink::Null(sink)) = queue.close().await else {
                panic!("run {run}: no sink back");
            };
            assert_eq!(sink.frames, 800, "run {run}");
            let mut seen = Vec::new();
            while let Ok(event) = events.try_recv() {
                seen.push(match event {
                    QueueEvent::SegmentStart { .. } => "start",
                    QueueEvent::SegmentEnd { .. } => "end",
                    QueueEvent::Stopped { .. } => "stopped",
                });
            }
            assert_eq!(seen, ["start", "end", "stopped"], "run {run}");
        }
    }
}
