//! A device's conversation (ARCHITECTURE §5): the device's Opus frames are decoded at 16 kHz, turns
//! end by the server's VAD (`listen` mode `auto` and `realtime`) or by the device's `listen
//! stop` (`manual`), whisper hears them (`stt`), and the reply plays into an Opus stream paced
//! at real time, `[audio] device_lead_ms` ahead, framed by the session's protocol version, with
//! `tts start`, `sentence_start {text}` and `stop` around it. `abort`, or in `realtime` mode
//! speech over the reply, cancels the turn and stops the frames within one frame time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::mcp::{DeviceMcp, McpCaps};
use super::protocol::{ListenMode, ProtocolVersion, ServerMessage, TtsState};
use crate::audio::convert::ConvertError;
use crate::audio::opus::{FrameDecoder, OpusError};
use crate::audio::queue::{
    PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason as QueueStop,
};
use crate::audio::sink::{OpusSink, Sink, SinkError};
use crate::conversation::assistant::Assistant;
use crate::conversation::turns::{Job, TurnObserver, Turns};
use crate::conversation::voice::{Output, TranscribeError, VoiceInput, transcribe};

use crate::conversation::{Conversation, TurnReport};
use crate::speech::SPEECH_RATE;
use crate::speech::asr::AsrConfig;

/// Why a device session's audio failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionAudioError {
    /// The downlink's Opus encoder could not be set up (the configured rate, frame length or
    /// complexity).
    #[error("playback setup: {0}")]
    Playback(#[from] SinkError),
    /// An uplink packet libopus cannot decode, or a decoder it cannot set up.
    #[error("undecodable Opus packet: {0}")]
    Opus(#[from] OpusError),
    /// The uplink's PCM could not be resampled for speech.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// What a session is started with besides the assistant.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// The code of the device's pending activation: every turn speaks it instead of running
    /// the assistant ([`super::activation`]).
    pub activation_code: Option<String>,
    /// The camera's vision endpoint and this session's token for it, announced in
    /// device-MCP `initialize`.
    pub vision: Option<(String, String)>,
    /// Send each turn's tool calls as `tool` messages (the hello's `features.tool_events`).
    pub tool_events: bool,
}

/// A device session around each turn: before it, `llm {emotion}` and `tts start`; after it,
/// once the reply has played (or the turn was cancelled), `tts stop`. Before the first turn,
/// the device's own tools are listed and offered (device-side MCP), whisper gets its
/// vocabulary prompt and the model warms up.
struct DeviceTurns {
    session_id: String,
    out: mpsc::Sender<Message>,
    queue: PlaybackQueue,
    mcp: Option<Arc<DeviceMcp>>,
    max_pages: u32,
    vision: Option<(String, String)>,
    /// A device waiting for activation: it only hears its code, so no prompt, no warm-up.
    speaks_only: bool,
    asr: AsrConfig,
    asr_prompt: Arc<std::sync::Mutex<Option<String>>>,
    /// Send each tool call as a `tool` message.
    tool_events: bool,
}

impl DeviceTurns {
    fn tts(&self, state: TtsState) -> Message {
        text(ServerMessage::Tts {
            session_id: self.session_id.clone(),
            state,
            text: None,
        })
    }
}

impl TurnObserver for DeviceTurns {
    async fn prepare(&mut self, conversation: &mut Conversation) {
        if let Some(mcp) = &self.mcp {
            let vision = self.vision.as_ref().map(|(u, t)| (u.as_str(), t.as_str()));
            match mcp.discover(self.max_pages, vision).await {
                Ok(tools) => {
                    let names: Vec<&str> = tools.iter().map(|t| t.tool.as_str()).collect();
                    tracing::info!(session = %self.session_id, tools = ?names, "device tools");
                    conversation.add_tool_source(mcp.clone(), tools);
                }
                Err(e) => {
                    tracing::warn!(session = %self.session_id, error = %e, "device tools unavailable")
                }
            }
        }
        if !self.speaks_only {
            let prompt = conversation.asr_prompt(&self.asr).await;
            *self.asr_prompt.lock().unwrap_or_else(|e| e.into_inner()) = prompt;
            conversation.warm_up().await;
        }
    }

    async fn started(&mut self, _job: &Job) -> bool {
        // The firmware shows the reply's mood (`llm {emotion}`); voxloop has no emotion model,
        // so every reply is neutral.
        let mood = text(ServerMessage::Llm {
            session_id: self.session_id.clone(),
            emotion: "neutral".into(),
            text: None,
        });
        self.out.send(mood).await.is_ok() && self.out.send(self.tts(TtsState::Start)).await.is_ok()
    }

    async fn finished(
        &mut self,
        _conversation: &Conversation,
        report: Option<TurnReport>,
        cancel: &CancellationToken,
    ) -> bool {
        if let Some(report) = report {
            tracing::info!(
                session = %self.session_id,
                heard = %report.heard,
                said = %report.said,
                tools = report.tools.len(),
                end = ?report.end,
                first_audio_ms = ?report.first_audio_ms,
                "device turn"
            );
            if self.tool_events {
                for call in report.tools {
                    let event = text(ServerMessage::Tool {
                        session_id: self.session_id.clone(),
                        name: call.name,
                        server: call.server,
                        arguments: call.arguments,
                        is_error: call.is_error,
                        result: call.result,
                    });
                    if self.out.send(event).await.is_err() {
                        return false;
                    }
                }
            }
        }
        tokio::select! {
            _ = self.queue.idle() => {}
            _ = cancel.cancelled() => {}
        }
        self.out.send(self.tts(TtsState::Stop)).await.is_ok()
    }
}

/// One device's side of the conversation, fed by the session's receive loop.
pub struct DeviceConversation {
    assistant: Assistant,
    session_id: String,
    out: mpsc::Sender<Message>,
    decoder: FrameDecoder,
    voice: VoiceInput,
    listening: bool,
    mode: ListenMode,
    /// Manual mode: the utterance so far (16 kHz mono).
    manual: Vec<f32>,
    queue: PlaybackQueue,
    /// The session's turn task.
    turns: Turns,
    /// The pending activation's message, spoken for every turn.
    activation: Option<String>,
    /// The device's MCP server, when its hello announced `features.mcp`.
    mcp: Option<Arc<DeviceMcp>>,
    /// Whisper's vocabulary prompt, set by the turn task once the tools are known.
    asr_prompt: Arc<std::sync::Mutex<Option<String>>>,
}

fn text(message: ServerMessage) -> Message {
    Message::Text(message.to_json().into())
}

impl DeviceConversation {
    /// Starts the session's playback (Opus frames into `out`) and its turn task. With
    /// `device_mcp` (the hello announced `features.mcp`) the turn task first lists the device's
    /// tools and offers them in every turn; a device that does not answer is logged and the
    /// session goes on without them. A session of a device waiting for activation
    /// (`options.activation_code`) speaks the code for every turn and nothing else.
    ///
    /// # Errors
    /// [`SessionAudioError`]: a setup libopus refuses (the configured downlink rate or frame
    /// length).
    pub fn start(
        assistant: Assistant,
        session_id: String,
        version: ProtocolVersion,
        out: mpsc::Sender<Message>,
        device_mcp: bool,
        options: SessionOptions,
    ) -> Result<Self, SessionAudioError> {
        let activation = options
            .activation_code
            .as_deref()
            .map(super::activation::activation_message);
        let device_mcp = device_mcp && activation.is_none();
        let config = assistant.config.clone();
        let audio = &config.audio;
        let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<u8>>(8);
        let mut sink = OpusSink::new(
            audio.device_rate,
            audio.device_frame_ms,
            audio.device_bitrate,
            Duration::from_millis(audio.device_lead_ms.into()),
            frames_tx,
        )?;
        sink.set_complexity(audio.device_opus_complexity)?;
        let settings = QueueSettings {
            volume: audio.device_volume,
            ..QueueSettings::from_config(audio)
        };
        let queue = PlaybackQueue::new(Sink::Opus(sink), settings).with_transcode_cache(
            assistant.transcode.clone(),
            crate::audio::transcode::DownlinkFormat::from_config(audio),
        );
        // Downlink frames, framed by protocol version.
        let frames_out = out.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            while let Some(packet) = frames_rx.recv().await {
                let timestamp = started.elapsed().as_millis() as u32;
                let frame = version.encode_opus(&packet, timestamp);
                if frames_out
                    .send(Message::Binary(frame.into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        // Sentences as they start playing.
        let mut events = queue.events();
        let (events_out, id) = (out.clone(), session_id.clone());
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    // Each sentence as it starts, and a media item's title (the firmware shows
                    // `sentence_start` text on its display).
                    Ok(QueueEvent::SegmentStart {
                        segment:
                            SegmentKind::Sentence { text: shown }
                            | SegmentKind::Media { title: Some(shown) },
                        ..
                    }) => {
                        let message = text(ServerMessage::Tts {
                            session_id: id.clone(),
                            state: TtsState::SentenceStart,
                            text: Some(shown),
                        });
                        if events_out.send(message).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
        let conversation = assistant.conversation(queue.clone());
        let mcp = device_mcp.then(|| {
            DeviceMcp::new(
                session_id.clone(),
                out.clone(),
                Duration::from_millis(config.device.mcp_request_timeout_ms),
                (&config.tools).into(),
                McpCaps {
                    max_tools: config.device.mcp_max_tools as usize,
                    max_tool_bytes: config.device.mcp_max_tool_bytes,
                    max_session_bytes: config.device.mcp_max_session_bytes,
                },
            )
        });
        let asr_prompt = Arc::new(std::sync::Mutex::new(None));
        let observer = DeviceTurns {
            session_id: session_id.clone(),
            out: out.clone(),
            queue: queue.clone(),
            mcp: mcp.clone(),
            max_pages: config.device.mcp_max_list_pages,
            vision: options.vision.clone(),
            speaks_only: activation.is_some(),
            asr: config.asr.clone(),
            asr_prompt: asr_prompt.clone(),
            tool_events: options.tool_events,
        };
        let turns = Turns::start(conversation, observer);
        Ok(Self {
            decoder: FrameDecoder::new(SPEECH_RATE, 1)?,
            voice: VoiceInput::new(&config.vad),
            listening: false,
            mode: ListenMode::Auto,
            manual: Vec::new(),
            queue,
            turns,
            mcp,
            asr_prompt,
            activation,
            assistant,
            session_id,
            out,
        })
    }

    /// `listen start`: audio frames follow.
    pub fn listen_start(&mut self, mode: ListenMode) {
        self.listening = true;
        self.mode = mode;
        self.manual.clear();
        self.voice.reset();
    }

    /// `listen stop`: the utterance so far is a turn (in manual mode the only way one ends; in
    /// the others speech cut short by the device).
    pub async fn listen_stop(&mut self) {
        self.listening = false;
        if self.mode == ListenMode::Manual {
            let mut pcm = std::mem::take(&mut self.manual);
            pcm.extend(self.voice.flush());
            if !pcm.is_empty() {
                self.hear(pcm).await;
            }
            return;
        }
        for utterance in self.voice.finish() {
            self.hear(utterance.pcm).await;
        }
    }

    /// `listen detect {text}`: a wake word alone (`[device] wake_words`) starts nothing; any
    /// other text is the user's request, as if heard.
    pub async fn detect(&mut self, text: &str) {
        let words = |s: &str| -> String {
            s.chars()
                .filter(|c| c.is_alphanumeric() || c.is_whitespace())
                .collect::<String>()
                .to_lowercase()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        if self.activation.is_some() {
            return self.start_turn(String::new()).await;
        }
        let said = words(text);
        if said.is_empty()
            || self
                .assistant
                .config
                .device
                .wake_words
                .iter()
                .any(|w| words(w) == said)
        {
            tracing::info!(session = %self.session_id, text, "wake word");
            return;
        }
        self.start_turn(text.trim().to_string()).await;
    }

    /// An `mcp` payload from the device (a response to one of our requests, or a notification),
    /// carried by a message of `bytes` bytes.
    pub async fn mcp(&mut self, payload: serde_json::Value, bytes: usize) {
        match &self.mcp {
            Some(mcp) => mcp.on_payload(payload, bytes),
            None => {
                tracing::info!(session = %self.session_id, "mcp message from a device that did not announce features.mcp; ignored")
            }
        }
    }

    /// `abort`: the turn is cancelled and the frames stop; held music is dropped.
    pub async fn abort(&mut self) {
        self.turns.cancel();
        self.queue.stop(QueueStop::BargeIn).await;
    }

    /// `abort` for the wake word, or speech over the reply in `realtime` mode: the turn is
    /// cancelled and the frames stop, but music is held ([`PlaybackQueue::interrupt`]), to go
    /// on after the request that follows unless that replaces or stops it.
    pub async fn interrupt(&mut self) {
        self.turns.cancel();
        self.queue.interrupt(QueueStop::BargeIn).await;
    }

    /// One Opus packet from the device.
    ///
    /// # Errors
    /// [`SessionAudioError`]: a packet libopus cannot decode (the session tells the device and
    /// goes on).
    pub async fn audio(&mut self, packet: &[u8]) -> Result<(), SessionAudioError> {
        if !self.listening {
            return Ok(());
        }
        let pcm = self.decoder.decode(packet)?;
        if self.mode == ListenMode::Manual {
            let samples = self.voice.convert(&pcm)?;
            self.manual.extend(samples);
            // A turn's uplink is bounded as the VAD bounds one (`[vad] max_utterance_ms`): a
            // device that never sends `listen stop` has what it said heard at the cap.
            let cap =
                self.assistant.config.vad.max_utterance_ms as usize * SPEECH_RATE as usize / 1000;
            if self.manual.len() >= cap {
                tracing::info!(session = %self.session_id, "manual utterance at vad.max_utterance_ms; heard now");
                let pcm = std::mem::take(&mut self.manual);
                self.hear(pcm).await;
            }
            return Ok(());
        }
        // In realtime mode the device keeps its microphone open while the reply plays: speech
        // over it interrupts it.
        let output = (self.mode == ListenMode::Realtime).then(|| Output {
            busy: self.queue.is_busy(),
            level: self.queue.output_level(),
        });
        let heard = self.voice.push(&pcm, output)?;
        if heard.barge_in {
            self.interrupt().await;
        }
        for utterance in heard.utterances {
            self.hear(utterance.pcm).await;
        }
        Ok(())
    }

    /// Transcribes an utterance and starts its turn.
    async fn hear(&mut self, pcm: Vec<f32>) {
        if self.activation.is_some() {
            return self.start_turn(String::new()).await;
        }
        let Some(asr) = self.assistant.asr.clone() else {
            tracing::error!(session = %self.session_id, "no ASR: the assistant was started for typed text");
            return;
        };
        let prompt = self
            .asr_prompt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let heard = match transcribe(asr, pcm, prompt).await {
            Ok((transcript, _)) => transcript.text,
            Err(TranscribeError::Busy) => {
                tracing::warn!(session = %self.session_id, "ASR busy; the device is told to try again");
                self.turns.submit(Job::Busy).await;
                return;
            }
            Err(e) => {
                tracing::error!(session = %self.session_id, error = %e, "ASR failed");
                return;
            }
        };
        if !heard.is_empty() {
            self.start_turn(heard).await;
        } else if self.queue.has_held() {
            // Not words: music that the wake word or speech held goes on.
            self.turns.submit(Job::Resume).await;
        }
    }

    /// Tells the device what was heard (`stt`) and starts its turn (a running turn is
    /// superseded). A device waiting for activation hears its activation message instead.
    async fn start_turn(&mut self, heard: String) {
        if let Some(message) = &self.activation {
            self.turns.submit(Job::Say(message.clone())).await;
            return;
        }
        let stt = text(ServerMessage::Stt {
            session_id: self.session_id.clone(),
            text: heard.clone(),
        });
        if self.out.send(stt).await.is_err() {
            return;
        }
        let job = Job::Turn {
            text: heard,
            asr_ms: None,
        };
        self.turns.submit(job).await;
    }
}
