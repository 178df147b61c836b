//! Splitting streamed LLM text into speakable pieces, so the first sentence can be spoken while
//! the LLM is still writing the rest.
//!
//! A piece ends at `.`, `!`, `?` or `…` followed by white space (closing quotes and brackets stay
//! with it), at Chinese and Japanese full stops, exclamation and question marks (`。！？；`) at
//! once, and at a line break. A period is not an end after a known abbreviation ("Dr.", "e.g."),
//! a single capital letter (an initial), or inside a number ("3.14"). The first piece of a reply
//! may also end at a comma, semicolon or colon (`,;:，、：`) once it is `first_clause_chars` long,
//! so speech starts early (a CJK character counts as two). A piece that grows past `max_chars` is cut at its last space.
//! Pieces with no letter or digit (a lone "..."), are dropped.

/// Abbreviations after which a period does not end a sentence (compared lower-case, without
/// the period).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "u.s", "u.k",
    "a.m", "p.m", "no", "fig", "approx", "inc", "ltd", "co", "mt", "jan", "feb", "mar", "apr",
    "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
];

const CLOSERS: &[char] = &['"', '\'', ')', ']', '}', '”', '’', '」', '』', '）'];

/// Streaming sentence splitter.
#[derive(Debug, Clone)]
pub struct SentenceSplitter {
    buffer: String,
    released_any: bool,
    first_clause_chars: usize,
    max_chars: usize,
}

impl Default for SentenceSplitter {
    fn default() -> Self {
        Self::new(24, 240)
    }
}

impl SentenceSplitter {
    /// `first_clause_chars`: length from which the first piece may end at a comma;
    /// `max_chars`: longest piece before a forced cut.
    pub fn new(first_clause_chars: usize, max_chars: usize) -> Self {
        Self {
            buffer: String::new(),
            released_any: false,
            first_clause_chars,
            max_chars,
        }
    }

    /// Adds streamed text; returns the pieces now complete, in order.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.buffer.push_str(delta);
        let mut pieces = Vec::new();
        while let Some(end) = self.boundary() {
            let piece: String = self.buffer.drain(..end).collect();
            self.release(piece, &mut pieces);
        }
        pieces
    }

    /// Ends the stream: the rest, if it is speakable.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buffer);
        let mut pieces = Vec::new();
        self.release(rest, &mut pieces);
        pieces.pop()
    }

    fn release(&mut self, piece: String, out: &mut Vec<String>) {
        let piece = piece.trim();
        if piece.chars().any(char::is_alphanumeric) {
            self.released_any = true;
            out.push(piece.to_string());
        }
    }

    /// Byte offset just after the first complete piece in the buffer, if any.
    fn boundary(&self) -> Option<usize> {
        let text = &self.buffer;
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for (i, &(at, c)) in chars.iter().enumerate() {
            let next = chars.get(i + 1).map(|&(_, c)| c);
            match c {
                '\n' => return Some(at + 1),
                '。' | '！' | '？' | '；' => return Some(self.after_closers(&chars, i)),
                '.' | '!' | '?' | '…' => {
                    // Skip closers, then the end needs white space after (or we wait for more).
                    let end = self.after_closers(&chars, i);
                    let after = text[end..].chars().next();
                    match after {
                        None => return None, // cannot tell yet
                        Some(a) if !a.is_whitespace() => continue,
                        Some(_) => {}
                    }
                    if c == '.'
                        && (is_abbreviation(&text[..at])
                            || next.is_some_and(|n| n.is_ascii_digit()))
                    {
                        continue;
                    }
                    return Some(end);
                }
                ',' | ';' | ':' | '，' | '、' | '：' if !self.released_any => {
                    let long_enough = spoken_width(&text[..at]) >= self.first_clause_chars;
                    let ascii = c.is_ascii();
                    let spaced = next.is_some_and(char::is_whitespace);
                    if long_enough && (!ascii || spaced) {
                        return Some(at + c.len_utf8());
                    }
                }
                _ => {}
            }
        }
        if chars.len() > self.max_chars {
            let cut = text[..chars[self.max_chars].0]
                .rfind(' ')
                .filter(|&p| p > 0);
            return Some(cut.unwrap_or(chars[self.max_chars].0));
        }
        None
    }

    fn after_closers(&self, chars: &[(usize, char)], i: usize) -> usize {
        let mut j = i + 1;
        while j < chars.len() && CLOSERS.contains(&chars[j].1) {
            j += 1;
        }
        chars.get(j).map_or(self.buffer.len(), |&(at, _)| at)
    }
}

/// Length for the early-clause rule: a CJK character carries about two Latin letters' worth of
/// speech, so it counts 2.
fn spoken_width(text: &str) -> usize {
    text.chars().map(|c| if c.is_ascii() { 1 } else { 2 }).sum()
}

/// True when the text before a period ends with an abbreviation or a single capital (initial).
fn is_abbreviation(before: &str) -> bool {
    let word = before
        .rsplit(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("");
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    let mut letters = word.chars();
    matches!((letters.next(), letters.next()), (Some(c), None) if c.is_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(deltas: &[&str]) -> Vec<String> {
        let mut splitter = SentenceSplitter::default();
        let mut out: Vec<String> = deltas.iter().flat_map(|d| splitter.push(d)).collect();
        out.extend(splitter.finish());
        out
    }

    #[test]
    fn sentences_end_at_terminators_followed_by_space() {
        assert_eq!(
            split(&["Hello there. How are", " you? Fine!"]),
            ["Hello there.", "How are you?", "Fine!"]
        );
        assert_eq!(
            split(&["He said \"stop.\" Then left."]),
            ["He said \"stop.\"", "Then left."]
        );
    }

    #[test]
    fn a_sentence_is_released_as_soon_as_it_is_known_complete() {
        let mut splitter = SentenceSplitter::default();
        assert!(
            splitter.push("It is sunny.").is_empty(),
            "the next char is not known yet"
        );
        assert_eq!(splitter.push(" Tomorrow"), ["It is sunny."]);
    }

    #[test]
    fn abbreviations_initials_and_decimals_do_not_end_sentences() {
        assert_eq!(
            split(&["Dr. Smith paid 3.50 dollars e.g. for tea. Done."]),
            ["Dr. Smith paid 3.50 dollars e.g. for tea.", "Done."]
        );
        assert_eq!(
            split(&["J. K. Rowling wrote it. Yes."]),
            ["J. K. Rowling wrote it.", "Yes."]
        );
        assert_eq!(
            split(&["Pi is 3.14159 roughly. Ok."]),
            ["Pi is 3.14159 roughly.", "Ok."]
        );
    }

    #[test]
    fn chinese_punctuation_ends_at_once() {
        assert_eq!(
            split(&["你好。今天天气很好！", "我们去公园吧？"]),
            ["你好。", "今天天气很好！", "我们去公园吧？"]
        );
    }

    #[test]
    fn the_first_piece_may_end_at_a_clause() {
        assert_eq!(
            split(&["Sure, here is the song you asked for, enjoy it. Bye, see you."]),
            [
                "Sure, here is the song you asked for,",
                "enjoy it.",
                "Bye, see you."
            ]
        );
        assert_eq!(
            split(&["好的，我现在为您播放这首非常好听的歌曲，请欣赏。"]),
            ["好的，我现在为您播放这首非常好听的歌曲，", "请欣赏。"]
        );
    }

    #[test]
    fn unspeakable_pieces_are_dropped_and_long_ones_cut() {
        assert_eq!(split(&["... ", "Okay."]), ["Okay."]);
        let mut splitter = SentenceSplitter::new(24, 20);
        let pieces = splitter.push("one two three four five six seven");
        assert_eq!(pieces, ["one two three four"]);
    }
}
