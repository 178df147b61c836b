//! The assistant assembled from the configuration, in one place: whisper (when speech comes
//! in), the tool hub with its MCP servers started, the chat model and TTS. `voxloop run`,
//! `chat` and `serve` start it; every conversation (a terminal's, each device session's) is
//! made from its shared parts.

use std::sync::Arc;

use crate::audio::queue::PlaybackQueue;
use crate::config::Config;
use crate::llm::{ChatModel, LlmError};
use crate::speech::asr::{Asr, AsrError};
use crate::speech::tts::{Tts, TtsError};
use crate::tools::hub::ToolHub;

use super::{Conversation, ConversationSettings};

/// How requests reach the assistant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Speech: whisper is loaded.
    Speech,
    /// Typed text only: no ASR model is needed.
    Text,
}

/// Why the assistant could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The ASR model is missing or does not load.
    #[error("[asr]: {0}")]
    Asr(#[from] AsrError),
    /// The chat model is misconfigured or its file is missing.
    #[error("[llm]: {0}")]
    Llm(#[from] LlmError),
    /// The voice is unusable (a Kokoro file or ONNX Runtime missing, an unknown voice).
    #[error("[tts]: {0}")]
    Tts(#[from] TtsError),
}

/// The assistant's shared parts. Cheap to clone: every part is shared.
#[derive(Clone)]
pub struct Assistant {
    /// The configuration it was started with.
    pub config: Arc<Config>,
    /// Whisper, shared (transcriptions run one at a time); `None` for [`Input::Text`].
    pub asr: Option<Arc<Asr>>,
    /// The chat model, shared.
    pub llm: ChatModel,
    /// The MCP servers and built-in tools, shared. Servers that failed to start are in
    /// [`ToolHub::startup_failures`].
    pub hub: Arc<ToolHub>,
    /// Text to speech (its HTTP client and models are shared between clones).
    pub tts: Tts,
    /// The device downlink's transcode cache (`[audio] transcode_cache_mb`), shared by every
    /// device session.
    pub transcode: Arc<crate::audio::transcode::TranscodeCache>,
}

impl Assistant {
    /// Starts the assistant for `config`: loads whisper for [`Input::Speech`], starts the MCP
    /// servers and lists their tools (one that fails is skipped and reported, not fatal),
    /// builds the chat model and checks the voice. The chat model and TTS get their circuit
    /// breakers from `[breaker]`.
    ///
    /// # Errors
    /// [`StartError`]: a part that cannot work at all with this configuration.
    pub async fn start(config: &Config, input: Input) -> Result<Assistant, StartError> {
        let asr = match input {
            Input::Speech => Some(Arc::new(Asr::load(&config.asr)?)),
            Input::Text => None,
        };
        let hub = Arc::new(ToolHub::start(config.hub()).await);
        let llm = ChatModel::from_config(&config.llm)?.with_breaker(&config.breaker);
        tracing::info!(model = %llm.describe(), "chat model ready");
        let mut tts = Tts::new(&config.tts).with_breaker(&config.breaker);
        if let Some(asr) = &asr {
            // Whisper and Kokoro each take every core: one at a time, in order.
            tts = tts.sharing_workers_with(asr.compute_queue());
        }
        tts.check().await?;
        Ok(Assistant {
            config: Arc::new(config.clone()),
            asr,
            llm,
            hub,
            tts,
            transcode: Arc::new(crate::audio::transcode::TranscodeCache::from_config(
                &config.audio,
            )),
        })
    }

    /// A new conversation (empty history) over the shared parts, speaking into `queue`.
    pub fn conversation(&self, queue: PlaybackQueue) -> Conversation {
        Conversation::new(
            self.llm.clone(),
            self.hub.clone(),
            self.tts.clone(),
            queue,
            ConversationSettings::new(&self.config.llm, &self.config.tools),
        )
    }
}
