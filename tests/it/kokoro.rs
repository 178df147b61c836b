//! Kokoro-82M, the default voice, on the real model (`voxloop models fetch` brings it; scripts/test
//! does): English and Chinese sentences give 24 kHz speech of a plausible length that whisper
//! hears back; a long paragraph's phonemes are cut under the model's limit; missing model files
//! fall back to espeak-ng; an unknown voice is a configuration error naming the valid ones.

use crate::common;

use std::process::Command;

use common::*;
use voxloop::audio::Pcm;
use voxloop::audio::convert::Converter;
use voxloop::speech::SPEECH_RATE;
use voxloop::speech::asr::AsrConfig;
use voxloop::speech::asr::{Asr, edit_distance, transcript_words};
use voxloop::speech::g2p::{self, Language};
use voxloop::speech::kokoro::{self, KokoroFiles, MAX_PHONEMES};
use voxloop::speech::tts::Tts;
use voxloop::speech::tts::TtsConfig;

fn files() -> KokoroFiles {
    let files = KokoroFiles::in_dir(&voxloop::models::model_dir());
    if let Some(missing) = files.missing() {
        panic!(
            "{} is missing: run `voxloop models fetch` (scripts/test does)",
            missing.display()
        );
    }
    files
}

/// The sentence through the default TTS: its samples at their rate, and the source.
async fn speak(text: &str) -> (Pcm, String) {
    files();
    let tts = Tts::new(&TtsConfig::default());
    tts.check().await.unwrap();
    let mut media = tts.synthesize(text).await.unwrap();
    let source = media.source.clone();
    let mut bytes = Vec::new();
    while let Some(chunk) = media.next_chunk().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let mut pcm = None;
    voxloop::audio::decode::decode(std::io::Cursor::new(bytes), "audio/wav", &mut |p: Pcm| {
        let all = pcm.get_or_insert(Pcm {
            rate: p.rate,
            channels: p.channels,
            samples: Vec::new(),
        });
        all.samples.extend(p.samples);
        true
    })
    .unwrap();
    (pcm.unwrap(), source)
}

fn hear(pcm: &Pcm, language: &str) -> String {
    let mut converter = Converter::new(SPEECH_RATE, 1);
    let mut samples = converter.push(pcm).unwrap();
    samples.extend(converter.flush());
    let config = AsrConfig {
        model: Some(model_file("whisper-base")),
        language: language.into(),
        ..AsrConfig::default()
    };
    Asr::load(&config)
        .unwrap()
        .transcribe(&samples)
        .unwrap()
        .text
}

#[tokio::test(flavor = "multi_thread")]
async fn an_english_sentence_is_natural_speech_whisper_hears_back() {
    let text = "The weather is lovely today, so let us take a walk by the river.";
    let (pcm, source) = speak(text).await;
    assert_eq!(source, "kokoro");
    assert_eq!((pcm.rate, pcm.channels), (24_000, 1));
    let seconds = pcm.samples.len() as f64 / 24_000.0;
    assert!((2.5..9.0).contains(&seconds), "{seconds} s for 14 words");
    let peak = pcm.samples.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!(peak > 0.1, "peak {peak}");
    let heard = hear(&pcm, "en");
    let (reference, hypothesis) = (transcript_words(text), transcript_words(&heard));
    let errors = edit_distance(&reference, &hypothesis);
    assert!(errors <= 2, "heard {heard:?}: {errors} word errors");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chinese_sentence_is_spoken_in_a_chinese_voice_whisper_hears_back() {
    let text = "今天天气很好，我们去公园散步吧。";
    let (pcm, source) = speak(text).await;
    assert_eq!(source, "kokoro");
    let seconds = pcm.samples.len() as f64 / 24_000.0;
    assert!(
        (1.5..8.0).contains(&seconds),
        "{seconds} s for 14 characters"
    );
    let heard = hear(&pcm, "zh");
    let han = |t: &str| -> Vec<char> { t.chars().filter(|c| c.is_alphanumeric()).collect() };
    let (reference, hypothesis) = (han(text), han(&heard));
    let errors = edit_distance(&reference, &hypothesis);
    assert!(
        errors * 100 <= reference.len() * 30,
        "heard {heard:?}: {errors} of {} characters wrong",
        reference.len()
    );
}

#[tokio::test]
async fn a_long_paragraph_is_cut_under_the_models_limit() {
    let sentence = "Voice assistants hear a request, ask a language model what to do, call \
                    tools, and speak the answer; this paragraph is long on purpose. ";
    let paragraph = sentence.repeat(2000 / sentence.len() + 1);
    assert!(paragraph.len() >= 2000);
    let phonemes = g2p::phonemes(&paragraph, Language::En, "espeak-ng")
        .await
        .unwrap();
    assert!(
        phonemes.chars().count() > 3 * MAX_PHONEMES,
        "{}",
        phonemes.len()
    );
    let pieces = kokoro::chunks(&phonemes);
    assert!(pieces.len() >= 4);
    for piece in &pieces {
        let n = kokoro::tokenize(piece).len();
        assert!(n <= MAX_PHONEMES, "{n} phonemes");
        assert!(piece.ends_with(['.', ';', ',']), "cut at a mark: {piece:?}");
    }
    let kept: usize = pieces.iter().map(|p| p.chars().count()).sum();
    assert!(kept + pieces.len() >= phonemes.chars().count());
}

fn voxloop(args: &[&str], env: &[(&str, &std::path::Path)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .env_remove("VOXLOOP_CONFIG")
        .current_dir(repo_root())
        .output()
        .unwrap()
}

#[test]
fn missing_model_files_fall_back_to_espeak_ng() {
    let empty = tempfile::tempdir().unwrap();
    let out = empty.path().join("say.wav");
    let output = voxloop(
        &["say", "--output", out.to_str().unwrap(), "Hello there."],
        &[("VOXLOOP_MODELS", empty.path())],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("espeak-ng speaks instead"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // espeak-ng's speech was written (the file is at `[audio] output_rate` either way).
    let reader = hound::WavReader::open(&out).unwrap();
    assert!(
        reader.duration() > 24_000 / 4,
        "{} samples",
        reader.duration()
    );
}

#[test]
fn an_unknown_voice_is_a_configuration_error_naming_the_valid_ones() {
    files();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("voxloop.toml");
    std::fs::write(&config, "[tts]\nvoice_en = \"af_nobody\"\n").unwrap();
    let out = dir.path().join("say.wav");
    let output = voxloop(
        &[
            "--config",
            config.to_str().unwrap(),
            "say",
            "--output",
            out.to_str().unwrap(),
            "Hello.",
        ],
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown Kokoro voice \"af_nobody\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("af_heart") && stderr.contains("zf_xiaobei"),
        "{stderr}"
    );
}
