//! Deterministic intents for voxloop's own tools: volume, the time, stop, pause and resume, and
//! goodbye; and the one question the runtime answers itself, what the volume is.
//!
//! A small chat model chooses these tools poorly (issue 20: "set the volume to forty percent"
//! played a song; "what time is it" was answered from the model's imagination), while the
//! requests themselves are few and formulaic. As Home Assistant's local intent matching does
//! before it asks an LLM, the transcript is matched against fixed patterns first; a match calls
//! the built-in tool directly, and everything else (music, chit-chat, other servers' tools)
//! still goes to the model.
//!
//! Patterns are English and Chinese. They are deliberately narrow: an utterance that starts with
//! "play" (or 播放) is never matched, so a song called "Don't Stop Me Now" still reaches the
//! music tool, and stop/goodbye phrases must make up most of the utterance.

use serde_json::{Value, json};

/// A built-in tool call recognised in the user's words.
#[derive(Debug, Clone, PartialEq)]
pub struct Intent {
    /// The built-in tool's name (`set_volume`, `get_current_time`, `stop_playback`,
    /// `pause_playback`, `resume_playback`, `exit_conversation`).
    pub tool: &'static str,
    /// The call's arguments (a JSON object).
    pub arguments: Value,
}

/// Settings of the matcher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntentSettings {
    /// Percentage points that "louder" / "quieter" move the volume.
    pub volume_step: u8,
}

/// Words said before or after a command that do not change it.
const POLITE: &[&str] = &[
    "please", "hey", "ok", "okay", "voxloop", "now", "can", "could", "would", "you", "just",
    "thanks", "thank", "oh", "um", "uh", "so", "and",
];

/// Matches `text` (a transcript) against the built-in intents. `volume` is the current playback
/// volume in percent (for "louder" and "quieter"); `offered` says whether a tool of that name is
/// offered this turn (a match on a tool that is not offered is no match).
pub fn match_intent(
    text: &str,
    volume: u8,
    settings: &IntentSettings,
    offered: impl Fn(&str) -> bool,
) -> Option<Intent> {
    let lower = text.trim().to_lowercase();
    let words = words(&lower);
    if words.is_empty() || words[0] == "play" || lower.starts_with("播放") {
        return None;
    }
    let candidates = [
        exit_intent(&lower, &words),
        stop_intent(&lower, &words),
        pause_intent(&lower, &words),
        resume_intent(&lower, &words),
        volume_intent(&lower, &words, volume, settings.volume_step),
        time_intent(&lower, &words),
    ];
    candidates.into_iter().flatten().find(|i| offered(i.tool))
}

/// Lower-case words of `text`, split at anything that is not a letter, digit or apostrophe
/// (curly apostrophes made straight).
fn words(text: &str) -> Vec<String> {
    text.replace('’', "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The words of an utterance without the polite ones around a command.
fn core_words(words: &[String]) -> Vec<&str> {
    words
        .iter()
        .map(String::as_str)
        .filter(|w| !POLITE.contains(w))
        .collect()
}

fn call(tool: &'static str, arguments: Value) -> Option<Intent> {
    Some(Intent { tool, arguments })
}

fn exit_intent(lower: &str, words: &[String]) -> Option<Intent> {
    const PHRASES: &[&str] = &[
        "goodbye",
        "good bye",
        "bye bye",
        "see you later",
        "see you tomorrow",
        "good night",
        "that's all",
        "that is all",
        "that will be all",
        "that'll be all",
        "we're done",
        "we are done",
        "i'm done",
        "i am done",
        "end the conversation",
        "stop talking",
        "exit",
        "quit",
    ];
    const ZH: &[&str] = &["再见", "拜拜", "退出", "结束对话", "晚安", "就这样吧"];
    let joined = words.join(" ");
    let english = PHRASES
        .iter()
        .any(|p| contains_phrase(&joined, p) && core_words(words).len() <= 8)
        || core_words(words) == ["bye"];
    (english || ZH.iter().any(|p| lower.contains(p))).then_some(())?;
    call("exit_conversation", json!({}))
}

/// Words that may follow a playback command and name only the playback.
const PLAYBACK_WORDS: &[&str] = &[
    "it",
    "that",
    "this",
    "the",
    "music",
    "song",
    "track",
    "playback",
    "playing",
    "audio",
    "sound",
    "off",
    "for",
    "a",
    "moment",
    "now",
    "everything",
    "all",
    "please",
    "again",
];

fn stop_intent(lower: &str, words: &[String]) -> Option<Intent> {
    const ZH: &[&str] = &["停止", "停下", "别放了", "不要放了", "关掉音乐"];
    let core = core_words(words);
    let english = match core.as_slice() {
        [] => false,
        ["silence"] | ["be", "quiet"] | ["shut", "up"] | ["enough"] => true,
        ["turn", rest @ ..] | ["switch", rest @ ..] => {
            rest.contains(&"off") && rest.iter().all(|w| PLAYBACK_WORDS.contains(w))
        }
        [first, rest @ ..] => {
            matches!(*first, "stop" | "halt")
                && about_playback(rest)
                && !rest.iter().any(|w| A_WHILE.contains(w))
        }
    };
    let chinese =
        says_briefly(lower, ZH) || lower.trim_matches(|c: char| !c.is_alphanumeric()) == "停";
    (english || chinese).then_some(())?;
    call("stop_playback", json!({}))
}

/// Words that make "stop" a pause: "stop the music for a moment".
const A_WHILE: &[&str] = &["moment", "second", "minute", "bit", "while"];

/// Whether a short utterance (at most 8 characters: a command, not a sentence about one)
/// contains one of the Chinese `phrases`.
fn says_briefly(lower: &str, phrases: &[&str]) -> bool {
    lower.chars().count() <= 8 && phrases.iter().any(|p| lower.contains(p))
}

/// Whether the words after a playback command ("stop ...", "pause ...") only name the playback:
/// "the music", "it", "for a moment".
fn about_playback(rest: &[&str]) -> bool {
    rest.len() <= 4 && rest.iter().all(|w| PLAYBACK_WORDS.contains(w))
}

fn pause_intent(lower: &str, words: &[String]) -> Option<Intent> {
    // "Hold it, pause the music": a "hold it" or "wait" before the command adds nothing.
    let mut core = core_words(words);
    let lead = match core.as_slice() {
        ["hold" | "wait", "it" | "on", _, ..] => 2,
        ["wait", _, ..] => 1,
        _ => 0,
    };
    core.drain(..lead);
    let english = match core.as_slice() {
        ["pause", rest @ ..] => about_playback(rest),
        ["hold", "the", "music"] => true,
        // "Stop the music for a moment" asks for a pause, not an end.
        ["stop", rest @ ..] => {
            rest.iter().any(|w| A_WHILE.contains(w))
                && rest.len() <= 6
                && rest
                    .iter()
                    .all(|w| PLAYBACK_WORDS.contains(w) || A_WHILE.contains(w))
        }
        _ => false,
    };
    let chinese = says_briefly(lower, &["暂停", "停一下"]);
    (english || chinese).then_some(())?;
    call("pause_playback", json!({}))
}

fn resume_intent(lower: &str, words: &[String]) -> Option<Intent> {
    let core = core_words(words);
    let english = match core.as_slice() {
        ["resume" | "unpause" | "continue", rest @ ..] => about_playback(rest),
        ["keep", "playing", rest @ ..] | ["carry", "on", rest @ ..] => about_playback(rest),
        ["start", "the", "music", "again"] | ["start", "it", "again"] => true,
        _ => false,
    };
    let trimmed = lower.trim_matches(|c: char| !c.is_alphanumeric());
    let chinese = trimmed == "继续"
        || says_briefly(
            lower,
            &["继续播放", "继续放", "接着放", "接着播放", "恢复播放"],
        );
    (english || chinese).then_some(())?;
    call("resume_playback", json!({}))
}

fn volume_intent(lower: &str, words: &[String], volume: u8, step: u8) -> Option<Intent> {
    let joined = words.join(" ");
    let has = |p: &str| contains_phrase(&joined, p);
    let about_volume = has("volume")
        || lower.contains("音量")
        || lower.contains("声音")
        || ["louder", "quieter", "softer", "mute", "unmute"]
            .iter()
            .any(|w| has(w))
        || [
            "turn it up",
            "turn it down",
            "turn up",
            "turn down",
            "crank it up",
        ]
        .iter()
        .any(|p| has(p));
    if !about_volume {
        return None;
    }
    let set = |v: i32| call("set_volume", json!({"volume": v.clamp(0, 100)}));
    if let Some(n) = english_number(words).or_else(|| chinese_number(lower)) {
        return set(n);
    }
    if has("unmute") {
        return set(50);
    }
    if has("mute") || lower.contains("静音") {
        return set(0);
    }
    if has("max") || has("maximum") || has("full volume") || lower.contains("最大") {
        return set(100);
    }
    let step = i32::from(step);
    let up = ["louder", "up", "increase", "raise", "higher", "more"]
        .iter()
        .any(|w| has(w))
        || ["大声", "调大", "大一点", "大点", "增大"]
            .iter()
            .any(|p| lower.contains(p));
    let down = [
        "quieter", "softer", "down", "decrease", "lower", "reduce", "less",
    ]
    .iter()
    .any(|w| has(w))
        || ["小声", "调小", "小一点", "小点", "减小", "轻一点"]
            .iter()
            .any(|p| lower.contains(p));
    match (up, down) {
        (true, false) => set(i32::from(volume) + step),
        (false, true) => set(i32::from(volume) - step),
        _ => None,
    }
}

fn time_intent(lower: &str, words: &[String]) -> Option<Intent> {
    let joined = words.join(" ");
    let has = |p: &str| contains_phrase(&joined, p);
    let english = [
        "what time",
        "the time",
        "time is it",
        "current time",
        "time now",
    ]
    .iter()
    .any(|p| has(p))
        || [
            "what day is it",
            "what's the date",
            "what is the date",
            "today's date",
        ]
        .iter()
        .any(|p| has(p))
        || [
            "what day is today",
            "which day is it",
            "what is today's date",
        ]
        .iter()
        .any(|p| has(p));
    // "What time is it in Tokyo?" asks about another place: the built-in tool knows only ours.
    let elsewhere = joined
        .split_once("time")
        .is_some_and(|(_, after)| contains_phrase(after, "in"));
    let chinese = ["几点", "什么时间", "几号", "星期几", "日期", "现在时间"]
        .iter()
        .any(|p| lower.contains(p));
    ((english && !elsewhere) || chinese).then_some(())?;
    call("get_current_time", json!({}))
}

/// Whether `text` (a transcript) asks what the playback volume is ("What's the volume right
/// now?", "How loud is it?", 音量是多少): a question about the volume that neither sets it
/// ([`match_intent`] hears those) nor asks about something else's ("the volume of a sphere").
pub fn asks_volume(text: &str) -> bool {
    let lower = text.trim().to_lowercase();
    let words = words(&lower);
    let joined = words.join(" ");
    let has = |p: &str| contains_phrase(&joined, p);
    let question = ["what", "what's", "how", "is", "tell", "say", "which"]
        .iter()
        .any(|w| words.first().is_some_and(|f| f == w))
        || text.trim_end().ends_with('?');
    let about_volume = (has("volume") && !has("volume of") && !has("volume in"))
        || [
            "how loud is it",
            "how loud is this",
            "how loud is the music",
        ]
        .iter()
        .any(|p| has(p));
    let english = question && about_volume;
    let chinese = (lower.contains("音量") || lower.contains("声音"))
        && ["多少", "多大", "几"].iter().any(|q| lower.contains(q))
        && !["调", "设", "大一点", "小一点", "大点", "小点"]
            .iter()
            .any(|w| lower.contains(w));
    let sets = english_number(&words).is_some()
        || [
            "set", "turn", "make", "change", "louder", "quieter", "softer", "mute", "unmute", "up",
            "down", "increase", "decrease", "raise", "lower",
        ]
        .iter()
        .any(|w| has(w));
    (english && !sets) || chinese
}

/// Whether `text` has Chinese characters (CJK unified ideographs): the answer is then Chinese.
fn is_chinese(text: &str) -> bool {
    text.chars().any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c))
}

/// Said when `resume_playback` finds nothing paused, in the request's language.
pub fn nothing_paused(request: &str) -> &'static str {
    if is_chinese(request) {
        "没有暂停的音乐。"
    } else {
        "Nothing is paused."
    }
}

/// The spoken answer to [`asks_volume`]: `volume` in percent, in the request's language.
pub fn spoken_volume(volume: u8, request: &str) -> String {
    if is_chinese(request) {
        format!("现在的音量是百分之{volume}。")
    } else if volume == 0 {
        "The sound is muted.".to_string()
    } else {
        format!("The volume is {volume} percent.")
    }
}

/// The reply to a time request: the built-in tool's `result` ("It is 7:05 PM on Sunday, ...")
/// as it is, or, for a request in Chinese, its hour and minute in Chinese ("现在是19点05分。").
pub fn spoken_time(result: &str, request: &str) -> String {
    let chinese = is_chinese(request);
    let words: Vec<&str> = result.split_whitespace().collect();
    let clock = words.iter().position(|w| w.contains(':'));
    if let (true, Some(i)) = (chinese, clock)
        && let Some((h, m)) = words[i].split_once(':')
        && let (Ok(mut h), Ok(m)) = (h.parse::<u32>(), m.parse::<u32>())
    {
        match words
            .get(i + 1)
            .map(|w| w.trim_matches(|c: char| !c.is_alphabetic()))
        {
            Some("PM") if h < 12 => h += 12,
            Some("AM") if h == 12 => h = 0,
            _ => {}
        }
        return format!("现在是{h}点{m:02}分。");
    }
    super::reply::clean(result)
}

/// Whether `phrase` occurs in `text` as whole words (both are space-joined lower-case words).
fn contains_phrase(text: &str, phrase: &str) -> bool {
    let padded = format!(" {text} ");
    padded.contains(&format!(" {phrase} "))
}

/// The first number in `words`: digits (`40`, `40%`), or English number words ("forty",
/// "twenty five", "twenty-five", "a hundred", "one hundred").
pub fn english_number(words: &[String]) -> Option<i32> {
    let mut i = 0;
    while i < words.len() {
        let w = words[i].trim_end_matches('%');
        if let Ok(n) = w.parse::<i32>() {
            return Some(n);
        }
        // Whisper writes "40%" as "40%" and sometimes "forty-five" with a hyphen; words() split
        // the hyphen already.
        if let Some(mut n) = word_value(w) {
            let mut j = i + 1;
            if n == 100 {
                return Some(100);
            }
            if (20..100).contains(&n)
                && n % 10 == 0
                && let Some(unit) = words.get(j).and_then(|w| word_value(w))
                && (1..10).contains(&unit)
            {
                n += unit;
                j += 1;
            }
            if matches!(words.get(j).map(String::as_str), Some("hundred")) {
                n = n.max(1) * 100;
            }
            return Some(n);
        }
        if w == "a" && matches!(words.get(i + 1).map(String::as_str), Some("hundred")) {
            return Some(100);
        }
        if w == "half" && words.iter().any(|w| w == "volume") {
            return Some(50);
        }
        i += 1;
    }
    None
}

fn word_value(word: &str) -> Option<i32> {
    use crate::speech::asr::{NUMBER_WORDS, TENS_WORDS};
    if let Some(i) = NUMBER_WORDS.iter().position(|w| *w == word) {
        return Some(i as i32);
    }
    if let Some(i) = TENS_WORDS[2..].iter().position(|w| *w == word) {
        return Some(20 + 10 * i as i32);
    }
    match word {
        "fourty" => Some(40),
        "hundred" => Some(100),
        _ => None,
    }
}

/// The first number written in Chinese numerals or digits in `text` (百分之三十 = 30,
/// 四十 = 40, 二十五 = 25, 一百 = 100, 两 = 2).
pub fn chinese_number(text: &str) -> Option<i32> {
    let digit = |c: char| match c {
        '零' | '〇' => Some(0),
        '一' => Some(1),
        '二' | '两' => Some(2),
        '三' => Some(3),
        '四' => Some(4),
        '五' => Some(5),
        '六' => Some(6),
        '七' => Some(7),
        '八' => Some(8),
        '九' => Some(9),
        _ => None,
    };
    // 一点 / 一下 / 一些 are "a bit", not the number one (声音大一点: a bit louder).
    let mut text = text.replace("百分之", "");
    for idiom in ["一点", "一下", "一些"] {
        text = text.replace(idiom, "");
    }
    let chars: Vec<char> = text.chars().collect();
    let start = chars
        .iter()
        .position(|&c| digit(c).is_some() || c == '十' || c == '百')?;
    let mut total = 0;
    let mut current = 0;
    let mut any = false;
    for &c in &chars[start..] {
        if let Some(d) = digit(c) {
            current = d;
            any = true;
        } else if c == '十' {
            total += current.max(1) * 10;
            current = 0;
            any = true;
        } else if c == '百' {
            total += current.max(1) * 100;
            current = 0;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(total + current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(text: &str) -> Option<(&'static str, Value)> {
        match_intent(text, 50, &IntentSettings { volume_step: 20 }, |_| true)
            .map(|i| (i.tool, i.arguments))
    }

    fn volume(text: &str) -> Option<i64> {
        match intent(text) {
            Some(("set_volume", args)) => args["volume"].as_i64(),
            _ => None,
        }
    }

    #[test]
    fn volume_in_words_and_digits() {
        assert_eq!(volume("Set the volume to forty percent."), Some(40));
        assert_eq!(volume("Make it quieter, set volume to ten."), Some(10));
        assert_eq!(volume("Turn the volume down to twenty."), Some(20));
        assert_eq!(volume("Volume 75%"), Some(75));
        assert_eq!(volume("set the volume to twenty-five"), Some(25));
        assert_eq!(volume("Volume to a hundred."), Some(100));
        assert_eq!(volume("Set the volume to 150."), Some(100));
        assert_eq!(volume("Louder please."), Some(70));
        assert_eq!(volume("Make it quieter."), Some(30));
        assert_eq!(volume("Turn it up."), Some(70));
        assert_eq!(volume("Mute."), Some(0));
        assert_eq!(volume("把音量调到百分之三十"), Some(30));
        assert_eq!(volume("音量四十"), Some(40));
        assert_eq!(volume("声音大一点"), Some(70));
        assert_eq!(volume("What is the weather like?"), None);
    }

    #[test]
    fn time_stop_and_goodbye() {
        for t in [
            "What time is it right now?",
            "Tell me what time it is.",
            "What's the time?",
            "What day is it today?",
            "现在几点了？",
        ] {
            assert_eq!(intent(t).map(|i| i.0), Some("get_current_time"), "{t}");
        }
        assert_eq!(intent("What time is it in Tokyo?"), None);
        for t in ["Stop.", "Stop the music.", "Turn it off.", "停止播放"] {
            assert_eq!(intent(t).map(|i| i.0), Some("stop_playback"), "{t}");
        }
        for t in [
            "Pause it please.",
            "Pause the music.",
            "Pause.",
            "Hold the music.",
            "Hold it, pause the music please.",
            "Wait, pause it.",
            "Could you stop the music for a moment?",
            "Stop it for a second.",
            "暂停",
            "暂停一下音乐",
        ] {
            assert_eq!(intent(t).map(|i| i.0), Some("pause_playback"), "{t}");
        }
        for t in [
            "Resume the music.",
            "Continue playing.",
            "Resume.",
            "Unpause it.",
            "Keep playing please.",
            "Start the music again.",
            "继续",
            "继续播放",
        ] {
            assert_eq!(intent(t).map(|i| i.0), Some("resume_playback"), "{t}");
        }
        for t in [
            "Continue the story.",
            "Pause for thought is a good book.",
            "继续讲故事吧，讲到哪里了",
        ] {
            assert_eq!(intent(t), None, "{t}");
        }
        for t in [
            "Goodbye, that is all for today.",
            "Bye!",
            "That's all, thanks.",
            "再见",
        ] {
            assert_eq!(intent(t).map(|i| i.0), Some("exit_conversation"), "{t}");
        }
    }

    #[test]
    fn music_requests_and_chat_are_left_to_the_model() {
        for t in [
            "Play Don't Stop Me Now.",
            "Play some music.",
            "播放音乐",
            "Why do we stop at red lights?",
            "Tell me a joke.",
            "How far away is the moon?",
            "",
        ] {
            assert_eq!(intent(t), None, "{t}");
        }
    }

    #[test]
    fn a_tool_that_is_not_offered_is_no_match() {
        let settings = IntentSettings { volume_step: 20 };
        assert_eq!(
            match_intent("What time is it?", 50, &settings, |t| t
                != "get_current_time"),
            None
        );
    }

    #[test]
    fn a_question_about_the_volume_is_told_not_set() {
        for t in [
            "What's the volume right now?",
            "What is the volume?",
            "How loud is it?",
            "What volume is it at?",
            "Tell me the current volume.",
            "Is the volume high?",
            "音量是多少？",
            "现在声音多大",
        ] {
            assert!(asks_volume(t), "{t}");
            // And it is no call of a tool.
            assert_eq!(intent(t), None, "{t}");
        }
        for t in [
            "Set the volume to forty percent.",
            "What's the volume? Turn it up.",
            "Volume up.",
            "What is the volume of a sphere?",
            "How loud is a jet engine?",
            "What time is it?",
            "Play the volume song.",
            "把音量调到百分之三十",
            "声音大一点",
        ] {
            assert!(!asks_volume(t), "{t}");
        }
        assert_eq!(
            spoken_volume(30, "What's the volume?"),
            "The volume is 30 percent."
        );
        assert_eq!(spoken_volume(0, "How loud is it?"), "The sound is muted.");
        assert_eq!(spoken_volume(45, "音量是多少"), "现在的音量是百分之45。");
    }

    #[test]
    fn the_time_is_said_in_the_requests_language() {
        let result = "It is 7:05 PM on Sunday, 29 November 2026.";
        assert_eq!(spoken_time(result, "What time is it?"), result);
        assert_eq!(spoken_time(result, "现在几点了？"), "现在是19点05分。");
        assert_eq!(
            spoken_time("It is 12:30 AM on Monday.", "几点"),
            "现在是0点30分。"
        );
    }

    #[test]
    fn numbers() {
        let w = |s: &str| words(s);
        assert_eq!(english_number(&w("forty five")), Some(45));
        assert_eq!(english_number(&w("one hundred")), Some(100));
        assert_eq!(english_number(&w("nothing here")), None);
        assert_eq!(chinese_number("二十五"), Some(25));
        assert_eq!(chinese_number("十"), Some(10));
        assert_eq!(chinese_number("一百"), Some(100));
    }
}
