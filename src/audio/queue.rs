//! The playback queue (ARCHITECTURE §1): segments (TTS sentences, media streams) play in order into one
//! sink, with events for each, volume that applies at once (ramped), and a stop that silences
//! output within one frame and drops what was queued.
//!
//! A turn does not end the music it did not ask to end. [`PlaybackQueue::interrupt`] (a new turn,
//! speech over the output) silences the output within one frame like a stop, but a media
//! segment playing then is held: set aside with its place. [`PlaybackQueue::resume`] (the turn
//! answered without new media) queues it again behind the answer, where it goes on from that
//! place; a stop, or new media, drops it. This is what smart speakers do: "louder" or "what
//! time is it" over a song leaves the song playing after the answer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use serde::Serialize;
use std::sync::Mutex;

use tokio::sync::{Notify, broadcast, watch};

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
    /// Media segment `id` was held by [`PlaybackQueue::interrupt`] after `played_ms` of it: it
    /// goes on after [`QueueEvent::Resumed`], or ends ([`QueueEvent::SegmentEnd`]) when a
    /// stop or new media drops it.
    Held {
        /// The segment id the queue gave it.
        id: u64,
        /// How much of it played so far, in ms.
        played_ms: u64,
    },
    /// Held segment `id` plays again, from where it was held.
    Resumed {
        /// The segment id the queue gave it.
        id: u64,
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
    /// Hold media on [`PlaybackQueue::interrupt`] (to go on after the turn) instead of
    /// stopping it.
    pub resume_media: bool,
}

impl QueueSettings {
    /// From `[audio]`.
    pub fn from_config(audio: &crate::audio::AudioConfig) -> Self {
        Self {
            frame_ms: audio.frame_ms,
            volume: audio.volume,
            ramp_ms: audio.volume_ramp_ms,
            overlap_turns: audio.overlap_turns,
            resume_media: audio.resume_media,
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
            resume_media: true,
        }
    }
}

struct Pending {
    id: u64,
    kind: SegmentKind,
    source: Source,
    /// Frames (per channel) of it played before it was held.
    played: u64,
    /// It was held and goes on now ([`QueueEvent::Resumed`], not `SegmentStart`).
    resumed: bool,
}

/// Where a segment's audio comes from.
enum Source {
    /// PCM, converted, volume applied and written to the sink frame by frame (boxed: its
    /// converter is large beside the cache reader).
    Pcm(Box<PcmPlay>),
    /// Opus frames of `frame_ms` from the transcode cache, for an Opus sink of their format.
    Encoded(CachedFrames, u32),
}

/// A PCM source and what of it was converted but not yet played (kept when it is held).
struct PcmPlay {
    pcm: PcmReceiver,
    /// To the sink's rate and channels; made when it first plays.
    converter: Option<Converter>,
    /// Converted samples not yet written (less than a frame, or the rest of a block).
    buffer: Vec<f32>,
}

impl PcmPlay {
    fn new(pcm: PcmReceiver) -> Box<Self> {
        Box::new(Self {
            pcm,
            converter: None,
            buffer: Vec::new(),
        })
    }
}

/// What stops and holds have asked of the player, under one lock so that a stop, an interrupt,
/// a resume and the player holding a segment are seen in one order.
#[derive(Default)]
struct Control {
    /// Why the last stop or interrupt happened, until the player reports it.
    reason: Option<StopReason>,
    /// The generation an interrupt bumped to while media played: that segment is held.
    hold: Option<u64>,
    /// A media segment plays, started at this generation, and no stop has ended it yet (so an
    /// interrupt may hold it).
    playing: Option<u64>,
    /// The held segment.
    held: Option<Pending>,
    /// [`PlaybackQueue::resume`] came before the player had held the segment: it goes on at
    /// once instead.
    resume_early: bool,
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
    /// The sink's sample rate in Hz (for the ms in events).
    rate: u32,
    control: Mutex<Control>,
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

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `segment` last and wakes the player.
    fn push(&self, segment: Pending) {
        {
            // `busy` changes only under the pending lock, so the player never sees it set
            // before the segment is there (it would report Stopped and idle with it queued).
            let mut pending = self.pending();
            pending.push_back(segment);
            self.busy.send_replace(true);
        }
        self.wake.notify_one();
    }

    fn take_reason(&self) -> Option<StopReason> {
        self.control().reason.take()
    }

    fn set_reason(&self, reason: StopReason) {
        self.control().reason = Some(reason);
    }

    /// Reports a held segment that will not go on as ended.
    fn end_held(&self, held: Option<Pending>) {
        if let Some(held) = held {
            self.emit(QueueEvent::SegmentEnd {
                id: held.id,
                played_ms: held.played * 1000 / u64::from(self.rate.max(1)),
                error: None,
            });
        }
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
            rate: sink.rate(),
            control: Mutex::new(Control::default()),
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
        self.push(kind, Source::Pcm(PcmPlay::new(pcm)))
    }

    /// Queues a media stream behind what is queued: through the transcode cache when the queue
    /// has one and the media can be cached ([`TranscodeCache::open`]), else decoded here.
    /// New media replaces held media ([`Self::interrupt`]): that is dropped. The queue owns the
    /// stream from now on ([`MediaStream::detach`]): its stop, or its dropping the segment,
    /// ends the transfer, and a later request cancelling the turn that asked for it does not,
    /// so that held media can go on. Returns its id.
    pub async fn enqueue_media(&self, kind: SegmentKind, mut media: MediaStream) -> u64 {
        self.drop_held();
        media.detach();
        let source = match &self.transcode {
            Some((cache, format)) => match cache.open(media, *format) {
                Ok(frames) => Source::Encoded(frames, format.frame_ms),
                Err(media) => Source::Pcm(PcmPlay::new(decode_media(media))),
            },
            None => Source::Pcm(PcmPlay::new(decode_media(media))),
        };
        self.push(kind, source)
    }

    fn push(&self, kind: SegmentKind, source: Source) -> u64 {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        self.shared.push(Pending {
            id,
            kind,
            source,
            played: 0,
            resumed: false,
        });
        id
    }

    /// Stops playback within one frame: the sink's buffer is dropped, and so is every queued
    /// segment and a held one. Emits [`QueueEvent::Stopped`] with `reason`.
    pub async fn stop(&self, reason: StopReason) {
        let held = {
            let mut control = self.shared.control();
            control.reason = Some(reason);
            control.hold = None;
            control.playing = None;
            control.resume_early = false;
            self.shared.pending().clear();
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            control.held.take()
        };
        self.shared.end_held(held);
        self.shared.stopped.notify_one();
        self.shared.wake.notify_one();
    }

    /// Silences playback within one frame, as [`Self::stop`] does, except that a media segment
    /// playing now is held, with its place, for [`Self::resume`] (when `resume_media` is off,
    /// this is a stop). What was queued is dropped; a segment held earlier stays held unless
    /// this holds another one. Emits [`QueueEvent::Held`] and [`QueueEvent::Stopped`] with
    /// `reason`.
    pub async fn interrupt(&self, reason: StopReason) {
        if !self.settings.resume_media {
            return self.stop(reason).await;
        }
        {
            let mut control = self.shared.control();
            control.reason = Some(reason);
            control.resume_early = false;
            self.shared.pending().clear();
            let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
            // Only media still playing is held (or still to be held, for an earlier interrupt
            // the player has not acted on): not what a stop before this already ended.
            let holding = control.playing.is_some() || control.hold.is_some();
            control.hold = holding.then_some(generation);
        }
        self.shared.stopped.notify_one();
        self.shared.wake.notify_one();
    }

    /// The held media segment goes on, from where it was held, behind what is queued now
    /// ([`QueueEvent::Resumed`]). Returns whether there was one.
    pub async fn resume(&self) -> bool {
        let mut control = self.shared.control();
        if let Some(mut held) = control.held.take() {
            held.resumed = true;
            self.shared.push(held);
            return true;
        }
        // An interrupt the player has not acted on yet: its segment goes on without a pause.
        if control.hold == Some(self.shared.generation.load(Ordering::SeqCst)) {
            control.resume_early = true;
            return true;
        }
        false
    }

    /// Segments queued so far ([`Self::enqueue`] and [`Self::enqueue_media`]; a resume queues
    /// none): what a caller compares to know whether it queued anything since.
    pub fn queued(&self) -> u64 {
        self.shared.next_id.load(Ordering::SeqCst) - 1
    }

    /// Whether a media segment is held ([`Self::interrupt`]).
    pub fn has_held(&self) -> bool {
        self.shared.control().held.is_some()
    }

    /// Drops the held segment (and an interrupt's hold the player has not acted on yet).
    fn drop_held(&self) {
        let held = {
            let mut control = self.shared.control();
            control.hold = None;
            control.resume_early = false;
            control.held.take()
        };
        self.shared.end_held(held);
    }

    /// A new turn begins: unless `overlap_turns` is set, what plays is interrupted
    /// ([`Self::interrupt`]): the old turn's speech stops, and its media is held.
    pub async fn new_turn(&self) {
        if !self.settings.overlap_turns && self.is_busy() {
            self.interrupt(StopReason::NewTurn).await;
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
        let next = shared.pending().pop_front();
        let Some(segment) = next else {
            shared.level.store(0, Ordering::SeqCst);
            output.recent.clear();
            // Nothing more to play: what waits for a whole frame goes out now.
            let was_busy = *shared.busy.borrow();
            if was_busy && let Err(e) = sink.flush().await {
                tracing::error!(error = %e, "flushing the audio output");
            }
            {
                let pending = shared.pending();
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
        let generation = {
            let mut control = shared.control();
            let generation = shared.generation.load(Ordering::SeqCst);
            control.playing =
                matches!(segment.kind, SegmentKind::Media { .. }).then_some(generation);
            generation
        };
        shared.busy.send_replace(true);
        let Pending {
            id,
            kind,
            mut source,
            played: played_before,
            resumed,
        } = segment;
        shared.emit(if resumed {
            QueueEvent::Resumed { id }
        } else {
            QueueEvent::SegmentStart {
                id,
                segment: kind.clone(),
            }
        });
        let played = match &mut source {
            Source::Pcm(pcm) => {
                play_pcm(&shared, &mut sink, pcm, generation, frame_len, &mut output).await
            }
            Source::Encoded(frames, frame_ms) => {
                play_encoded(
                    &shared,
                    &mut sink,
                    frames,
                    *frame_ms,
                    generation,
                    &mut output,
                )
                .await
            }
        };
        let frames = played_before + played.frames;
        let played_ms = frames * 1000 / u64::from(rate);
        let holdable =
            played.stopped && played.error.is_none() && matches!(kind, SegmentKind::Media { .. });
        let fate = if holdable {
            hold(
                &shared,
                Pending {
                    id,
                    kind,
                    source,
                    played: frames,
                    resumed: true,
                },
            )
        } else {
            // A stop of any kind ends an interrupt's hold: it held nothing, or this.
            let mut control = shared.control();
            control.playing = None;
            if control.hold == Some(shared.generation.load(Ordering::SeqCst)) {
                control.hold = None;
                control.resume_early = false;
            }
            Fate::Ended
        };
        match fate {
            Fate::Held => shared.emit(QueueEvent::Held { id, played_ms }),
            Fate::GoesOn => {}
            Fate::Ended => shared.emit(QueueEvent::SegmentEnd {
                id,
                played_ms,
                error: played.error,
            }),
        }
        if played.stopped {
            sink.clear();
            shared.level.store(0, Ordering::SeqCst);
            output.recent.clear();
            if let Some(reason) = shared.take_reason() {
                shared.emit(QueueEvent::Stopped { reason });
            }
            let pending = shared.pending();
            if pending.is_empty() {
                shared.busy.send_replace(false);
            }
        }
    }
}

/// What became of a media segment a stop ended early.
enum Fate {
    /// Held for [`PlaybackQueue::resume`].
    Held,
    /// Queued again at once: a resume came before the player acted on the interrupt.
    GoesOn,
    /// Dropped: the stop was not an interrupt, or a stop came after it.
    Ended,
}

/// After a stop ended media `segment` early: holds it if the stop was an interrupt (nothing
/// stopped since), or queues it again at once if a resume came before this; else drops it.
fn hold(shared: &Shared, segment: Pending) -> Fate {
    let mut control = shared.control();
    control.playing = None;
    if control.hold != Some(shared.generation.load(Ordering::SeqCst)) {
        return Fate::Ended;
    }
    control.hold = None;
    if std::mem::take(&mut control.resume_early) {
        shared.push(segment);
        return Fate::GoesOn;
    }
    let earlier = control.held.replace(segment);
    drop(control);
    shared.end_held(earlier);
    Fate::Held
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
/// frames of `frame_len` samples. On a stop, `pcm` keeps what was converted and not played (the
/// frame being written when it came is dropped), so that a held segment goes on from there.
async fn play_pcm(
    shared: &Shared,
    sink: &mut Sink,
    pcm: &mut PcmPlay,
    generation: u64,
    frame_len: usize,
    output: &mut OutputState,
) -> Played {
    let (rate, channels) = (sink.rate(), sink.channels());
    let converter = pcm
        .converter
        .get_or_insert_with(|| Converter::new(rate, channels));
    let buffer = &mut pcm.buffer;
    let (mut played, mut error, mut stopped) = (0u64, None, false);
    let mut end = false;
    'segment: loop {
        // What was left when the segment was held goes out first.
        if buffer.len() < frame_len {
            let block = tokio::select! {
                block = pcm.pcm.recv() => block,
                _ = shared.stop_since(generation) => { stopped = true; break 'segment; }
            };
            end = !matches!(block, Some(Ok(_)));
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
        }
        let mut offset = 0;
        while buffer.len() - offset >= frame_len || (end && offset < buffer.len()) {
            let n = frame_len.min(buffer.len() - offset);
            let frame = &mut buffer[offset..offset + n];
            output.follow(shared);
            output.volume.apply(frame, channels);
            offset += n;
            let written = tokio::select! {
                r = sink.write(frame) => Some(r),
                _ = shared.stop_since(generation) => None,
            };
            match written {
                None => {
                    stopped = true;
                    break;
                }
                Some(Err(e)) => {
                    shared.set_reason(StopReason::Error(e.to_string()));
                    error = Some(e.to_string());
                    stopped = true;
                    break;
                }
                Some(Ok(())) => {
                    played += (n / channels as usize) as u64;
                    output.record(shared, rms(frame));
                }
            }
        }
        buffer.drain(..offset);
        if end || stopped {
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
    frames: &mut CachedFrames,
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
                shared.set_reason(StopReason::Error(e.to_string()));
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
                    QueueEvent::Held { .. } | QueueEvent::Resumed { .. } => "held",
                });
            }
            assert_eq!(seen, ["start", "end", "stopped"], "run {run}");
        }
    }

    const RATE: u32 = 16_000;

    fn block(value: f32, samples: usize) -> Result<Pcm, crate::audio::decode::DecodeError> {
        Ok(Pcm {
            rate: RATE,
            channels: 1,
            samples: vec![value; samples],
        })
    }

    fn full_volume() -> QueueSettings {
        QueueSettings {
            volume: 100,
            ..QueueSettings::default()
        }
    }

    /// Waits for the first event `want` accepts, with a deadline.
    async fn wait_for(
        events: &mut broadcast::Receiver<QueueEvent>,
        mut want: impl FnMut(&QueueEvent) -> bool,
    ) -> QueueEvent {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let event = events.recv().await.expect("queue events");
                if want(&event) {
                    return event;
                }
            }
        })
        .await
        .expect("the event came")
    }

    /// A queue on an unpaced null sink playing a track whose first 1600 samples (0.1 s) have
    /// arrived; its segment id is 1. Returns the queue, its events since, and the track's
    /// sender.
    async fn playing_track() -> (
        PlaybackQueue,
        broadcast::Receiver<QueueEvent>,
        tokio::sync::mpsc::Sender<Result<Pcm, crate::audio::decode::DecodeError>>,
    ) {
        let queue = PlaybackQueue::new(Sink::Null(NullSink::new(RATE, 1, false)), full_volume());
        let mut events = queue.events();
        let (track, rx) = tokio::sync::mpsc::channel(8);
        track.send(block(0.25, 1_600)).await.unwrap();
        queue.enqueue(SegmentKind::Media { title: None }, rx).await;
        wait_for(&mut events, |e| {
            matches!(e, QueueEvent::SegmentStart { .. })
        })
        .await;
        (queue, events, track)
    }

    /// A track interrupted by a turn is held, the turn's sentence plays, and the track goes on
    /// from where it was: nothing of it is lost but the frame being written (20 ms), and it
    /// is reported as one segment.
    #[tokio::test]
    async fn a_held_track_goes_on_after_the_answer_from_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.wav");
        let sink = Sink::Wav(crate::audio::sink::WavSink::create(&path, RATE, 1).unwrap());
        let queue = PlaybackQueue::new(sink, full_volume());
        let mut events = queue.events();
        let (track, rx) = tokio::sync::mpsc::channel(8);
        track.send(block(0.25, 16_000)).await.unwrap();
        let id = queue.enqueue(SegmentKind::Media { title: None }, rx).await;
        wait_for(&mut events, |e| {
            matches!(e, QueueEvent::SegmentStart { .. })
        })
        .await;
        queue.interrupt(StopReason::NewTurn).await;
        let held = wait_for(&mut events, |e| matches!(e, QueueEvent::Held { .. })).await;
        assert!(matches!(held, QueueEvent::Held { id: h, .. } if h == id));
        assert!(queue.has_held() && !queue.is_busy());
        // The answer, then the rest of the track.
        let (answer, rx) = tokio::sync::mpsc::channel(1);
        answer.send(block(0.75, 3_200)).await.unwrap();
        drop(answer);
        queue
            .enqueue(
                SegmentKind::Sentence {
                    text: "It is noon.".into(),
                },
                rx,
            )
            .await;
        track.send(block(0.5, 8_000)).await.unwrap();
        drop(track);
        assert!(queue.resume().await);
        assert!(!queue.has_held());
        let mut log = Vec::new();
        let end = wait_for(&mut events, |e| {
            log.push(e.clone());
            matches!(e, QueueEvent::SegmentEnd { id: i, .. } if *i == id)
        })
        .await;
        queue.close().await.unwrap();

        let out: Vec<f32> = hound::WavReader::open(&path)
            .unwrap()
            .samples::<i16>()
            .map(|s| f32::from(s.unwrap()) / 32768.0)
            .collect();
        // Runs of equal values, in order.
        let mut runs: Vec<(f32, usize)> = Vec::new();
        for v in &out {
            let v = (v * 4.0).round() / 4.0;
            match runs.last_mut() {
                Some((last, n)) if *last == v => *n += 1,
                _ => runs.push((v, 1)),
            }
        }
        let values: Vec<f32> = runs.iter().map(|r| r.0).collect();
        let first = runs[0].1;
        let sentence = runs.iter().find(|r| r.0 == 0.75).map(|r| r.1);
        let before: usize = runs.iter().filter(|r| r.0 == 0.25).map(|r| r.1).sum();
        assert_eq!(sentence, Some(3_200), "{runs:?}");
        assert!(
            values == [0.25, 0.75, 0.25, 0.5] || values == [0.25, 0.75, 0.5],
            "{runs:?}"
        );
        assert!(first > 0, "{runs:?}");
        assert!((16_000 - 320..=16_000).contains(&before), "{runs:?}");
        assert_eq!(runs.last().unwrap().1, 8_000, "{runs:?}");
        assert!(
            log.iter()
                .any(|e| matches!(e, QueueEvent::Resumed { id: r } if *r == id))
        );
        let QueueEvent::SegmentEnd {
            played_ms, error, ..
        } = end
        else {
            unreachable!()
        };
        assert_eq!(error, None);
        assert_eq!(played_ms, (before as u64 + 8_000) * 1000 / 16_000);
    }

    /// A 16-bit mono WAV file of `samples` at [`RATE`].
    fn wav_bytes(samples: usize) -> Vec<u8> {
        let mut wav = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::new(&mut wav, spec).unwrap();
        for _ in 0..samples {
            writer.write_sample(1000i16).unwrap();
        }
        writer.finalize().unwrap();
        wav.into_inner()
    }

    /// The queue owns a stream once it is queued: the turn that asked for it being cancelled
    /// later (the next request supersedes it) does not cut its transfer, which a held track
    /// still needs; the queue's stop does.
    #[tokio::test]
    async fn a_queued_stream_outlives_the_turn_that_asked_for_it() {
        let queue = PlaybackQueue::new(Sink::Null(NullSink::new(RATE, 1, true)), full_volume());
        let mut events = queue.events();
        let (chunks, rx) = tokio::sync::mpsc::channel(4);
        let transfer = tokio_util::sync::CancellationToken::new();
        let turn = tokio_util::sync::CancellationToken::new();
        let media = MediaStream::new(
            "audio/wav".into(),
            None,
            "test://track".into(),
            None,
            rx,
            transfer.clone(),
        )
        .linked_to(&turn);
        // Two seconds, of which the first half arrives now.
        let wav = wav_bytes(32_000);
        let half = 44 + 32_000;
        chunks
            .send(Ok(bytes::Bytes::copy_from_slice(&wav[..half])))
            .await
            .unwrap();
        queue
            .enqueue_media(SegmentKind::Media { title: None }, media)
            .await;
        wait_for(&mut events, |e| {
            matches!(e, QueueEvent::SegmentStart { .. })
        })
        .await;
        turn.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !transfer.is_cancelled(),
            "the turn's cancel cut the transfer"
        );
        queue.stop(StopReason::StopCommand).await;
        tokio::time::timeout(std::time::Duration::from_secs(10), transfer.cancelled())
            .await
            .expect("the stop ends the transfer");
    }

    /// A stop drops the held track, and so does new media; neither comes back on resume.
    #[tokio::test]
    async fn a_stop_or_new_media_drops_the_held_track() {
        for new_media in [false, true] {
            let (queue, mut events, track) = playing_track().await;
            let id = 1;
            queue.interrupt(StopReason::BargeIn).await;
            wait_for(&mut events, |e| matches!(e, QueueEvent::Held { .. })).await;
            if new_media {
                let media = MediaStream::from_bytes(
                    "audio/wav".into(),
                    Some("next".into()),
                    wav_bytes(1_600).into(),
                );
                queue
                    .enqueue_media(SegmentKind::Media { title: None }, media)
                    .await;
            } else {
                queue.stop(StopReason::StopCommand).await;
            }
            let end = wait_for(
                &mut events,
                |e| matches!(e, QueueEvent::SegmentEnd { id: i, .. } if *i == id),
            )
            .await;
            assert!(
                matches!(
                    end,
                    QueueEvent::SegmentEnd {
                        played_ms: 100,
                        error: None,
                        ..
                    }
                ),
                "{end:?}"
            );
            assert!(!queue.has_held());
            assert!(!queue.resume().await, "new media: {new_media}");
            // The track's receiver is gone: its decoder (or transfer) ends.
            assert!(track.is_closed(), "new media: {new_media}");
            let Some(Sink::Null(sink)) = queue.close().await else {
                panic!("no sink back");
            };
            let expected = if new_media { 1_600 + 1_600 } else { 1_600 };
            assert_eq!(sink.frames, expected, "new media: {new_media}");
        }
    }

    /// A stop followed at once by an interrupt (the next turn starting before the player acted
    /// on the stop) does not hold what the stop ended. Before the fix, the track came back in
    /// every run. The window is narrow, so it runs many times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupt_right_after_a_stop_holds_nothing() {
        for run in 0..500 {
            let (queue, mut events, track) = playing_track().await;
            queue.stop(StopReason::StopCommand).await;
            queue.interrupt(StopReason::NewTurn).await;
            assert!(!queue.resume().await, "run {run}");
            // A second of track that must not play (a frame or two may, taken before the
            // player saw the stop: the sink here takes frames as fast as they come).
            let _ = track.send(block(0.25, 16_000)).await;
            drop(track);
            let Some(Sink::Null(sink)) = queue.close().await else {
                panic!("run {run}: no sink back");
            };
            let mut seen = Vec::new();
            while let Ok(e) = events.try_recv() {
                seen.push(e);
            }
            assert!(
                sink.frames < 1_600 + 3_200
                    && !seen
                        .iter()
                        .any(|e| matches!(e, QueueEvent::Held { .. } | QueueEvent::Resumed { .. })),
                "run {run}: {} frames, {seen:?}",
                sink.frames
            );
        }
    }

    /// A resume that comes before the player acted on the interrupt lets the track go on
    /// without a pause; either way nothing is lost but at most the frame being written. The
    /// window is narrow, so it runs many times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resume_right_after_an_interrupt_loses_nothing() {
        for run in 0..500 {
            let (queue, _events, track) = playing_track().await;
            queue.interrupt(StopReason::NewTurn).await;
            assert!(queue.resume().await, "run {run}");
            track.send(block(0.25, 1_600)).await.unwrap();
            drop(track);
            let Some(Sink::Null(sink)) = queue.close().await else {
                panic!("run {run}: no sink back");
            };
            assert!(
                (3_200 - 320..=3_200).contains(&sink.frames),
                "run {run}: {} frames",
                sink.frames
            );
        }
    }
}
