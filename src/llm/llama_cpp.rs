//! llama.cpp as the local model's engine: its `llama-server` program, run by voxloop as a child
//! process on loopback and spoken to over its native HTTP API (`POST /completion`, llama.cpp's
//! `tools/server/README.md`). The prompt goes as token ids (voxloop's own tokenizer, from the
//! same GGUF file, so both sides count the same tokens); the server keeps each slot's KV cache
//! and reuses the longest common prefix (`cache_prompt`), so the system message is computed
//! once. voxloop keeps the decisions ([`super::local`]): text or tool call from the first
//! token's log-probabilities (`n_probs`), a tool call under [`super::constraint`]'s grammar
//! written as GBNF (`grammar`), text streamed with the token ids (`return_tokens`) and
//! detokenized here.
//!
//! The child is started on first use, on a free loopback port with a random API key, and
//! killed when the engine is dropped (and, on Linux, when voxloop dies: `PR_SET_PDEATHSIG`). A
//! child that exits is started again by the next request; the request it broke fails with
//! [`LlmError::Model`].

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::LlmError;
use crate::llm::config::LlmConfig;

/// Tokens of context per slot: the limit the local model checks prompts against, whatever
/// the engine (candle's `MAX_SEQ_LEN`, 4096).
pub const CONTEXT_TOKENS: usize = candle_transformers::models::quantized_llama::MAX_SEQ_LEN;

/// A running `llama-server`.
struct Running {
    child: Child,
    /// The file holding the API key (mode 0600), passed as `--api-key-file` so that the key
    /// is not in the command line other local users can read; removed when dropped.
    _key_file: tempfile::NamedTempFile,
    /// `http://127.0.0.1:PORT`.
    base: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `llama-server` child serving one GGUF model.
pub struct LlamaServer {
    binary: PathBuf,
    model: PathBuf,
    threads: u32,
    slots: u32,
    /// CPU niceness of the child (`[llm] engine_nice`).
    nice: i32,
    start_timeout: Duration,
    /// The longest wait for the server's next bytes once a request is sent.
    idle_timeout: Duration,
    /// The server's API key: only voxloop may use the server, though it listens on loopback.
    api_key: String,
    client: reqwest::Client,
    running: tokio::sync::Mutex<Option<Running>>,
}

/// A token and its log-probability, from `completion_probabilities[..].top_logprobs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    /// The token id in the model's vocabulary.
    pub id: u32,
    /// Its natural-log probability at that step.
    pub logprob: f32,
}

/// llama-server's timing of one completion (`timings`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens taken from the slot's cache.
    pub cached: usize,
    /// Prompt tokens computed, and the time they took in ms.
    pub prompt_n: usize,
    /// Time the prompt tokens took, in ms.
    pub prompt_ms: f64,
    /// Tokens generated, and the time they took in ms.
    pub predicted_n: usize,
    /// Time the generated tokens took, in ms.
    pub predicted_ms: f64,
}

impl Timings {
    fn from_json(value: &Value) -> Self {
        let t = &value["timings"];
        let n = |key: &str| t[key].as_u64().unwrap_or(0) as usize;
        let ms = |key: &str| t[key].as_f64().unwrap_or(0.0);
        Self {
            cached: n("cache_n"),
            prompt_n: n("prompt_n"),
            prompt_ms: ms("prompt_ms"),
            predicted_n: n("predicted_n"),
            predicted_ms: ms("predicted_ms"),
        }
    }
}

/// The server's answer to a completion that does not stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// The generated text.
    pub content: String,
    /// For each generated token, the most likely tokens at that step, most likely first.
    pub top: Vec<Vec<TokenLogprob>>,
    /// `"eos"`, `"limit"` or `"word"`.
    pub stop_type: String,
    /// The server's timings of this completion.
    pub timings: Timings,
}

/// One piece of a streamed completion: its tokens' ids, and on the last piece why it stopped
/// (`"eos"`, `"limit"`, `"word"`) and the timings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamPiece {
    /// The ids of the tokens generated since the previous piece.
    pub tokens: Vec<u32>,
    /// Set on the last piece.
    pub end: Option<(String, Timings)>,
}

impl LlamaServer {
    /// An engine for `model` with `config`'s binary, threads, slots and timeouts. Starts
    /// nothing: the child starts on the first request (or [`Self::start`]).
    ///
    /// # Errors
    /// [`LlmError::Model`] when the binary is not there, or no random key can be made.
    pub fn new(model: &Path, config: &LlmConfig) -> Result<Self, LlmError> {
        let binary = config.llama_server_path();
        if !binary.is_file() {
            return Err(model_error(
                &binary,
                "no llama-server program (build it with `voxloop models fetch llama-server`)",
            ));
        }
        // A key only this process knows, so that no other local program uses the server.
        let mut key = [0u8; 16];
        getrandom::fill(&mut key)
            .map_err(|e| model_error(&binary, format!("no random API key: {e}")))?;
        let api_key: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let threads = match config.engine_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        // No pooled connections: a blocking caller runs each request on a runtime of its own,
        // and a pooled connection would outlive it (loopback connects in microseconds).
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| model_error(&binary, format!("HTTP client: {e}")))?;
        Ok(Self {
            binary,
            model: model.to_path_buf(),
            threads,
            slots: config.engine_slots.max(1),
            nice: config.engine_nice.min(19) as i32,
            start_timeout: Duration::from_millis(config.engine_start_timeout_ms),
            idle_timeout: Duration::from_millis(config.timeout_ms),
            api_key,
            client,
            running: tokio::sync::Mutex::new(None),
        })
    }

    /// Starts the server unless it is running, and waits until its model is loaded
    /// (`GET /health` answers 200). Returns its base URL.
    ///
    /// # Errors
    /// [`LlmError::Model`] when it cannot start, exits, or is not ready within
    /// `engine_start_timeout_ms`.
    pub async fn start(&self) -> Result<String, LlmError> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.as_mut() {
            match r.child.try_wait() {
                Ok(None) => return Ok(r.base.clone()),
                Ok(Some(status)) => {
                    tracing::warn!(%status, "llama-server exited; starting it again");
                }
                Err(e) => tracing::warn!(error = %e, "llama-server: cannot tell whether it runs"),
            }
            *running = None;
        }
        let started = Instant::now();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| self.error(format!("no free loopback port: {e}")))?
            .port();
        let key_file = key_file(&self.api_key)
            .map_err(|e| self.error(format!("cannot write the API key file: {e}")))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--model")
            .arg(&self.model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .args(["--threads-batch", &self.threads.to_string()])
            .args(["--parallel", &self.slots.to_string()])
            .args([
                "--ctx-size",
                &(CONTEXT_TOKENS * self.slots as usize).to_string(),
            ])
            .arg("--api-key-file")
            .arg(key_file.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        lower_priority(&mut command, self.nice);
        let mut child = spawn_from_lasting_thread(command)
            .map_err(|e| self.error(format!("cannot start {}: {e}", self.binary.display())))?;
        if let Some(stderr) = child.stderr.take() {
            // Its log, line by line, at debug level; the last lines name a failure.
            std::thread::Builder::new()
                .name("voxloop-llama-log".into())
                .spawn(move || {
                    for line in std::io::BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        tracing::debug!(target: "voxloop::llm::llama_server", "{line}");
                    }
                })
                .map_err(|e| self.error(format!("starting a thread: {e}")))?;
        }
        let base = format!("http://127.0.0.1:{port}");
        let mut r = Running {
            child,
            _key_file: key_file,
            base,
        };
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(self.error(format!(
                    "llama-server exited while loading the model ({status}); run with RUST_LOG=voxloop::llm=debug to see its log"
                )));
            }
            let health = self
                .client
                .get(format!("{}/health", r.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if health.is_ok_and(|h| h.status().is_success()) {
                break;
            }
            if started.elapsed() > self.start_timeout {
                return Err(self.error(format!(
                    "llama-server was not ready within {} ms",
                    self.start_timeout.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            port,
            threads = self.threads,
            slots = self.slots,
            ms = started.elapsed().as_millis() as u64,
            "llama-server ready"
        );
        let base = r.base.clone();
        *running = Some(r);
        Ok(base)
    }

    /// Sends `body` to `POST /completion` and returns the response, or `None` when `cancel`
    /// fired first.
    async fn post(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<Option<reqwest::Response>, LlmError> {
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let base = self.start().await?;
            let request = self
                .client
                .post(format!("{base}/completion"))
                .bearer_auth(&self.api_key)
                .json(body)
                .send();
            let response = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, request) => r,
                _ = cancel.cancelled() => return Ok(None),
            };
            match response {
                Err(_) => return Err(self.stalled()),
                // A server that died since the last request: nothing was generated yet, so
                // start another and send the request again, once.
                Ok(Err(e)) if attempt == 1 && e.is_connect() => {
                    let error = self.broken(e).await;
                    tracing::warn!("{error}");
                }
                Ok(Err(e)) => return Err(self.broken(e).await),
                Ok(Ok(response)) => break response,
            }
        };
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(self.error(format!("llama-server answered HTTP {status}: {text}")));
        }
        Ok(Some(response))
    }

    /// A completion that does not stream. `None` when cancelled.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the server cannot be reached, fails, or sends something else.
    pub async fn complete(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<Option<Completion>, LlmError> {
        let Some(response) = self.post(body, cancel).await? else {
            return Ok(None);
        };
        let value: Value = tokio::select! {
            v = response.json() => v.map_err(|e| self.error(format!("llama-server's answer: {e}")))?,
            _ = cancel.cancelled() => return Ok(None),
        };
        let top = value["completion_probabilities"]
            .as_array()
            .map(|steps| {
                steps
                    .iter()
                    .map(|step| {
                        step["top_logprobs"]
                            .as_array()
                            .map(|list| list.iter().filter_map(token_logprob).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Completion {
            content: value["content"].as_str().unwrap_or_default().to_string(),
            top,
            stop_type: value["stop_type"].as_str().unwrap_or_default().to_string(),
            timings: Timings::from_json(&value),
        }))
    }

    /// Starts a streamed completion (`"stream": true` and `"return_tokens": true` are set
    /// here); read its pieces with [`Pieces::next`]. Dropping the [`Pieces`] drops the request,
    /// which stops the generation. `None` when cancelled.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the server cannot be reached or refuses the request.
    pub async fn stream(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<Option<Pieces<'_>>, LlmError> {
        let mut body = body.clone();
        body["stream"] = Value::Bool(true);
        body["return_tokens"] = Value::Bool(true);
        let Some(response) = self.post(&body, cancel).await? else {
            return Ok(None);
        };
        Ok(Some(Pieces {
            server: self,
            bytes: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            ended: false,
        }))
    }

    /// The error for a stream that ended before its last piece.
    async fn broken_stream(&self) -> LlmError {
        match self.exited().await {
            Some(e) => e,
            None => self.error("llama-server ended the stream before its last piece"),
        }
    }

    /// The error for a request that broke: says whether the child exited.
    async fn broken(&self, e: reqwest::Error) -> LlmError {
        match self.exited().await {
            Some(exited) => exited,
            None => self.error(format!("llama-server: {e}")),
        }
    }

    /// When the child has exited, or exits within a second (a connection it broke is often
    /// seen before its exit is): the error saying so (and it is forgotten, so the next request
    /// starts another).
    async fn exited(&self) -> Option<LlmError> {
        let mut running = self.running.lock().await;
        let mut exited = None;
        for _ in 0..20 {
            exited = running
                .as_mut()
                .and_then(|r| r.child.try_wait().ok().flatten());
            if exited.is_some() || running.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = exited?;
        *running = None;
        Some(self.error(format!(
            "llama-server exited ({status}) during the request; the next request starts it again"
        )))
    }

    /// The error for a server that sent nothing for the idle timeout.
    fn stalled(&self) -> LlmError {
        self.error(format!(
            "llama-server sent nothing for {} ms",
            self.idle_timeout.as_millis()
        ))
    }

    fn error(&self, reason: impl std::fmt::Display) -> LlmError {
        model_error(&self.model, reason)
    }

    /// The child's process id while it runs (for tests that stop it).
    pub async fn pid(&self) -> Option<u32> {
        self.running.lock().await.as_ref().map(|r| r.child.id())
    }
}

/// The pieces of a streamed completion, as the server sends them (server-sent events).
pub struct Pieces<'a> {
    server: &'a LlamaServer,
    bytes: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'a>,
    >,
    buffer: Vec<u8>,
    ended: bool,
}

impl Pieces<'_> {
    /// The next piece; `None` after the last one, or when `cancel` fired.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the server stalls for the idle timeout, fails or exits
    /// mid-stream, ends the stream early, or sends something else.
    pub async fn next(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<StreamPiece>, LlmError> {
        let server = self.server;
        loop {
            if self.ended {
                return Ok(None);
            }
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                let value: Value = serde_json::from_str(data.trim()).map_err(|e| {
                    server.error(format!("llama-server sent {e} in {:?}", data.trim()))
                })?;
                if let Some(error) = value.get("error") {
                    return Err(server.error(format!("llama-server: {error}")));
                }
                let tokens = value["tokens"]
                    .as_array()
                    .map(|t| t.iter().filter_map(Value::as_u64).map(|id| id as u32))
                    .into_iter()
                    .flatten()
                    .collect();
                let end = value["stop"].as_bool().unwrap_or(false).then(|| {
                    (
                        value["stop_type"].as_str().unwrap_or_default().to_string(),
                        Timings::from_json(&value),
                    )
                });
                self.ended = end.is_some();
                return Ok(Some(StreamPiece { tokens, end }));
            }
            let chunk = tokio::select! {
                c = tokio::time::timeout(server.idle_timeout, self.bytes.next()) => c,
                _ = cancel.cancelled() => return Ok(None),
            };
            match chunk {
                Err(_) => return Err(server.stalled()),
                Ok(None) => {
                    return Err(server.broken_stream().await);
                }
                Ok(Some(Err(e))) => return Err(server.broken(e).await),
                Ok(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
            }
        }
    }
}

fn model_error(path: &Path, reason: impl std::fmt::Display) -> LlmError {
    LlmError::Model {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A temporary file (mode 0600, `tempfile`'s default) holding `key` and a newline, the format
/// of llama-server's `--api-key-file` (one key a line).
fn key_file(key: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let mut file = tempfile::Builder::new()
        .prefix("voxloop-llama-key-")
        .tempfile()?;
    writeln!(file, "{key}")?;
    file.flush()?;
    Ok(file)
}

fn token_logprob(value: &Value) -> Option<TokenLogprob> {
    Some(TokenLogprob {
        id: value["id"].as_u64()? as u32,
        logprob: value["logprob"].as_f64()? as f32,
    })
}

/// Spawns `command` from a thread that lives as long as the process. Linux sends the
/// parent-death signal when the *thread* that forked the child ends (prctl(2)), and the threads
/// that start the server (a runtime's worker, a blocking pool's thread) may end any time.
fn spawn_from_lasting_thread(command: Command) -> std::io::Result<Child> {
    type Request = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::io::Result<std::sync::mpsc::Sender<Request>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("voxloop-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_| tx)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
    let (reply, answer) = std::sync::mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Has the child killed when voxloop dies, however it dies (Linux's `PR_SET_PDEATHSIG`; see
/// [`spawn_from_lasting_thread`]).
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: `prctl` is async-signal-safe and touches no memory of this process; the closure
    // runs in the child between fork and exec and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Starts the child at CPU niceness `nice` (0..=19; setpriority(2)), so that speech work in
/// voxloop's own process gets the cores first.
#[cfg(unix)]
fn lower_priority(command: &mut Command, nice: i32) {
    use std::os::unix::process::CommandExt as _;
    if nice == 0 {
        return;
    }
    // SAFETY: `setpriority` is async-signal-safe and touches no memory of this process; the
    // closure runs in the child between fork and exec and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn lower_priority(_command: &mut Command, _nice: i32) {}
