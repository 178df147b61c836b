//! Text to phonemes for Kokoro (grapheme to phoneme, G2P), in the phoneme symbols Kokoro-82M
//! was trained on: those of hexgrad's misaki G2P (the model's own front end).
//!
//! - English: espeak-ng's IPA, run as a program (`espeak-ng -q --ipa --tie=^ -v en-us`; it is
//!   GPL-3 and never linked), then the fix-ups misaki applies to espeak-ng's output
//!   (`ESPEAK_TO_MISAKI`). Punctuation is kept (espeak-ng drops it): the text is cut at
//!   punctuation, each run is phonemized, and the marks go back between them.
//! - Chinese (Mandarin): digits read as Chinese numerals, full-width punctuation mapped, words cut
//!   with jieba (`jieba-rs`), readings from the `pinyin` crate, each syllable turned into misaki's
//!   v1.0 IPA: initials and finals as in Standard Chinese phonology (`ꭧ` for zh, `ʨ` for j, `ʦ`
//!   for z), the tone after the nucleus as an arrow (`→` 1st, `↗` 2nd, `↓` 3rd, `↘` 4th, none for
//!   the neutral tone), the apical vowel of zhi/chi/shi/ri and zi/ci/si as `ɨ`. Latin runs inside
//!   Chinese text are read as English.
//!
//! The language of a sentence is picked from its script ([`Language::of`]): any Han character
//! makes it Chinese.

use std::process::Stdio;
use std::sync::OnceLock;

use tokio::io::AsyncWriteExt as _;

/// A language the Kokoro voices speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// American English.
    En,
    /// Mandarin Chinese.
    Zh,
}

impl Language {
    /// The language of `text` by its script: Chinese when it holds a Han character (CJK
    /// Unified Ideographs and Extension A), else English.
    pub fn of(text: &str) -> Self {
        if text.chars().any(is_han) {
            Language::Zh
        } else {
            Language::En
        }
    }
}

fn is_han(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}

/// Why text could not be turned into phonemes.
#[derive(Debug, thiserror::Error)]
pub enum G2pError {
    /// espeak-ng could not run (English phonemes need it).
    #[error("espeak-ng ({program:?}) is needed for English phonemes and could not run: {reason}")]
    Espeak {
        /// The espeak-ng program run.
        program: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
}

/// espeak-ng's IPA (with `^` ties) to misaki's symbols, longest first. Each line is one of the
/// fix-ups misaki's espeak fallback applies, so the model hears the symbols it was trained on:
/// diphthongs and affricates become one symbol (`aɪ` -> `I`, `aʊ` -> `W`, `eɪ` -> `A`, `ɔɪ` ->
/// `Y`, `oʊ` -> `O`, `dʒ` -> `ʤ`, `tʃ` -> `ʧ`); sounds outside the inventory are mapped to the
/// nearest inside it (`r` -> `ɹ`, `x` and `ç` -> `k`, `ɐ` -> `ə`, `ɬ` -> `l`, the glottal stop
/// `ʔ` -> `t`, `ɚ` -> `əɹ`); a syllabic `l` is `ᵊl`; nasalisation and palatalisation marks are
/// dropped.
const ESPEAK_TO_MISAKI: &[(&str, &str)] = &[
    ("ʔˌn\u{329}", "tᵊn"),
    ("ʔn\u{329}", "tᵊn"),
    ("a^ɪ", "I"),
    ("a^ʊ", "W"),
    ("d^ʒ", "ʤ"),
    ("e^ɪ", "A"),
    ("t^ʃ", "ʧ"),
    ("ɔ^ɪ", "Y"),
    ("ə^l", "ᵊl"),
    ("o^ʊ", "O"),
    ("ʔn", "tᵊn"),
    ("ʲO", "jO"),
    ("ʲQ", "jQ"),
    ("\u{303}", ""),
    ("e", "A"),
    ("r", "ɹ"),
    ("x", "k"),
    ("ç", "k"),
    ("ɐ", "ə"),
    ("ɚ", "əɹ"),
    ("ɬ", "l"),
    ("ʔ", "t"),
    ("ʲ", ""),
];

/// Punctuation Kokoro's vocabulary has, kept between phonemized runs.
const KEPT_PUNCTUATION: &[char] = &[
    ';', ':', ',', '.', '!', '?', '—', '…', '"', '(', ')', '“', '”',
];

/// misaki's American-English clean-up of espeak-ng's IPA (see `ESPEAK_TO_MISAKI`); also the
/// length mark goes (American English in misaki has no long vowels), `ɜː` is `ɜɹ`, `ɪə` is
/// `iə`, a syllabic consonant `C̩` is `ᵊC`, and a bare `o` (older espeak-ng) is `ɔ`.
pub fn misaki_from_espeak(ipa: &str) -> String {
    let mut out = ipa.to_string();
    for (from, to) in ESPEAK_TO_MISAKI {
        out = out.replace(from, to);
    }
    // A syllabic consonant (a combining vertical line below): a schwa before it.
    let mut syllabic = String::with_capacity(out.len());
    let chars: Vec<char> = out.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && chars[i + 1] == '\u{329}' && !chars[i].is_whitespace() {
            syllabic.push('ᵊ');
            syllabic.push(chars[i]);
            i += 2;
            continue;
        }
        if chars[i] != '\u{329}' {
            syllabic.push(chars[i]);
        }
        i += 1;
    }
    syllabic
        .replace("ɜːɹ", "ɜɹ")
        .replace("ɜː", "ɜɹ")
        .replace("ɪə", "iə")
        .replace('ː', "")
        .replace('o', "ɔ")
        .replace('^', "")
}

/// Vowel symbols of misaki's English inventory (diphthongs as one capital).
const VOWELS: &str = "AIOWYQaeiouæɑɒɔəɛɜɪʊʌᵊɐ";

/// `ipa` with a primary stress on its first word when that word is a lone unstressed vowel.
/// espeak-ng leaves "I" unstressed, and Kokoro then swallowed it at the start of a sentence (4
/// of 20 benchmark sentences lost it: "I have set a timer" was heard as "Have set a timer");
/// misaki's own lexicon stresses it.
fn stress_first_word(ipa: &str) -> String {
    let first_end = ipa.find(' ').unwrap_or(ipa.len());
    let first = &ipa[..first_end];
    if first.is_empty() || !first.chars().all(|c| VOWELS.contains(c)) {
        return ipa.to_string();
    }
    format!("ˈ{ipa}")
}

/// English phonemes of `text` with the `espeak` program (see the module documentation).
///
/// # Errors
/// [`G2pError::Espeak`] when the program cannot run.
pub async fn english(text: &str, espeak: &str) -> Result<String, G2pError> {
    let mut out = String::new();
    for piece in split_keep(text, |c| KEPT_PUNCTUATION.contains(&c)) {
        match piece {
            Piece::Mark(c) => out.push(c),
            Piece::Text(words) if words.trim().is_empty() => {}
            Piece::Text(words) => {
                let ipa = espeak_ipa(words, espeak).await?;
                let ipa = misaki_from_espeak(&ipa);
                // A run that starts a sentence: its first word carries a stress.
                let starts_sentence = out.is_empty() || out.ends_with(['.', '!', '?', '…']);
                let ipa = if starts_sentence {
                    stress_first_word(&ipa)
                } else {
                    ipa
                };
                if ipa.is_empty() {
                    continue;
                }
                if !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
                out.push_str(&ipa);
            }
        }
    }
    Ok(out.trim().to_string())
}

async fn espeak_ipa(words: &str, espeak: &str) -> Result<String, G2pError> {
    let failed = |reason: String| G2pError::Espeak {
        program: espeak.to_string(),
        reason,
    };
    let mut child = tokio::process::Command::new(espeak)
        .args(["-q", "--ipa", "--tie=^", "-v", "en-us"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let mut stdin = child.stdin.take().expect("piped");
    // On stdin: no shell, no option injection, no length limit.
    stdin
        .write_all(format!("{words}\n").as_bytes())
        .await
        .map_err(|e| failed(e.to_string()))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        return Err(failed(format!("exited with {}", output.status)));
    }
    // One clause a line: joined with spaces.
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

enum Piece<'a> {
    Text(&'a str),
    Mark(char),
}

/// `text` cut at the characters `is_mark` picks, the marks kept as pieces.
fn split_keep(text: &str, is_mark: impl Fn(char) -> bool) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_mark(c) {
            if start < i {
                pieces.push(Piece::Text(&text[start..i]));
            }
            pieces.push(Piece::Mark(c));
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        pieces.push(Piece::Text(&text[start..]));
    }
    pieces
}

/// Full-width and Chinese punctuation as the ASCII marks Kokoro's vocabulary has.
fn map_chinese_punctuation(c: char) -> Option<&'static str> {
    Some(match c {
        '，' | '、' => ",",
        '。' | '．' => ".",
        '！' => "!",
        '？' => "?",
        '：' => ":",
        '；' => ";",
        '（' => "(",
        '）' => ")",
        '《' | '「' | '【' | '«' | '“' => "“",
        '》' | '」' | '】' | '»' | '”' => "”",
        _ => return None,
    })
}

/// Chinese numerals of a whole number (`2026` -> 二千零二十六), up to 10^16 - 1; read digit by
/// digit beyond.
pub fn chinese_number(digits: &str) -> String {
    const DIGIT: [char; 10] = ['零', '一', '二', '三', '四', '五', '六', '七', '八', '九'];
    let digit_by_digit = || {
        digits
            .chars()
            .filter_map(|c| c.to_digit(10))
            .map(|d| DIGIT[d as usize])
            .collect::<String>()
    };
    let Ok(n) = digits.parse::<u64>() else {
        return digit_by_digit();
    };
    if n == 0 {
        return "零".into();
    }
    if n >= 10_000_000_000_000_000 {
        return digit_by_digit();
    }
    // Below 10^4: thousands, hundreds, tens, ones, with 零 for an inner gap.
    let four = |n: u64| -> String {
        const UNIT: [&str; 4] = ["千", "百", "十", ""];
        let digits = [n / 1000, n / 100 % 10, n / 10 % 10, n % 10];
        let mut out = String::new();
        let mut gap = false;
        for (i, d) in digits.iter().enumerate() {
            if *d == 0 {
                gap = !out.is_empty();
                continue;
            }
            if gap {
                out.push('零');
                gap = false;
            }
            out.push(DIGIT[*d as usize]);
            out.push_str(UNIT[i]);
        }
        out
    };
    let groups = [
        (n / 1_000_000_000_000 % 10_000, "万亿"),
        (n / 100_000_000 % 10_000, "亿"),
        (n / 10_000 % 10_000, "万"),
        (n % 10_000, ""),
    ];
    let mut out = String::new();
    let mut zero_pending = false;
    for (value, unit) in groups {
        if value == 0 {
            zero_pending = !out.is_empty();
            continue;
        }
        let leading = out.is_empty();
        if !leading && (zero_pending || value < 1000) {
            out.push('零');
        }
        out.push_str(&four(value));
        out.push_str(unit);
        zero_pending = false;
    }
    // 一十X at the start is said 十X.
    if out.starts_with("一十") {
        out.remove(0);
    }
    out
}

/// Initials of Mandarin syllables, longest first, with misaki's IPA.
const INITIALS: &[(&str, &str)] = &[
    ("zh", "ꭧ"),
    ("ch", "ꭧʰ"),
    ("sh", "ʂ"),
    ("b", "p"),
    ("p", "pʰ"),
    ("m", "m"),
    ("f", "f"),
    ("d", "t"),
    ("t", "tʰ"),
    ("n", "n"),
    ("l", "l"),
    ("g", "k"),
    ("k", "kʰ"),
    ("h", "x"),
    ("j", "ʨ"),
    ("q", "ʨʰ"),
    ("x", "ɕ"),
    ("r", "ɻ"),
    ("z", "ʦ"),
    ("c", "ʦʰ"),
    ("s", "s"),
];

/// Finals (in their full spelling: `iou`, `uei`, `uen`, `ü...`) as IPA; `0` is where the tone
/// goes (after the nucleus).
const FINALS: &[(&str, &str)] = &[
    ("a", "a0"),
    ("ai", "ai0"),
    ("an", "a0n"),
    ("ang", "a0ŋ"),
    ("ao", "au0"),
    ("e", "ɤ0"),
    ("ei", "ei0"),
    ("en", "ə0n"),
    ("eng", "ə0ŋ"),
    ("er", "ɚ0"),
    ("i", "i0"),
    ("ia", "ja0"),
    ("ian", "jɛ0n"),
    ("iang", "ja0ŋ"),
    ("iao", "jau0"),
    ("ie", "je0"),
    ("in", "i0n"),
    ("iou", "jou0"),
    ("ing", "i0ŋ"),
    ("iong", "jʊ0ŋ"),
    ("ong", "ʊ0ŋ"),
    ("ou", "ou0"),
    ("u", "u0"),
    ("uei", "wei0"),
    ("ua", "wa0"),
    ("uai", "wai0"),
    ("uan", "wa0n"),
    ("uen", "wə0n"),
    ("uang", "wa0ŋ"),
    ("ueng", "wə0ŋ"),
    ("uo", "wo0"),
    ("o", "wo0"),
    ("ü", "y0"),
    ("üe", "ɥe0"),
    ("üan", "ɥɛ0n"),
    ("ün", "y0n"),
];

/// A syllable's tone as misaki's arrow (1st to 4th; the neutral tone has none).
fn tone_mark(tone: u32) -> &'static str {
    match tone {
        1 => "→",
        2 => "↗",
        3 => "↓",
        4 => "↘",
        _ => "",
    }
}

/// misaki's IPA of one pinyin syllable with its tone number at the end (`zhong1`, `lü4`,
/// `ma` for the neutral tone). `None` for a spelling that is no Mandarin syllable.
pub fn syllable_ipa(syllable: &str) -> Option<String> {
    let (spelling, tone) = match syllable.chars().last()?.to_digit(10) {
        Some(t) => (&syllable[..syllable.len() - 1], t),
        None => (syllable, 5),
    };
    let spelling = spelling.replace('v', "ü");
    let mark = tone_mark(tone);
    // Syllabic nasals and interjections.
    let special = match spelling.as_str() {
        "m" => Some("m0"),
        "n" => Some("n0"),
        "ng" => Some("ŋ0"),
        "hm" => Some("hm0"),
        "hng" => Some("hŋ0"),
        "ê" => Some("ɛ0"),
        "o" => Some("ɔ0"),
        "io" => Some("jɔ0"),
        "er" => Some("ɚ0"),
        _ => None,
    };
    if let Some(ipa) = special {
        return Some(ipa.replace('0', mark));
    }
    let (initial, ipa_initial, rest) = INITIALS
        .iter()
        .find(|(i, _)| spelling.starts_with(i))
        .map(|(i, ipa)| (*i, *ipa, &spelling[i.len()..]))
        .unwrap_or(("", "", spelling.as_str()));
    // The spelled-out forms of y-, w- and the abbreviations iu, ui, un; u after j/q/x is ü.
    let final_ = match (initial, rest) {
        ("", r) if r.starts_with("yu") => format!("ü{}", &r[2..]),
        ("", "yi" | "yin" | "ying") => rest[1..].to_string(),
        ("", r) if r.starts_with('y') => format!("i{}", &r[1..]),
        ("", "wu") => "u".into(),
        ("", r) if r.starts_with('w') => format!("u{}", &r[1..]),
        ("j" | "q" | "x", r) if r.starts_with('u') => format!("ü{}", &r[1..]),
        (_, "iu") => "iou".into(),
        (_, "ui") => "uei".into(),
        (_, "un") => "uen".into(),
        (_, r) => r.to_string(),
    };
    // The apical vowel of zhi, chi, shi, ri and zi, ci, si.
    let final_ipa =
        if final_ == "i" && matches!(initial, "zh" | "ch" | "sh" | "r" | "z" | "c" | "s") {
            "ɨ0".to_string()
        } else {
            FINALS
                .iter()
                .find(|(f, _)| *f == final_)
                .map(|(_, ipa)| ipa.to_string())?
        };
    Some(format!("{ipa_initial}{}", final_ipa.replace('0', mark)))
}

fn jieba() -> &'static jieba_rs::Jieba {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new)
}

/// Mandarin phonemes of `text` (see the module documentation); Latin runs inside it are read
/// by `english`, which gets each run's text.
///
/// # Errors
/// What `english` returns.
pub async fn chinese(text: &str, espeak: &str) -> Result<String, G2pError> {
    use pinyin::ToPinyin as _;
    // Digits as numerals (a decimal point is 点, a percent sign 百分之 before the number).
    let mut normalised = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let whole: String = chars[start..i].iter().collect();
            let mut spoken = chinese_number(&whole);
            if i + 1 < chars.len() && chars[i] == '.' && chars[i + 1].is_ascii_digit() {
                spoken.push('点');
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    spoken.push_str(&chinese_number(&chars[i].to_string()));
                    i += 1;
                }
            }
            if i < chars.len() && (chars[i] == '%' || chars[i] == '％') {
                spoken = format!("百分之{spoken}");
                i += 1;
            }
            normalised.push_str(&spoken);
            continue;
        }
        match map_chinese_punctuation(chars[i]) {
            Some(mark) => normalised.push_str(mark),
            None => normalised.push(chars[i]),
        }
        i += 1;
    }
    let mut out = String::new();
    let push = |out: &mut String, part: &str| {
        let part = part.trim();
        if part.is_empty() {
            return;
        }
        let glue = !out.is_empty()
            && !out.ends_with(' ')
            && !part.starts_with(|c: char| KEPT_PUNCTUATION.contains(&c));
        if glue {
            out.push(' ');
        }
        out.push_str(part);
    };
    // Runs of Han characters, Latin words and everything else.
    let mut run = String::new();
    let mut run_is_han = None;
    let mut runs: Vec<(bool, String)> = Vec::new();
    for c in normalised.chars() {
        let han = is_han(c);
        if run_is_han.is_some_and(|h| h != han) {
            runs.push((run_is_han.unwrap_or(false), std::mem::take(&mut run)));
        }
        run_is_han = Some(han);
        run.push(c);
    }
    if !run.is_empty() {
        runs.push((run_is_han.unwrap_or(false), run));
    }
    for (han, run) in runs {
        if han {
            for word in jieba().cut(&run, true) {
                let ipa: String = word
                    .to_pinyin()
                    .filter_map(|p| p.and_then(|p| syllable_ipa(p.with_tone_num_end())))
                    .collect();
                push(&mut out, &ipa);
            }
        } else if run.chars().any(|c| c.is_ascii_alphabetic()) {
            push(&mut out, &english(&run, espeak).await?);
        } else {
            let marks: String = run
                .chars()
                .filter(|c| KEPT_PUNCTUATION.contains(c))
                .collect();
            out.push_str(&marks);
        }
    }
    Ok(out.trim().to_string())
}

/// The phonemes of `text` in `language` (see [`english`] and [`chinese`]).
///
/// # Errors
/// [`G2pError`].
pub async fn phonemes(text: &str, language: Language, espeak: &str) -> Result<String, G2pError> {
    match language {
        Language::En => english(text, espeak).await,
        Language::Zh => chinese(text, espeak).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_picks_the_language() {
        assert_eq!(Language::of("Play some music."), Language::En);
        assert_eq!(Language::of("播放音乐"), Language::Zh);
        assert_eq!(Language::of("打开 Spotify 播放"), Language::Zh);
    }

    #[test]
    fn espeak_ipa_becomes_misakis_symbols() {
        assert_eq!(misaki_from_espeak("həlˈo^ʊ"), "həlˈO");
        assert_eq!(misaki_from_espeak("a^ɪ lˈa^ɪk hˈa^ʊs"), "I lˈIk hˈWs");
        assert_eq!(misaki_from_espeak("ðə bˈɔ^ɪz d^ʒˈɔ^ɪ"), "ðə bˈYz ʤˈY");
        assert_eq!(misaki_from_espeak("t^ʃˈɜːt^ʃ"), "ʧˈɜɹʧ");
        assert_eq!(misaki_from_espeak("bˈʌʔn\u{329}"), "bˈʌtᵊn");
        assert_eq!(misaki_from_espeak("pɚsˈɛnt"), "pəɹsˈɛnt");
        assert_eq!(misaki_from_espeak("fˈɔːɹɾi"), "fˈɔɹɾi");
    }

    #[test]
    fn an_unstressed_first_word_gets_a_stress() {
        assert_eq!(stress_first_word("I hæv sˈɛt"), "ˈI hæv sˈɛt");
        assert_eq!(stress_first_word("ə tˈImɚ"), "ˈə tˈImɚ");
        assert_eq!(stress_first_word("ðə bˈYz"), "ðə bˈYz");
        assert_eq!(stress_first_word("hˈæv"), "hˈæv");
        assert_eq!(stress_first_word("ɹ"), "ɹ");
    }

    #[test]
    fn syllables_in_misakis_ipa() {
        let cases = [
            ("ni3", "ni↓"),
            ("hao3", "xau↓"),
            ("zhong1", "ꭧʊ→ŋ"),
            ("guo2", "kwo↗"),
            ("shi4", "ʂɨ↘"),
            ("zi3", "ʦɨ↓"),
            ("ri4", "ɻɨ↘"),
            ("xue2", "ɕɥe↗"),
            ("lü4", "ly↘"),
            ("lv4", "ly↘"),
            ("ju4", "ʨy↘"),
            ("quan2", "ʨʰɥɛ↗n"),
            ("yu2", "y↗"),
            ("yuan2", "ɥɛ↗n"),
            ("yi1", "i→"),
            ("ying1", "i→ŋ"),
            ("you3", "jou↓"),
            ("wu3", "u↓"),
            ("wei4", "wei↘"),
            ("wen4", "wə↘n"),
            ("liu2", "ljou↗"),
            ("dui4", "twei↘"),
            ("lun4", "lwə↘n"),
            ("bo1", "pwo→"),
            ("er4", "ɚ↘"),
            ("de", "tɤ"),
            ("ma", "ma"),
            ("chi1", "ꭧʰɨ→"),
            ("qiong2", "ʨʰjʊ↗ŋ"),
        ];
        for (pinyin, ipa) in cases {
            assert_eq!(syllable_ipa(pinyin).as_deref(), Some(ipa), "{pinyin}");
        }
        assert_eq!(syllable_ipa("xyz1"), None);
    }

    #[test]
    fn numbers_in_chinese() {
        for (n, zh) in [
            ("0", "零"),
            ("7", "七"),
            ("10", "十"),
            ("15", "十五"),
            ("20", "二十"),
            ("101", "一百零一"),
            ("2026", "二千零二十六"),
            ("10000", "一万"),
            ("10001", "一万零一"),
            ("120000", "十二万"),
            ("100000000", "一亿"),
        ] {
            assert_eq!(chinese_number(n), zh, "{n}");
        }
    }

    #[tokio::test]
    async fn chinese_text_with_numbers_punctuation_and_english() {
        let ipa = chinese("你好，世界。", "espeak-ng").await.unwrap();
        assert_eq!(ipa, "ni↓xau↓, ʂɨ↘ʨje↘.");
        let ipa = chinese("音量调到30%", "espeak-ng").await.unwrap();
        assert!(ipa.contains("pai↓"), "{ipa}");
        assert!(ipa.contains("ʂɨ↗"), "{ipa}");
        // English inside Chinese is read as English.
        let ipa = chinese("打开Spotify播放", "espeak-ng").await.unwrap();
        assert!(ipa.contains("spˈɑ"), "{ipa}");
        let tokens = crate::speech::kokoro::tokenize(&ipa);
        assert_eq!(
            tokens.len(),
            ipa.chars().count(),
            "every symbol is in the vocabulary: {ipa}"
        );
    }

    #[tokio::test]
    async fn english_keeps_punctuation_and_reads_numbers() {
        let ipa = english("Hello, world! It's 7 PM.", "espeak-ng")
            .await
            .unwrap();
        assert_eq!(ipa.matches(',').count(), 1, "{ipa}");
        assert!(ipa.contains('!') && ipa.ends_with('.'), "{ipa}");
        assert!(ipa.contains("sˈɛvən"), "{ipa}");
        let tokens = crate::speech::kokoro::tokenize(&ipa);
        assert_eq!(tokens.len(), ipa.chars().count(), "{ipa}");
    }
}
