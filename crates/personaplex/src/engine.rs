//! Loading PersonaPlex and running it: the system prompts, then one 80 ms step per frame of the
//! user's audio, full duplex.
//!
//! Streams and delays (the fork's `_lm_kwargs.delays`, ARCHITECTURE §6): 17 token streams, text, the
//! agent's 8 codebooks, the user's 8; text and each codebook 0 have delay 0, the other codebooks
//! delay 1. Step `c` reads token column `c` and writes column `c + 1`; frame `f` of a stream is
//! its codebook 0 in column `f` and its other codebooks in column `f + 1`, so the agent's frame
//! `c` is complete after step `c`, aligned with the user's frame `c`. Columns before a stream's
//! delay hold the initial tokens (text: `text_card`, audio: `card`, the padding token).
//! Tokens the prompts provide (text and both streams' audio) go into the columns of their frame,
//! as the fork's `prepare_step_input` writes them.
//!
//! A voice prompt is a recording (PCM) encoded with Mimi or the repo's `.pt` file
//! ([`super::voice`]): the inputs of all but the last voice frame as embeddings, then the token
//! columns the last frame reads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use super::arch::{Arch, PyTorchLayout};
use super::tokenizer::TextTokenizer;
use super::voice::VoiceEmbeddings;
use super::{DuplexError, FRAME_SAMPLES, MIMI_FILE, MODEL_FILE, SAMPLE_RATE, TOKENIZER_FILE};

/// The text pad token (the fork's `existing_text_padding_id`): "nothing said this frame".
pub const TEXT_PAD: u32 = 3;
/// Mimi codes of an 80 ms frame of silence with PersonaPlex's Mimi: the agent's audio during
/// the silence and text prompts (the fork's `SILENCE_TOKENS`, `moshi/models/lm.py`).
pub const SILENCE_TOKENS: [u32; 8] = [948, 243, 1178, 546, 1736, 1030, 1978, 2008];
/// Mimi codes of an 80 ms frame of a 440 Hz tone with PersonaPlex's Mimi: the user's audio
/// during every system prompt (the fork's `SINE_TOKENS`, `moshi/models/lm.py`).
pub const SINE_TOKENS: [u32; 8] = [430, 1268, 381, 1611, 1095, 1495, 56, 472];

/// Frames of silence around the text prompt (0.5 s at 12.5 Hz, ARCHITECTURE §6).
pub const SILENCE_FRAMES: usize = 6;

/// Token streams: text, then the agent's codebooks, then the user's.
fn streams(arch: &Arch) -> usize {
    1 + 2 * arch.codebooks
}

/// Sampling temperatures and top-k (the reference server's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSettings {
    /// Text temperature.
    pub text_temperature: f64,
    /// Text top-k.
    pub text_top_k: usize,
    /// Audio temperature.
    pub audio_temperature: f64,
    /// Audio top-k.
    pub audio_top_k: usize,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self {
            text_temperature: 0.7,
            text_top_k: 25,
            audio_temperature: 0.8,
            audio_top_k: 250,
        }
    }
}

/// A voice to speak in.
#[derive(Debug, Clone, PartialEq)]
pub enum VoicePrompt {
    /// The repo's `.pt` voice prompt file ([`super::voice`]): the model's inputs for the voice,
    /// computed once.
    Embeddings(PathBuf),
    /// A recording of the voice: mono PCM at [`SAMPLE_RATE`] (at least one sample), encoded
    /// with Mimi and fed as the agent's audio before the conversation.
    Audio(Vec<f32>),
}

/// What conditions a conversation: the voice, the role, the random seed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    /// The voice to speak in; none: the model's own.
    pub voice: Option<VoicePrompt>,
    /// The role, wrapped in `<system>` tokens and fed one token per frame.
    pub text: Option<String>,
    /// Seed of the samplers.
    pub seed: u64,
    /// Sampling settings.
    pub sampling: SamplingSettings,
}

/// One step's output: 80 ms of the agent's voice and the text it chose.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// [`FRAME_SAMPLES`] mono samples at [`SAMPLE_RATE`]; silence while the model has no complete
    /// frame yet.
    pub pcm: Vec<f32>,
    /// The text token's piece (`" hello"`), empty for padding.
    pub text: String,
}

/// [`SILENCE_TOKENS`] and [`SINE_TOKENS`] when `arch` has PersonaPlex's Mimi (2048 entries,
/// 8 codebooks), whose codes they are.
fn fixed_prompt_codes(arch: &Arch) -> Option<(Vec<u32>, Vec<u32>)> {
    (arch.card == 2048 && arch.codebooks == SILENCE_TOKENS.len())
        .then(|| (SILENCE_TOKENS.to_vec(), SINE_TOKENS.to_vec()))
}

/// A loaded PersonaPlex: the LM, Mimi and the text tokenizer, on one device.
pub struct Engine {
    arch: Arch,
    lm: moshi::lm::LmModel,
    mimi: moshi::mimi::Mimi,
    tokenizer: TextTokenizer,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

impl Engine {
    /// Loads the model in `dir` (the Hugging Face repo's file names; [`Arch::of_dir`]) onto
    /// `device`, the LM's weights in `dtype` (Mimi in f32).
    ///
    /// # Errors
    /// [`DuplexError::MissingFile`] naming the first absent file; [`DuplexError::Load`] when a
    /// file has the wrong tensors or shapes.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, DuplexError> {
        let file = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(DuplexError::MissingFile(path))
            }
        };
        let (model, mimi_file, tokenizer_file) =
            (file(MODEL_FILE)?, file(MIMI_FILE)?, file(TOKENIZER_FILE)?);
        let arch = Arch::of_dir(dir).map_err(|e| DuplexError::Load {
            file: dir.join(super::arch::ARCH_FILE),
            reason: e.to_string(),
        })?;
        let load_error = |file: &Path| {
            let file = file.to_path_buf();
            move |e: candle_core::Error| DuplexError::Load {
                file: file.clone(),
                reason: e.to_string(),
            }
        };
        let backend = PyTorchLayout::open(&model, &arch).map_err(load_error(&model))?;
        let vb = candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let lm = moshi::lm::LmModel::new(
            &arch.lm_config(),
            moshi::nn::MaybeQuantizedVarBuilder::Real(vb),
        )
        .map_err(load_error(&model))?;
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let mimi_vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&mimi_file], DType::F32, device)
        }
        .map_err(load_error(&mimi_file))?;
        let mimi =
            moshi::mimi::Mimi::new(arch.mimi_config(), mimi_vb).map_err(load_error(&mimi_file))?;
        let tokenizer = TextTokenizer::load(&tokenizer_file)?;
        Ok(Self {
            arch,
            lm,
            mimi,
            tokenizer,
            device: device.clone(),
            dtype,
            dir: dir.to_path_buf(),
        })
    }

    /// The model's shapes.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The device the model is on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The LM weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Starts a conversation: resets every stream state and runs the system prompts (voice, 0.5 s
    /// silence, the `<system>`-wrapped text one token per frame, 0.5 s silence).
    ///
    /// # Errors
    /// [`DuplexError::Audio`] when the voice file cannot be read or does not fit the model;
    /// [`DuplexError::Compute`].
    pub fn start(&mut self, prompt: &Prompt) -> Result<Session<'_>, DuplexError> {
        let voice =
            match &prompt.voice {
                Some(VoicePrompt::Embeddings(path)) => Some(Voice::Embeddings(
                    VoiceEmbeddings::read(path, &self.arch, &self.device, self.dtype)?,
                )),
                Some(VoicePrompt::Audio(pcm)) => Some(Voice::Frames(self.voice_frames(pcm)?)),
                None => None,
            };
        let text_tokens = match prompt.text.as_deref().map(str::trim) {
            Some(text) if !text.is_empty() => {
                self.tokenizer.encode(&format!("<system> {text} <system>"))
            }
            _ => Vec::new(),
        };
        // A previous conversation's streaming state goes.
        self.lm.reset_state();
        self.mimi.reset_state();
        let (silence, sine) = self.prompt_codes()?;
        let mut session = Session::new(self, prompt.seed, prompt.sampling);
        match voice {
            Some(Voice::Frames(frames)) => {
                for frame in &frames {
                    session.step_tokens(Some(&sine), Some(frame), Some(TEXT_PAD), false)?;
                }
            }
            Some(Voice::Embeddings(voice)) => session.replay(&voice)?,
            None => {}
        }
        // 0.5 s of silence, the role one token per frame, 0.5 s of silence; the agent silent,
        // the user a tone.
        let texts: Vec<u32> = std::iter::repeat_n(TEXT_PAD, SILENCE_FRAMES)
            .chain(text_tokens)
            .chain(std::iter::repeat_n(TEXT_PAD, SILENCE_FRAMES))
            .collect();
        for (i, &text) in texts.iter().enumerate() {
            // The last prompt step predicts the conversation's first column.
            let predict = i + 1 == texts.len();
            session.step_tokens(Some(&sine), Some(&silence), Some(text), predict)?;
        }
        Ok(session)
    }

    /// Computes the `.pt` voice prompt of a recording ([`SAMPLE_RATE`] mono PCM; what the fork writes with
    /// `save_voice_prompt_embeddings`): the LM's input embeddings of every voice frame but the
    /// last, and the token columns the last one reads. Starting with it gives the same
    /// conversation as starting with the audio.
    ///
    /// # Errors
    /// [`DuplexError::Audio`] for unreadable or empty audio; [`DuplexError::Load`] when the
    /// embedding tables cannot be read; [`DuplexError::Compute`].
    pub fn voice_embeddings(&mut self, audio: &[f32]) -> Result<VoiceEmbeddings, DuplexError> {
        let frames = self.voice_frames(audio)?;
        let (_, sine) = self.prompt_codes()?;
        let model = self.dir.join(MODEL_FILE);
        let load_error = |e: candle_core::Error| DuplexError::Load {
            file: model.clone(),
            reason: e.to_string(),
        };
        let backend = PyTorchLayout::open(&model, &self.arch).map_err(load_error)?;
        let vb =
            candle_nn::VarBuilder::from_backend(Box::new(backend), self.dtype, self.device.clone());
        let table = |name: &str, rows: usize| {
            vb.get((rows, self.arch.dim), name)
                .map(|t| candle_nn::Embedding::new(t, self.arch.dim))
                .map_err(load_error)
        };
        let text_emb = table("text_emb.weight", self.arch.text_card + 1)?;
        let audio_embs = (0..2 * self.arch.codebooks)
            .map(|i| table(&format!("emb.{i}.weight"), self.arch.card + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let mut session = Session::new(self, 0, SamplingSettings::default());
        let (last, before) = frames.split_last().expect("voice_frames is never empty");
        let mut embeddings = Vec::with_capacity(before.len());
        for frame in before {
            let input = session.prepare(Some(&sine), Some(frame), Some(TEXT_PAD));
            let device = &session.engine.device;
            let id = |t: u32| Tensor::from_vec(vec![t], (1, 1), device);
            // The sum forward_cond makes, in its order: text, then each audio stream.
            let mut sum = candle_core::Module::forward(&text_emb, &id(input[0])?)?;
            for (emb, &t) in audio_embs.iter().zip(&input[1..]) {
                sum = (sum + candle_core::Module::forward(emb, &id(t)?)?)?;
            }
            embeddings.push(sum);
            session.advance();
        }
        session.prepare(Some(&sine), Some(last), Some(TEXT_PAD));
        let columns = [session.cur.clone(), session.next.clone()];
        let embeddings = if embeddings.is_empty() {
            Tensor::zeros((0, 1, 1, self.arch.dim), self.dtype, &self.device)?
        } else {
            Tensor::stack(&embeddings, 0)?
        };
        VoiceEmbeddings::new(embeddings, &columns)
    }

    /// The Mimi codes of a voice prompt's audio ([`SAMPLE_RATE`] mono), one vector per 80 ms
    /// frame (at least one).
    fn voice_frames(&mut self, pcm: &[f32]) -> Result<Vec<Vec<u32>>, DuplexError> {
        if pcm.is_empty() {
            return Err(DuplexError::Audio("the voice prompt has no audio".into()));
        }
        self.encode_all(pcm)
    }

    /// The agent's silence frame and the user's tone frame for the system prompts: the fork's
    /// fixed codes with PersonaPlex's Mimi (2048 entries, 8 codebooks); another Mimi (test
    /// models) encodes silence and a 440 Hz tone of amplitude 0.5 itself.
    fn prompt_codes(&mut self) -> Result<(Vec<u32>, Vec<u32>), DuplexError> {
        if let Some(fixed) = fixed_prompt_codes(&self.arch) {
            return Ok(fixed);
        }
        let tone: Vec<f32> = (0..FRAME_SAMPLES)
            .map(|i| 0.5 * (std::f32::consts::TAU * 440.0 * i as f32 / SAMPLE_RATE as f32).sin())
            .collect();
        let mut first = |pcm: &[f32]| -> Result<Vec<u32>, DuplexError> {
            Ok(self.encode_all(pcm)?.swap_remove(0))
        };
        Ok((first(&[0.0; FRAME_SAMPLES])?, first(&tone)?))
    }

    /// Mimi codes of `pcm` on its own (Mimi's streaming state reset before and after), one
    /// `codebooks`-long vector per 80 ms frame, at least one (the tail padded with silence).
    fn encode_all(&mut self, pcm: &[f32]) -> Result<Vec<Vec<u32>>, DuplexError> {
        self.mimi.reset_state();
        let frames = pcm.len().div_ceil(FRAME_SAMPLES).max(1);
        let mut padded = pcm.to_vec();
        padded.resize(frames * FRAME_SAMPLES, 0.0);
        let input = Tensor::from_vec(padded, (1, 1, frames * FRAME_SAMPLES), &self.device)?;
        let codes = self.mimi.encode(&input)?.i(0)?.to_dtype(DType::U32);
        self.mimi.reset_state();
        let codes = codes?;
        let codes: Vec<Vec<u32>> = codes.to_vec2()?;
        let n = codes.first().map_or(0, Vec::len);
        Ok((0..n)
            .map(|t| codes.iter().map(|cb| cb[t]).collect())
            .collect())
    }
}

/// A voice prompt, ready to feed.
enum Voice {
    /// Mimi codes per frame.
    Frames(Vec<Vec<u32>>),
    /// A `.pt` voice prompt.
    Embeddings(VoiceEmbeddings),
}

/// A conversation on an [`Engine`]: one [`Session::step`] per 80 ms frame of the user's audio.
pub struct Session<'a> {
    engine: &'a mut Engine,
    streams: usize,
    /// The column this step reads (`None`: not yet known).
    cur: Vec<Option<u32>>,
    /// The column this step writes.
    next: Vec<Option<u32>>,
    step: usize,
    text_lp: LogitsProcessor,
    audio_lp: LogitsProcessor,
}

impl<'a> Session<'a> {
    fn new(engine: &'a mut Engine, seed: u64, s: SamplingSettings) -> Self {
        let streams = streams(&engine.arch);
        Session {
            streams,
            cur: vec![None; streams],
            next: vec![None; streams],
            step: 0,
            text_lp: LogitsProcessor::from_sampling(
                seed,
                Sampling::TopK {
                    k: s.text_top_k,
                    temperature: s.text_temperature,
                },
            ),
            audio_lp: LogitsProcessor::from_sampling(
                seed.wrapping_add(1),
                Sampling::TopK {
                    k: s.audio_top_k,
                    temperature: s.audio_temperature,
                },
            ),
            engine,
        }
    }
}

impl Session<'_> {
    /// Feeds one frame of the user's voice ([`FRAME_SAMPLES`] mono samples at [`SAMPLE_RATE`];
    /// shorter is padded with silence) and returns the agent's frame for the same 80 ms.
    ///
    /// # Errors
    /// [`DuplexError::Audio`] for a frame longer than [`FRAME_SAMPLES`];
    /// [`DuplexError::Compute`].
    pub fn step(&mut self, pcm: &[f32]) -> Result<StepOutput, DuplexError> {
        if pcm.len() > FRAME_SAMPLES {
            return Err(DuplexError::Audio(format!(
                "a frame is {FRAME_SAMPLES} samples, got {}",
                pcm.len()
            )));
        }
        let mut frame = pcm.to_vec();
        frame.resize(FRAME_SAMPLES, 0.0);
        let input = Tensor::from_vec(frame, (1, 1, FRAME_SAMPLES), &self.engine.device)?;
        let codes = self.engine.mimi.encode_step(&input.into(), &().into())?;
        let user = match codes.as_option() {
            Some(codes) => codes
                .i((0, .., 0))?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
            // Mimi's first call may hold its output back: the user's stream gets padding.
            None => vec![self.engine.arch.card as u32; self.engine.arch.codebooks],
        };
        let (text, agent) = self.step_tokens(Some(&user), None, None, true)?;
        let pcm = match agent {
            Some(agent) => {
                let n = agent.len();
                let codes = Tensor::from_vec(agent, (1, n, 1), &self.engine.device)?;
                let out = self.engine.mimi.decode_step(&codes.into(), &().into())?;
                match out.as_option() {
                    Some(pcm) => {
                        let mut pcm = pcm.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        pcm.resize(FRAME_SAMPLES, 0.0);
                        pcm
                    }
                    None => vec![0.0; FRAME_SAMPLES],
                }
            }
            None => vec![0.0; FRAME_SAMPLES],
        };
        let text = if text == TEXT_PAD {
            String::new()
        } else {
            self.engine.tokenizer.piece_text(text)
        };
        Ok(StepOutput { pcm, text })
    }

    /// Steps taken so far, prompts included.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// Writes one frame's codes of the stream whose codebook 0 is `first`: codebook 0 into this
    /// column, the delayed codebooks into the next.
    fn provide(&mut self, first: usize, codes: &[u32]) {
        for (k, &token) in codes.iter().enumerate().take(self.engine.arch.codebooks) {
            let column = if k == 0 {
                &mut self.cur
            } else {
                &mut self.next
            };
            column[first + k] = Some(token);
        }
    }

    /// Puts a frame's provided tokens in place and returns the column this step reads: the
    /// initial tokens before each stream's delay, else what was provided or predicted.
    fn prepare(
        &mut self,
        user: Option<&[u32]>,
        agent: Option<&[u32]>,
        text: Option<u32>,
    ) -> Vec<u32> {
        let (cb, card, text_card) = {
            let arch = &self.engine.arch;
            (arch.codebooks, arch.card as u32, arch.text_card as u32)
        };
        let (agent0, user0) = (1, 1 + cb);
        if let Some(user) = user {
            self.provide(user0, user);
        }
        if let Some(agent) = agent {
            self.provide(agent0, agent);
        }
        if let Some(text) = text {
            self.cur[0] = Some(text);
        }
        let delay = |s: usize| usize::from(s != 0 && s != agent0 && s != user0);
        let initial = |s: usize| if s == 0 { text_card } else { card };
        (0..self.streams)
            .map(|s| {
                if self.step <= delay(s) {
                    initial(s)
                } else {
                    self.cur[s].unwrap_or(initial(s))
                }
            })
            .collect()
    }

    /// Moves to the next column.
    fn advance(&mut self) {
        self.cur = std::mem::replace(&mut self.next, vec![None; self.streams]);
        self.step += 1;
    }

    /// Replays a `.pt` voice prompt: its embeddings as the inputs of the first voice frames,
    /// then its token columns for the last one.
    fn replay(&mut self, voice: &VoiceEmbeddings) -> Result<(), DuplexError> {
        let audio = vec![None; 2 * self.engine.arch.codebooks];
        for i in 0..voice.frames() {
            let condition = moshi::conditioner::Condition::AddToInput(voice.embedding(i)?);
            self.engine
                .lm
                .forward_cond(None, audio.clone(), Some(&condition), &().into())?;
            self.advance();
        }
        let [cur, next] = voice.columns(self.streams)?;
        self.cur = cur;
        self.next = next;
        self.step_tokens(None, None, None, false)?;
        Ok(())
    }

    /// One LM step: the user's frame codes, the agent's if provided (a voice prompt), the text
    /// token if provided. With `predict`, samples the next column's text and audio and returns
    /// its text token and the agent's frame if complete and decodable.
    fn step_tokens(
        &mut self,
        user: Option<&[u32]>,
        agent: Option<&[u32]>,
        text: Option<u32>,
        predict: bool,
    ) -> Result<(u32, Option<Vec<u32>>), DuplexError> {
        let input = self.prepare(user, agent, text);
        let device = self.engine.device.clone();
        let id = |t: u32| Tensor::from_vec(vec![t], (1, 1), &device);
        let audio = input[1..]
            .iter()
            .map(|&t| id(t).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        let (logits, ys) = self
            .engine
            .lm
            .forward(Some(id(input[0])?), audio, &().into())?;
        if !predict {
            self.advance();
            return Ok((TEXT_PAD, None));
        }
        let (cb, card) = (self.engine.arch.codebooks, self.engine.arch.card as u32);
        let text = self.text_lp.sample(&logits.i((0, 0))?)?;
        let forced: Vec<Option<u32>> = (1..self.streams).map(|s| self.next[s]).collect();
        let sampled = self
            .engine
            .lm
            .depformer_sample(&ys, Some(text), &forced, &mut self.audio_lp)?
            .unwrap_or_default();
        self.next[0] = Some(text);
        for (k, token) in sampled.into_iter().enumerate() {
            self.next[1 + k].get_or_insert(token);
        }
        let frame = if self.step >= 1 {
            let tokens: Vec<u32> = (0..cb)
                .map(|k| {
                    let column = if k == 0 { &self.cur } else { &self.next };
                    column[1 + k].unwrap_or(card)
                })
                .collect();
            tokens.iter().all(|&t| t < card).then_some(tokens)
        } else {
            None
        };
        self.advance();
        Ok((text, frame))
    }
}

/// Offline inference (ARCHITECTURE §6): the agent's reply to `input` (mono at [`SAMPLE_RATE`]), exactly
/// as long as the input, and its text.
///
/// # Errors
/// As [`Engine::start`] and [`Session::step`].
pub fn process(
    engine: &mut Engine,
    input: &[f32],
    prompt: &Prompt,
) -> Result<(Vec<f32>, String), DuplexError> {
    let mut session = engine.start(prompt)?;
    let mut pcm = Vec::with_capacity(input.len() + FRAME_SAMPLES);
    let mut text = String::new();
    for frame in input.chunks(FRAME_SAMPLES) {
        let out = session.step(frame)?;
        pcm.extend(out.pcm);
        text.push_str(&out.text);
    }
    pcm.truncate(input.len());
    Ok((pcm, text.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_mimi_uses_the_forks_prompt_codes_a_test_mimi_its_own() {
        let (silence, sine) = fixed_prompt_codes(&Arch::personaplex_7b()).unwrap();
        assert_eq!(silence, SILENCE_TOKENS);
        assert_eq!(sine, SINE_TOKENS);
        assert!(fixed_prompt_codes(&Arch::tiny()).is_none());
    }
}
