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

use super::mcp::DeviceMcp;
use super::protocol::{ListenMode, ProtocolVersion, ServerMessage, TtsState};
use crate::config::Config;
use crate::conversation::{Conversation, ConversationSettings};
use crate::llm::ChatModel;
use crate::pipeline::SPEECH_RATE;
use crate::pipeline::asr::Asr;
use crate::pipeline::input::SpeechInput;
use crate::pipeline::opus::FrameDecoder;
use crate::pipeline::queue::{
    PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason as QueueStop,
};
use crate::pipeline::sink::{OpusSink, Sink};
use crate::pipeline::tts::Tts;
use crate::pipeline::vad::{BargeIn, TurnDetector, TurnEvent};
use crate::tools::hub::ToolHub;

/// What device sessions share to hold conversations: the configuration, whisper, the chat
/// model and the tool hub.
#[derive(Clone)]
pub struct Assistant {
    /// The configuration (`[audio] device_*`, `[vad]`, `[tts]`, `[llm]` settings per session).
    pub config: Arc<Config>,
    /// Whisper, shared (transcriptions run one at a time).
    pub asr: Arc<Asr>,
    /// The chat model, shared.
    pub llm: ChatModel,
    /// The MCP servers and built-in tools, shared.
    pub hub: Arc<ToolHub>,
    /// Text to speech, cloned into each session (its HTTP client is shared).
    pub tts: Tts,
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
}

/// What the turn task does next.
enum Job {
    /// A turn on what was heard.
    Turn(String),
    /// Speak this text (the activation message); no model, no tools.
    Say(String),
}

/// One device's side of the conversation, fed by the session's receive loop.
pub struct DeviceConversation {
    assistant: Assistant,
    session_id: String,
    out: mpsc::Sender<Message>,
    decoder: FrameDecoder,
    speech: SpeechInput,
    turns: TurnDetector,
    barge: BargeIn,
    listening: bool,
    mode: ListenMode,
    /// Manual mode: the utterance so far (16 kHz mono).
    manual: Vec<f32>,
    queue: PlaybackQueue,
    turn_tx: mpsc::Sender<(Job, CancellationToken)>,
    /// The pending activation's message, spoken for every turn.
    activation: Option<String>,
    current: CancellationToken,
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
    /// A setup libopus refuses (the configured downlink rate or frame length).
    pub fn start(
        assistant: Assistant,
        session_id: String,
        version: ProtocolVersion,
        out: mpsc::Sender<Message>,
        device_mcp: bool,
        options: SessionOptions,
    ) -> Result<Self, String> {
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
        )
        .map_err(|e| e.to_string())?;
        sink.set_complexity(audio.device_opus_complexity)
            .map_err(|e| e.to_string())?;
        let queue = PlaybackQueue::new(Sink::Opus(sink), QueueSettings::from_config(audio));
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
        let mut conversation = Conversation::new(
            assistant.llm.clone(),
            assistant.hub.clone(),
            assistant.tts.clone(),
            queue.clone(),
            ConversationSettings::from_config(&config),
        );
        let mcp = device_mcp.then(|| {
            DeviceMcp::new(
                session_id.clone(),
                out.clone(),
                Duration::from_millis(config.device.mcp_request_timeout_ms),
                (&config.tools).into(),
            )
        });
        let (turn_tx, mut turn_rx) = mpsc::channel::<(Job, CancellationToken)>(4);
        let vision = options.vision.clone();
        let speaks_only = activation.is_some();
        let (turn_out, id, turn_queue) = (out.clone(), session_id.clone(), queue.clone());
        let (turn_mcp, max_pages) = (mcp.clone(), config.device.mcp_max_list_pages);
        let asr_prompt = Arc::new(std::sync::Mutex::new(None));
        let (turn_prompt, asr_config) = (asr_prompt.clone(), config.asr.clone());
        tokio::spawn(async move {
            if let Some(mcp) = turn_mcp {
                let vision = vision.as_ref().map(|(u, t)| (u.as_str(), t.as_str()));
                match mcp.discover(max_pages, vision).await {
                    Ok(tools) => {
                        let names: Vec<&str> = tools.iter().map(|t| t.tool.as_str()).collect();
                        tracing::info!(session = %id, tools = ?names, "device tools");
                        conversation.add_tool_source(mcp.clone(), tools);
                    }
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "device tools unavailable")
                    }
                }
            }
            if !speaks_only {
                let prompt = conversation.asr_prompt(&asr_config).await;
                *turn_prompt.lock().unwrap_or_else(|e| e.into_inner()) = prompt;
                conversation.warm_up().await;
            }
            while let Some((job, cancel)) = turn_rx.recv().await {
                let tts = |state| {
                    text(ServerMessage::Tts {
                        session_id: id.clone(),
                        state,
                        text: None,
                    })
                };
                // The firmware shows the reply's mood (`llm {emotion}`); voxloop has no
                // emotion model, so every reply is neutral.
                let mood = text(ServerMessage::Llm {
                    session_id: id.clone(),
                    emotion: "neutral".into(),
                    text: None,
                });
                if turn_out.send(mood).await.is_err()
                    || turn_out.send(tts(TtsState::Start)).await.is_err()
                {
                    break;
                }
                let heard = match job {
                    Job::Say(message) => {
                        conversation.say(&message).await;
                        tokio::select! {
                            _ = turn_queue.idle() => {}
                            _ = cancel.cancelled() => {}
                        }
                        if turn_out.send(tts(TtsState::Stop)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Job::Turn(heard) => heard,
                };
                let report = conversation.turn(&heard, &cancel).await;
                tracing::info!(
                    session = %id,
                    heard = %report.heard,
                    said = %report.said,
                    tools = report.tools.len(),
                    end = ?report.end,
                    first_audio_ms = ?report.first_audio_ms,
                    "device turn"
                );
                tokio::select! {
                    _ = turn_queue.idle() => {}
                    _ = cancel.cancelled() => {}
                }
                if turn_out.send(tts(TtsState::Stop)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            decoder: FrameDecoder::new(SPEECH_RATE, 1).map_err(|e| e.to_string())?,
            speech: SpeechInput::default(),
            turns: TurnDetector::new(&config.vad),
            barge: BargeIn::new(&config.vad),
            listening: false,
            mode: ListenMode::Auto,
            manual: Vec::new(),
            queue,
            turn_tx,
            current: CancellationToken::new(),
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
        self.speech = SpeechInput::default();
        self.turns = TurnDetector::new(&self.assistant.config.vad);
    }

    /// `listen stop`: the utterance so far is a turn (in manual mode the only way one ends; in
    /// the others speech cut short by the device).
    pub async fn listen_stop(&mut self) {
        self.listening = false;
        let rest = self.speech.finish();
        if self.mode == ListenMode::Manual {
            let mut pcm = std::mem::take(&mut self.manual);
            pcm.extend(rest);
            if !pcm.is_empty() {
                self.hear(pcm).await;
            }
            return;
        }
        let (mut events, _) = self.turns.push(&rest);
        events.extend(self.turns.finish());
        for event in events {
            if let TurnEvent::Utterance { pcm, .. } = event {
                self.hear(pcm).await;
            }
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

    /// An `mcp` payload from the device (a response to one of our requests, or a notification).
    pub async fn mcp(&mut self, payload: serde_json::Value) {
        match &self.mcp {
            Some(mcp) => mcp.on_payload(payload).await,
            None => {
                tracing::info!(session = %self.session_id, "mcp message from a device that did not announce features.mcp; ignored")
            }
        }
    }

    /// `abort` (or speech over the reply): the turn is cancelled and the frames stop.
    pub async fn abort(&mut self) {
        self.current.cancel();
        self.queue.stop(QueueStop::BargeIn).await;
    }

    /// One Opus packet from the device.
    ///
    /// # Errors
    /// A packet libopus cannot decode (the session tells the device and goes on).
    pub async fn audio(&mut self, packet: &[u8]) -> Result<(), String> {
        if !self.listening {
            return Ok(());
        }
        let pcm = self
            .decoder
            .decode(packet)
            .map_err(|e| format!("undecodable Opus packet: {e}"))?;
        let samples = self.speech.push(&pcm).map_err(|e| e.to_string())?;
        if self.mode == ListenMode::Manual {
            self.manual.extend(samples);
            return Ok(());
        }
        let (events, frames) = self.turns.push(&samples);
        if self.mode == ListenMode::Realtime {
            for frame in &frames {
                if self
                    .barge
                    .on_frame(frame, self.queue.is_busy(), self.queue.output_level())
                {
                    self.abort().await;
                }
            }
        }
        for event in events {
            if let TurnEvent::Utterance { pcm, .. } = event {
                self.hear(pcm).await;
            }
        }
        Ok(())
    }

    /// Transcribes an utterance and starts its turn.
    async fn hear(&mut self, pcm: Vec<f32>) {
        if self.activation.is_some() {
            return self.start_turn(String::new()).await;
        }
        let asr = self.assistant.asr.clone();
        let prompt = self
            .asr_prompt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let heard = match tokio::task::spawn_blocking(move || {
            asr.transcribe_with_prompt(&pcm, prompt.as_deref())
        })
        .await
        {
            Ok(Ok(transcript)) => transcript.text,
            Ok(Err(e)) => {
                tracing::error!(session = %self.session_id, error = %e, "ASR failed");
                return;
            }
            Err(e) => {
                tracing::error!(session = %self.session_id, error = %e, "ASR task failed");
                return;
            }
        };
        if !heard.is_empty() {
            self.start_turn(heard).await;
        }
    }

    /// Tells the device what was heard (`stt`) and starts its turn (a running turn is
    /// superseded). A device waiting for activation hears its activation message instead.
    async fn start_turn(&mut self, heard: String) {
        if let Some(message) = &self.activation {
            self.current.cancel();
            self.current = CancellationToken::new();
            let job = Job::Say(message.clone());
            let _ = self.turn_tx.send((job, self.current.clone())).await;
            return;
        }
        let stt = text(ServerMessage::Stt {
            session_id: self.session_id.clone(),
            text: heard.clone(),
        });
        if self.out.send(stt).await.is_err() {
            return;
        }
        self.current.cancel();
        self.current = CancellationToken::new();
        let _ = self
            .turn_tx
            .send((Job::Turn(heard), self.current.clone()))
            .await;
    }
}
