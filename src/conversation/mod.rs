//! The turn loop (ARCHITECTURE §1, §2): the user's text goes to the chat model with the tools; its text
//! is spoken sentence by sentence as it streams; its tool calls run through the tool hub, media
//! they return plays, actions apply, and the terminal rules decide whether the model speaks again.
//! Cancelling a turn (barge-in, a stop command) ends the model's stream, the tool calls and the
//! pagers, and history keeps only what was actually said.

pub mod assistant;
pub mod intent;
pub mod reply;
pub mod turns;
pub mod voice;

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::audio::decode::decode_media;
use crate::audio::queue::{PlaybackQueue, QueueEvent, SegmentKind, StopReason as QueueStop};
use crate::llm::config::LlmConfig;
use crate::llm::{ChatMessage, ChatModel, LlmError, LlmEvent, Role};
use crate::speech::sentence::SentenceSplitter;
use crate::speech::tts::{Tts, TtsError};
use crate::tools::config::ToolsConfig;
use crate::tools::hub::{ToolCall, ToolHub, ToolSpec};
use crate::tools::outcome::{Action, ToolOutcome};
use crate::tools::source::ToolSource;
use crate::tools::terminal::{Decision, StopReason, decide};
use intent::{IntentSettings, match_intent};
use reply::{Accepted, LeadIn, MarkupFilter, ReplyLimitSettings, ReplyLimits};

/// Turn settings.
#[derive(Debug, Clone)]
pub struct ConversationSettings {
    /// The system prompt.
    pub system_prompt: String,
    /// User turns kept in history (older ones are dropped with their replies and tool results).
    pub history_turns: usize,
    /// Most tokens of history sent to the model; the current turn is always kept.
    pub history_tokens: usize,
    /// Tool rounds per turn before the spoken fallback.
    pub max_tool_rounds: u32,
    /// Call the model again after media started.
    pub continue_after_media: bool,
    /// Match requests for the built-in tools without the model ([`intent`]); `None`: off.
    pub intents: Option<IntentSettings>,
    /// How long a spoken reply may be ([`reply`]).
    pub reply_limits: ReplyLimitSettings,
    /// Most characters of a request sent to the model (the last ones are kept).
    pub max_request_chars: usize,
}

impl ConversationSettings {
    /// From the `[llm]` section (prompt, history, intents, reply limits) and the `[tools]`
    /// section (tool rounds, media as the answer).
    pub fn new(llm: &LlmConfig, tools: &ToolsConfig) -> Self {
        Self {
            system_prompt: llm.system_prompt.clone(),
            history_turns: llm.history_turns as usize,
            history_tokens: llm.history_tokens as usize,
            max_tool_rounds: tools.max_tool_rounds,
            continue_after_media: tools.continue_after_media,
            intents: llm.builtin_intents.then_some(IntentSettings {
                volume_step: llm.volume_step.min(100) as u8,
            }),
            reply_limits: ReplyLimitSettings {
                max_sentences: llm.max_reply_sentences as usize,
                max_words: llm.max_reply_words as usize,
            },
            max_request_chars: llm.max_request_chars as usize,
        }
    }
}

/// One tool call of a turn, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ToolReport {
    /// The tool called.
    pub name: String,
    /// Its arguments, as JSON.
    pub arguments: Value,
    /// Where it ran: an MCP server's name, `voxloop` for a built-in tool, `device` for a
    /// device's own tool.
    pub server: String,
    /// Whether the call failed (a tool error or a transport failure).
    pub is_error: bool,
    /// What the model was told (the tool message).
    pub result: String,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "end", content = "detail", rename_all = "snake_case")]
pub enum TurnEnd {
    /// The model answered in words.
    Answered,
    /// A terminal rule stopped the model (media playing, a flagged action, exit, max rounds).
    Stopped(StopReason),
    /// The turn was cancelled (barge-in, a stop command).
    Cancelled,
    /// Nothing was said (an empty transcript, or only non-speech markers): no reply.
    Ignored,
    /// The model could not be reached or failed; the user heard a short apology.
    Failed(String),
    /// A shared stage (the local model, the voice) stayed busy with other sessions past its
    /// `max_wait_ms`; the user heard [`crate::compute::BUSY_SENTENCE`].
    Busy(String),
}

/// Who chose the turn's first action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    /// A built-in intent matched the words ([`intent`]); the model was not asked.
    Intent,
    /// The chat model.
    Model,
    /// Nobody: the turn was ignored.
    None,
}

/// What happened in a turn, with timings in ms from its start (the end of speech, for turns
/// from speech: ASR time is reported apart, in `asr_ms`).
#[derive(Debug, Clone, Serialize)]
pub struct TurnReport {
    /// The user's words (the transcript, or the typed text).
    pub heard: String,
    /// Time whisper took for the utterance, when the turn came from speech (set by the caller).
    pub asr_ms: Option<u64>,
    /// Who chose the first action.
    pub handled_by: Handler,
    /// The text given to TTS.
    pub said: String,
    /// The tool calls, in call order.
    pub tools: Vec<ToolReport>,
    /// How the turn ended.
    pub end: TurnEnd,
    /// Requests made to the chat model.
    pub llm_calls: u32,
    /// The model's first token, in ms from the turn's start.
    pub first_token_ms: Option<u64>,
    /// The first audio queued (speech or media), in ms from the turn's start.
    pub first_audio_ms: Option<u64>,
    /// The whole turn, in ms (playback may go on after it).
    pub total_ms: u64,
}

/// A conversation: history, the model, the tools, and the playback queue it speaks into.
pub struct Conversation {
    llm: ChatModel,
    hub: Arc<ToolHub>,
    tts: Tts,
    queue: PlaybackQueue,
    settings: ConversationSettings,
    history: Vec<ChatMessage>,
    exit: bool,
    /// `pause_playback` held the media: turns leave it held until `resume_playback` (or new
    /// media, or a stop, drops it).
    paused: bool,
    /// Tools of this conversation's own sources (a device's MCP server), beside the hub's.
    session_tools: Vec<SessionTools>,
    /// Whether this turn has told the speaker the assistant is busy (said once a turn).
    told_busy: std::sync::atomic::AtomicBool,
}

/// A tool source of one conversation (not the shared hub's) and the tools it offers, under
/// their offered names.
struct SessionTools {
    source: Arc<dyn ToolSource>,
    tools: Vec<ToolSpec>,
}

/// The own name of a tool that sets a device speaker's volume (the xiaozhi firmware's
/// `self.audio_speaker.set_volume`, ARCHITECTURE §5).
const SPEAKER_VOLUME_TOOL: &str = "audio_speaker.set_volume";

/// The last `max` characters of `text`, from a word start when it is cut.
fn last_chars(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - max).collect();
    match tail.split_once(char::is_whitespace) {
        Some((_, rest)) if !rest.is_empty() => rest.to_string(),
        _ => tail,
    }
}

/// Spoken when the model cannot be reached.
const APOLOGY_UNREACHABLE: &str = "Sorry, I can't reach my language model right now.";
/// Spoken when the tool rounds run out.
const APOLOGY_ROUNDS: &str = "Sorry, I couldn't finish that.";
/// Said when the model's reply had nothing speakable in it and no tool result to fall back on.
const APOLOGY_EMPTY: &str = "Sorry, I don't have an answer to that.";
/// Said when the user ends the conversation.
const GOODBYE: &str = "Goodbye.";

impl Conversation {
    /// A conversation over these parts.
    pub fn new(
        llm: ChatModel,
        hub: Arc<ToolHub>,
        tts: Tts,
        queue: PlaybackQueue,
        settings: ConversationSettings,
    ) -> Self {
        Self {
            llm,
            hub,
            tts,
            queue,
            settings,
            history: Vec::new(),
            exit: false,
            paused: false,
            session_tools: Vec::new(),
            told_busy: Default::default(),
        }
    }

    /// Offers `tools` of `source` (a device's own MCP server) in this conversation's turns,
    /// beside the hub's; calls to them go to `source`. The tools' offered names must not clash
    /// with the hub's (a device's are prefixed `device_`).
    pub fn add_tool_source(&mut self, source: Arc<dyn ToolSource>, tools: Vec<ToolSpec>) {
        self.session_tools.push(SessionTools { source, tools });
    }

    /// The offered name of a session tool that sets a device speaker's volume, if one is
    /// offered: it then stands for the built-in `set_volume`.
    fn speaker_volume_tool(&self) -> Option<&ToolSpec> {
        self.session_tools
            .iter()
            .flat_map(|s| &s.tools)
            .find(|t| t.tool.ends_with(SPEAKER_VOLUME_TOOL))
    }

    /// Every tool offered to the LLM, in OpenAI's function-tool form: the hub's, then the
    /// device's. When the device offers its speaker's volume
    /// (`self.audio_speaker.set_volume`), the built-in `set_volume` (a gain on the PCM voxloop
    /// sends) is left out: one volume, one tool.
    ///
    /// With the built-in intents on, the local model is not offered `exit_conversation`: the
    /// intents hear goodbyes, while Qwen2.5-0.5B chose it mostly for other requests ("What is
    /// two plus two?", "Good morning!"), and a false exit ends the session (BENCHMARKS.md).
    /// Nor `pause_playback` and `resume_playback`, which the intents hear too: fewer tools for
    /// it to choose among.
    pub fn function_tools(&self) -> Vec<Value> {
        let speaker_on_device = self.speaker_volume_tool().is_some();
        let by_intent_only =
            self.settings.intents.is_some() && matches!(self.llm, ChatModel::Local(_));
        let mut tools = self.hub.function_tools();
        tools.retain(|t| {
            let name = t["function"]["name"].as_str().unwrap_or_default();
            let withheld = match name {
                "set_volume" => speaker_on_device,
                "exit_conversation" | "pause_playback" | "resume_playback" => by_intent_only,
                _ => false,
            };
            !(withheld && self.hub.is_builtin(name))
        });
        for session in &self.session_tools {
            tools.extend(session.tools.iter().map(ToolSpec::function_tool));
        }
        tools
    }

    /// Speaks `text` sentence by sentence, as the assistant (no model, no tools, no history):
    /// a message such as a device's activation code.
    pub async fn say(&self, text: &str) {
        self.queue.new_turn().await;
        self.told_busy
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let mut splitter = crate::speech::sentence::SentenceSplitter::default();
        let mut sentences = splitter.push(text);
        sentences.extend(splitter.finish());
        for sentence in sentences {
            self.speak(&sentence).await;
        }
        self.resume_media().await;
    }

    /// Held media ([`PlaybackQueue::interrupt`]: speech over it that brought no request) goes
    /// on from where it was held, unless the user paused it (`pause_playback`). Returns
    /// whether there was some.
    pub async fn resume_media(&self) -> bool {
        !self.paused && self.queue.resume().await
    }

    /// One round's calls, concurrently; outcomes in call order. A session tool's call goes to
    /// its source (a device's, over the device's socket), any other to the hub.
    async fn call_round(&self, calls: &[ToolCall], cancel: &CancellationToken) -> Vec<ToolOutcome> {
        join_all(calls.iter().map(|call| async move {
            let session = self.session_tools.iter().find_map(|s| {
                let spec = s.tools.iter().find(|t| t.name == call.name)?;
                Some((&s.source, spec))
            });
            let Some((source, spec)) = session else {
                return self.hub.call(call, cancel).await;
            };
            match call.arguments_object() {
                Ok(arguments) => source
                    .call(&spec.tool, arguments, cancel)
                    .await
                    .renamed(&spec.name),
                Err(e) => ToolOutcome::failed(&spec.name, source.name(), e),
            }
        }))
        .await
    }

    /// Gets the chat model ready for the first turn (the local model computes the system
    /// prompt and tools now, instead of in the first turn). A failure is logged; turns still
    /// run.
    pub async fn warm_up(&self) {
        let system = [ChatMessage::new(
            Role::System,
            self.settings.system_prompt.clone(),
        )];
        if let Err(e) = self.llm.warm_up(&system, &self.function_tools()).await {
            tracing::warn!(error = %e, "chat model warm-up failed");
        }
    }

    /// Whisper's vocabulary prompt for this conversation ([`crate::speech::asr::vocabulary_prompt`]):
    /// the titles of the resources the MCP servers list. (The tools' names were tried too and
    /// left out: whisper then wrote "set volume" into requests that did not say it,
    /// BENCHMARKS.md.) `None` when `[asr] vocabulary_prompt` is off or there is nothing to say.
    pub async fn asr_prompt(&self, asr: &crate::speech::asr::AsrConfig) -> Option<String> {
        if !asr.vocabulary_prompt || asr.prompt_max_chars == 0 {
            return None;
        }
        let titles = self.hub.resource_titles(200).await;
        let prompt =
            crate::speech::asr::vocabulary_prompt(&titles, &[], asr.prompt_max_chars as usize);
        (!prompt.is_empty()).then_some(prompt)
    }

    /// The history (without the system prompt).
    pub fn history(&self) -> &[ChatMessage] {
        &self.history
    }

    /// True once `exit_conversation` was called: the session ends after playback.
    pub fn exit_requested(&self) -> bool {
        self.exit
    }

    /// The playback queue.
    pub fn queue(&self) -> &PlaybackQueue {
        &self.queue
    }

    /// The request: the system prompt, then the history from the oldest user turn that fits
    /// both windows (`history_turns`, `history_tokens`); the current turn always fits.
    fn messages(&self) -> Vec<ChatMessage> {
        let start = self.window_start();
        let mut messages = vec![ChatMessage::new(
            Role::System,
            self.settings.system_prompt.clone(),
        )];
        messages.extend_from_slice(&self.history[start..]);
        messages
    }

    /// Where the history the model is sent starts: the oldest user turn within both windows.
    fn window_start(&self) -> usize {
        let mut turns_seen = 0;
        let mut tokens = 0;
        let mut start = self.history.len();
        for (i, m) in self.history.iter().enumerate().rev() {
            tokens += self.llm.count_tokens(&m.content)
                + m.tool_calls
                    .iter()
                    .map(|c| self.llm.count_tokens(&c.arguments) + 8)
                    .sum::<usize>();
            if m.role == Role::User {
                turns_seen += 1;
                if turns_seen > 1
                    && (turns_seen > self.settings.history_turns
                        || tokens > self.settings.history_tokens)
                {
                    break;
                }
                start = i;
            }
        }
        start
    }

    /// Forgets the turns that have left the window: a later turn's window only starts later,
    /// so they would never be sent again, and a long conversation keeps no more than its
    /// window in memory.
    fn trim_history(&mut self) {
        let start = self.window_start();
        self.history.drain(..start);
    }

    /// Speaks `text` (queued behind what is playing); a TTS failure is logged and skipped.
    async fn speak(&self, text: &str) {
        if self.is_told_busy() {
            return;
        }
        match self.tts.synthesize(text).await {
            Ok(media) => self.enqueue_sentence(text, media).await,
            Err(TtsError::Busy(busy)) => {
                tracing::warn!(%busy, sentence = text, "TTS busy; sentence skipped");
                self.say_busy().await;
            }
            Err(e) => tracing::error!(error = %e, sentence = text, "TTS failed; sentence skipped"),
        }
    }

    async fn enqueue_sentence(&self, text: &str, media: crate::media::MediaStream) {
        self.queue
            .enqueue(
                SegmentKind::Sentence {
                    text: text.to_string(),
                },
                decode_media(media),
            )
            .await;
    }

    /// Tells the speaker, as a job of its own ([`turns::Job::Busy`]), that the assistant is
    /// busy: whisper refused their words. What played before is interrupted, as by a turn:
    /// held media goes on after the sentence.
    pub async fn tell_busy(&self) {
        self.queue.new_turn().await;
        self.told_busy
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.say_busy().await;
        self.resume_media().await;
    }

    /// Tells the speaker the assistant is busy ([`crate::compute::BUSY_SENTENCE`]), once per
    /// turn: from the TTS's rendered clip when it has one (so that it needs no synthesis while
    /// the voice is busy), else synthesized.
    async fn say_busy(&self) {
        use std::sync::atomic::Ordering;
        if self.told_busy.swap(true, Ordering::Relaxed) {
            return;
        }
        let sentence = crate::compute::BUSY_SENTENCE;
        let media = match self.tts.busy_clip() {
            Some(clip) => Ok(clip),
            None => self.tts.synthesize(sentence).await,
        };
        match media {
            Ok(media) => self.enqueue_sentence(sentence, media).await,
            Err(e) => tracing::error!(error = %e, "the busy sentence could not be said"),
        }
    }

    /// One request to the model: its text is cleaned of markup ([`MarkupFilter`]), split into
    /// sentences and spoken while it streams, within [`ReplyLimits`] (a limit or a loop ends the
    /// stream); its tool calls are collected into `calls`. Returns the sentences spoken. Sets
    /// `report.end` when the turn is cancelled or the model fails.
    async fn stream_reply(
        &self,
        tools: &[Value],
        cancel: &CancellationToken,
        started: Instant,
        report: &mut TurnReport,
        text: &mut String,
        calls: &mut Vec<crate::llm::ToolCallRequest>,
    ) -> Vec<String> {
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        let mut spoken = Vec::new();
        let mut stream = match self.llm.stream(&self.messages(), tools, cancel).await {
            Ok(stream) => stream,
            Err(e) if cancel.is_cancelled() => {
                tracing::info!(error = %e, "turn cancelled");
                report.end = TurnEnd::Cancelled;
                return spoken;
            }
            Err(LlmError::Busy(busy)) => {
                tracing::warn!(%busy, "the local model is busy; the speaker is told to try again");
                self.say_busy().await;
                report.end = TurnEnd::Busy(busy.to_string());
                return spoken;
            }
            Err(e) => {
                tracing::error!(error = %e, "LLM failed");
                self.speak(APOLOGY_UNREACHABLE).await;
                report.end = TurnEnd::Failed(e.to_string());
                return spoken;
            }
        };
        let mut filter = MarkupFilter::new();
        let mut splitter = SentenceSplitter::default();
        let mut lead_in = LeadIn::default();
        let mut limits = ReplyLimits::new(self.settings.reply_limits);
        let mut ended = false;
        loop {
            let event = tokio::select! {
                e = stream.recv() => e,
                _ = cancel.cancelled() => { report.end = TurnEnd::Cancelled; break; }
            };
            match event {
                Some(Ok(LlmEvent::Text(delta))) => {
                    report.first_token_ms.get_or_insert(elapsed_ms());
                    text.push_str(&delta);
                    for piece in splitter.push(&filter.push(&delta)) {
                        let Some(sentence) = lead_in.pass(&piece) else {
                            continue;
                        };
                        if self.say_within(&mut limits, &sentence, &mut spoken).await {
                            ended = true;
                            break;
                        }
                    }
                    if ended {
                        // Dropping the stream stops the model.
                        break;
                    }
                }
                Some(Ok(LlmEvent::ToolCall(call))) => {
                    report.first_token_ms.get_or_insert(elapsed_ms());
                    calls.push(call);
                }
                Some(Ok(LlmEvent::Done { .. })) | None => break,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "LLM stream failed");
                    if text.is_empty() && calls.is_empty() {
                        self.speak(APOLOGY_UNREACHABLE).await;
                    }
                    report.end = TurnEnd::Failed(e.to_string());
                    break;
                }
            }
        }
        // The stream also ends (closed) when the turn is cancelled.
        if cancel.is_cancelled() {
            report.end = TurnEnd::Cancelled;
        } else if self.is_told_busy() {
            report.end = TurnEnd::Busy("the voice (TTS) is busy".into());
        }
        if report.end != TurnEnd::Cancelled && !ended {
            splitter.push(&filter.finish());
            let rest: Vec<String> = splitter
                .push("")
                .into_iter()
                .chain(splitter.finish())
                .collect();
            for piece in rest {
                let Some(sentence) = lead_in.pass(&piece) else {
                    continue;
                };
                if self.say_within(&mut limits, &sentence, &mut spoken).await {
                    break;
                }
            }
        }
        if let Some(dropped) = lead_in.finish() {
            tracing::debug!(
                dropped,
                "a lead-in with nothing speakable after it was not said"
            );
        }
        tracing::debug!(model_text = %text, spoken = ?spoken, "model reply");
        if ended {
            // What the history keeps is what was said, not the rest the model had in mind.
            *text = spoken.join(" ");
        }
        spoken
    }

    /// Speaks `sentence` if `limits` accept it (cut to them); true when the reply ends here.
    async fn say_within(
        &self,
        limits: &mut ReplyLimits,
        sentence: &str,
        spoken: &mut Vec<String>,
    ) -> bool {
        let (say, last) = match limits.accept(sentence) {
            Accepted::More(s) => (s, false),
            Accepted::Last(s) => (s, true),
            Accepted::Stop => (String::new(), true),
        };
        if !say.is_empty() {
            self.speak(&say).await;
            if self.is_told_busy() {
                // The voice is busy: the speaker was told so, and hears no more of this reply.
                return true;
            }
            spoken.push(say);
        }
        last
    }

    fn is_told_busy(&self) -> bool {
        self.told_busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs one turn for the user's `text`. `cancel` ends it early (barge-in): the caller also
    /// stops the playback queue.
    pub async fn turn(&mut self, text: &str, cancel: &CancellationToken) -> TurnReport {
        let started = Instant::now();
        let ms = |t: Instant| t.duration_since(started).as_millis() as u64;
        self.queue.new_turn().await;
        let queued_before = self.queue.queued();
        *self.told_busy.get_mut() = false;
        let mut events = self.queue.events();
        // When the turn's first audio starts playing (it may be after the model has finished).
        let mut watcher = self.queue.events();
        let first_audio = tokio::spawn(async move {
            while let Ok(event) = watcher.recv().await {
                if matches!(event, QueueEvent::SegmentStart { .. }) {
                    return Some(Instant::now());
                }
            }
            None
        });
        let mut report = TurnReport {
            heard: text.to_string(),
            asr_ms: None,
            handled_by: Handler::Model,
            said: String::new(),
            tools: Vec::new(),
            end: TurnEnd::Answered,
            llm_calls: 0,
            first_token_ms: None,
            first_audio_ms: None,
            total_ms: 0,
        };
        let text = crate::speech::asr::speech_only(text);
        if text.is_empty() {
            first_audio.abort();
            report.end = TurnEnd::Ignored;
            report.handled_by = Handler::None;
            self.resume_media().await;
            return report;
        }
        self.history.push(ChatMessage::new(
            Role::User,
            last_chars(&text, self.settings.max_request_chars),
        ));
        let tools = self.function_tools();
        let hub = self.hub.clone();
        // In a device session, volume is the device's own speaker when it offers one: one
        // volume for the user, not voxloop's PCM gain beside the device's.
        let speaker = self.speaker_volume_tool().map(|t| t.name.clone());
        let intent = self.settings.intents.and_then(|settings| {
            match_intent(&text, self.queue.volume(), &settings, |t| {
                hub.is_builtin(t) || (t == "set_volume" && speaker.is_some())
            })
        });
        // "What's the volume?": the runtime knows, when the volume is its own (a device's
        // speaker has its own, which the model can ask the device for).
        let volume_answer = (self.settings.intents.is_some()
            && intent.is_none()
            && speaker.is_none()
            && intent::asks_volume(&text))
        .then(|| intent::spoken_volume(self.queue.volume(), &text));
        if intent.is_some() || volume_answer.is_some() {
            report.handled_by = Handler::Intent;
        }
        let mut spoken_sentences: Vec<String> = Vec::new();
        let mut round = 0;
        'rounds: loop {
            round += 1;
            if let Some(answer) = &volume_answer {
                self.speak(answer).await;
                spoken_sentences.push(answer.clone());
                self.history
                    .push(ChatMessage::new(Role::Assistant, answer.as_str()));
                break 'rounds;
            }
            let mut reply = String::new();
            let mut calls = Vec::new();
            if round == 1
                && let Some(intent) = &intent
            {
                let name = match &speaker {
                    Some(device_tool) if intent.tool == "set_volume" => device_tool.clone(),
                    _ => intent.tool.to_string(),
                };
                calls.push(crate::llm::ToolCallRequest {
                    id: "intent_1".into(),
                    name,
                    arguments: intent.arguments.to_string(),
                });
            } else {
                report.llm_calls += 1;
                let spoken = self
                    .stream_reply(&tools, cancel, started, &mut report, &mut reply, &mut calls)
                    .await;
                spoken_sentences.extend(spoken);
            }
            let cancelled = report.end == TurnEnd::Cancelled;
            if cancelled {
                // Calls the model had not finished are not made.
                calls.clear();
            }
            let mut assistant = ChatMessage::new(Role::Assistant, reply.trim());
            assistant.tool_calls = calls.clone();
            self.history.push(assistant);
            if cancelled
                || calls.is_empty()
                || matches!(report.end, TurnEnd::Failed(_) | TurnEnd::Busy(_))
            {
                break 'rounds;
            }
            // Tool round: concurrent calls, results in call order.
            let hub_calls: Vec<ToolCall> = calls
                .iter()
                .map(|c| ToolCall {
                    name: c.name.clone(),
                    arguments: serde_json::from_str(&c.arguments).unwrap_or(Value::Null),
                })
                .collect();
            let outcomes = tokio::select! {
                o = self.call_round(&hub_calls, cancel) => o,
                _ = cancel.cancelled() => {
                    // Every call gets an answer in history, as the chat API requires.
                    for call in &calls {
                        self.history.push(ChatMessage::tool(&call.id, "[cancelled]"));
                    }
                    report.end = TurnEnd::Cancelled;
                    break 'rounds;
                }
            };
            let mut facts = Vec::new();
            let mut nothing_resumed = false;
            for ((call, hub_call), mut outcome) in calls.iter().zip(&hub_calls).zip(outcomes) {
                facts.push(outcome.facts());
                let result = outcome.tool_message();
                nothing_resumed |= self.apply(&mut outcome).await;
                report.tools.push(ToolReport {
                    name: call.name.clone(),
                    arguments: hub_call.arguments.clone(),
                    server: outcome.server.clone(),
                    is_error: outcome.is_error,
                    result: result.clone(),
                });
                self.history.push(ChatMessage::tool(&call.id, result));
            }
            if nothing_resumed {
                let said = intent::nothing_paused(&text);
                self.speak(said).await;
                spoken_sentences.push(said.into());
            }
            let decision = decide(
                &facts,
                round,
                self.settings.max_tool_rounds,
                self.settings.continue_after_media,
            );
            // A built-in called for an intent is answered without the model: its text result
            // (the time) is the reply, a goodbye is said, an action is its own answer.
            if round == 1
                && let Some(intent) = &intent
            {
                let said = match report.tools.last() {
                    Some(tool) if tool.is_error => Some(APOLOGY_ROUNDS.to_string()),
                    Some(_) if intent.tool == "exit_conversation" => Some(GOODBYE.to_string()),
                    Some(tool) if intent.tool == "get_current_time" => {
                        Some(intent::spoken_time(&tool.result, &text))
                    }
                    _ => None,
                };
                if let Some(said) = said.filter(|s| !s.is_empty()) {
                    self.speak(&said).await;
                    spoken_sentences.push(said);
                }
                report.end = match decision {
                    Decision::Stop(reason) => TurnEnd::Stopped(reason),
                    Decision::CallLlm(_) => TurnEnd::Answered,
                };
                break 'rounds;
            }
            match decision {
                Decision::CallLlm(_) => continue,
                Decision::Stop(reason) => {
                    if reason == StopReason::MaxRounds {
                        self.speak(APOLOGY_ROUNDS).await;
                        spoken_sentences.push(APOLOGY_ROUNDS.into());
                    }
                    report.end = TurnEnd::Stopped(reason);
                    break 'rounds;
                }
            }
        }
        // A model reply with nothing speakable in it (Qwen sometimes writes a code block or a
        // call as text): after a tool's text result, that text is the answer; else a short
        // apology, never silence.
        if spoken_sentences.is_empty()
            && report.end == TurnEnd::Answered
            && report.handled_by == Handler::Model
        {
            let fallback = match report.tools.last() {
                Some(tool) if !tool.is_error => reply::clean(&tool.result),
                _ => String::new(),
            };
            let fallback = if fallback.chars().any(char::is_alphanumeric) {
                fallback
            } else {
                APOLOGY_EMPTY.to_string()
            };
            let mut limits = ReplyLimits::new(self.settings.reply_limits);
            let mut splitter = SentenceSplitter::default();
            let mut sentences = splitter.push(&fallback);
            sentences.extend(splitter.finish());
            for sentence in sentences {
                if self
                    .say_within(&mut limits, &sentence, &mut spoken_sentences)
                    .await
                {
                    break;
                }
            }
        }
        // What was actually said: every sentence, or on cancellation only those that started.
        if report.end == TurnEnd::Cancelled {
            let mut started = Vec::new();
            while let Ok(event) = events.try_recv() {
                if let QueueEvent::SegmentStart {
                    segment: SegmentKind::Sentence { text },
                    ..
                } = event
                {
                    started.push(text);
                }
            }
            report.said = started.join(" ");
            if let Some(last) = self
                .history
                .iter_mut()
                .rev()
                .find(|m| m.role == Role::Assistant)
            {
                last.content = format!("{} [interrupted]", report.said).trim().to_string();
            }
        } else {
            report.said = spoken_sentences.join(" ");
        }
        self.trim_history();
        report.total_ms = ms(Instant::now());
        if self.queue.queued() != queued_before && self.queue.is_busy() {
            let wait = std::time::Duration::from_secs(10);
            if let Ok(Ok(Some(at))) = tokio::time::timeout(wait, first_audio).await {
                report.first_audio_ms = Some(ms(at));
                crate::metrics::get().first_audio(at.saturating_duration_since(started));
            }
        } else {
            first_audio.abort();
        }
        // Music the turn did not replace, stop or pause (new media and a stop drop it) goes on
        // after the answer; a cancelled turn leaves it to the turn that superseded it.
        if report.end != TurnEnd::Cancelled && !self.exit {
            self.resume_media().await;
        }
        report
    }

    /// Plays the outcome's media and performs its action. Returns true when the action was
    /// `resume_playback` and nothing was paused (the turn then says so).
    async fn apply(&mut self, outcome: &mut ToolOutcome) -> bool {
        for media in std::mem::take(&mut outcome.media) {
            let title = media.title.clone();
            // New media drops what was paused.
            self.paused = false;
            self.queue
                .enqueue_media(SegmentKind::Media { title }, media)
                .await;
        }
        match &outcome.action {
            Some(Action::SetVolume { volume }) => self.queue.set_volume(*volume),
            Some(Action::StopPlayback) => {
                self.paused = false;
                self.queue.stop(QueueStop::StopCommand).await
            }
            Some(Action::PausePlayback) => {
                // The turn's start held the media already, unless turns overlap.
                self.queue.interrupt(QueueStop::StopCommand).await;
                self.paused = true;
            }
            Some(Action::ResumePlayback) => {
                self.paused = false;
                // Held (by the pause, or by this turn's start), or still playing: it goes on.
                return !self.queue.resume().await;
            }
            Some(Action::ExitConversation) => self.exit = true,
            Some(Action::Other { name }) => {
                tracing::warn!(action = %name, "unknown action, not performed")
            }
            None => {}
        }
        false
    }
}
