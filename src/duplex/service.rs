//! What the duplex surfaces share (the REST/WebSocket server and the MCP server, ARCHITECTURE §6):
//! the managed model, prompt resolution, offline processing off the async threads, a streaming
//! conversation on its own thread, and the `{status: "success" | "error", ...}` result form.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::engine::{self, Prompt, StepOutput};
use super::lifecycle::{Lease, ModelManager};
use super::{DuplexError, FRAME_SAMPLES, MIMI_FILE, MODEL_FILE, SAMPLE_RATE, TOKENIZER_FILE};
use crate::duplex::config::DuplexConfig;

/// The Hugging Face repo whose files `[duplex] model_dir` holds.
pub const MODEL_ID: &str = "nvidia/personaplex-7b-v1";

/// A `{status: "success", ...fields}` result; `fields` must be an object.
pub fn success(fields: Value) -> Value {
    let mut result = json!({"status": "success"});
    if let (Some(out), Value::Object(fields)) = (result.as_object_mut(), fields) {
        out.extend(fields);
    }
    result
}

/// A `{status: "error", error}` result.
pub fn failure(error: impl std::fmt::Display) -> Value {
    json!({"status": "error", "error": error.to_string()})
}

/// The co-host: the model manager and the `[duplex]` defaults and limits.
pub struct Duplex {
    manager: Arc<ModelManager>,
    model_dir: Option<PathBuf>,
    default_voice: String,
    default_seed: u64,
    max_input_s: f64,
    chat_queue_frames: usize,
    chat_wait: std::time::Duration,
}

/// One offline run's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The reply, mono at [`SAMPLE_RATE`], as long as the input.
    pub pcm: Vec<f32>,
    /// What the model said, as text.
    pub text: String,
    /// The input's duration, seconds.
    pub duration_s: f64,
    /// Time from request to reply, seconds (loading included).
    pub processing_time: f64,
}

/// What a conversation's model thread sends back.
#[derive(Debug)]
pub enum ChatEvent {
    /// The system prompts ran: the conversation may start (the WebSocket's `0x00`).
    Ready,
    /// One 80 ms step's reply.
    Step(StepOutput),
    /// The model failed; the conversation is over.
    Failed(DuplexError),
}

/// A running conversation: send frames of [`FRAME_SAMPLES`] samples at [`SAMPLE_RATE`] into
/// `frames`; read `events`. Dropping `frames` (or `events`) ends it and frees the model.
/// `events` is unbounded but holds at most one [`ChatEvent::Step`] per frame sent, so a reader
/// that stops sending while it falls behind bounds both queues.
pub struct Chat {
    /// The user's audio, one 80 ms frame per message (bounded: `[duplex] chat_queue_frames`).
    pub frames: mpsc::Sender<Vec<f32>>,
    /// [`ChatEvent::Ready`], then one [`ChatEvent::Step`] per frame.
    pub events: mpsc::UnboundedReceiver<ChatEvent>,
}

impl Duplex {
    /// The co-host for `config` (with `PERSONAPLEX_MODEL_DIR` / `GPU_IDLE_TIMEOUT` applied); its
    /// idle monitor runs on the current tokio runtime. Nothing is loaded yet.
    ///
    /// # Errors
    /// As [`super::settings`] and [`ModelManager::new`].
    pub fn start(config: &DuplexConfig) -> Result<Arc<Self>, DuplexError> {
        let settings = super::settings(config)?;
        let model_dir = settings.model_dir.clone();
        let manager = ModelManager::new(settings)?;
        manager.spawn_monitor();
        Ok(Arc::new(Self {
            manager,
            model_dir,
            default_voice: config.default_voice.clone(),
            default_seed: config.seed,
            max_input_s: config.max_input_s,
            chat_queue_frames: config.chat_queue_frames.max(1),
            chat_wait: std::time::Duration::from_millis(config.chat_wait_ms),
        }))
    }

    /// The model manager (status, offload, release, timeout).
    pub fn manager(&self) -> &Arc<ModelManager> {
        &self.manager
    }

    /// The file of a voice (id or file; default `[duplex] default_voice`), as
    /// [`super::voice_file`] finds it.
    ///
    /// # Errors
    /// [`DuplexError::NoModelDir`]; as [`super::voice_file`].
    pub fn voice_file(&self, voice: Option<&str>) -> Result<PathBuf, DuplexError> {
        let dir = self.model_dir.as_deref().ok_or(DuplexError::NoModelDir)?;
        let voice = voice
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .unwrap_or(&self.default_voice);
        super::voice_file(dir, voice)
    }

    /// The prompt for a voice (id or file; default `[duplex] default_voice`), a role text and a
    /// seed (`None` or -1: `[duplex] seed`).
    ///
    /// # Errors
    /// [`DuplexError::NoModelDir`]; [`DuplexError::UnknownVoice`] / [`DuplexError::MissingFile`]
    /// as [`super::voice_prompt`]; [`DuplexError::Config`] for another negative seed.
    pub fn prompt(
        &self,
        voice: Option<&str>,
        text: Option<&str>,
        seed: Option<i64>,
    ) -> Result<Prompt, DuplexError> {
        let voice = self.voice_file(voice)?;
        let seed = match seed {
            None | Some(-1) => self.default_seed,
            Some(s) => u64::try_from(s).map_err(|_| DuplexError::Config {
                key: "seed",
                reason: format!("{s} is negative (-1 means the default)"),
            })?,
        };
        Ok(Prompt {
            voice: Some(super::voice_from_file(&voice)?),
            text: text
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
            seed,
            ..Prompt::default()
        })
    }

    /// The reply to an audio file (any format and rate the decoder reads), off the async
    /// threads; waits while a conversation holds the model.
    ///
    /// # Errors
    /// [`DuplexError::Audio`] for a missing, unreadable or too long input; as
    /// [`Duplex::process_pcm`].
    pub async fn process_file(
        &self,
        input: &Path,
        prompt: Prompt,
    ) -> Result<Processed, DuplexError> {
        if !input.is_file() {
            return Err(DuplexError::Audio(format!(
                "input file not found: {}",
                input.display()
            )));
        }
        let path = input.to_path_buf();
        let pcm = decoded(input.display().to_string(), move || {
            crate::audio::decode::decode_file(&path, SAMPLE_RATE)
        })
        .await?;
        self.process_pcm(pcm, prompt).await
    }

    /// The reply to encoded audio in memory (an upload), `mime` its type or
    /// `application/octet-stream` to sniff it.
    ///
    /// # Errors
    /// [`DuplexError::Audio`] for audio that cannot be decoded or is too long; as
    /// [`Duplex::process_pcm`].
    pub async fn process_encoded(
        &self,
        audio: bytes::Bytes,
        mime: String,
        prompt: Prompt,
    ) -> Result<Processed, DuplexError> {
        let pcm = decoded("the upload".into(), move || {
            let input = std::io::Cursor::new(audio);
            crate::audio::decode::decode_to_mono(input, &mime, SAMPLE_RATE)
        })
        .await?;
        self.process_pcm(pcm, prompt).await
    }

    /// The reply to mono PCM at [`SAMPLE_RATE`].
    ///
    /// # Errors
    /// [`DuplexError::Audio`] for empty input or input over `[duplex] max_input_s`; loading
    /// errors; [`DuplexError::Compute`] when the model fails mid-run (out of GPU memory), after
    /// which the model is parked in host memory to free the GPU.
    pub async fn process_pcm(
        &self,
        pcm: Vec<f32>,
        prompt: Prompt,
    ) -> Result<Processed, DuplexError> {
        let started = Instant::now();
        let duration_s = pcm.len() as f64 / f64::from(SAMPLE_RATE);
        if pcm.is_empty() {
            return Err(DuplexError::Audio("the input has no audio".into()));
        }
        if duration_s > self.max_input_s {
            return Err(DuplexError::Audio(format!(
                "the input is {duration_s:.1} s, over [duplex] max_input_s = {} s",
                self.max_input_s
            )));
        }
        let mut lease = self.manager.lease().await?;
        let run = tokio::task::spawn_blocking(move || {
            let result = engine::process(lease.engine(), &pcm, &prompt);
            drop(lease);
            result
        })
        .await
        .map_err(|e| DuplexError::Compute(format!("inference task failed: {e}")))?;
        let (pcm, text) = match run {
            Ok(reply) => reply,
            Err(e) => return Err(self.after_failure(e).await),
        };
        Ok(Processed {
            pcm,
            text,
            duration_s,
            processing_time: started.elapsed().as_secs_f64(),
        })
    }

    /// A compute failure (out of GPU memory, a device error) parks the model so the GPU is
    /// free for whatever else needs it; the error says so. Other errors pass unchanged.
    pub async fn after_failure(&self, error: DuplexError) -> DuplexError {
        let DuplexError::Compute(reason) = error else {
            return error;
        };
        match self.manager.offload().await {
            Ok(location) => DuplexError::Compute(format!(
                "{reason}; the model was moved to {location:?} to free the GPU"
            )),
            Err(e) => DuplexError::Compute(format!("{reason}; parking the model failed: {e}")),
        }
    }

    /// Starts a conversation if the model is free within `[duplex] chat_wait_ms` (a conversation
    /// that just ended may still be finishing its last step): `Ok(None)` while another holds it
    /// (one conversation per model instance). The system prompts run on the conversation's
    /// thread; [`ChatEvent::Ready`] says when they are done.
    ///
    /// # Errors
    /// Loading errors.
    pub async fn chat(&self, prompt: Prompt) -> Result<Option<Chat>, DuplexError> {
        let deadline = tokio::time::Instant::now() + self.chat_wait;
        let lease = loop {
            if let Some(lease) = self.manager.try_lease().await? {
                break lease;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let (frames, frames_rx) = mpsc::channel(self.chat_queue_frames);
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || converse(lease, &prompt, frames_rx, &events_tx));
        Ok(Some(Chat { frames, events }))
    }

    /// `health_check` / `GET /health` (which adds `status: "healthy"`): what a request would
    /// find.
    pub fn health(&self) -> Value {
        let status = self.manager.status();
        json!({
            "healthy": true,
            "model": MODEL_ID,
            "model_dir": self.model_dir,
            "model_files_present": self.missing_files().is_empty(),
            "location": status.location,
            "device": status.device,
            "gpu_available": cfg!(feature = "cuda") && !status.device.starts_with("cpu"),
            "active_connections": status.active_connections,
        })
    }

    /// `list_available_models`: the model this co-host serves and whether its files are there.
    pub fn models(&self) -> Value {
        let missing = self.missing_files();
        json!({"models": [{
            "id": MODEL_ID,
            "model_dir": self.model_dir,
            "available": self.model_dir.is_some() && missing.is_empty(),
            "missing_files": missing,
            "location": self.manager.status().location,
            "sample_rate": SAMPLE_RATE,
            "frame_samples": FRAME_SAMPLES,
        }]})
    }

    fn missing_files(&self) -> Vec<String> {
        let Some(dir) = &self.model_dir else {
            return vec![MODEL_FILE.into(), MIMI_FILE.into(), TOKENIZER_FILE.into()];
        };
        [MODEL_FILE, MIMI_FILE, TOKENIZER_FILE]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .map(String::from)
            .collect()
    }
}

/// Runs a blocking decode off the async threads; errors name `what` was decoded.
async fn decoded(
    what: String,
    decode: impl FnOnce() -> Result<Vec<f32>, crate::audio::decode::DecodeError> + Send + 'static,
) -> Result<Vec<f32>, DuplexError> {
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(|e| DuplexError::Compute(format!("decoding task failed: {e}")))?
        .map_err(|e| DuplexError::Audio(format!("{what}: {e}")))
}

/// The conversation's thread: prompts, then one step per frame until the frames end or the
/// event reader goes away.
fn converse(
    mut lease: Lease,
    prompt: &Prompt,
    mut frames: mpsc::Receiver<Vec<f32>>,
    events: &mpsc::UnboundedSender<ChatEvent>,
) {
    let mut session = match lease.engine().start(prompt) {
        Ok(session) => session,
        Err(e) => {
            let _ = events.send(ChatEvent::Failed(e));
            return;
        }
    };
    if events.send(ChatEvent::Ready).is_err() {
        return;
    }
    while let Some(frame) = frames.blocking_recv() {
        let event = match session.step(&frame) {
            Ok(out) => ChatEvent::Step(out),
            Err(e) => ChatEvent::Failed(e),
        };
        let failed = matches!(event, ChatEvent::Failed(_));
        if events.send(event).is_err() || failed {
            return;
        }
    }
}

/// Writes mono PCM at [`SAMPLE_RATE`] as a 16-bit WAV into memory.
pub fn wav_bytes(pcm: &[f32]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = std::io::Cursor::new(Vec::with_capacity(44 + pcm.len() * 2));
    {
        let mut wav = hound::WavWriter::new(&mut out, spec).expect("WAV header into memory");
        for sample in pcm {
            wav.write_sample((sample.clamp(-1.0, 1.0) * 32767.0) as i16)
                .expect("WAV into memory");
        }
        wav.finalize().expect("WAV into memory");
    }
    out.into_inner()
}
