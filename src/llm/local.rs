//! The local chat model: a llama- or qwen2-architecture GGUF (by default
//! Qwen2.5-Coder-0.5B-Instruct) run on the CPU, streaming the same [`LlmEvent`]s as the
//! OpenAI-compatible client. The engine is llama.cpp's `llama-server` ([`super::llama_cpp`],
//! the default) or candle in this process (`[llm] engine`); the tokenizer, the prompt and the
//! decisions below are voxloop's either way.
//!
//! - Tokenizer: built from the GGUF metadata (`tokenizer.ggml.tokens`, `.merges`,
//!   `.token_type`): GPT-2 byte-level BPE without a prefix space, digits split one by one (as
//!   SmolLM2's `tokenizer.json`), control tokens such as `<|im_end|>` kept whole.
//! - Prompt: ChatML (`<|im_start|>role\n...<|im_end|>\n`), SmolLM2's chat template. The tools
//!   are described in the system message; a call is written `<tool_call>{"name": ..,
//!   "arguments": {..}}`, and a tool's answer comes back as a user message
//!   `Tool result: ...`.
//! - Tool calls: at the reply's first token the model chooses between text and a tool call (the
//!   most likely first token decides). A call is then decoded greedily under
//!   [`ToolGrammar`]: only tokens that keep it a valid call of an offered tool are allowed, so
//!   the call is always well formed. Text is sampled at the configured temperature.
//!
//! With candle, generation runs on a blocking thread; with llama.cpp, on a task that reads the
//! server's stream. Cancelling stops it between two tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{self as llama, MAX_SEQ_LEN};
use serde_json::Value;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::constraint::{GrammarState, StringRule, TOOL_CALL_OPEN, ToolGrammar};
use super::qwen2;
use super::{ChatMessage, FunctionTools, LlmError, LlmEvent, Role, ToolCallRequest, Usage};
use crate::llm::config::{LlmConfig, LocalEngine};

/// GGUF `tokenizer.ggml.token_type` of control tokens (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of user-defined tokens (`LLAMA_TOKEN_TYPE_USER_DEFINED`):
/// added tokens that are text, such as Qwen's `<tool_call>`; they are matched whole.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// Qwen2's pre-tokenizer split (its `tokenizer.json`; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The transformer of a GGUF file, by its `general.architecture`.
#[derive(Clone)]
enum Weights {
    /// `llama` (SmolLM2): candle's `quantized_llama`.
    Llama(llama::ModelWeights),
    /// `qwen2` (Qwen2.5): [`qwen2`], candle's `quantized_qwen2` with a resumable cache.
    Qwen2(qwen2::ModelWeights),
}

impl Weights {
    fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward(input, pos),
            Self::Qwen2(m) => m.forward(input, pos),
        }
    }
}

/// How a model family writes prompts and tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// SmolLM2's ChatML: the tools listed as `name(param: type): description` in the system
    /// message, a call written `<tool_call>{...}`, a tool's answer a user message
    /// `Tool result: ...`.
    SmolLm,
    /// Qwen2.5's chat template (its GGUF `tokenizer.chat_template`): the tools as JSON lines in
    /// `<tools></tools>` under `# Tools`, a call `<tool_call>\n{...}\n</tool_call>`, a tool's
    /// answer a user message `<tool_response>\n...\n</tool_response>`.
    Qwen,
}

impl ChatFormat {
    /// What opens a tool call in the model's reply, up to the JSON object.
    pub fn call_opening(self) -> &'static str {
        match self {
            Self::SmolLm => TOOL_CALL_OPEN,
            Self::Qwen => "<tool_call>\n",
        }
    }
}
/// Where the model's reply starts.
const ASSISTANT_HEADER: &str = "<|im_start|>assistant\n";
/// Seed of the text sampler: the same prompt gives the same reply.
const SEED: u64 = 299_792_458;
/// With llama.cpp: how many of the most likely first tokens the server lists
/// (`n_probs`), among which a tool call's start and a text start are looked for.
const FIRST_TOKEN_CHOICES: usize = 20;

/// Runs `future` to its end on a runtime of its own, on a thread of its own (so that a caller
/// inside a runtime may block on it too): the blocking calls of the llama.cpp engine.
///
/// # Errors
/// The runtime could not be built (no threads or file descriptors left). A panic in `future`
/// is resumed in the caller.
fn block_on<T: Send>(future: impl std::future::Future<Output = T> + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let joined = scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| runtime.block_on(future))
            })
            .join();
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A loaded model; cheap to clone (the weights are shared).
#[derive(Clone)]
pub struct LocalModel {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// candle's transformer, when candle is the engine.
    weights: Option<Weights>,
    /// llama.cpp's server, when it is the engine.
    server: Option<super::llama_cpp::LlamaServer>,
    /// How prompts and tool calls are written for this model.
    format: ChatFormat,
    tokenizer: Tokenizer,
    /// Each token's text (empty for control tokens), for the tool-call mask.
    token_text: Vec<String>,
    /// The token texts as a character trie, for the tool-call mask.
    trie: Vec<TrieNode>,
    /// Tokens that end a reply (`<|im_end|>`, the end-of-text token).
    stop: Vec<u32>,
    config: LlmConfig,
    /// Model states after earlier prompts, to resume from: the warm-up prefix first, then the
    /// latest prompt.
    cache: std::sync::Mutex<Vec<CachedPrompt>>,
    /// Completions (and warm-ups) run `engine_slots` at once on llama.cpp, one at a time on
    /// candle; the others wait here, in order, at most `[llm] max_wait_ms`.
    queue: crate::compute::ComputeQueue,
    /// The system prefixes warmed up (by a hash of their token ids): each is computed once for
    /// every session that starts with it; a session arriving while it is computed waits for
    /// that one instead of computing its own.
    warmed: std::sync::Mutex<HashMap<u64, Arc<tokio::sync::OnceCell<()>>>>,
    /// Warm-ups computed, for tests and logs.
    warm_ups: AtomicUsize,
    /// candle: whether the cache's first entry is a warm-up prefix (it then stays there).
    pinned: AtomicBool,
}

/// A node of the vocabulary trie: the tokens spelled by the path to it, and its children.
#[derive(Default)]
struct TrieNode {
    tokens: Vec<u32>,
    children: Vec<(char, u32)>,
}

/// The trie of `texts` (token id = index); empty texts are left out.
fn token_trie(texts: &[String]) -> Vec<TrieNode> {
    let mut nodes = vec![TrieNode::default()];
    for (id, text) in texts.iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        let mut node = 0;
        for c in text.chars() {
            node = match nodes[node].children.iter().find(|(x, _)| *x == c) {
                Some(&(_, child)) => child as usize,
                None => {
                    nodes.push(TrieNode::default());
                    let child = nodes.len() - 1;
                    nodes[node].children.push((c, child as u32));
                    child
                }
            };
        }
        nodes[node].tokens.push(id as u32);
    }
    nodes
}

/// Where generation stands: the model with its KV cache, the logits for the next token, and
/// that token's position.
#[derive(Clone)]
struct Cursor {
    model: Weights,
    logits: Vec<f32>,
    pos: usize,
}

/// The state after a prompt's tokens `ids`.
#[derive(Clone)]
struct CachedPrompt {
    ids: Vec<u32>,
    cursor: Cursor,
}

/// Timing of one completion (also logged).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from an earlier prompt (not computed again).
    pub cached_tokens: usize,
    /// Tokens of the reply, forced and scored tool-call tokens included.
    pub generated_tokens: usize,
    /// Time to run the prompt through the model, in ms.
    pub prefill_ms: f64,
    /// Time for the generated tokens after the first, in ms.
    pub decode_ms: f64,
}

impl GenerationStats {
    /// Prompt tokens computed per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / (self.prefill_ms / 1000.0)
    }
    /// Generated tokens per second, after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        (self.generated_tokens.saturating_sub(1)) as f64 / (self.decode_ms / 1000.0)
    }
}

/// Why the model failed, without the path that [`model_error`] adds again.
fn reason(e: LlmError) -> String {
    match e {
        LlmError::Model { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn model_error(path: &Path, reason: impl std::fmt::Display) -> LlmError {
    LlmError::Model {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn metadata_strings(content: &gguf_file::Content, key: &str) -> Result<Vec<String>, String> {
    let values = content
        .metadata
        .get(key)
        .ok_or_else(|| format!("no {key} in the GGUF metadata"))?
        .to_vec()
        .map_err(|e| format!("{key}: {e}"))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
        .collect()
}

/// The tokenizer described by the GGUF metadata, and the ids of its control tokens.
fn tokenizer_from_gguf(content: &gguf_file::Content) -> Result<(Tokenizer, Vec<u32>), String> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is supported"
        ));
    }
    let tokens = metadata_strings(content, "tokenizer.ggml.tokens")?;
    let merges = metadata_strings(content, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge without a space: {m:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let pre_tokenizer = if pre == "qwen2" {
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("Qwen2 pre-tokenizer: {e}"))?;
        Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])
    } else {
        Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])
    };
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tokenizer)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let control: Vec<u32> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
        .map(|(i, _)| i as u32)
        .collect();
    let special: Vec<AddedToken> = control
        .iter()
        .map(|&i| AddedToken::from(tokens[i as usize].clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("control tokens: {e}"))?;
    let user_defined: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, _)| AddedToken::from(tokens[i].clone(), false))
        .collect();
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| format!("user-defined tokens: {e}"))?;
    Ok((tokenizer, control))
}

impl LocalModel {
    /// Loads the GGUF file at `path` (llama architecture, GPT-2 tokenizer) for `config`'s
    /// sampling settings: its tokenizer always, its weights into candle when candle is the
    /// engine (`[llm] engine`; also when llama.cpp's `llama-server` is missing, with a
    /// warning). About 0.3 s for the 98 MB SmolLM2 file. llama.cpp's server starts with the
    /// first request or the warm-up.
    ///
    /// # Errors
    /// [`LlmError::Model`] naming the file when it cannot be read or is not such a model.
    pub fn load(path: &Path, config: &LlmConfig) -> Result<Self, LlmError> {
        let mut file = std::fs::File::open(path).map_err(|e| {
            model_error(path, format!("{e} (fetch it with `voxloop models fetch`)"))
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| model_error(path, e))?;
        let (tokenizer, control) =
            tokenizer_from_gguf(&content).map_err(|e| model_error(path, e))?;
        let mut stop = Vec::new();
        for name in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(id) = tokenizer.token_to_id(name) {
                stop.push(id);
            }
        }
        if let Some(eos) = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            && !stop.contains(&eos)
        {
            stop.push(eos);
        }
        if tokenizer.token_to_id("<|im_start|>").is_none() {
            return Err(model_error(
                path,
                "no <|im_start|> token: not a ChatML model",
            ));
        }
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        let format = match architecture.as_str() {
            "llama" => ChatFormat::SmolLm,
            "qwen2" => ChatFormat::Qwen,
            other => {
                return Err(model_error(
                    path,
                    format!("architecture {other:?}; only llama and qwen2 are supported"),
                ));
            }
        };
        let server = match config.engine {
            LocalEngine::Candle => None,
            LocalEngine::LlamaCpp => match super::llama_cpp::LlamaServer::new(path, config) {
                Ok(server) => Some(server),
                Err(e) => {
                    tracing::warn!(
                        "{e}; the local model runs on candle instead, about 4 times slower to read a prompt (set [llm] engine = \"candle\" to silence this)"
                    );
                    None
                }
            },
        };
        let weights = match (&server, format) {
            (Some(_), _) => None,
            (None, ChatFormat::SmolLm) => Some(Weights::Llama(
                llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                    .map_err(|e| model_error(path, e))?,
            )),
            (None, ChatFormat::Qwen) => Some(Weights::Qwen2(
                qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                    .map_err(|e| model_error(path, e))?,
            )),
        };
        let size = tokenizer.get_vocab_size(true);
        let mut token_text = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let text = if control.contains(&id) {
                String::new()
            } else {
                tokenizer.decode(&[id], false).unwrap_or_default()
            };
            token_text.push(text);
        }
        let trie = token_trie(&token_text);
        // llama-server runs its slots' completions in one batch; candle one at a time (each
        // would take every core).
        let workers = match server {
            Some(_) => config.engine_slots as usize,
            None => 1,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                weights,
                server,
                format,
                tokenizer,
                token_text,
                trie,
                stop,
                config: config.clone(),
                cache: Default::default(),
                queue: crate::compute::ComputeQueue::new("llm", workers, config.max_wait_ms),
                warmed: Default::default(),
                warm_ups: AtomicUsize::new(0),
                pinned: AtomicBool::new(false),
            }),
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What runs the model: llama.cpp's server, or candle (configured so, or because the
    /// server program is missing).
    pub fn engine(&self) -> LocalEngine {
        if self.inner.server.is_some() {
            LocalEngine::LlamaCpp
        } else {
            LocalEngine::Candle
        }
    }

    /// llama.cpp's server, when it is the engine.
    pub fn llama_server(&self) -> Option<&super::llama_cpp::LlamaServer> {
        self.inner.server.as_ref()
    }

    /// How this model writes prompts and tool calls (from its architecture).
    pub fn format(&self) -> ChatFormat {
        self.inner.format
    }

    /// The prompt for `messages` and `tools` in `format`, ending with the assistant's header.
    ///
    /// [`ChatFormat::SmolLm`]: the system message is the tools section (each tool, how to call
    /// one, and the examples of `tool_examples` whose calls name an offered tool), then the
    /// system prompt. (Putting the system prompt first made no clear difference to
    /// SmolLM2-135M's choice between a call and words in a probe of 10 requests.)
    ///
    /// [`ChatFormat::Qwen`]: Qwen2.5's template: the system prompt, then `# Tools` with each tool
    /// as a JSON line and the call format, then the same examples written in that format.
    pub fn render_prompt(
        format: ChatFormat,
        messages: &[ChatMessage],
        tools: &FunctionTools,
        tool_examples: &str,
    ) -> String {
        let mut out = String::new();
        let mut system = String::new();
        let mut rest = messages;
        let mut prompt = "";
        if let Some((first, tail)) = messages.split_first()
            && first.role == Role::System
        {
            prompt = &first.content;
            rest = tail;
        }
        match format {
            ChatFormat::SmolLm => {
                if !tools.is_empty() {
                    system.push_str(&tools_prompt(tools, tool_examples));
                }
                if !prompt.is_empty() {
                    if !system.is_empty() {
                        system.push_str("\n\n");
                    }
                    system.push_str(prompt);
                }
            }
            ChatFormat::Qwen => {
                system.push_str(prompt);
                if !tools.is_empty() {
                    system.push_str(&qwen_tools_prompt(tools, tool_examples));
                }
            }
        }
        if !system.is_empty() {
            chatml(&mut out, "system", &system);
        }
        let mut i = 0;
        while i < rest.len() {
            let m = &rest[i];
            match (format, m.role) {
                (_, Role::System) => chatml(&mut out, "system", &m.content),
                (_, Role::User) => chatml(&mut out, "user", &m.content),
                (_, Role::Assistant) => {
                    let close = match format {
                        ChatFormat::SmolLm => "",
                        ChatFormat::Qwen => "\n</tool_call>",
                    };
                    let mut content = m.content.clone();
                    for call in &m.tool_calls {
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        content.push_str(&format!(
                            "{}{{\"name\": {}, \"arguments\": {}}}{close}",
                            format.call_opening(),
                            Value::String(call.name.clone()),
                            call.arguments
                        ));
                    }
                    chatml(&mut out, "assistant", &content);
                }
                (ChatFormat::SmolLm, Role::Tool) => {
                    chatml(&mut out, "user", &format!("Tool result: {}", m.content))
                }
                (ChatFormat::Qwen, Role::Tool) => {
                    // Consecutive tool results share one user message, as the template does.
                    let mut content = String::new();
                    while i < rest.len() && rest[i].role == Role::Tool {
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        content.push_str(&format!(
                            "<tool_response>\n{}\n</tool_response>",
                            rest[i].content
                        ));
                        i += 1;
                    }
                    chatml(&mut out, "user", &content);
                    continue;
                }
            }
            i += 1;
        }
        out.push_str(ASSISTANT_HEADER);
        out
    }

    /// Starts a completion of `messages`, offering `tools`; the reply streams through the
    /// receiver, like [`super::openai::OpenAiClient::stream`]. Cancelling `cancel` (or
    /// dropping the receiver) stops generation before the next token. Waits first, in order,
    /// for one of the engine's workers while other completions run ([`crate::compute`]).
    ///
    /// # Errors
    /// [`LlmError::Model`] when the prompt cannot be tokenized or does not fit the context;
    /// [`LlmError::Busy`] when no worker came free within `[llm] max_wait_ms`.
    pub async fn stream(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
        cancel: &CancellationToken,
    ) -> Result<super::LlmStream, LlmError> {
        let (ids, grammar) = self.prepare(messages, tools)?;
        let (tx, rx) = mpsc::channel(64);
        let permit = tokio::select! {
            permit = self.inner.queue.enter() => permit?,
            // A cancelled turn leaves the queue: the receiver ends with no event.
            _ = cancel.cancelled() => return Ok(rx),
        };
        let inner = self.inner.clone();
        let cancel = cancel.clone();
        if inner.server.is_some() {
            tokio::spawn(async move {
                let _permit = permit;
                let result = inner
                    .generate_llama(&ids, grammar.as_ref(), &tx, &cancel)
                    .await;
                if let Some(last) = inner.last_event(result) {
                    let _ = tx.send(last).await;
                }
            });
            return Ok(rx);
        }
        std::thread::Builder::new()
            .name("voxloop-llm".into())
            .spawn(move || {
                let _permit = permit;
                let result = inner.generate(&ids, grammar.as_ref(), &tx, &cancel);
                if let Some(last) = inner.last_event(result) {
                    let _ = tx.blocking_send(last);
                }
            })
            .map_err(|e| model_error(&self.inner.path, format!("starting a thread: {e}")))?;
        Ok(rx)
    }

    /// Runs a completion to its end, for benchmarks and tests: the events and the timings.
    ///
    /// # Errors
    /// As [`Self::stream`], and a failure during generation.
    pub fn complete_blocking(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(Vec<LlmEvent>, GenerationStats), LlmError> {
        let (ids, grammar) = self.prepare(messages, tools)?;
        // Room for every event of the reply: nothing reads them until it is done.
        let (tx, mut rx) = mpsc::channel(self.inner.config.max_tokens as usize + 2);
        let cancel = CancellationToken::new();
        let result = if self.inner.server.is_some() {
            block_on(
                self.inner
                    .generate_llama(&ids, grammar.as_ref(), &tx, &cancel),
            )
            .map_err(|e| model_error(&self.inner.path, e))?
        } else {
            self.inner.generate(&ids, grammar.as_ref(), &tx, &cancel)
        };
        drop(tx);
        let (finish_reason, stats) = match result {
            Ok(Some(done)) => done,
            Ok(None) => return Err(model_error(&self.inner.path, "generation stopped")),
            Err(e) => return Err(model_error(&self.inner.path, e)),
        };
        let mut events = Vec::new();
        while let Ok(Ok(event)) = rx.try_recv() {
            events.push(event);
        }
        events.push(LlmEvent::Done {
            finish_reason,
            usage: None,
        });
        Ok((events, stats))
    }

    /// Runs the system message (the system prompt in `messages`, and `tools`) through the model
    /// and keeps the state, so that the first turn's prompt resumes from it. Blocking: about
    /// 3 s for SmolLM2's 270-token system message on candle on 2 cores, 3.5 s for Qwen's 382
    /// tokens on llama.cpp (starting the server included); run it while nobody is talking.
    /// Each call computes the prefix again; sessions use [`Self::warm_up_async`], which
    /// computes each prefix once.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the model fails.
    pub fn warm_up(&self, messages: &[ChatMessage], tools: &FunctionTools) -> Result<(), LlmError> {
        let ids = self.system_ids(messages, tools)?;
        self.warm_up_ids(&ids)
    }

    /// The blocking warm-up of `ids`. On candle the first prefix warmed stays first in the
    /// cache for good (later prompts resume from it); a different prefix warmed later is only
    /// the latest prompt, so that one session's own tools do not evict the prefix every other
    /// session shares.
    fn warm_up_ids(&self, ids: &[u32]) -> Result<(), LlmError> {
        self.inner.warm_ups.fetch_add(1, Ordering::Relaxed);
        if self.inner.server.is_some() {
            return block_on(self.warm_up_llama(ids))
                .map_err(|e| model_error(&self.inner.path, e))?;
        }
        let mut stats = GenerationStats::default();
        let started = Instant::now();
        self.inner
            .prefill(ids, &mut stats)
            .map_err(|e| model_error(&self.inner.path, e))?;
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !self.inner.pinned.swap(true, Ordering::Relaxed) {
            // The first warm-up prefix goes first, where it stays.
            let warm = cache.pop();
            cache.clear();
            cache.extend(warm);
        }
        tracing::debug!(
            tokens = ids.len(),
            ms = started.elapsed().as_millis() as u64,
            "local model warmed up"
        );
        Ok(())
    }

    /// [`Self::warm_up`] for a session, without blocking a thread. Each distinct system prefix
    /// is computed once per model: a session whose prefix was warmed returns at once, and one
    /// that arrives while it is computed waits for that computation. The computation waits
    /// for a worker like a completion ([`crate::compute`]). On llama.cpp it is a request to the
    /// server, which dropping the future cancels (another waiting session then computes it);
    /// on candle the prefill runs on the blocking pool.
    ///
    /// # Errors
    /// As [`Self::warm_up`]; [`LlmError::Busy`] when no worker came free in time.
    pub async fn warm_up_async(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(), LlmError> {
        let ids = self.system_ids(messages, tools)?;
        let key = {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            ids.hash(&mut hasher);
            hasher.finish()
        };
        let once = {
            let mut warmed = self.inner.warmed.lock().unwrap_or_else(|e| e.into_inner());
            warmed.entry(key).or_default().clone()
        };
        once.get_or_try_init(|| async {
            let _permit = self.inner.queue.enter().await?;
            if self.inner.server.is_some() {
                self.inner.warm_ups.fetch_add(1, Ordering::Relaxed);
                return self.warm_up_llama(&ids).await;
            }
            let model = self.clone();
            tokio::task::spawn_blocking(move || model.warm_up_ids(&ids))
                .await
                .unwrap_or_else(|e| {
                    Err(model_error(
                        &self.inner.path,
                        format!("warm-up thread: {e}"),
                    ))
                })
        })
        .await
        .map(|_| ())
    }

    /// How many system prefixes this model has computed in warm-ups since it was loaded.
    pub fn warm_ups(&self) -> usize {
        self.inner.warm_ups.load(Ordering::Relaxed)
    }

    /// The token ids of the system message alone: the system messages of `messages` and
    /// `tools`, without the assistant's header.
    fn system_ids(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<Vec<u32>, LlmError> {
        let system: Vec<ChatMessage> = messages
            .iter()
            .take_while(|m| m.role == Role::System)
            .cloned()
            .collect();
        let prompt = Self::render_prompt(
            self.inner.format,
            &system,
            tools,
            &self.inner.config.tool_examples,
        );
        let prefix = prompt.strip_suffix(ASSISTANT_HEADER).unwrap_or(&prompt);
        self.tokenize(prefix)
    }

    /// The warm-up on llama.cpp: the server keeps the prefix in a slot's cache
    /// (`cache_prompt`), where the next prompts that start with it find it.
    async fn warm_up_llama(&self, ids: &[u32]) -> Result<(), LlmError> {
        let Some(server) = &self.inner.server else {
            return Ok(());
        };
        let started = Instant::now();
        let body = serde_json::json!({"prompt": ids, "n_predict": 0, "cache_prompt": true});
        let done = server.complete(&body, &CancellationToken::new()).await?;
        tracing::debug!(
            tokens = ids.len(),
            cached = done.map_or(0, |d| d.timings.cached),
            ms = started.elapsed().as_millis() as u64,
            "local model warmed up (llama.cpp)"
        );
        Ok(())
    }

    /// The text of token ids (control tokens included).
    ///
    /// # Errors
    /// [`LlmError::Model`] when an id is not in the vocabulary.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, LlmError> {
        self.inner
            .tokenizer
            .decode(ids, false)
            .map_err(|e| model_error(&self.inner.path, e))
    }

    /// The id of a token written as text, such as `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// The prompt's token ids for `messages` and `tools`, and the tool-call grammar.
    ///
    /// # Errors
    /// [`LlmError::Model`] when the prompt cannot be tokenized, or with `max_tokens` does not
    /// fit the model's context.
    fn prepare(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(Vec<u32>, Option<ToolGrammar>), LlmError> {
        self.fit(messages, tools).map(|f| (f.ids, f.grammar))
    }

    /// What a completion of `messages` with `tools` would be given: the prompt's length in
    /// tokens and the names of the tools offered (all of them, or, when they do not all fit
    /// the context, the most relevant that do).
    ///
    /// # Errors
    /// As [`Self::stream`].
    pub fn offered(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(usize, Vec<String>), LlmError> {
        let fitted = self.fit(messages, tools)?;
        let names = fitted
            .tools
            .iter()
            .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
            .collect();
        Ok((fitted.ids.len(), names))
    }

    /// The prompt's ids, the grammar and the tools offered.
    fn fit(&self, messages: &[ChatMessage], tools: &FunctionTools) -> Result<Fitted, LlmError> {
        let max_new = self.inner.config.max_tokens as usize;
        let fits = |ids: &[u32]| ids.len() + max_new <= MAX_SEQ_LEN;
        let ids = self.prompt_ids(messages, tools)?;
        if fits(&ids) || tools.is_empty() {
            let (ids, grammar) = self.checked(ids, max_new, messages, tools)?;
            let tools = tools.to_vec();
            return Ok(Fitted {
                ids,
                grammar,
                tools,
            });
        }
        // Every tool does not fit: offer the ones the request most likely wants, as many as fit
        // (tool retrieval), rather than fail the turn.
        let request = messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        let ranked = tools_by_relevance(request, tools);
        let subset = |k: usize| -> Vec<Value> {
            let mut chosen: Vec<usize> = ranked[..k].to_vec();
            chosen.sort_unstable();
            chosen.into_iter().map(|i| tools[i].clone()).collect()
        };
        // The largest count that fits: `low` fits (or is 0), `high` does not.
        let (mut low, mut high) = (0, tools.len());
        let mut best = self.prompt_ids(messages, &[])?;
        while high - low > 1 {
            let middle = (low + high) / 2;
            let ids = self.prompt_ids(messages, &subset(middle))?;
            if fits(&ids) {
                (low, best) = (middle, ids);
            } else {
                high = middle;
            }
        }
        let chosen = subset(low);
        tracing::info!(
            offered = low,
            of = tools.len(),
            "tools chosen by relevance to the request, to fit the model's context"
        );
        let (ids, grammar) = self.checked(best, max_new, messages, &chosen)?;
        Ok(Fitted {
            ids,
            grammar,
            tools: chosen,
        })
    }

    fn prompt_ids(
        &self,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<Vec<u32>, LlmError> {
        let prompt = Self::render_prompt(
            self.inner.format,
            messages,
            tools,
            &self.inner.config.tool_examples,
        );
        tracing::trace!(%prompt, "local model prompt");
        self.tokenize(&prompt)
    }

    /// `ids` with the grammar for `tools`, or the error of a prompt too long even so.
    fn checked(
        &self,
        ids: Vec<u32>,
        max_new: usize,
        messages: &[ChatMessage],
        tools: &FunctionTools,
    ) -> Result<(Vec<u32>, Option<ToolGrammar>), LlmError> {
        if ids.len() + max_new > MAX_SEQ_LEN {
            return Err(model_error(
                &self.inner.path,
                format!(
                    "the prompt has {} tokens; with max_tokens {max_new} it exceeds the model's {MAX_SEQ_LEN}",
                    ids.len()
                ),
            ));
        }
        Ok((ids, self.grammar(messages, tools)))
    }

    /// The tool-call grammar for this request: none once a tool has answered (the last
    /// message is a tool result), so that a small model replies in words instead of calling
    /// again; a request gets at most one tool round from the local model.
    fn grammar(&self, messages: &[ChatMessage], tools: &FunctionTools) -> Option<ToolGrammar> {
        match messages.last() {
            Some(m) if m.role == Role::Tool => None,
            _ => ToolGrammar::with_opening(
                tools,
                self.string_rule(messages),
                self.inner.format.call_opening(),
            ),
        }
    }

    /// How string arguments may be written: spans of the last user message when
    /// `tool_strings_from_request` is on, else free strings of up to `tool_string_max_chars`.
    fn string_rule(&self, messages: &[ChatMessage]) -> StringRule {
        let config = &self.inner.config;
        let request = messages.iter().rev().find(|m| m.role == Role::User);
        match request {
            Some(m) if config.tool_strings_from_request => StringRule::SpansOf(m.content.clone()),
            _ => StringRule::Free {
                max_chars: config.tool_string_max_chars as usize,
            },
        }
    }

    /// Token ids of `text` (no special tokens added).
    ///
    /// # Errors
    /// [`LlmError::Model`] when the tokenizer fails.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        Ok(self
            .inner
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| model_error(&self.inner.path, e))?
            .get_ids()
            .to_vec())
    }
}

fn chatml(out: &mut String, role: &str, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str("<|im_end|>\n");
}

/// The tools section of the system message: each tool with its parameters, how to call one,
/// and the examples whose calls name an offered tool.
fn tools_prompt(tools: &FunctionTools, examples: &str) -> String {
    let mut out = String::from("You can call these tools:\n");
    for tool in tools {
        let function = tool.get("function").unwrap_or(tool);
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        let description = function
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("");
        let params: Vec<String> = function
            .get("parameters")
            .and_then(|p| p.get("properties"))
            .and_then(Value::as_object)
            .map(|p| {
                p.iter()
                    .map(|(k, v)| {
                        let t = match v.get("type") {
                            Some(Value::String(t)) => t.clone(),
                            Some(Value::Array(ts)) => ts
                                .iter()
                                .filter_map(Value::as_str)
                                .find(|t| *t != "null")
                                .unwrap_or("string")
                                .to_string(),
                            _ => "string".into(),
                        };
                        format!("{k}: {t}")
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!("- {name}({}): {description}\n", params.join(", ")));
    }
    out.push_str(&format!(
        "To call a tool, reply with only {TOOL_CALL_OPEN}{{\"name\": \"TOOL\", \"arguments\": {{...}}}}. Otherwise reply in plain words."
    ));
    let kept = offered_examples(examples, tools);
    if !kept.is_empty() {
        out.push_str("\n\nExamples:\n");
        out.push_str(&kept);
    }
    out
}

/// The tools section of a Qwen2.5 system message (its chat template's words), then the
/// examples whose calls name an offered tool, in Qwen's call format.
fn qwen_tools_prompt(tools: &FunctionTools, examples: &str) -> String {
    let mut out = String::from(
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        out.push('\n');
        out.push_str(&compact_tool(tool));
    }
    out.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
    let kept = offered_examples(examples, tools);
    if !kept.is_empty() {
        out.push_str("\n\nExamples:\n");
        for line in kept.lines() {
            match line.split_once(TOOL_CALL_OPEN) {
                Some((before, call)) => {
                    out.push_str(&format!("{before}<tool_call>\n{call}\n</tool_call>\n"))
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out.truncate(out.trim_end().len());
    }
    out
}

/// A function tool as one JSON line for a small model's prompt: name, the first sentence of the
/// description, and the parameters with only `type` (nullable types as their other type),
/// `description`, `enum`, `minimum`, `maximum` and `required` kept. (The full schemas of six
/// tools made Qwen's system message 691 tokens, each computed at about 30 tokens/s on 2 cores.)
fn compact_tool(tool: &Value) -> String {
    let function = tool.get("function").unwrap_or(tool);
    let text = |key: &str| function.get(key).and_then(Value::as_str).unwrap_or("");
    let description = first_sentence(text("description"));
    let parameters = function.get("parameters");
    let mut properties = serde_json::Map::new();
    if let Some(props) = parameters
        .and_then(|p| p.get("properties"))
        .and_then(Value::as_object)
    {
        for (name, schema) in props {
            let mut kept = serde_json::Map::new();
            let kind = match schema.get("type") {
                Some(Value::Array(kinds)) => kinds
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|k| *k != "null")
                    .map(|k| Value::String(k.to_string())),
                other => other.cloned(),
            };
            if let Some(kind) = kind {
                kept.insert("type".into(), kind);
            }
            for key in ["description", "enum", "minimum", "maximum"] {
                if let Some(v) = schema.get(key) {
                    let v = match (key, v) {
                        ("description", Value::String(d)) => Value::String(first_sentence(d)),
                        _ => v.clone(),
                    };
                    kept.insert(key.into(), v);
                }
            }
            properties.insert(name.clone(), Value::Object(kept));
        }
    }
    let mut params = serde_json::json!({"type": "object", "properties": properties});
    if let Some(required) = parameters.and_then(|p| p.get("required"))
        && required.as_array().is_some_and(|r| !r.is_empty())
    {
        params["required"] = required.clone();
    }
    format!(
        "{{\"type\": \"function\", \"function\": {{\"name\": {}, \"description\": {}, \"parameters\": {}}}}}",
        Value::String(text("name").to_string()),
        Value::String(description),
        params
    )
}

/// The first sentence of `text` (up to and with its first ". ").
fn first_sentence(text: &str) -> String {
    match text.find(". ") {
        Some(end) => text[..=end].to_string(),
        None => text.to_string(),
    }
}

/// The exchanges of `examples` (blocks of a `User:` line and the lines after it) whose tool
/// calls, if any, name an offered tool.
fn offered_examples(examples: &str, tools: &FunctionTools) -> String {
    let offered: Vec<&str> = tools
        .iter()
        .filter_map(|t| t.get("function").unwrap_or(t).get("name")?.as_str())
        .collect();
    let mut kept = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let flush = |block: &mut Vec<&str>, kept: &mut Vec<String>| {
        let text = block.join("\n");
        let calls_offered = text.match_indices(TOOL_CALL_OPEN).all(|(i, _)| {
            let call = &text[i + TOOL_CALL_OPEN.len()..];
            offered.iter().any(|name| {
                call.starts_with(&format!("{{\"name\": {}", Value::String(name.to_string())))
            })
        });
        if !text.trim().is_empty() && calls_offered {
            kept.push(text.trim().to_string());
        }
        block.clear();
    };
    for line in examples.lines() {
        if line.starts_with("User:") {
            flush(&mut block, &mut kept);
        }
        block.push(line);
    }
    flush(&mut block, &mut kept);
    kept.join("\n")
}

/// `ln softmax(logits)[index]`.
fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits[index] - max - sum.ln()
}

/// Index of the largest value among `allowed` (all when `None`).
fn argmax(logits: &[f32], allowed: impl Iterator<Item = usize>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for i in allowed {
        let v = logits[i];
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

impl Inner {
    /// The stream's last event for a generation's `result` (logged, and counted in the
    /// metrics): `Done` with the usage, or the error; `None` when it was cancelled.
    fn last_event(
        &self,
        result: Result<Option<(String, GenerationStats)>, String>,
    ) -> Option<Result<LlmEvent, LlmError>> {
        match result {
            Ok(Some((finish_reason, stats))) => {
                tracing::debug!(
                    engine = if self.server.is_some() {
                        "llama.cpp"
                    } else {
                        "candle"
                    },
                    prompt_tokens = stats.prompt_tokens,
                    cached = stats.cached_tokens,
                    generated = stats.generated_tokens,
                    prefill_ms = format!("{:.0}", stats.prefill_ms),
                    decode_tok_s = format!("{:.1}", stats.decode_tokens_per_s()),
                    "local model reply"
                );
                crate::metrics::get()
                    .llm_tokens(stats.prompt_tokens as u64, stats.generated_tokens as u64);
                Some(Ok(LlmEvent::Done {
                    finish_reason,
                    usage: Some(Usage {
                        prompt_tokens: stats.prompt_tokens as u64,
                        completion_tokens: stats.generated_tokens as u64,
                    }),
                }))
            }
            Ok(None) => None, // cancelled or the receiver is gone
            Err(e) => Some(Err(model_error(&self.path, e))),
        }
    }

    /// Runs `ids` through `model` from position `pos`: the logits for the token after them.
    fn forward(&self, model: &mut Weights, ids: &[u32], pos: usize) -> Result<Vec<f32>, String> {
        let input = Tensor::new(ids, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| e.to_string())?;
        let logits = model.forward(&input, pos).map_err(|e| e.to_string())?;
        logits
            .squeeze(0)
            .and_then(|l| l.to_dtype(candle_core::DType::F32))
            .and_then(|l| l.to_vec1())
            .map_err(|e| e.to_string())
    }

    /// Writes `forced` (text the grammar requires) into the call: its tokens are fed to the
    /// model, except, for Qwen, the last one, whose text goes to `heal` for the model to choose
    /// a token that starts with it. SmolLM2 is fed every token, one at a time.
    #[allow(clippy::too_many_arguments)]
    fn force(
        &self,
        grammar: &ToolGrammar,
        cursor: &mut Cursor,
        state: &mut GrammarState,
        text: &mut String,
        heal: &mut String,
        forced: &str,
        stats: &mut GenerationStats,
    ) -> Result<(), String> {
        let mut ids = self
            .tokenizer
            .encode_fast(forced, false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec();
        let mut fed = forced.to_string();
        if self.format == ChatFormat::Qwen
            && let Some(&last) = ids.last()
            && let Some(kept) = fed.strip_suffix(self.token_text[last as usize].as_str())
        {
            *heal = self.token_text[last as usize].clone();
            fed = kept.to_string();
            ids.pop();
        }
        *state = grammar
            .advance_str(state, &fed)
            .ok_or("the grammar refused forced text")?;
        text.push_str(&fed);
        self.feed(cursor, &ids)?;
        stats.generated_tokens += ids.len();
        Ok(())
    }

    /// Feeds `ids` at the cursor: in one batch where the model can run several tokens after a
    /// cached state (Qwen2), else one at a time.
    fn feed(&self, cursor: &mut Cursor, ids: &[u32]) -> Result<(), String> {
        match cursor.model {
            Weights::Qwen2(_) if !ids.is_empty() => {
                cursor.logits = self.forward(&mut cursor.model, ids, cursor.pos)?;
                cursor.pos += ids.len();
            }
            _ => {
                for &id in ids {
                    self.step(cursor, id)?;
                }
            }
        }
        Ok(())
    }

    /// Feeds one token at the cursor.
    fn step(&self, cursor: &mut Cursor, id: u32) -> Result<(), String> {
        cursor.logits = self.forward(&mut cursor.model, &[id], cursor.pos)?;
        cursor.pos += 1;
        Ok(())
    }

    /// The cursor after `ids`: from the longest cached prompt that starts `ids`, feeding the
    /// rest one token at a time, or from scratch in one batch when that is cheaper. The state
    /// after `ids` is cached for the next call (whose prompt usually extends this one).
    fn prefill(&self, ids: &[u32], stats: &mut GenerationStats) -> Result<Cursor, String> {
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .filter(|c| ids.starts_with(&c.ids))
                .max_by_key(|c| c.ids.len())
                .cloned()
        };
        // candle's llama runs several tokens at once only from position 0, and one at a time
        // costs about twice a batched token: resume when that is still cheaper. Qwen2 runs the
        // rest after a cached prompt in one batch.
        let weights = self
            .weights
            .as_ref()
            .ok_or("the model's weights are not loaded (llama.cpp runs it)")?;
        let resume = |c: &CachedPrompt| match weights {
            Weights::Llama(_) => (ids.len() - c.ids.len()) * 2 < ids.len(),
            Weights::Qwen2(_) => !c.ids.is_empty(),
        };
        let cursor = match cached {
            Some(c) if resume(&c) => {
                let mut cursor = c.cursor;
                self.feed(&mut cursor, &ids[c.ids.len()..])?;
                stats.cached_tokens = c.ids.len();
                cursor
            }
            _ => {
                let mut model = weights.clone();
                let logits = self.forward(&mut model, ids, 0)?;
                Cursor {
                    model,
                    logits,
                    pos: ids.len(),
                }
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the first entry (the warm-up prefix, once there is one) and the latest prompt.
        cache.truncate(1);
        cache.push(CachedPrompt {
            ids: ids.to_vec(),
            cursor: cursor.clone(),
        });
        Ok(cursor)
    }

    /// Tokens allowed after `state`, as indices: a walk of the vocabulary's trie that drops a
    /// whole subtree as soon as its prefix leaves the grammar.
    fn allowed(&self, grammar: &ToolGrammar, state: &GrammarState) -> Vec<usize> {
        let mut allowed = Vec::new();
        let mut stack = vec![(0u32, state.clone())];
        while let Some((node, state)) = stack.pop() {
            for &(c, child) in &self.trie[node as usize].children {
                let next = grammar.advance(&state, c);
                if next.is_dead() {
                    continue;
                }
                allowed.extend(self.trie[child as usize].tokens.iter().map(|&t| t as usize));
                stack.push((child, next));
            }
        }
        allowed
    }

    /// Generates a reply to the prompt `ids`, sending events on `tx`. Returns the finish
    /// reason and timings, or `None` when cancelled or the receiver went away.
    fn generate(
        &self,
        ids: &[u32],
        grammar: Option<&ToolGrammar>,
        tx: &mpsc::Sender<Result<LlmEvent, LlmError>>,
        cancel: &CancellationToken,
    ) -> Result<Option<(String, GenerationStats)>, String> {
        let mut stats = GenerationStats {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        let started = Instant::now();
        let mut cursor = self.prefill(ids, &mut stats)?;
        stats.prefill_ms = started.elapsed().as_secs_f64() * 1000.0;
        let decode_started = Instant::now();
        let max_new = self.config.max_tokens as usize;

        // The first token chooses: a tool call, or text.
        if let Some(grammar) = grammar
            && self.starts_tool_call(grammar, &cursor.logits)
        {
            let call = self.decode_call(grammar, &mut cursor, max_new, &mut stats, cancel)?;
            stats.decode_ms = decode_started.elapsed().as_secs_f64() * 1000.0;
            let Some(call) = call else { return Ok(None) };
            if tx.blocking_send(Ok(LlmEvent::ToolCall(call))).is_err() {
                return Ok(None);
            }
            return Ok(Some(("tool_calls".into(), stats)));
        }

        let temperature = f64::from(self.config.temperature);
        let sampling = if temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::All { temperature }
        };
        let mut sampler = LogitsProcessor::from_sampling(SEED, sampling);
        // A reply in words does not start with markup.
        for id in 0..self.token_text.len() {
            if self.starts_markup(id) {
                cursor.logits[id] = f32::NEG_INFINITY;
            }
        }
        let mut generated: Vec<u32> = Vec::new();
        let mut sent = 0; // bytes of the decoded text already sent
        let mut finish = "length";
        while generated.len() < max_new {
            if cancel.is_cancelled() || tx.is_closed() {
                return Ok(None);
            }
            let tensor =
                Tensor::new(cursor.logits.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
            let mut next = sampler.sample(&tensor).map_err(|e| e.to_string())?;
            // Control tokens other than the stops end the reply too.
            if self.token_text[next as usize].is_empty() && !self.stop.contains(&next) {
                next = self.stop[0];
            }
            if self.stop.contains(&next) {
                finish = "stop";
                break;
            }
            generated.push(next);
            stats.generated_tokens += 1;
            if let Some(delta) = self.text_delta(&generated, &mut sent)?
                && tx.blocking_send(Ok(LlmEvent::Text(delta))).is_err()
            {
                return Ok(None);
            }
            if generated.len() < max_new {
                self.step(&mut cursor, next)?;
            }
        }
        stats.decode_ms = decode_started.elapsed().as_secs_f64() * 1000.0;
        Ok(Some((finish.into(), stats)))
    }

    /// [`Self::generate`] on llama.cpp's server, in up to two requests after the prompt's:
    /// 1. the first token alone (`n_predict` 1), with the [`FIRST_TOKEN_CHOICES`] most likely
    ///    ones: a tool call or text, as [`Self::starts_tool_call`] decides (a tool start
    ///    outside that list is taken to be too unlikely);
    /// 2. a tool call: the call opening fed after the prompt, then the call decoded greedily
    ///    under the tool grammar as GBNF; or text: the most likely first token that does not
    ///    start markup (greedy, whatever the temperature), then the rest streamed at the
    ///    configured temperature, detokenized here so that a character split over tokens is
    ///    sent whole.
    async fn generate_llama(
        &self,
        ids: &[u32],
        grammar: Option<&ToolGrammar>,
        tx: &mpsc::Sender<Result<LlmEvent, LlmError>>,
        cancel: &CancellationToken,
    ) -> Result<Option<(String, GenerationStats)>, String> {
        let server = self.server.as_ref().ok_or("llama.cpp is not the engine")?;
        let mut stats = GenerationStats {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        let max_new = self.config.max_tokens as usize;
        let first = server
            .complete(
                &serde_json::json!({
                    "prompt": ids, "n_predict": 1, "n_probs": FIRST_TOKEN_CHOICES,
                    "temperature": 0.0, "cache_prompt": true,
                }),
                cancel,
            )
            .await
            .map_err(reason)?;
        let Some(first) = first else { return Ok(None) };
        stats.cached_tokens = first.timings.cached;
        stats.prefill_ms = first.timings.prompt_ms;
        let top = first.top.into_iter().next().unwrap_or_default();
        if top.is_empty() {
            return Err("llama-server sent no token probabilities (n_probs)".into());
        }
        let decode_started = Instant::now();

        if let Some(grammar) = grammar {
            let mut logits = vec![f32::NEG_INFINITY; self.token_text.len()];
            for t in &top {
                if let Some(l) = logits.get_mut(t.id as usize) {
                    *l = t.logprob;
                }
            }
            if self.starts_tool_call(grammar, &logits) {
                // The opening and the text every call goes on with (`{"name": "`) are fed
                // with the prompt, but for their last token, which the model writes under the
                // grammar (so that it is tokenized as the model would write it).
                let opening = self.format.call_opening();
                let forced = grammar.forced_text(&grammar.start());
                let mut fed: Vec<u32> = self
                    .tokenizer
                    .encode_fast(forced.as_str(), false)
                    .map_err(|e| e.to_string())?
                    .get_ids()
                    .to_vec();
                fed.pop();
                let fed_text = self
                    .tokenizer
                    .decode(&fed, false)
                    .map_err(|e| e.to_string())?;
                let state = grammar
                    .advance_str(&grammar.start(), &fed_text)
                    .ok_or("the grammar refused the call's opening")?;
                let mut prompt = ids.to_vec();
                prompt.extend(&fed);
                let call = server
                    .complete(
                        &serde_json::json!({
                            "prompt": prompt, "n_predict": max_new, "temperature": 0.0,
                            "grammar": grammar.gbnf(&state), "cache_prompt": true,
                        }),
                        cancel,
                    )
                    .await
                    .map_err(reason)?;
                let Some(call) = call else { return Ok(None) };
                stats.generated_tokens = prompt.len() - ids.len() + call.timings.predicted_n;
                stats.decode_ms = decode_started.elapsed().as_secs_f64() * 1000.0;
                let text = format!("{fed_text}{}", call.content);
                if !grammar.accepts(&text) {
                    return Err(format!(
                        "the tool call did not finish within max_tokens ({max_new}): {text}"
                    ));
                }
                let json = text
                    .strip_prefix(opening)
                    .ok_or("the tool call lost its opening tag")?;
                let value: Value =
                    serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
                let call = ToolCallRequest {
                    id: format!("call_{}", stats.prompt_tokens + stats.generated_tokens),
                    name: value["name"].as_str().unwrap_or_default().to_string(),
                    arguments: value["arguments"].to_string(),
                };
                if tx.send(Ok(LlmEvent::ToolCall(call))).await.is_err() {
                    return Ok(None);
                }
                return Ok(Some(("tool_calls".into(), stats)));
            }
        }

        // Text.
        let Some(first_id) = top
            .iter()
            .map(|t| t.id)
            .find(|&id| !self.starts_markup(id as usize))
        else {
            return Ok(Some(("stop".into(), stats)));
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut sent = 0; // bytes of the decoded text already sent
        let mut finish = "length";
        let mut next_ids = vec![first_id];
        let mut pieces = None;
        'reply: loop {
            for id in next_ids.drain(..) {
                let control = self
                    .token_text
                    .get(id as usize)
                    .is_none_or(String::is_empty);
                if self.stop.contains(&id) || control {
                    finish = "stop";
                    break 'reply;
                }
                generated.push(id);
                stats.generated_tokens += 1;
                if let Some(delta) = self.text_delta(&generated, &mut sent)?
                    && tx.send(Ok(LlmEvent::Text(delta))).await.is_err()
                {
                    return Ok(None);
                }
                if generated.len() >= max_new {
                    break 'reply;
                }
            }
            if pieces.is_none() {
                let mut prompt = ids.to_vec();
                prompt.push(first_id);
                let body = serde_json::json!({
                    "prompt": prompt, "n_predict": max_new - 1,
                    "temperature": self.config.temperature, "seed": SEED,
                    "cache_prompt": true,
                });
                match server.stream(&body, cancel).await.map_err(reason)? {
                    Some(p) => pieces = Some(p),
                    None => return Ok(None),
                }
            }
            let Some(stream) = pieces.as_mut() else {
                break;
            };
            match stream.next(cancel).await.map_err(reason)? {
                None if cancel.is_cancelled() => return Ok(None),
                None => break,
                Some(piece) => {
                    next_ids = piece.tokens;
                    if let Some((stop_type, _)) = &piece.end
                        && stop_type != "limit"
                    {
                        finish = "stop";
                    }
                }
            }
            if tx.is_closed() {
                return Ok(None);
            }
        }
        stats.decode_ms = decode_started.elapsed().as_secs_f64() * 1000.0;
        Ok(Some((finish.into(), stats)))
    }

    /// The text of `generated` past its first `sent` bytes, which it advances; `None` while
    /// nothing new is whole (a partial UTF-8 sequence is held back until its last byte).
    fn text_delta(&self, generated: &[u32], sent: &mut usize) -> Result<Option<String>, String> {
        let text = self
            .tokenizer
            .decode(generated, false)
            .map_err(|e| e.to_string())?;
        if text.len() <= *sent || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = text[*sent..].to_string();
        *sent = text.len();
        Ok(Some(delta))
    }

    /// Whether token `id` starts markup, which a reply in words does not start with: a tool
    /// call written out, a tag, a JSON object or a code block (after a tool's answer, or when
    /// sampling picks a less likely first token, Qwen writes a call out as JSON, or in a
    /// fenced block).
    fn starts_markup(&self, id: usize) -> bool {
        self.token_text
            .get(id)
            .is_some_and(|text| text.trim_start().starts_with(['<', '{', '[', '`']))
    }

    /// Whether the reply starts with a tool call: the most likely token that can start one,
    /// given `tool_call_bias` more logits, is at least as likely as the most likely token.
    fn starts_tool_call(&self, grammar: &ToolGrammar, logits: &[f32]) -> bool {
        let mut tool_starts = self.allowed(grammar, &grammar.start());
        // Qwen often starts a call with its JSON object and no tag: such a start is a call too
        // (the tag is then written by the decoder).
        if self.format == ChatFormat::Qwen {
            tool_starts.extend(
                self.token_text
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.starts_with("{\""))
                    .map(|(id, _)| id),
            );
        }
        let best = argmax(logits, 0..logits.len()).unwrap_or(0);
        let tool_starts: std::collections::HashSet<usize> = tool_starts.into_iter().collect();
        let Some(best_tool) = argmax(logits, tool_starts.iter().copied()) else {
            return false;
        };
        let best_text = argmax(
            logits,
            (0..logits.len()).filter(|i| !tool_starts.contains(i)),
        );
        let bias = self.config.tool_call_bias.unwrap_or(match self.format {
            ChatFormat::SmolLm => 3.0,
            ChatFormat::Qwen => 0.0,
        });
        let choose = logits[best_tool] + bias >= logits[best];
        tracing::debug!(
            best = %self.token_text[best],
            gap = logits[best] - logits[best_tool],
            margin = best_text.map(|t| logits[best_tool] - logits[t]),
            bias,
            tool_call = choose,
            "first token: text or tool call"
        );
        choose
    }

    /// Decodes a tool call under `grammar` from `cursor` (at the reply's first token). The
    /// opening `<tool_call>{"name": "` is written as is. With SmolLM2 the tool is the offered
    /// name the model finds most likely as a whole (the sum of its tokens' log-probabilities: a
    /// 135M model's first name token alone picks poorly); with Qwen the name is decoded greedily
    /// under the mask like the rest. Text the grammar forces (`", "arguments": {"` after a
    /// name, a sole property's key) is written without asking the model; Qwen runs it in one
    /// batch. `None` when cancelled.
    fn decode_call(
        &self,
        grammar: &ToolGrammar,
        cursor: &mut Cursor,
        max_new: usize,
        stats: &mut GenerationStats,
        cancel: &CancellationToken,
    ) -> Result<Option<ToolCallRequest>, String> {
        let tokenize = |text: &str| -> Result<Vec<u32>, String> {
            Ok(self
                .tokenizer
                .encode_fast(text, false)
                .map_err(|e| e.to_string())?
                .get_ids()
                .to_vec())
        };
        let opening = self.format.call_opening();
        let mut text = String::new();
        let mut state = grammar.start();
        // Text the model must write next but whose last token it chooses itself (with what
        // follows), so that forced text is tokenized as the model would write it ("token
        // healing": ` {` fed alone before `"query"` made Qwen close the object instead).
        let mut heal = String::new();
        let forced = format!("{opening}{{\"name\": \"");
        self.force(
            grammar, cursor, &mut state, &mut text, &mut heal, &forced, stats,
        )?;
        if self.format == ChatFormat::SmolLm {
            // Score each name (with its closing quote) from the same state.
            let mut best: Option<(f32, String, Cursor)> = None;
            for name in grammar.names() {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                let quoted = Value::String(name.clone()).to_string();
                let piece = &quoted[1..];
                let mut candidate = cursor.clone();
                let mut score = 0.0;
                for id in tokenize(piece)? {
                    score += log_softmax_at(&candidate.logits, id as usize);
                    self.step(&mut candidate, id)?;
                }
                tracing::debug!(tool = %name, score, "tool name score");
                if best.as_ref().is_none_or(|(b, ..)| score > *b) {
                    best = Some((score, piece.to_string(), candidate));
                }
            }
            let (_, piece, chosen) = best.ok_or("no tool name to choose")?;
            stats.generated_tokens += chosen.pos - cursor.pos;
            *cursor = chosen;
            state = grammar
                .advance_str(&state, &piece)
                .ok_or("the grammar refused an offered name")?;
            text.push_str(&piece);
        }
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            if stats.generated_tokens >= max_new {
                return Err(format!(
                    "the tool call did not finish within max_tokens ({max_new}): {text}"
                ));
            }
            let forced = grammar.forced_text(&state);
            if heal.is_empty() && !forced.is_empty() && self.format == ChatFormat::Qwen {
                let probe = grammar
                    .advance_str(&state, &forced)
                    .ok_or("the grammar refused its own forced text")?;
                if grammar.is_complete(&probe) {
                    text.push_str(&forced);
                    break;
                }
                self.force(
                    grammar, cursor, &mut state, &mut text, &mut heal, &forced, stats,
                )?;
                continue;
            }
            let allowed = self
                .allowed(grammar, &state)
                .into_iter()
                .filter(|&t| self.token_text[t].starts_with(heal.as_str()));
            let next = argmax(&cursor.logits, allowed)
                .ok_or_else(|| format!("no token can continue the tool call {text:?}"))?;
            heal.clear();
            let piece = &self.token_text[next];
            state = grammar
                .advance_str(&state, piece)
                .ok_or("the tool-call mask let an invalid token through")?;
            text.push_str(piece);
            stats.generated_tokens += 1;
            if grammar.is_complete(&state) {
                break;
            }
            self.step(cursor, next as u32)?;
        }
        let json = text
            .strip_prefix(opening)
            .ok_or("the tool call lost its opening tag")?;
        let call: Value = serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
        Ok(Some(ToolCallRequest {
            id: format!("call_{}", stats.prompt_tokens + stats.generated_tokens),
            name: call["name"].as_str().unwrap_or_default().to_string(),
            arguments: call["arguments"].to_string(),
        }))
    }
}
/// A prompt that fits the context: its token ids, the tool-call grammar, the tools offered.
struct Fitted {
    ids: Vec<u32>,
    grammar: Option<ToolGrammar>,
    tools: Vec<Value>,
}

/// Words that say nothing about which tool a request wants.
const STOP_WORDS: &[&str] = &[
    "the", "and", "for", "you", "can", "please", "what", "with", "this", "that", "from", "some",
    "set", "get", "are", "how", "its", "into", "about", "tool", "tools", "when", "will", "your",
];

/// The words of `text` that can tell tools apart: lowercased, split at anything but letters and
/// digits and at camelCase humps, at least three characters, no stop words.
fn words(text: &str) -> std::collections::BTreeSet<String> {
    let mut spaced = String::with_capacity(text.len() + 8);
    let mut previous_lower = false;
    for c in text.chars() {
        if c.is_uppercase() && previous_lower {
            spaced.push(' ');
        }
        previous_lower = c.is_lowercase();
        spaced.push(if c.is_alphanumeric() { c } else { ' ' });
    }
    spaced
        .split_whitespace()
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() >= 3 && !STOP_WORDS.contains(&w.as_str()))
        .collect()
}

/// The tools in order of relevance to `request` (indices into `tools`): a request word in a
/// tool's name counts 2, in its description 1; ties keep the offered order, so the runtime's
/// own tools, offered first, come first among equals.
pub fn tools_by_relevance(request: &str, tools: &FunctionTools) -> Vec<usize> {
    let wanted = words(request);
    let mut scored: Vec<(usize, usize)> = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let function = &tool["function"];
            let name = words(function["name"].as_str().unwrap_or_default());
            let description = words(function["description"].as_str().unwrap_or_default());
            let score = wanted
                .iter()
                .map(|w| 2 * usize::from(name.contains(w)) + usize::from(description.contains(w)))
                .sum();
            (i, score)
        })
        .collect();
    scored.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().map(|(i, _)| i).collect()
}
