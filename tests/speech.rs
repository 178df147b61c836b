//! Speech input with the real Whisper base model: the converter's output, transcription
//! accuracy, model errors, VAD and turns, and barge-in.
//!
//! The model must be present (`voxloop models fetch whisper-base`; scripts/test fetches it once).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use voxloop::config::AsrConfig;
use voxloop::models::{self, ModelError};
use voxloop::pipeline::Pcm;
use voxloop::pipeline::asr::{ASR_RATE, Asr, AsrError};
use voxloop::pipeline::convert::Converter;

fn model() -> PathBuf {
    let path = models::model_path(models::spec("whisper-base").unwrap());
    assert!(
        path.exists(),
        "{} is missing: run `voxloop models fetch whisper-base` (scripts/test does)",
        path.display()
    );
    path
}

/// One loaded model for all tests (loading takes a second).
fn asr() -> &'static Asr {
    static ASR: OnceLock<Asr> = OnceLock::new();
    ASR.get_or_init(|| {
        let config = AsrConfig {
            model: Some(model()),
            language: "en".into(),
            ..AsrConfig::default()
        };
        Asr::load(&config).unwrap()
    })
}

/// A speech asset as 16 kHz mono.
fn speech(name: &str) -> Vec<f32> {
    let path = repo_root().join("assets/speech").join(name);
    let file = std::fs::File::open(&path).unwrap();
    let mut converter = Converter::new(ASR_RATE, 1);
    let mut out = Vec::new();
    voxloop::pipeline::decode::decode(file, "audio/wav", &mut |pcm: Pcm| {
        out.extend(converter.push(&pcm).unwrap());
        true
    })
    .unwrap();
    out.extend(converter.flush());
    out
}

fn transcript(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("assets/speech").join(name)).unwrap()
}

/// Lower case, no punctuation, hyphens split, small numbers and "%" spelled out, "mr" as
/// "mister": the forms the transcripts use.
fn normalize(text: &str) -> Vec<String> {
    const ONES: [&str; 20] = [
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
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
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
            Ok(n) if n < 20 => words.push(ONES[n].to_string()),
            Ok(n) if n < 100 => {
                words.push(TENS[n / 10].to_string());
                if n % 10 > 0 {
                    words.push(ONES[n % 10].to_string());
                }
            }
            _ if word == "mr" => words.push("mister".into()),
            _ if !word.is_empty() => words.push(word),
            _ => {}
        }
    }
    words
}

/// Word-level edit distance.
fn word_errors(reference: &[String], hypothesis: &[String]) -> usize {
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let cost = if r == h { prev } else { prev + 1 };
            prev = row[j + 1];
            row[j + 1] = cost.min(row[j] + 1).min(prev + 1);
        }
    }
    row[hypothesis.len()]
}

#[test]
fn jfk_word_for_word() {
    let text = asr().transcribe(&speech("jfk.wav")).unwrap().text;
    assert_eq!(
        normalize(&text),
        normalize(&transcript("jfk.txt")),
        "{text}"
    );
}

#[test]
fn librivox_word_error_rate_is_at_most_10_percent() {
    let (mut errors, mut words) = (0, 0);
    for id in ["0870", "0880", "0890", "0920", "0930"] {
        let name = format!("librivox_sense_and_sensibility_{id}");
        let reference = normalize(&transcript(&format!("{name}.txt")));
        let hypothesis = normalize(
            &asr()
                .transcribe(&speech(&format!("{name}.wav")))
                .unwrap()
                .text,
        );
        errors += word_errors(&reference, &hypothesis);
        words += reference.len();
        println!(
            "{id}: {} errors / {} words: {}",
            word_errors(&reference, &hypothesis),
            reference.len(),
            hypothesis.join(" ")
        );
    }
    let wer = errors as f64 / words as f64;
    println!("LibriVox WER {:.1} % ({errors}/{words})", wer * 100.0);
    assert!(wer <= 0.10, "WER {:.1} %", wer * 100.0);
}

#[test]
fn english_commands_are_understood() {
    let (mut errors, mut words) = (0, 0);
    for name in [
        "cmd_play_horizon",
        "cmd_play_relaxing_music",
        "cmd_set_volume_30",
        "cmd_stop_music",
        "cmd_what_time",
        "goforward",
    ] {
        let reference = normalize(&transcript(&format!("{name}.txt")));
        let text = asr()
            .transcribe(&speech(&format!("{name}.wav")))
            .unwrap()
            .text;
        let hypothesis = normalize(&text);
        let e = word_errors(&reference, &hypothesis);
        println!("{name}: {e} errors: {text}");
        errors += e;
        words += reference.len();
    }
    let wer = errors as f64 / words as f64;
    println!("commands WER {:.1} % ({errors}/{words})", wer * 100.0);
    // The commands are espeak-ng speech; "stop" is sometimes heard as "start" (BENCHMARKS.md).
    assert!(wer <= 0.10, "WER {:.1} %", wer * 100.0);
}

/// The reference model (../shared/models, converted and quantized by whisper.cpp's own tools).
fn reference_model() -> PathBuf {
    let path = repo_root().join("../shared/models/ggml-base-q5_1.bin");
    assert!(
        path.exists(),
        "the reference model {} is missing",
        path.display()
    );
    path
}

#[test]
fn the_converted_model_transcribes_like_the_reference() {
    let config = AsrConfig {
        model: Some(reference_model()),
        language: "en".into(),
        ..AsrConfig::default()
    };
    let reference = Asr::load(&config).unwrap();
    for name in [
        "jfk.wav",
        "librivox_sense_and_sensibility_0930.wav",
        "cmd_play_horizon.wav",
    ] {
        let pcm = speech(name);
        let ours = normalize(&asr().transcribe(&pcm).unwrap().text);
        let theirs = normalize(&reference.transcribe(&pcm).unwrap().text);
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn converter_header_and_vocabulary_match_the_reference() {
    // Everything before the tensors (hyper-parameters but the file type, mel filters,
    // vocabulary) must be what whisper.cpp's own converter wrote.
    fn header(path: &Path) -> (Vec<i32>, Vec<f32>, Vec<u8>) {
        let bytes = std::fs::read(path).unwrap();
        let i32_at = |at: usize| i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let hparams: Vec<i32> = (0..10).map(|i| i32_at(4 + 4 * i)).collect();
        let (n_mel, n_fft) = (i32_at(48) as usize, i32_at(52) as usize);
        let mel: Vec<f32> = (0..n_mel * n_fft)
            .map(|i| f32::from_le_bytes(bytes[56 + 4 * i..60 + 4 * i].try_into().unwrap()))
            .collect();
        let vocab_at = 56 + 4 * n_mel * n_fft;
        let mut at = vocab_at + 4;
        for _ in 0..i32_at(vocab_at) {
            at += 4 + i32_at(at) as usize;
        }
        (hparams, mel, bytes[vocab_at..at].to_vec())
    }
    let (ours, theirs) = (header(&model()), header(&reference_model()));
    assert_eq!(ours.0, theirs.0);
    assert!(
        ours.1
            .iter()
            .zip(&theirs.1)
            .all(|(a, b)| (a - b).abs() < 1e-6)
    );
    assert!(ours.2 == theirs.2, "vocabulary differs");
}

#[test]
fn missing_and_corrupt_models_say_how_to_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let missing = AsrConfig {
        model: Some(dir.path().join("nope.bin")),
        ..AsrConfig::default()
    };
    let err = Asr::load(&missing).err().unwrap();
    assert!(
        matches!(err, AsrError::Model(ModelError::Missing { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("voxloop models fetch whisper-base")
    );

    let corrupt = dir.path().join("corrupt.bin");
    std::fs::write(&corrupt, vec![7u8; 4096]).unwrap();
    let err = Asr::load(&AsrConfig {
        model: Some(corrupt),
        ..AsrConfig::default()
    })
    .err()
    .unwrap();
    assert!(
        matches!(err, AsrError::Model(ModelError::Corrupt { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("voxloop models fetch whisper-base")
    );

    // A truncated model (right magic, cut short): whisper.cpp refuses it, no crash.
    let truncated = dir.path().join("truncated.bin");
    let head = std::fs::read(model()).unwrap()[..1 << 20].to_vec();
    std::fs::write(&truncated, head).unwrap();
    let err = Asr::load(&AsrConfig {
        model: Some(truncated),
        ..AsrConfig::default()
    })
    .err()
    .unwrap();
    assert!(matches!(err, AsrError::Load { .. }), "{err}");
}

#[test]
fn cli_transcribes_and_lists_models() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_voxloop"))
            .args(args)
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&run(&[
        "transcribe",
        "assets/speech/jfk.wav",
        "--json",
        "--language",
        "en",
    ]))
    .unwrap();
    assert_eq!(json["language"], "en");
    let segments = json["segments"].as_array().unwrap();
    assert!(!segments.is_empty());
    assert!(segments.last().unwrap()["end_ms"].as_u64().unwrap() >= 10_000);
    assert!(
        json["text"]
            .as_str()
            .unwrap()
            .contains("ask not what your country can do for you")
    );
    let list = run(&["models", "list"]);
    assert!(
        list.contains("whisper-base") && list.contains("present, 147951465 bytes"),
        "{list}"
    );
}
