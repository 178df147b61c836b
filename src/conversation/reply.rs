//! Spoken-reply hygiene: what the chat model writes is cleaned before TTS hears it.
//!
//! - [`MarkupFilter`] removes, as the text streams, what must never be spoken: tags and
//!   everything inside a `<tool_call>`/`<tool_response>` block, JSON objects and arrays (a tool
//!   call a model writes out as text), code (fenced or in backticks) and Markdown decoration
//!   (emphasis, headings, list markers, table bars, link targets).
//! - [`ReplyLimits`] ends a reply at `max_sentences` sentences or `max_words` words (a voice
//!   answer is short), and at the first sign of a degenerate loop: a sentence said before, or a
//!   three-word phrase said three times ("What? What? What?").
//!
//! - [`LeadIn`] holds back a piece that ends in a colon ("Here is the JSON for that:") until
//!   something speakable follows it: when what follows was markup, and so removed, the lead-in
//!   is dropped instead of announcing nothing.
//!
//! The conversation feeds deltas through the filter, splits sentences from what is left, passes
//! them through the lead-in holder and then through the limits; a limit ends the model's stream.

/// Tags whose whole content is dropped.
const DROPPED_BLOCKS: &[&str] = &["tool_call", "tool_response", "tools", "code", "think"];

/// Streaming markup remover. Feed deltas with [`Self::push`]; each call returns the speakable
/// text that is now certain (a `<` or `` ` `` waits for what follows).
#[derive(Debug, Default, Clone)]
pub struct MarkupFilter {
    /// Text held back: an open tag, a possible fence.
    pending: String,
    /// Inside a dropped block: the tag that closes it.
    dropping_until: Option<String>,
    /// Depth of `{}`/`[` nesting being dropped.
    brace_depth: usize,
    /// Inside a JSON string within a dropped object (braces there do not count).
    in_json_string: bool,
    /// Inside a fenced code block.
    in_fence: bool,
    /// Inside inline code.
    in_code: bool,
    /// Inside a Markdown link target `(...)` after `]`.
    in_link_target: bool,
    /// At the start of a line (for list markers and headings).
    line_start: bool,
    /// The previous character passed on.
    last: Option<char>,
}

impl MarkupFilter {
    /// A filter at the start of a reply.
    pub fn new() -> Self {
        Self {
            line_start: true,
            ..Self::default()
        }
    }

    /// Adds streamed text; returns the speakable text now complete.
    pub fn push(&mut self, delta: &str) -> String {
        self.pending.push_str(delta);
        let text = std::mem::take(&mut self.pending);
        let mut out = String::new();
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let (at, c) = chars[i];
            let rest = &text[at..];
            // Constructs that need more text to decide wait for it.
            if self.needs_more(rest) {
                self.pending = rest.to_string();
                return out;
            }
            i += 1;
            if let Some(close) = &self.dropping_until {
                if rest.starts_with(close.as_str()) {
                    i += close.chars().count() - 1;
                    self.dropping_until = None;
                }
                continue;
            }
            if self.brace_depth > 0 {
                self.drop_json(c);
                continue;
            }
            if self.in_fence {
                if rest.starts_with("```") {
                    i += 2;
                    self.in_fence = false;
                }
                continue;
            }
            if rest.starts_with("```") {
                i += 2;
                self.in_fence = true;
                continue;
            }
            if self.in_code {
                self.in_code = c != '`';
                continue;
            }
            if self.in_link_target {
                self.in_link_target = c != ')';
                continue;
            }
            match c {
                '<' if !starts_tag(rest) => self.emit(&mut out, c),
                '<' => {
                    let Some(end) = rest.find('>') else {
                        // No '>' within 40 characters: not a tag after all.
                        continue;
                    };
                    let tag = &rest[1..end];
                    let name = tag.trim_start_matches('/').split_whitespace().next();
                    let name = name.unwrap_or("").to_ascii_lowercase();
                    if !tag.starts_with('/') && DROPPED_BLOCKS.contains(&name.as_str()) {
                        self.dropping_until = Some(format!("</{name}>"));
                    }
                    i += rest[..=end].chars().count() - 1;
                }
                '{' | '[' if c == '{' || rest[1..].trim_start().starts_with(['{', '"']) => {
                    self.brace_depth = 1;
                }
                '`' => match inline_identifier(rest) {
                    // `set_volume` is said "set volume"; other inline code is dropped.
                    Some(name) => {
                        for w in crate::speech::asr::split_identifier(name).chars() {
                            self.emit(&mut out, w);
                        }
                        i += name.chars().count() + 1;
                    }
                    None => self.in_code = true,
                },
                '*' | '_' | '#' | '|' | '~' => {
                    // Emphasis, headings and table bars; "_" inside a word stays a space.
                    let next_alnum = rest[1..].starts_with(char::is_alphanumeric);
                    if c == '_' && next_alnum && self.last.is_some_and(char::is_alphanumeric) {
                        self.emit(&mut out, ' ');
                    }
                }
                '[' => {}
                ']' => {
                    if rest[1..].starts_with('(') {
                        self.in_link_target = true;
                        i += 1;
                    }
                }
                '-' | '+' | '•' if self.line_start => {}
                '\n' => {
                    self.emit(&mut out, '\n');
                    self.line_start = true;
                }
                c if self.line_start && c.is_whitespace() => {}
                c => {
                    // A numbered list marker "1. " at a line start.
                    if self.line_start
                        && c.is_ascii_digit()
                        && let Some(len) = list_number(rest)
                    {
                        i += len - 1;
                        continue;
                    }
                    self.line_start = false;
                    self.emit(&mut out, c);
                }
            }
        }
        out
    }

    /// Ends the reply: whatever was held back and is speakable.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        // An unclosed tag or fence at the end is dropped with what follows it.
        if rest.starts_with(['<', '`']) || self.dropping_until.is_some() || self.brace_depth > 0 {
            return String::new();
        }
        rest
    }

    fn emit(&mut self, out: &mut String, c: char) {
        out.push(c);
        self.last = Some(c);
    }

    /// Whether `rest` starts a construct that cannot be decided yet.
    fn needs_more(&self, rest: &str) -> bool {
        if let Some(close) = &self.dropping_until {
            return rest.len() < close.len() && close.starts_with(rest);
        }
        if self.brace_depth > 0 {
            return false;
        }
        let fence_prefix = rest.len() < 3 && "```".starts_with(rest);
        let open_tag = rest == "<" || (starts_tag(rest) && !rest.contains('>') && rest.len() < 40);
        let bracket = rest.starts_with('[') && rest[1..].trim_start().is_empty();
        let link = rest.starts_with(']') && rest.len() == 1;
        // A list number at a line start ("1. ") waits for the character after its dot.
        let list_prefix = self.line_start
            && rest.len() < 4
            && rest.starts_with(|c: char| c.is_ascii_digit())
            && !rest.contains(' ');
        // "_" between two words is a space: wait for the next character.
        let underscore = rest == "_";
        // Inline code waits for its closing backtick (a name in it is spoken).
        let inline_code = !self.in_code
            && !self.in_fence
            && rest.starts_with('`')
            && !rest.starts_with("``")
            && !rest[1..].contains('`')
            && rest.len() < 48;
        fence_prefix || open_tag || bracket || link || list_prefix || underscore || inline_code
    }

    /// Consumes one character of a JSON value being dropped.
    fn drop_json(&mut self, c: char) {
        if self.in_json_string {
            if c == '"' && self.last != Some('\\') {
                self.in_json_string = false;
            }
            self.last = Some(c);
            return;
        }
        match c {
            '"' => self.in_json_string = true,
            '{' | '[' => self.brace_depth += 1,
            '}' | ']' => self.brace_depth -= 1,
            _ => {}
        }
        self.last = Some(c);
    }
}

/// Whether `text` starts like a tag: `<` then a letter or `/` (`3 < 4` is no tag).
fn starts_tag(text: &str) -> bool {
    text.strip_prefix('<')
        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_alphabetic() || c == '/'))
}

/// The byte length of a list number ("12. ") at the start of `text`, if it is one.
fn list_number(text: &str) -> Option<usize> {
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    let rest = &text[digits..];
    (digits > 0 && digits <= 2 && (rest.starts_with(". ") || rest.starts_with(") ")))
        .then_some(digits + 2)
}

/// How long a spoken reply may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplyLimitSettings {
    /// Most sentences of one reply.
    pub max_sentences: usize,
    /// Most words of one reply (a CJK character counts as a word).
    pub max_words: usize,
}

/// What [`ReplyLimits::accept`] decided for a sentence.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Speak it; more may follow.
    More(String),
    /// Speak it (cut at the word limit); the reply ends here.
    Last(String),
    /// Say nothing more: it repeats the reply or the limit was reached before it.
    Stop,
}

/// Holds back pieces that end in a colon (`:` or `：`) until a piece that does not follows; see
/// the module docs.
#[derive(Debug, Default, Clone)]
pub struct LeadIn {
    held: Option<String>,
}

impl LeadIn {
    /// The next piece of the reply: `None` while it is held back, else the text to speak (any
    /// held lead-in joined before it).
    pub fn pass(&mut self, piece: &str) -> Option<String> {
        let piece = piece.trim();
        let text = match self.held.take() {
            // A Chinese colon needs no space after it.
            Some(held) if held.ends_with('：') => format!("{held}{piece}"),
            Some(held) => format!("{held} {piece}"),
            None => piece.to_string(),
        };
        match lead_in_end(&text) {
            Some(end) => {
                self.held = Some(text[..end].to_string());
                None
            }
            None => Some(text),
        }
    }

    /// Ends the reply: the lead-in that nothing speakable followed, dropped (for the log).
    pub fn finish(&mut self) -> Option<String> {
        self.held.take()
    }
}

/// When `text` ends in a lead-in, the byte offset just after its colon: the colon follows the
/// last letter or digit, with only white space before it and at most the punctuation left by
/// removed markup after it ("Here you go: .").
fn lead_in_end(text: &str) -> Option<usize> {
    let after_word = text
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_alphanumeric())
        .map_or(0, |(at, c)| at + c.len_utf8());
    let rest = &text[after_word..];
    let spaces = rest.len() - rest.trim_start().len();
    let colon = rest[spaces..]
        .chars()
        .next()
        .filter(|c| [':', '：'].contains(c))?;
    Some(after_word + spaces + colon.len_utf8())
}

/// Counts a reply's sentences and words and watches for loops.
#[derive(Debug, Clone)]
pub struct ReplyLimits {
    settings: ReplyLimitSettings,
    sentences: usize,
    words: usize,
    said: Vec<String>,
    phrase_counts: std::collections::HashMap<String, usize>,
}

impl ReplyLimits {
    /// Limits for a new reply.
    pub fn new(settings: ReplyLimitSettings) -> Self {
        Self {
            settings,
            sentences: 0,
            words: 0,
            said: Vec::new(),
            phrase_counts: Default::default(),
        }
    }

    /// Judges the next sentence of the reply.
    pub fn accept(&mut self, sentence: &str) -> Accepted {
        let sentence = sentence.trim();
        if self.sentences >= self.settings.max_sentences || self.words >= self.settings.max_words {
            return Accepted::Stop;
        }
        let key = normalized(sentence);
        if key.is_empty() {
            return Accepted::More(String::new());
        }
        if self.said.contains(&key) {
            return Accepted::Stop;
        }
        // A three-word phrase said a third time in this reply ends it before that phrase.
        let tokens = word_tokens(sentence);
        let mut keep = tokens.len();
        let mut looped = false;
        for i in 0..tokens.len().saturating_sub(2) {
            let phrase = normalized(&tokens[i..i + 3].join(" "));
            let count = self.phrase_counts.entry(phrase).or_default();
            *count += 1;
            if *count >= 3 {
                keep = i;
                looped = true;
                break;
            }
        }
        let room = self.settings.max_words - self.words;
        let cut_at_limit = keep > room;
        keep = keep.min(room);
        if keep == 0 {
            return Accepted::Stop;
        }
        let text = if keep < tokens.len() {
            let mut cut = join_tokens(&tokens[..keep]);
            cut = cut
                .trim_end_matches(|c: char| !c.is_alphanumeric())
                .to_string();
            cut.push('.');
            cut
        } else {
            sentence.to_string()
        };
        self.words += keep;
        self.sentences += 1;
        self.said.push(key);
        if looped || cut_at_limit || self.sentences >= self.settings.max_sentences {
            Accepted::Last(text)
        } else {
            Accepted::More(text)
        }
    }
}

/// Words of `text`: runs split at white space, and each CJK character on its own.
fn word_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in text.split_whitespace() {
        let mut run = String::new();
        for c in word.chars() {
            if is_cjk(c) {
                if !run.is_empty() {
                    out.push(std::mem::take(&mut run));
                }
                out.push(c.to_string());
            } else {
                run.push(c);
            }
        }
        if !run.is_empty() {
            out.push(run);
        }
    }
    out
}

fn join_tokens(tokens: &[String]) -> String {
    let mut out = String::new();
    for t in tokens {
        let cjk = t.chars().next().is_some_and(is_cjk);
        let prev_cjk = out.chars().last().is_some_and(is_cjk);
        if !(out.is_empty() || cjk && prev_cjk) {
            out.push(' ');
        }
        out.push_str(t);
    }
    out
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{9FFF}' | '\u{F900}'..='\u{FAFF}' | '\u{3040}'..='\u{30FF}')
}

/// Lower-case letters and digits of `text`, words separated by one space.
fn normalized(text: &str) -> String {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `text` with markup removed, in one piece (for text that does not stream).
pub fn clean(text: &str) -> String {
    let mut filter = MarkupFilter::new();
    let mut out = filter.push(text);
    out.push_str(&filter.finish());
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The name in inline code at the start of `rest` ("`set_volume` ..."): a name of several
/// words (joined by `_` or `-`, or camelCase), letters and digits only otherwise, starting with
/// a letter, at most 40 characters, closed by a backtick. A single word ("`ls`") is not taken
/// for a name: it may be a command.
fn inline_identifier(rest: &str) -> Option<&str> {
    let inner = rest.strip_prefix('`')?;
    let name = &inner[..inner.find('`')?];
    let word = name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-'));
    let hump = name
        .chars()
        .zip(name.chars().skip(1))
        .any(|(a, b)| a.is_lowercase() && b.is_uppercase());
    let parts = hump || name.trim_matches(['_', '-']).contains(['_', '-']);
    (word && parts && name.len() <= 40 && name.starts_with(char::is_alphabetic)).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(text: &str, piece: usize) -> String {
        let mut filter = MarkupFilter::new();
        let mut out = String::new();
        let chars: Vec<char> = text.chars().collect();
        for chunk in chars.chunks(piece) {
            out.push_str(&filter.push(&chunk.iter().collect::<String>()));
        }
        out.push_str(&filter.finish());
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn markup_never_survives_in_any_chunking() {
        let cases = [
            (
                r#"<tool_call>{"name": "set_volume", "arguments": {"volume": 20}}</tool_call>"#,
                "",
            ),
            (
                r#"Sure. {"name": "get_current_time", "arguments": {}} Done."#,
                "Sure. Done.",
            ),
            ("**Hello** there, _friend_!", "Hello there, friend!"),
            ("# Title\n- one\n- two\n1. three", "Title one two three"),
            ("Run `ls -la` now.", "Run now."),
            (
                "Use `musicPlayer`, `set_volume` or `stop_playback`.",
                "Use music player, set volume or stop playback.",
            ),
            ("Type `x = 1` now.", "Type now."),
            ("Code:\n```python\nprint('hi')\n```\nBye.", "Code: Bye."),
            (
                "See [the docs](https://example.com) here.",
                "See the docs here.",
            ),
            ("It is 3 < 4 and 5 > 2.", "It is 3 < 4 and 5 > 2."),
            (r#"A list [1, 2] and ["a", "b"] ok"#, "A list 1, 2 and ok"),
            ("Use the set_volume tool.", "Use the set volume tool."),
            ("<tool_call>\n{\"name\": \"x\"", ""),
        ];
        for (input, want) in cases {
            for piece in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    streamed(input, piece),
                    want,
                    "{input:?} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn limits_cut_long_replies_and_loops() {
        let settings = ReplyLimitSettings {
            max_sentences: 2,
            max_words: 12,
        };
        let mut limits = ReplyLimits::new(settings);
        assert_eq!(
            limits.accept("Hello there."),
            Accepted::More("Hello there.".into())
        );
        assert_eq!(
            limits.accept("This is the second sentence of the reply, and it is long."),
            Accepted::Last("This is the second sentence of the reply, and it.".into())
        );
        assert_eq!(limits.accept("A third."), Accepted::Stop);

        let mut limits = ReplyLimits::new(ReplyLimitSettings {
            max_sentences: 10,
            max_words: 100,
        });
        assert_eq!(limits.accept("What?"), Accepted::More("What?".into()));
        assert_eq!(limits.accept("What?"), Accepted::Stop);

        let mut limits = ReplyLimits::new(ReplyLimitSettings {
            max_sentences: 10,
            max_words: 100,
        });
        assert_eq!(
            limits.accept("I like it and I like it and I like it and I like it"),
            Accepted::Last("I like it and I like it and.".into())
        );
    }

    #[test]
    fn a_lead_in_waits_for_speech_and_is_dropped_without_it() {
        let mut lead = LeadIn::default();
        assert_eq!(lead.pass("Sure."), Some("Sure.".into()));
        assert_eq!(
            lead.pass("Here's the JSON response for that request:"),
            None
        );
        assert_eq!(
            lead.finish(),
            Some("Here's the JSON response for that request:".into())
        );
        assert_eq!(lead.finish(), None);

        let mut lead = LeadIn::default();
        assert_eq!(lead.pass("The three tracks are:"), None);
        assert_eq!(
            lead.pass("Horizon, Home and Trooper."),
            Some("The three tracks are: Horizon, Home and Trooper.".into())
        );
        assert_eq!(lead.pass("Here you go: ."), None);
        assert_eq!(lead.finish(), Some("Here you go:".into()));
        assert_eq!(lead.pass("It is 10:30."), Some("It is 10:30.".into()));
        assert_eq!(lead.pass("现在播放："), None);
        assert_eq!(lead.pass("晴天。"), Some("现在播放：晴天。".into()));
        assert_eq!(lead.finish(), None);
    }

    #[test]
    fn chinese_counts_characters_as_words() {
        let mut limits = ReplyLimits::new(ReplyLimitSettings {
            max_sentences: 2,
            max_words: 4,
        });
        assert_eq!(
            limits.accept("你好世界啊"),
            Accepted::Last("你好世界.".into())
        );
    }
}
