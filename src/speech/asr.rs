//! Speech to text with whisper.cpp (whisper-rs) on a ggml Whisper model.

use std::path::PathBuf;
use std::sync::Mutex;

use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

use super::SPEECH_RATE;
use crate::models::{self, ModelError};
use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// Why transcription failed.
#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    /// The model file is missing or corrupt.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// whisper.cpp could not load the model file.
    #[error(
        "whisper.cpp could not load {path}: {reason}; fetch it again with `voxloop models fetch whisper-base`"
    )]
    Load {
        /// The whisper model file.
        path: PathBuf,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// whisper.cpp failed while transcribing (its message).
    #[error("whisper.cpp: {0}")]
    Whisper(String),
}

/// One transcribed segment; times in ms from the start of the audio.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    /// Start, in ms from the start of the audio.
    pub start_ms: u64,
    /// End, in ms from the start of the audio.
    pub end_ms: u64,
    /// The segment's text.
    pub text: String,
}

/// A transcript of one utterance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transcript {
    /// The whole text, segments joined and trimmed.
    pub text: String,
    /// Language whisper used (the configured one, or the detected one for `auto`), e.g. `en`.
    pub language: String,
    /// The timed segments whisper produced, in order.
    pub segments: Vec<Segment>,
}

/// A loaded Whisper model. Transcriptions run one at a time (a state per call).
pub struct Asr {
    context: Mutex<WhisperContext>,
    config: AsrConfig,
    /// One transcription at a time (each runs `threads` threads: more at once would only make
    /// them thrash); utterances wait here, not on blocking threads.
    queue: crate::compute::ComputeQueue,
}

/// Whisper's default initial prompt for English (`[asr] context_prompt`): it tells the decoder
/// that short spoken requests follow. Descriptive, not example requests: whisper copied example
/// sentences into what it heard (BENCHMARKS.md).
pub const ASSISTANT_CONTEXT: &str = "Questions and commands for a voice assistant.";

/// Encoder frames for `samples` of audio when the context is fitted: 50 per second (1500 for
/// 30 s), plus 64 of margin, and never under 300 (6 s): with less, whisper base repeated or
/// misheard short commands in our measurements (BENCHMARKS.md).
pub fn fitted_context(samples: usize) -> i32 {
    let frames = samples as u64 * 50 / u64::from(SPEECH_RATE) + 64;
    frames.clamp(300, 1500) as i32
}

impl Asr {
    /// Loads the model of `config` (`[asr] model`, else whisper-base in the model directory),
    /// after checking that it is a ggml file.
    ///
    /// # Errors
    /// [`AsrError::Model`] (missing or corrupt, naming the fetch command) or [`AsrError::Load`].
    pub fn load(config: &AsrConfig) -> Result<Self, AsrError> {
        whisper_rs::install_logging_hooks();
        let path = config
            .model
            .clone()
            .unwrap_or_else(|| models::model_path(models::spec("whisper-base").expect("known")));
        models::check_ggml("whisper-base", &path)?;
        let context = WhisperContext::new_with_params(&path, WhisperContextParameters::default())
            .map_err(|e| AsrError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            context: Mutex::new(context),
            config: config.clone(),
            queue: crate::compute::ComputeQueue::new("asr", 1, config.max_wait_ms),
        })
    }

    /// Waits for whisper's turn, in arrival order, at most `[asr] max_wait_ms`. The permit is
    /// held while the transcription runs.
    ///
    /// # Errors
    /// [`crate::compute::Busy`] when that wait passed (the assistant is busy).
    pub async fn queue(&self) -> Result<tokio::sync::OwnedSemaphorePermit, crate::compute::Busy> {
        self.queue.enter().await
    }

    /// Whisper's queue, for a stage that shares its worker ([`crate::compute::ComputeQueue::sharing`]).
    pub fn compute_queue(&self) -> &crate::compute::ComputeQueue {
        &self.queue
    }

    /// Transcribes `pcm`: mono samples at [`SPEECH_RATE`]. Blocking (seconds of CPU on long audio):
    /// call it from a blocking thread in async code.
    ///
    /// # Errors
    /// [`AsrError::Whisper`] when whisper.cpp fails.
    pub fn transcribe(&self, pcm: &[f32]) -> Result<Transcript, AsrError> {
        self.transcribe_with_prompt(pcm, None)
    }

    /// As [`Self::transcribe`], with `prompt` added to whisper's initial prompt (text it takes
    /// to precede the audio, after `[asr] context_prompt`: names in it are heard more readily;
    /// see [`vocabulary_prompt`]). A sentence whisper repeats is written once in the
    /// transcript's `text` ([`without_repeats`]); `segments` keep what whisper wrote, with
    /// their times.
    /// Non-speech markers (`[BLANK_AUDIO]`, `(music)`, `*cough*`, `♪`) and the captions whisper
    /// invents over silence ("Thanks for watching!") are removed: silence or noise gives an
    /// empty text.
    ///
    /// # Errors
    /// [`AsrError::Whisper`] when whisper.cpp fails.
    pub fn transcribe_with_prompt(
        &self,
        pcm: &[f32],
        prompt: Option<&str>,
    ) -> Result<Transcript, AsrError> {
        let strategy = match self.config.beam_size {
            0 | 1 => SamplingStrategy::Greedy { best_of: 1 },
            beam_size => SamplingStrategy::BeamSearch {
                beam_size: beam_size as i32,
                patience: -1.0,
            },
        };
        let mut params = FullParams::new(strategy);
        let language = self.config.language.as_str();
        params.set_language(if language == "auto" {
            None
        } else {
            Some(language)
        });
        params.set_n_threads(self.config.threads as i32);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_print_special(false);
        params.set_no_context(true);
        params.set_suppress_blank(true);
        let lead = match &self.config.context_prompt {
            Some(text) => text.trim(),
            None if language == "en" => ASSISTANT_CONTEXT,
            None => "",
        };
        let prompt = [lead, prompt.unwrap_or("").trim()]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !prompt.is_empty() {
            params.set_initial_prompt(&prompt);
        }
        let context = self.context.lock().expect("asr lock");
        let mut state = context
            .create_state()
            .map_err(|e| AsrError::Whisper(e.to_string()))?;
        // Whisper needs at least 1 s; pad short utterances with silence.
        let mut audio = pcm.to_vec();
        if audio.len() < SPEECH_RATE as usize + 1600 {
            audio.resize(SPEECH_RATE as usize + 1600, 0.0);
        }
        if self.config.fit_context {
            params.set_audio_ctx(fitted_context(audio.len()));
        }
        state
            .full(params, &audio)
            .map_err(|e| AsrError::Whisper(e.to_string()))?;
        let detected = whisper_rs::get_lang_str(state.full_lang_id_from_state()).unwrap_or("?");
        let mut segments = Vec::new();
        for segment in state.as_iter() {
            let text = segment
                .to_str_lossy()
                .map_err(|e| AsrError::Whisper(e.to_string()))?;
            let text = speech_only(&text);
            if text.is_empty() {
                continue;
            }
            // whisper.cpp timestamps are in 10 ms units.
            segments.push(Segment {
                start_ms: segment.start_timestamp().max(0) as u64 * 10,
                end_ms: segment.end_timestamp().max(0) as u64 * 10,
                text,
            });
        }
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let language = if language == "auto" {
            detected.to_string()
        } else {
            language.to_string()
        };
        Ok(Transcript {
            text: without_repeats(text.trim()),
            language,
            segments,
        })
    }
}

/// Captions whisper writes over silence or noise (learnt from subtitled videos), compared
/// lower-case without punctuation. Only whole segments are dropped.
const HALLUCINATIONS: &[&str] = &[
    "thanks for watching",
    "thank you for watching",
    "please subscribe",
    "subtitles by the amara org community",
    "字幕由amara org社区提供",
    "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
];

/// `text` without non-speech markers: spans in `[]`, `()` or `**`, music notes, and whole
/// segments that are a caption whisper invents over silence. Empty when nothing spoken is left.
pub fn speech_only(text: &str) -> String {
    let mut out = String::new();
    let mut closing: Option<char> = None;
    for c in text.chars() {
        match closing {
            Some(close) if c == close => closing = None,
            Some(_) => {}
            None => match c {
                '[' => closing = Some(']'),
                '(' => closing = Some(')'),
                '*' => closing = Some('*'),
                '♪' | '♫' | '♬' | '🎵' | '🎶' => {}
                c => out.push(c),
            },
        }
    }
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    let key: String = out
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !out.chars().any(char::is_alphanumeric) || HALLUCINATIONS.contains(&key.as_str()) {
        return String::new();
    }
    out
}

/// `text` with a sentence that repeats the one before it left out: whisper's decoder can loop on
/// a sentence it has written ("Stop the music. Stop the music."), most of all after a prompt.
/// Sentences end at `.`, `?`, `!` or `。？！` and are compared lower-case, letters and digits only.
pub fn without_repeats(text: &str) -> String {
    let mut out = String::new();
    let mut last_key = String::new();
    let mut sentence = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        sentence.push(c);
        let ends = matches!(c, '.' | '?' | '!' | '。' | '？' | '！')
            && chars
                .peek()
                .is_none_or(|n| n.is_whitespace() || !n.is_ascii());
        if ends || chars.peek().is_none() {
            let key: String = sentence
                .chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect();
            if key.is_empty() || key != last_key {
                out.push_str(&sentence);
            }
            if !key.is_empty() {
                last_key = key;
            }
            sentence.clear();
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whisper's initial prompt for the vocabulary of the moment: `titles` (of the resources the
/// MCP servers list) first, then the words of the offered `tools`' names (`musicPlayer` and
/// `set_volume` become "music player", "set volume"), comma-separated, cut at a comma to at
/// most `max_chars` characters. Empty when there is nothing to say.
pub fn vocabulary_prompt(titles: &[String], tools: &[String], max_chars: usize) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut push = |item: String| {
        let item = item.trim().to_string();
        if !item.is_empty() && !items.iter().any(|i| i.eq_ignore_ascii_case(&item)) {
            items.push(item);
        }
    };
    for title in titles {
        push(title.clone());
    }
    for tool in tools {
        push(split_identifier(tool));
    }
    let mut prompt = String::new();
    for item in items {
        let extra = if prompt.is_empty() { 0 } else { 2 };
        if prompt.chars().count() + extra + item.chars().count() > max_chars {
            break;
        }
        if !prompt.is_empty() {
            prompt.push_str(", ");
        }
        prompt.push_str(&item);
    }
    if !prompt.is_empty() {
        prompt.push('.');
    }
    prompt
}

/// `musicPlayer` -> "music player", `get_current_time` -> "get current time".
pub fn split_identifier(name: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c == '_' || c == '-' || c == '.' {
            out.push(' ');
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        out.extend(c.to_lowercase());
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// English words for 0 to 19, by value.
pub const NUMBER_WORDS: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
/// English words for the tens 20 to 90, by value / 10 (0 and 1 have none).
pub const TENS_WORDS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

/// `text` as words to compare for a word error rate: lower case, hyphens and dashes split,
/// punctuation dropped (apostrophes kept), `%` said as "percent" and whole numbers below 100
/// spelled out (whisper writes "40%" for "forty percent").
pub fn transcript_words(text: &str) -> Vec<String> {
    let spaced = text
        .to_lowercase()
        .replace(['-', '—'], " ")
        .replace('%', " percent");
    let mut words = Vec::new();
    for word in spaced.split_whitespace() {
        let word: String = word
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '\'')
            .collect();
        match word.parse::<usize>() {
            Ok(n) if n < 20 => words.push(NUMBER_WORDS[n].to_string()),
            Ok(n) if n < 100 => {
                words.push(TENS_WORDS[n / 10].to_string());
                if n % 10 > 0 {
                    words.push(NUMBER_WORDS[n % 10].to_string());
                }
            }
            _ if !word.is_empty() => words.push(word),
            _ => {}
        }
    }
    words
}

/// The Levenshtein distance between `reference` and `hypothesis` (substitutions, insertions and
/// deletions, each 1): over words it gives the word error rate's numerator (WER = distance /
/// reference words), over characters the character error rate's.
pub fn edit_distance<T: PartialEq>(reference: &[T], hypothesis: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let substitution = if r == h { diagonal } else { diagonal + 1 };
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[hypothesis.len()]
}

/// `[asr]`: speech to text with whisper.cpp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AsrConfig {
    /// A ggml Whisper model file; default: `ggml-base.bin` in the model directory
    /// (`voxloop models fetch whisper-base`).
    pub model: Option<PathBuf>,
    /// Spoken language: a code such as `en` (the default) or `zh`, or `auto` (detect; about
    /// 1.4 s more per utterance on 2 cores).
    pub language: String,
    /// CPU threads for whisper.cpp.
    pub threads: u32,
    /// Beam search width; 0 or 1 for greedy decoding (the default). Width 5 missed fewer words
    /// of the assistant bench's espeak-ng requests (23.9 % against 27.9 %) but, with the fitted
    /// encoder context, wrote a LibriVox sentence twice and raised tests/it/speech.rs's WER on
    /// human speech past its 10 % bound (BENCHMARKS.md).
    pub beam_size: u32,
    /// Run whisper's encoder over the utterance's length instead of a full 30 s window (much
    /// faster for short commands; see BENCHMARKS.md for the accuracy cost).
    pub fit_context: bool,
    /// Bias whisper towards the words of the moment: its initial prompt lists the titles of the
    /// resources the MCP servers list ([`crate::speech::asr::vocabulary_prompt`]). Off by
    /// default: with whisper base it cut the title words missed from 31.8 % to 4.5 %, but
    /// whisper also wrote prompt words into other requests, and whole turns were right less
    /// often (28 against 30 of 45; BENCHMARKS.md).
    pub vocabulary_prompt: bool,
    /// Longest vocabulary prompt in characters (0..=1000; whisper keeps at most 223 tokens of it).
    pub prompt_max_chars: u32,
    /// Text whisper takes to precede every utterance (its initial prompt; the vocabulary prompt,
    /// when on, follows it), which tells the decoder what kind of speech to expect; at most 200
    /// characters, "" for none. Default: [`crate::speech::asr::ASSISTANT_CONTEXT`] when
    /// `language` is `en`, none for other languages. On the assistant bench's spoken requests it
    /// cut whisper base's word error rate from 27.9 % to 23.4 %, with no loss on the human
    /// recordings of `assets/speech` (BENCHMARKS.md).
    pub context_prompt: Option<String>,
    /// Most time an utterance waits for whisper while others are transcribed (one at a time,
    /// each with `threads`), in ms (0..=600000); past it the speaker is told the assistant is
    /// busy instead of waiting in silence.
    pub max_wait_ms: u64,
}

impl Default for AsrConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        Self {
            model: None,
            language: "en".into(),
            threads: cores.min(8),
            beam_size: 0,
            fit_context: true,
            vocabulary_prompt: false,
            prompt_max_chars: 600,
            context_prompt: None,
            max_wait_ms: 10_000,
        }
    }
}

impl AsrConfig {
    /// Checks every `[asr]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `asr.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range("asr.threads", self.threads, 1..=64, "threads")?;
        in_range(
            "asr.max_wait_ms",
            self.max_wait_ms,
            0..=600_000,
            "milliseconds",
        )?;
        in_range("asr.beam_size", self.beam_size, 0..=16, "beams")?;
        in_range(
            "asr.prompt_max_chars",
            self.prompt_max_chars,
            0..=1000,
            "characters",
        )?;
        if let Some(prompt) = &self.context_prompt {
            in_range(
                "asr.context_prompt (length)",
                prompt.chars().count(),
                0..=200,
                "characters",
            )?;
        }
        let lang = &self.language;
        if !(lang == "auto"
            || (2..=3).contains(&lang.len()) && lang.chars().all(|c| c.is_ascii_lowercase()))
        {
            return Err(InvalidSetting {
                key: "asr.language".into(),
                value: format!("{lang:?}"),
                allowed: "\"auto\" or a language code such as \"en\" or \"zh\"".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_speech_markers_leave_nothing() {
        for marker in [
            "[BLANK_AUDIO]",
            "[POP]",
            " (music) ",
            "*cough*",
            "♪ ♪",
            "[ Silence ]",
            "Thanks for watching!",
            "",
        ] {
            assert_eq!(speech_only(marker), "", "{marker:?}");
        }
        assert_eq!(speech_only("[MUSIC] Play the song."), "Play the song.");
        assert_eq!(speech_only("Thank you."), "Thank you.");
        assert_eq!(speech_only("播放音乐"), "播放音乐");
    }

    #[test]
    fn a_repeated_sentence_is_written_once() {
        assert_eq!(
            without_repeats("Stop the music. Stop the music."),
            "Stop the music."
        );
        assert_eq!(
            without_repeats("What? What? What? What is the time?"),
            "What? What is the time?"
        );
        // Case and punctuation do not hide a repeat; different sentences stay, in order.
        assert_eq!(
            without_repeats("Turn it up! turn it up. Thank you."),
            "Turn it up! Thank you."
        );
        assert_eq!(
            without_repeats("Play 2.5 hours of music."),
            "Play 2.5 hours of music."
        );
        assert_eq!(without_repeats("停止。停止。"), "停止。");
        assert_eq!(without_repeats(""), "");
    }

    #[test]
    fn the_prompt_lists_titles_then_tool_words_within_the_limit() {
        let titles = vec![
            "Just Over The Horizon".to_string(),
            "Torus Trooper".to_string(),
        ];
        let tools = vec!["musicPlayer".to_string(), "set_volume".to_string()];
        assert_eq!(
            vocabulary_prompt(&titles, &tools, 600),
            "Just Over The Horizon, Torus Trooper, music player, set volume."
        );
        assert_eq!(
            vocabulary_prompt(&titles, &tools, 40),
            "Just Over The Horizon, Torus Trooper."
        );
        assert_eq!(vocabulary_prompt(&[], &[], 600), "");
    }
}
