//! The offline voices side by side in one run: espeak-ng and Kokoro-82M.
//!
//! For each: the time from a six-word clause's text to its first audio bytes (median of 5, the
//! Kokoro model loaded before), the real-time factor (synthesis time / audio time) over 40
//! sentences, and intelligibility: each sentence's speech transcribed back by whisper base,
//! English word error rate over 20 sentences and Chinese character error rate over 20 (numbers
//! written as digits by whisper count as the words or numerals said; whisper's traditional
//! characters count as errors).
//!
//! ```sh
//! cargo bench --bench tts
//! ```
//! Needs espeak-ng and `voxloop models fetch` (Whisper base, Kokoro, its voices, ONNX Runtime).

use std::time::{Duration, Instant};

use voxloop::audio::Pcm;
use voxloop::audio::convert::Converter;
use voxloop::speech::SPEECH_RATE;
use voxloop::speech::asr::AsrConfig;
use voxloop::speech::asr::{Asr, edit_distance, transcript_words};
use voxloop::speech::tts::Tts;
use voxloop::speech::tts::{TtsConfig, TtsProvider};

const CLAUSE: &str = "Turn on the lights, please.";

const ENGLISH: [&str; 20] = [
    "Good morning, here is your weather for today.",
    "It will be sunny with a light breeze in the afternoon.",
    "I have set a timer for ten minutes.",
    "Your next meeting starts at three in the afternoon.",
    "Playing the song just over the horizon.",
    "The volume is now at forty percent.",
    "I could not find that song in your library.",
    "Would you like me to read your messages?",
    "The kitchen lights are now turned off.",
    "Traffic on your way to work is lighter than usual.",
    "Remember to take an umbrella this evening.",
    "Your package was delivered at the front door.",
    "The nearest pharmacy closes at nine tonight.",
    "I added milk and bread to your shopping list.",
    "The train to the city leaves in twenty minutes.",
    "Here is a short summary of the news.",
    "Sorry, I did not catch that. Could you say it again?",
    "The living room is warmer than the bedroom.",
    "Goodbye, and have a wonderful day.",
    "Your alarm is set for seven tomorrow morning.",
];

const CHINESE: [&str; 20] = [
    "早上好，今天天气晴朗。",
    "下午会有一点小风。",
    "我已经设置了十分钟的计时器。",
    "你的下一个会议在下午三点开始。",
    "现在为你播放音乐。",
    "音量已经调到百分之四十。",
    "我没有找到这首歌。",
    "需要我帮你读一下消息吗？",
    "厨房的灯已经关掉了。",
    "今天上班的路上不太堵车。",
    "晚上记得带雨伞。",
    "你的快递已经送到门口了。",
    "最近的药店晚上九点关门。",
    "我把牛奶和面包加到了购物清单。",
    "去市中心的火车二十分钟后出发。",
    "这是今天新闻的简短摘要。",
    "对不起，我没听清楚，请再说一遍。",
    "客厅比卧室暖和一些。",
    "再见，祝你今天愉快。",
    "闹钟已经设在明天早上七点。",
];

/// Whisper's initial prompt for Chinese: simplified characters and punctuation, as the
/// references are written.
const ZH_PROMPT: &str = "以下是普通话的句子。";

async fn synthesize(tts: &Tts, text: &str) -> (Duration, Duration, Pcm) {
    let started = Instant::now();
    let mut media = tts.synthesize(text).await.expect("synthesis");
    let mut first = None;
    let mut bytes = Vec::new();
    while let Some(chunk) = media.next_chunk().await {
        first.get_or_insert_with(|| started.elapsed());
        bytes.extend_from_slice(&chunk.expect("audio"));
    }
    let total = started.elapsed();
    let mut pcm: Option<Pcm> = None;
    voxloop::audio::decode::decode(std::io::Cursor::new(bytes), "audio/wav", &mut |p: Pcm| {
        let all = pcm.get_or_insert(Pcm {
            rate: p.rate,
            channels: p.channels,
            samples: Vec::new(),
        });
        all.samples.extend(p.samples);
        true
    })
    .expect("a WAV");
    (first.unwrap_or(total), total, pcm.expect("audio"))
}

fn to_16k(pcm: &Pcm) -> Vec<f32> {
    let mut converter = Converter::new(SPEECH_RATE, 1);
    let mut out = converter.push(pcm).expect("resampling");
    out.extend(converter.flush());
    out
}

/// Characters for the CER: no punctuation, Arabic numbers as Chinese numerals (whisper writes
/// "40%" for 百分之四十).
fn han(text: &str) -> Vec<char> {
    let mut normalised = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String, percent: bool| {
        if !digits.is_empty() {
            if percent {
                out.push_str("百分之");
            }
            out.push_str(&voxloop::speech::g2p::chinese_number(digits));
            digits.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let percent = c == '%' || c == '％';
        flush(&mut digits, &mut normalised, percent);
        if !percent {
            normalised.push(c);
        }
    }
    flush(&mut digits, &mut normalised, false);
    normalised.chars().filter(|c| c.is_alphanumeric()).collect()
}

struct Row {
    name: &'static str,
    first_audio_ms: f64,
    rtf: f64,
    wer: f64,
    cer: f64,
    worst: Vec<String>,
}

async fn measure(name: &'static str, tts: &Tts, en: &Asr, zh: &Asr) -> Row {
    // Warm: the model loaded, the program's pages in cache.
    let _ = synthesize(tts, "Hello.").await;
    let mut firsts: Vec<f64> = Vec::new();
    for _ in 0..5 {
        let (first, _, _) = synthesize(tts, CLAUSE).await;
        firsts.push(first.as_secs_f64() * 1000.0);
    }
    firsts.sort_by(f64::total_cmp);
    let (mut synth, mut audio) = (0.0, 0.0);
    let (mut word_errors, mut word_count) = (0, 0);
    let mut worst = Vec::new();
    for text in ENGLISH {
        let (_, total, pcm) = synthesize(tts, text).await;
        synth += total.as_secs_f64();
        audio += pcm.samples.len() as f64 / f64::from(pcm.rate) / f64::from(pcm.channels);
        let heard = en.transcribe(&to_16k(&pcm)).expect("whisper").text;
        let errors = edit_distance(&transcript_words(text), &transcript_words(&heard));
        if errors > 0 {
            worst.push(format!("{text} -> {heard}"));
        }
        word_errors += errors;
        word_count += transcript_words(text).len();
    }
    let (mut char_errors, mut char_count) = (0, 0);
    for text in CHINESE {
        let (_, total, pcm) = synthesize(tts, text).await;
        synth += total.as_secs_f64();
        audio += pcm.samples.len() as f64 / f64::from(pcm.rate) / f64::from(pcm.channels);
        let heard = zh
            .transcribe_with_prompt(&to_16k(&pcm), Some(ZH_PROMPT))
            .expect("whisper")
            .text;
        let errors = edit_distance(&han(text), &han(&heard));
        if errors * 5 > han(text).len() {
            worst.push(format!("{text} -> {heard}"));
        }
        char_errors += errors;
        char_count += han(text).len();
    }
    Row {
        name,
        first_audio_ms: firsts[firsts.len() / 2],
        rtf: synth / audio,
        wer: word_errors as f64 / word_count as f64,
        cer: char_errors as f64 / char_count as f64,
        worst,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let whisper = |language: &str| {
        Asr::load(&AsrConfig {
            language: language.into(),
            ..AsrConfig::default()
        })
        .expect("whisper base (voxloop models fetch)")
    };
    let (en, zh) = (whisper("en"), whisper("zh"));
    let espeak = Tts::new(&TtsConfig {
        provider: TtsProvider::EspeakNg,
        ..TtsConfig::default()
    });
    let kokoro = Tts::new(&TtsConfig::default());
    let load = Instant::now();
    kokoro
        .check()
        .await
        .expect("Kokoro's files (voxloop models fetch)");
    let load = load.elapsed();
    let rows = [
        measure("espeak-ng", &espeak, &en, &zh).await,
        measure("Kokoro-82M (af_heart, zf_xiaobei)", &kokoro, &en, &zh).await,
    ];
    println!("Kokoro model load: {:.2} s", load.as_secs_f64());
    println!(
        "| voice | first audio, six-word clause (median of 5) | real-time factor (40 sentences) | English WER (20) | Chinese CER (20) |"
    );
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {:.0} ms | {:.2} | {:.1} % | {:.1} % |",
            row.name,
            row.first_audio_ms,
            row.rtf,
            row.wer * 100.0,
            row.cer * 100.0
        );
    }
    for row in &rows {
        println!("\n{}: sentences whisper heard wrong", row.name);
        for line in &row.worst {
            println!("- {line}");
        }
    }
}
