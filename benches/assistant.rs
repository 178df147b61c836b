//! The assistant on everyday spoken requests (issue 20): accuracy and per-turn latency of whole
//! turns (speech -> whisper -> intents or the chat model -> tools -> TTS or music), for each
//! chat model side by side in one run.
//!
//! The evaluation set is 45 requests spoken by espeak-ng in five voices at three speeds, every
//! other one with white noise at 20 dB SNR, plus room noise alone and a click: music by title
//! (also as a listener says it), volume in words and digits, the time, stop, goodbye, questions
//! and chit-chat no tool answers. Each request runs in a fresh conversation with the bundled
//! music server. A turn is right when it calls the expected tool with the expected arguments
//! (the music server's answer names the expected track), says the time the tool returned, or
//! answers in words without a tool; and any reply stays within the word limit, with no markup.
//!
//! Latency is from the end of speech (the VAD's end of turn: the end of the file here) to the
//! first audio: whisper's time plus the turn's time to its first sentence or track.
//!
//! Needs: espeak-ng, `voxloop models fetch` and `voxloop models fetch smollm2`.
//! Run: `cargo bench --bench assistant` (about 10 minutes on 2 cores). `CASES=N` runs the first
//! N requests only; `SETUPS=3,4` those setups only (0-based; 3 and 4 are the two engines with
//! the defaults; 5 is the defaults with llama-server at niceness 0). The reply's voice is the
//! default one (Kokoro), or espeak-ng with `VOICE=espeak-ng`. `ASR_COMPARE=1` first compares
//! whisper's greedy decoding with beam search on the requests (word error rate, time), and
//! `ASR_PROMPT="A|B|beam5:C"` adds each prompt as a variant (greedy, or beam search with the
//! `beam5:` prefix; `ASR_SHOW=1` prints what whisper heard with them).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use voxloop::audio::queue::{PlaybackQueue, QueueSettings};
use voxloop::audio::sink::{NullSink, Sink};
use voxloop::config::Config;
use voxloop::conversation::{Conversation, ConversationSettings, TurnEnd, TurnReport};
use voxloop::llm::ChatModel;
use voxloop::llm::config::LocalEngine;
use voxloop::speech::SPEECH_RATE;
use voxloop::speech::asr::{
    ASSISTANT_CONTEXT, Asr, edit_distance, transcript_words, vocabulary_prompt,
};
use voxloop::speech::tts::Tts;
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::ToolHub;

const HORIZON: &str = "Tumiki Just Over The Horizon";
const TORUS: &str = "Torus Trooper Tt1";
const HOME: &str = "Tumiki Return To Home";

/// What a request should get.
#[derive(Clone, Copy)]
enum Expect {
    /// `musicPlayer` plays this title.
    Track(&'static str),
    /// `musicPlayer` plays something.
    AnyTrack,
    /// No track plays, and something is said (a "no match" answer).
    NoTrack,
    /// `set_volume` with this volume (`None`: any).
    Volume(Option<i64>),
    /// `get_current_time`, and the reply says the hour and minute it returned.
    Time,
    /// This tool with no arguments.
    Tool(&'static str),
    /// Words, no tool; the reply contains one of these (lower-case), if any are given.
    Words(&'static [&'static str]),
    /// Nothing was said: no reply at all.
    Silent,
}

struct Case {
    text: &'static str,
    expect: Expect,
}

const fn case(text: &'static str, expect: Expect) -> Case {
    Case { text, expect }
}

/// The evaluation set. An empty text is room noise alone; "<click>" is a click in silence.
const CASES: &[Case] = &[
    case(
        "Play the song just over the horizon.",
        Expect::Track(HORIZON),
    ),
    case("Set the volume to forty percent.", Expect::Volume(Some(40))),
    case("What time is it right now?", Expect::Time),
    case("Hello, how are you?", Expect::Words(&[])),
    case("I would like to hear torus trooper.", Expect::Track(TORUS)),
    case(
        "Make it quieter, set volume to ten.",
        Expect::Volume(Some(10)),
    ),
    case("Stop the music.", Expect::Tool("stop_playback")),
    case(
        "Goodbye, that is all for today.",
        Expect::Tool("exit_conversation"),
    ),
    case("Play return to home.", Expect::Track(HOME)),
    case("Tell me what time it is.", Expect::Time),
    case("Turn the volume down to twenty.", Expect::Volume(Some(20))),
    case("What is the capital of France?", Expect::Words(&["paris"])),
    case("Play some music.", Expect::AnyTrack),
    case("Tell me a joke.", Expect::Words(&[])),
    case("Put on torus trooper please.", Expect::Track(TORUS)),
    case("Volume seventy five.", Expect::Volume(Some(75))),
    case("What's the time?", Expect::Time),
    case("Stop.", Expect::Tool("stop_playback")),
    case(
        "How many days are in a week?",
        Expect::Words(&["seven", "7"]),
    ),
    case("Play just over the horizon.", Expect::Track(HORIZON)),
    case("Louder please.", Expect::Volume(None)),
    case("Bye bye.", Expect::Tool("exit_conversation")),
    case("What is two plus two?", Expect::Words(&["four", "4"])),
    case(
        "Can you play return to home by tumiki?",
        Expect::Track(HOME),
    ),
    case("Set the volume to 80.", Expect::Volume(Some(80))),
    case("Pause the music please.", Expect::Tool("pause_playback")),
    case("Who are you?", Expect::Words(&[])),
    case("Put some music on.", Expect::AnyTrack),
    case("What day is it today?", Expect::Time),
    case("Make it quieter.", Expect::Volume(None)),
    case("That's all, thank you.", Expect::Tool("exit_conversation")),
    case("What is the weather like tomorrow?", Expect::Words(&[])),
    case(
        "I want to listen to just over the horizon.",
        Expect::Track(HORIZON),
    ),
    case("Thank you very much.", Expect::Words(&[])),
    case("Turn it up.", Expect::Volume(None)),
    case("Play Bohemian Rhapsody by Queen.", Expect::NoTrack),
    case("Good morning!", Expect::Words(&[])),
    case("Mute.", Expect::Volume(Some(0))),
    case("How far away is the moon?", Expect::Words(&[])),
    case("Can you recommend a good book?", Expect::Words(&[])),
    case("Play something.", Expect::AnyTrack),
    case("What can you do?", Expect::Words(&[])),
    case(
        "Explain photosynthesis in one sentence.",
        Expect::Words(&[]),
    ),
    case("", Expect::Silent),
    case("<click>", Expect::Silent),
];

const VOICES: &[&str] = &["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en-us+f4"];
const SPEEDS: &[u32] = &[160, 145, 180];

/// A deterministic noise source (a linear congruential generator), uniform in [-1, 1].
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

/// The request `index` as 16 kHz mono PCM.
fn speech(index: usize, case: &Case, dir: &Path) -> Vec<f32> {
    let mut noise = Noise(index as u64 + 1);
    let rate = SPEECH_RATE as usize;
    if case.text.is_empty() {
        // Room noise alone: 1.5 s at about -40 dBFS.
        return (0..rate * 3 / 2).map(|_| noise.next() * 0.01).collect();
    }
    if case.text == "<click>" {
        let mut pcm = vec![0.0; rate];
        for (i, s) in pcm[rate / 2..rate / 2 + 40].iter_mut().enumerate() {
            *s = if i % 2 == 0 { 0.9 } else { -0.9 };
        }
        return pcm;
    }
    let voice = VOICES[index % VOICES.len()];
    let speed = SPEEDS[index % SPEEDS.len()];
    let path = dir.join(format!("{index}.wav"));
    let status = Command::new("espeak-ng")
        .args(["-v", voice, "-s", &speed.to_string(), "-w"])
        .arg(&path)
        .arg(case.text)
        .status()
        .expect("espeak-ng runs");
    assert!(status.success(), "espeak-ng failed for {:?}", case.text);
    let mut pcm = voxloop::audio::decode::decode_file(&path, SPEECH_RATE).expect("decodes");
    if index % 2 == 1 {
        // White noise 20 dB under the speech's RMS.
        let rms = (pcm.iter().map(|s| s * s).sum::<f32>() / pcm.len() as f32).sqrt();
        let level = rms / 10.0 * 3f32.sqrt(); // uniform noise has RMS 1/sqrt(3)
        for s in &mut pcm {
            *s += noise.next() * level;
        }
    }
    pcm
}

/// Whether the turn did what `expect` asks, and if not, why.
fn judge(expect: Expect, report: &TurnReport, max_words: usize) -> Result<(), String> {
    let said = report.said.to_lowercase();
    let words = report.said.split_whitespace().count();
    if words > max_words {
        return Err(format!("said {words} words"));
    }
    if report
        .said
        .contains(['<', '>', '{', '}', '*', '#', '`', '|'])
    {
        return Err("markup in the reply".into());
    }
    let first = report.tools.first();
    let tool = first.map(|t| t.name.as_str()).unwrap_or("");
    let playing = |title: &str| {
        report
            .tools
            .iter()
            .any(|t| t.result.contains(&format!("Playing \"{title}\"")))
    };
    let any_playing = report.tools.iter().any(|t| t.result.contains("[Playing "));
    let ok = match expect {
        Expect::Track(title) => playing(title),
        Expect::AnyTrack => any_playing,
        Expect::NoTrack => !any_playing && !said.is_empty(),
        Expect::Volume(want) => {
            tool == "set_volume"
                && want.is_none_or(|v| first.is_some_and(|t| t.arguments["volume"] == v))
        }
        Expect::Time => {
            let result = first.map(|t| t.result.clone()).unwrap_or_default();
            let hh_mm = result
                .split(|c: char| !(c.is_ascii_digit() || c == ':'))
                .find(|w| w.contains(':'))
                .unwrap_or("?")
                .to_string();
            tool == "get_current_time" && said.contains(&hh_mm)
        }
        Expect::Tool(name) => tool == name,
        Expect::Words(any_of) => {
            report.tools.is_empty()
                && !said.is_empty()
                && (any_of.is_empty() || any_of.iter().any(|w| said.contains(w)))
        }
        Expect::Silent => report.end == TurnEnd::Ignored,
    };
    if ok {
        Ok(())
    } else {
        let calls: Vec<String> = report
            .tools
            .iter()
            .map(|t| format!("{}({})", t.name, t.arguments))
            .collect();
        Err(format!(
            "heard {:?}; tools [{}]; said {:?}",
            report.heard,
            calls.join(", "),
            report.said
        ))
    }
}

fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    values[i]
}

/// The fraction of `name`'s words that `heard` contains (case and punctuation ignored).
fn name_recall(name: &str, heard: &str) -> (usize, usize) {
    let norm = |s: &str| {
        s.to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let heard = norm(heard);
    let words = norm(name);
    let found = words.iter().filter(|w| heard.contains(w)).count();
    (found, words.len())
}

struct Setup {
    label: &'static str,
    model: &'static str,
    engine: LocalEngine,
    intents: bool,
    vocabulary: bool,
    limits: bool,
    /// `[llm] engine_nice`.
    nice: u32,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let limit = std::env::var("CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES.len());
    let cases = &CASES[..limit.min(CASES.len())];
    let dir = tempfile::tempdir().expect("temporary directory");
    let audio: Vec<Vec<f32>> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| speech(i, c, dir.path()))
        .collect();
    let mut base = Config::default();
    base.tts.voice = "en-us".into();
    // VOICE=espeak-ng: replies in espeak-ng's voice (first audio about 17 ms after the text),
    // so that first audio measures hearing and the chat model alone.
    if std::env::var("VOICE").as_deref() == Ok("espeak-ng") {
        base.tts.provider = voxloop::speech::tts::TtsProvider::EspeakNg;
    }
    base.mcp_servers = BTreeMap::from([(
        "music".to_string(),
        McpServerConfig {
            command: Some(env!("CARGO_BIN_EXE_mcp_audio").into()),
            args: vec!["--library".into(), "assets/music".into()],
            ..McpServerConfig::default()
        },
    )]);
    let asr = match Asr::load(&base.asr) {
        Ok(asr) => Arc::new(asr),
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    // ASR_COMPARE=1: whisper greedy against beam search on the spoken requests (word error
    // rate against the text spoken, numbers as words; time per utterance).
    if std::env::var("ASR_COMPARE").as_deref() == Ok("1") {
        println!("| whisper base decoding | WER | utterances word for word | p50 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        // Without a prompt, greedy and beam search; the default context prompt; and each prompt
        // of ASR_PROMPT="A|B|beam5:C" (greedy, or beam search with "beam5:").
        let asr_prompt = std::env::var("ASR_PROMPT").unwrap_or_default();
        let mut variants = vec![(0, None), (5, None), (0, Some(ASSISTANT_CONTEXT))];
        for p in asr_prompt.split('|').filter(|p| !p.is_empty()) {
            match p.strip_prefix("beam5:") {
                Some(p) => variants.push((5, Some(p))),
                None => variants.push((0, Some(p))),
            }
        }
        for (beam, prompt) in variants {
            let mut config = base.asr.clone();
            config.beam_size = beam;
            // Each variant's prompt alone, without the default context prompt.
            config.context_prompt = Some(String::new());
            let asr = Asr::load(&config).expect("loads");
            let (mut errors, mut words, mut exact, mut spoken, mut ms) = (0, 0, 0, 0, Vec::new());
            for (i, case) in cases.iter().enumerate() {
                let started = std::time::Instant::now();
                let heard = asr
                    .transcribe_with_prompt(&audio[i], prompt)
                    .expect("transcribes")
                    .text;
                ms.push(started.elapsed().as_millis() as u64);
                if prompt.is_some() && std::env::var("ASR_SHOW").is_ok() {
                    println!("  {:?} -> {heard:?}", case.text);
                }
                // Room noise and the click have no words to hear.
                if case.text.is_empty() || case.text == "<click>" {
                    continue;
                }
                let said = transcript_words(case.text);
                let e = edit_distance(&said, &transcript_words(&heard));
                errors += e;
                words += said.len();
                exact += usize::from(e == 0);
                spoken += 1;
            }
            let label = match (beam, prompt) {
                (0, None) => "greedy, no prompt".to_string(),
                (0, Some(p)) => format!("greedy, prompt {p:?}"),
                (width, None) => format!("beam search, width {width}, no prompt"),
                (width, Some(p)) => format!("beam search, width {width}, prompt {p:?}"),
            };
            println!(
                "| {label} | {:.1} % of {words} | {exact} of {spoken} | {} | {} |",
                100.0 * errors as f64 / words.max(1) as f64,
                percentile(&mut ms, 0.5),
                percentile(&mut ms, 1.0),
            );
        }
        println!();
    }
    let hub = Arc::new(ToolHub::start(base.hub()).await);
    let titles = hub.resource_titles(200).await;
    // As `Conversation::asr_prompt` builds it: the resources' titles.
    let prompt = vocabulary_prompt(&titles, &[], base.asr.prompt_max_chars as usize);
    println!("vocabulary prompt: {prompt:?}\n");

    // Whisper on the requests that name a track, with and without the vocabulary prompt.
    let mut recall = [(0, 0), (0, 0)];
    let mut transcripts: Vec<[String; 2]> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut pair = [String::new(), String::new()];
        for (k, p) in [None, Some(prompt.as_str())].into_iter().enumerate() {
            let asr = asr.clone();
            let pcm = audio[i].clone();
            let p = p.map(str::to_string);
            let text =
                tokio::task::spawn_blocking(move || asr.transcribe_with_prompt(&pcm, p.as_deref()))
                    .await
                    .expect("joins")
                    .expect("transcribes")
                    .text;
            if let Expect::Track(title) = case.expect {
                // The title without the artist word the speakers leave out.
                let name = title.trim_start_matches("Tumiki ").trim_end_matches(" Tt1");
                let (found, total) = name_recall(name, &text);
                recall[k].0 += found;
                recall[k].1 += total;
            }
            pair[k] = text;
        }
        transcripts.push(pair);
    }
    let wer = |(found, total): (usize, usize)| 100.0 * (total - found) as f64 / total.max(1) as f64;
    println!("| whisper base on the track names | title words missed |");
    println!("|---|---:|");
    println!(
        "| the context prompt alone (the default) | {:.1} % of {} |",
        wer(recall[0]),
        recall[0].1
    );
    println!(
        "| with the vocabulary prompt | {:.1} % of {} |\n",
        wer(recall[1]),
        recall[1].1
    );

    let setups = [
        Setup {
            label: "SmolLM2-135M, no intents, no prompt, no reply limits (before issue 20)",
            model: "smollm2",
            engine: LocalEngine::Candle,
            intents: false,
            vocabulary: false,
            limits: false,
            nice: 10,
        },
        Setup {
            label: "Qwen2.5-0.5B alone (no intents, no vocabulary prompt), llama.cpp",
            model: "qwen2.5-0.5b",
            engine: LocalEngine::LlamaCpp,
            intents: false,
            vocabulary: false,
            limits: true,
            nice: 10,
        },
        Setup {
            label: "Qwen2.5-0.5B with intents, with the vocabulary prompt, llama.cpp",
            model: "qwen2.5-0.5b",
            engine: LocalEngine::LlamaCpp,
            intents: true,
            vocabulary: true,
            limits: true,
            nice: 10,
        },
        Setup {
            label: "Qwen2.5-0.5B with intents, no vocabulary prompt, candle",
            model: "qwen2.5-0.5b",
            engine: LocalEngine::Candle,
            intents: true,
            vocabulary: false,
            limits: true,
            nice: 10,
        },
        Setup {
            label: "Qwen2.5-0.5B with intents, no vocabulary prompt, llama.cpp (the defaults)",
            model: "qwen2.5-0.5b",
            engine: LocalEngine::LlamaCpp,
            intents: true,
            vocabulary: false,
            limits: true,
            nice: 10,
        },
        Setup {
            label: "the defaults, but llama-server at niceness 0",
            model: "qwen2.5-0.5b",
            engine: LocalEngine::LlamaCpp,
            intents: true,
            vocabulary: false,
            limits: true,
            nice: 0,
        },
    ];
    // SETUPS=3,4 runs those setups only (0-based), e.g. the two engines side by side.
    let chosen: Option<Vec<usize>> = std::env::var("SETUPS")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let mut summary = Vec::new();
    for (index, setup) in setups.iter().enumerate() {
        if chosen.as_ref().is_some_and(|c| !c.contains(&index)) {
            continue;
        }
        let mut config = base.clone();
        config.llm.local_model = Some(voxloop::models::model_path(
            voxloop::models::spec(setup.model).expect("known model"),
        ));
        config.llm.builtin_intents = setup.intents;
        config.llm.engine = setup.engine;
        config.llm.engine_nice = setup.nice;
        if !setup.limits {
            config.llm.max_reply_sentences = 100;
            config.llm.max_reply_words = 10_000;
        }
        let llm = match ChatModel::from_config(&config.llm) {
            Ok(llm) => llm,
            Err(e) => {
                eprintln!("{}: skipped: {e}", setup.label);
                continue;
            }
        };
        let settings = ConversationSettings::new(&config.llm, &config.tools);
        let tts = Tts::new(&config.tts);
        let new_conversation = || {
            let queue = PlaybackQueue::new(
                Sink::Null(NullSink::new(24_000, 1, false)),
                QueueSettings::from_config(&config.audio),
            );
            Conversation::new(
                llm.clone(),
                hub.clone(),
                tts.clone(),
                queue,
                settings.clone(),
            )
        };
        let warm = std::time::Instant::now();
        new_conversation().warm_up().await;
        println!(
            "## {} (warm-up {:.1} s)\n",
            setup.label,
            warm.elapsed().as_secs_f64()
        );
        let mut right = 0;
        let mut latency: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut longest = 0;
        for (i, case) in cases.iter().enumerate() {
            let heard = transcripts[i][usize::from(setup.vocabulary)].clone();
            let asr_ms = {
                let asr = asr.clone();
                let pcm = audio[i].clone();
                let p = setup.vocabulary.then(|| prompt.clone());
                let started = std::time::Instant::now();
                tokio::task::spawn_blocking(move || asr.transcribe_with_prompt(&pcm, p.as_deref()))
                    .await
                    .expect("joins")
                    .expect("transcribes");
                started.elapsed().as_millis() as u64
            };
            let mut conversation = new_conversation();
            let mut report = conversation.turn(&heard, &CancellationToken::new()).await;
            report.asr_ms = Some(asr_ms);
            conversation
                .queue()
                .stop(voxloop::audio::queue::StopReason::StopCommand)
                .await;
            longest = longest.max(report.said.split_whitespace().count());
            let verdict = judge(
                case.expect,
                &report,
                config.llm.max_reply_words.min(60) as usize,
            );
            let kind = match report.handled_by {
                voxloop::conversation::Handler::Intent => "intent",
                voxloop::conversation::Handler::Model => "model",
                voxloop::conversation::Handler::None => "ignored",
            };
            if let Some(first) = report.first_audio_ms {
                latency.entry(kind).or_default().push(asr_ms + first);
            }
            match verdict {
                Ok(()) => right += 1,
                Err(why) => println!("- wrong: {:?}: {why}", case.text),
            }
        }
        println!(
            "\nright: {right} of {} ({:.0} %); longest reply {longest} words",
            cases.len(),
            100.0 * right as f64 / cases.len() as f64
        );
        println!("\n| first audio after the end of speech | turns | p50 ms | p90 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        for (kind, values) in &mut latency {
            let n = values.len();
            let (p50, p90, max) = (
                percentile(values, 0.5),
                percentile(values, 0.9),
                percentile(values, 1.0),
            );
            println!("| {kind} | {n} | {p50} | {p90} | {max} |");
        }
        println!();
        summary.push((setup.label, right, cases.len()));
    }
    println!("| setup | right |");
    println!("|---|---:|");
    for (label, right, n) in summary {
        println!(
            "| {label} | {right} of {n} ({:.0} %) |",
            100.0 * right as f64 / n as f64
        );
    }
    let _: Option<Value> = None;
}
