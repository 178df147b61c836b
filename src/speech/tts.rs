//! Text to speech, sentence by sentence, as a [`MediaStream`] the decoder starts on while it is
//! still being made. Providers: Kokoro-82M (offline, neural, [`super::kokoro`]; the sentence's
//! language from its script, a voice per language), `espeak-ng` (offline; run as a program,
//! since it is GPL-3; also Kokoro's fallback when its files are missing) and any
//! OpenAI-compatible `/v1/audio/speech` endpoint (streamed response in wav, mp3, opus or pcm).

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::g2p::{G2pError, Language};
use super::kokoro::{KokoroError, KokoroFiles};
use crate::media::{MediaError, MediaStream};
use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// Why a sentence could not be synthesized. The turn goes on without it.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// The TTS program is not installed.
    #[error("TTS program {program:?} is not installed (Debian: apt-get install espeak-ng)")]
    NotInstalled {
        /// The TTS program, as configured.
        program: String,
    },
    /// The TTS program failed.
    #[error("TTS program {program:?} could not run: {reason}")]
    Program {
        /// The TTS program, as configured.
        program: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The TTS endpoint could not be reached.
    #[error("TTS endpoint {url}: {reason}")]
    Http {
        /// The TTS endpoint's URL.
        url: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The TTS endpoint answered an HTTP error.
    #[error("TTS endpoint {url} answered HTTP {status}: {body}")]
    Status {
        /// The TTS endpoint's URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The API key's environment variable (named here) is not set.
    #[error("TTS: environment variable {0} (API key) is not set")]
    MissingKey(String),
    /// The TTS's circuit breaker is open: recent syntheses failed, this one was not tried.
    #[error("TTS: {0}")]
    Unavailable(String),
    /// Kokoro could not load or speak (an unknown voice names the valid ones).
    #[error("TTS: {0}")]
    Kokoro(#[from] KokoroError),
    /// Text could not be turned into phonemes.
    #[error("TTS: {0}")]
    Phonemes(#[from] G2pError),
    /// Kokoro stayed busy with other sessions' sentences for `[tts] max_wait_ms`.
    #[error("TTS: {0}")]
    Busy(#[from] crate::compute::Busy),
}

/// A configured TTS provider.
#[derive(Clone)]
pub struct Tts {
    config: TtsConfig,
    /// Cheap to clone (one connection pool). Building one loads the system's TLS roots through
    /// OpenSSL: when each device session built its own, 100 sessions took 3.8 s to start, with
    /// OpenSSL's decoder locks on top of `perf`'s profile.
    client: reqwest::Client,
    /// Upstream `tts`: opens after consecutive failed syntheses.
    breaker: crate::breaker::Breaker,
    /// Kokoro's syntheses, one at a time: a sentence waits here, in order, at most
    /// `[tts] max_wait_ms`.
    queue: crate::compute::ComputeQueue,
    /// [`crate::compute::BUSY_SENTENCE`] as WAV bytes, rendered by [`Tts::check`].
    busy_clip: std::sync::Arc<std::sync::OnceLock<Bytes>>,
}

impl Tts {
    /// A TTS for `config` (`[tts]`). Build one and clone it: construction costs tens of ms.
    pub fn new(config: &TtsConfig) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .expect("a plain HTTP client builds");
        Self {
            config: config.clone(),
            client,
            breaker: crate::breaker::Breaker::new("tts", &Default::default()),
            queue: crate::compute::ComputeQueue::new("tts", 1, config.max_wait_ms),
            busy_clip: Default::default(),
        }
    }

    /// The same TTS with Kokoro's syntheses on `queue`'s workers (whisper's, so that a
    /// sentence and an utterance never run at once), waiting at most `[tts] max_wait_ms`.
    pub fn sharing_workers_with(mut self, queue: &crate::compute::ComputeQueue) -> Self {
        self.queue = queue.sharing("tts", self.config.max_wait_ms);
        self
    }

    /// The same TTS behind a circuit breaker of `config` (`[breaker]`; the default otherwise).
    pub fn with_breaker(mut self, config: &crate::breaker::BreakerConfig) -> Self {
        self.breaker = crate::breaker::Breaker::new("tts", config);
        self
    }

    /// Its circuit breaker.
    pub fn breaker(&self) -> &crate::breaker::Breaker {
        &self.breaker
    }

    /// Starts synthesizing `text`; the audio streams as it is made.
    ///
    /// # Errors
    /// [`TtsError`] when synthesis cannot start (program missing, endpoint down or refusing);
    /// [`TtsError::Unavailable`] at once while the circuit breaker is open. Failures after the
    /// start end the stream with an error item.
    pub async fn synthesize(&self, text: &str) -> Result<MediaStream, TtsError> {
        self.breaker
            .permit()
            .map_err(|open| TtsError::Unavailable(open.to_string()))?;
        let result = match self.config.provider {
            TtsProvider::Kokoro => self.kokoro(text).await,
            TtsProvider::EspeakNg => self.espeak(text).await,
            TtsProvider::Openai => self.openai(text).await,
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(
                TtsError::MissingKey(_)
                | TtsError::Unavailable(_)
                | TtsError::Busy(_)
                | TtsError::Kokoro(KokoroError::UnknownVoice { .. }),
            ) => {}
            Err(TtsError::Status { status, .. }) if *status < 500 && *status != 429 => {}
            Err(_) => self.breaker.failure(),
        }
        result
    }

    /// The Kokoro files of the model directory, when the provider is Kokoro and they are all
    /// there.
    fn kokoro_files(&self) -> Option<KokoroFiles> {
        let files = KokoroFiles::in_dir(&crate::models::model_dir());
        match files.missing() {
            None => Some(files),
            Some(missing) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        file = %missing.display(),
                        "Kokoro's files are missing (voxloop models fetch); espeak-ng speaks instead"
                    )
                });
                None
            }
        }
    }

    /// Checks the configured voices before the first sentence: for Kokoro, loads the model
    /// (once per process), looks the voices up and renders the busy sentence
    /// ([`Self::busy_clip`]; about 0.3 s). Missing model files are no error (espeak-ng
    /// speaks).
    ///
    /// # Errors
    /// [`TtsError::Kokoro`]: an unknown voice (naming the valid ones), a model that does not
    /// load.
    pub async fn check(&self) -> Result<(), TtsError> {
        if self.config.provider != TtsProvider::Kokoro {
            return Ok(());
        }
        let Some(files) = self.kokoro_files() else {
            return Ok(());
        };
        let config = self.config.clone();
        let phonemes = super::g2p::phonemes(
            crate::compute::BUSY_SENTENCE,
            Language::En,
            &self.config.espeak_command,
        )
        .await?;
        let samples = tokio::task::spawn_blocking(move || {
            let kokoro = super::kokoro::shared(&files, config.threads)?;
            kokoro.check_voice(&config.voice_en)?;
            kokoro.check_voice(&config.voice_zh)?;
            Ok::<_, TtsError>(kokoro.synthesize(&phonemes, &config.voice_en, config.speed)?)
        })
        .await
        .map_err(|e| TtsError::Unavailable(e.to_string()))??;
        let wav = wav_bytes(&samples, super::kokoro::SAMPLE_RATE);
        let _ = self.busy_clip.set(Bytes::from(wav));
        Ok(())
    }

    /// [`crate::compute::BUSY_SENTENCE`] in Kokoro's voice, rendered once by [`Self::check`]:
    /// said without a synthesis when a stage is busy. `None` before the check, or when Kokoro
    /// does not speak (espeak-ng, an endpoint: those are not queued).
    pub fn busy_clip(&self) -> Option<MediaStream> {
        let wav = self.busy_clip.get()?.clone();
        let text = crate::compute::BUSY_SENTENCE.to_string();
        let mut media = MediaStream::from_bytes("audio/wav".into(), Some(text), wav);
        media.source = "kokoro".into();
        Some(media)
    }

    /// The language `text` is spoken in: the configured one, else its script's.
    fn language(&self, text: &str) -> Language {
        self.config.language.unwrap_or_else(|| Language::of(text))
    }

    async fn kokoro(&self, text: &str) -> Result<MediaStream, TtsError> {
        let Some(files) = self.kokoro_files() else {
            return self.espeak(text).await;
        };
        let language = self.language(text);
        let phonemes = super::g2p::phonemes(text, language, &self.config.espeak_command).await?;
        let voice = match language {
            Language::En => self.config.voice_en.clone(),
            Language::Zh => self.config.voice_zh.clone(),
        };
        let (threads, speed) = (self.config.threads, self.config.speed);
        let permit = self.queue.enter().await?;
        let samples = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let kokoro = super::kokoro::shared(&files, threads)?;
            kokoro.synthesize(&phonemes, &voice, speed)
        })
        .await
        .map_err(|e| TtsError::Unavailable(format!("the synthesis task failed: {e}")))??;
        let wav = wav_bytes(&samples, super::kokoro::SAMPLE_RATE);
        let mut media =
            MediaStream::from_bytes("audio/wav".into(), Some(text.to_string()), Bytes::from(wav));
        media.source = "kokoro".into();
        Ok(media)
    }

    async fn espeak(&self, text: &str) -> Result<MediaStream, TtsError> {
        let program = self.config.espeak_command.clone();
        // A Chinese sentence in Mandarin unless the language or voice is set for everything.
        let voice = match (self.config.language, Language::of(text)) {
            (None, Language::Zh) => "cmn",
            _ => &self.config.voice,
        };
        let mut child = tokio::process::Command::new(&program)
            .args([
                "--stdout",
                "-v",
                voice,
                "-s",
                &self.config.speed_wpm.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TtsError::NotInstalled {
                    program: program.clone(),
                },
                _ => TtsError::Program {
                    program: program.clone(),
                    reason: e.to_string(),
                },
            })?;
        // The text goes on stdin: no length limit, no shell, no option injection.
        let mut stdin = child.stdin.take().expect("piped");
        let input = format!("{text}\n");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
            drop(stdin);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    n = stdout.read(&mut buf) => n,
                    _ = token.cancelled() => return,
                };
                match n {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx
                            .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(MediaError(format!("{program}: {e}")))).await;
                        return;
                    }
                }
            }
            let mut message = String::new();
            let _ = stderr.read_to_string(&mut message).await;
            match child.wait().await {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    let _ = tx
                        .send(Err(MediaError(format!(
                            "{program} exited with {status}: {}",
                            message.trim()
                        ))))
                        .await;
                }
                Err(e) => {
                    let _ = tx.send(Err(MediaError(format!("{program}: {e}")))).await;
                }
            }
        });
        Ok(MediaStream::new(
            "audio/wav".into(),
            Some(text.to_string()),
            "espeak-ng".into(),
            None,
            rx,
            cancel,
        ))
    }

    async fn openai(&self, text: &str) -> Result<MediaStream, TtsError> {
        let url = format!("{}/audio/speech", self.config.url.trim_end_matches('/'));
        let mut request = self
            .client
            .post(&url)
            .timeout(Duration::from_millis(self.config.timeout_ms))
            .json(&serde_json::json!({
                "model": self.config.model,
                "input": text,
                "voice": self.config.voice,
                "response_format": self.config.format,
            }));
        if let Some(var) = &self.config.api_key_env {
            let key = std::env::var(var).map_err(|_| TtsError::MissingKey(var.clone()))?;
            request = request.bearer_auth(key);
        }
        let http_error = |e: reqwest::Error| TtsError::Http {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(http_error)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(TtsError::Status {
                url,
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            });
        }
        let mime = match self.config.format.as_str() {
            "mp3" => "audio/mpeg",
            "opus" => "audio/ogg; codecs=opus",
            "pcm" => "audio/pcm;rate=24000;channels=1",
            "flac" => "audio/flac",
            _ => "audio/wav",
        };
        Ok(crate::audio::source::media_from_response(
            response,
            mime.into(),
            Some(text.to_string()),
            url,
        ))
    }
}

/// `samples` (mono f32, clipped to [-1, 1]) as a 16-bit PCM WAV file at `rate` Hz.
fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cursor = std::io::Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    {
        let mut writer = hound::WavWriter::new(&mut cursor, spec).expect("a WAV header writes");
        for s in samples {
            let v = (s.clamp(-1.0, 1.0) * i16::MAX as f32) as i16;
            writer.write_sample(v).expect("writing to memory");
        }
        writer.finalize().expect("writing to memory");
    }
    cursor.into_inner()
}

/// Which TTS provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TtsProvider {
    /// Kokoro-82M, a neural voice, offline through ONNX Runtime (`voxloop models fetch`); when
    /// its files are missing, espeak-ng speaks instead (logged once).
    Kokoro,
    /// The `espeak-ng` program (offline; Debian package `espeak-ng`).
    EspeakNg,
    /// An OpenAI-compatible `POST {url}/audio/speech` endpoint.
    Openai,
}

/// `[tts]`: text to speech.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TtsConfig {
    /// `kokoro`, `espeak-ng` or `openai`.
    pub provider: TtsProvider,
    /// Kokoro's voice for English sentences (`af_heart`, `am_michael`, `bf_emma`, ...).
    pub voice_en: String,
    /// Kokoro's voice for Chinese sentences (`zf_xiaobei`, `zm_yunjian`, ...).
    pub voice_zh: String,
    /// The language of every sentence (`en` or `zh`); unset: each sentence's from its script
    /// (Chinese when it holds a Han character).
    pub language: Option<Language>,
    /// Kokoro's speaking rate, 1.0 the voice's own (0.5..=2.0).
    pub speed: f32,
    /// Threads one Kokoro synthesis uses (0: one per core). Syntheses run one at a time.
    pub threads: usize,
    /// Voice: an espeak-ng voice or language (`en-us`, `cmn`, ...) for English sentences (and
    /// for every sentence when `language` is set), or the endpoint's voice name. espeak-ng
    /// speaks Chinese sentences as `cmn` (Mandarin) otherwise.
    pub voice: String,
    /// espeak-ng speaking rate, words per minute.
    pub speed_wpm: u32,
    /// The espeak-ng program.
    pub espeak_command: String,
    /// Base URL of the OpenAI-compatible API (up to `/v1`).
    pub url: String,
    /// Model name sent to the endpoint.
    pub model: String,
    /// Response format asked of the endpoint: `wav`, `mp3`, `opus`, `flac` or `pcm`.
    pub format: String,
    /// Name of the environment variable holding the API key, if the endpoint needs one.
    pub api_key_env: Option<String>,
    /// Time limit to connect, and for the whole request to the endpoint, in ms.
    pub timeout_ms: u64,
    /// Kokoro: most time a sentence waits, in arrival order, while other sessions' sentences
    /// are synthesized (one at a time), in ms (0..=600000, default 10000); past it the speaker
    /// hears that the assistant is busy ([`crate::compute`]).
    pub max_wait_ms: u64,
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            provider: TtsProvider::Kokoro,
            voice_en: "af_heart".into(),
            voice_zh: "zf_xiaobei".into(),
            language: None,
            speed: 1.0,
            threads: 0,
            voice: "en-us".into(),
            speed_wpm: 170,
            espeak_command: "espeak-ng".into(),
            url: "http://127.0.0.1:8880/v1".into(),
            model: "tts-1".into(),
            format: "wav".into(),
            api_key_env: None,
            timeout_ms: 30_000,
            max_wait_ms: 10_000,
        }
    }
}

impl TtsConfig {
    /// Checks every `[tts]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `tts.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "tts.speed_wpm",
            self.speed_wpm,
            80..=500,
            "words per minute",
        )?;
        in_range(
            "tts.speed",
            self.speed,
            0.5..=2.0,
            "(1.0: the voice's own rate)",
        )?;
        in_range("tts.threads", self.threads, 0..=256, "threads")?;
        in_range(
            "tts.max_wait_ms",
            self.max_wait_ms,
            0..=600_000,
            "milliseconds",
        )?;
        for (key, voice) in [
            ("tts.voice_en", &self.voice_en),
            ("tts.voice_zh", &self.voice_zh),
        ] {
            if voice.is_empty() || !voice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(InvalidSetting {
                    key: key.into(),
                    value: format!("{voice:?}"),
                    allowed: "a Kokoro voice name such as af_heart or zf_xiaobei".into(),
                });
            }
        }
        in_range(
            "tts.timeout_ms",
            self.timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        if !["wav", "mp3", "opus", "flac", "pcm"].contains(&self.format.as_str()) {
            return Err(InvalidSetting {
                key: "tts.format".into(),
                value: format!("{:?}", self.format),
                allowed: "wav, mp3, opus, flac or pcm".into(),
            });
        }
        Ok(())
    }
}
