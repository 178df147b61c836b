//! The PersonaPlex co-host on a tiny random-weights model of the same architecture, written by the
//! test in the Hugging Face repo's layout and loaded by the real loading code (issue 8).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use voxloop::duplex::arch::{Arch, write_random_model};
use voxloop::duplex::engine::{Engine, Prompt, process};
use voxloop::duplex::{DuplexError, FRAME_SAMPLES, MODEL_FILE, SAMPLE_RATE};

fn speech(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/speech")
        .join(name)
}

fn tiny_model(steps_in_file: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &Arch::tiny(), steps_in_file, DType::F32, 7).unwrap();
    dir
}

fn rms(pcm: &[f32]) -> f32 {
    (pcm.iter().map(|s| s * s).sum::<f32>() / pcm.len().max(1) as f32).sqrt()
}

#[test]
fn offline_processing_keeps_the_length_and_speaks() {
    let dir = tiny_model(16);
    let mut engine = Engine::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let input =
        voxloop::pipeline::decode::decode_file(&speech("cmd_what_time.wav"), SAMPLE_RATE).unwrap();
    let prompt = Prompt {
        voice_wav: Some(speech("cmd_stop_music.wav")),
        text: Some("You are a helpful assistant.".into()),
        seed: 42,
        ..Prompt::default()
    };
    let (out, text) = process(&mut engine, &input, &prompt).unwrap();
    assert_eq!(out.len(), input.len());
    assert!(out.iter().all(|s| s.is_finite()));
    assert!(
        rms(&out[FRAME_SAMPLES..]) > 1e-4,
        "silent output: {}",
        rms(&out)
    );
    // Random weights say random things; the same seed says the same thing.
    let (again, again_text) = process(&mut engine, &input, &prompt).unwrap();
    assert_eq!(out, again);
    assert_eq!(text, again_text);
    let other = Prompt { seed: 43, ..prompt };
    assert_ne!(process(&mut engine, &input, &other).unwrap().0, out);
}

#[test]
fn streaming_steps_give_what_offline_processing_gives() {
    let dir = tiny_model(16);
    let mut engine = Engine::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let input =
        voxloop::pipeline::decode::decode_file(&speech("cmd_stop_music.wav"), SAMPLE_RATE).unwrap();
    let prompt = Prompt {
        text: Some("Be brief.".into()),
        seed: 5,
        ..Prompt::default()
    };
    let (offline, _) = process(&mut engine, &input, &prompt).unwrap();
    let mut session = engine.start(&prompt).unwrap();
    // The prompts ran first: 6 + text tokens + 6 steps.
    assert!(session.steps() > 12, "{}", session.steps());
    let mut streamed = Vec::new();
    for frame in input.chunks(FRAME_SAMPLES) {
        let out = session.step(frame).unwrap();
        assert_eq!(out.pcm.len(), FRAME_SAMPLES);
        streamed.extend(out.pcm);
    }
    streamed.truncate(input.len());
    assert_eq!(streamed, offline);
    let err = session.step(&vec![0.0; FRAME_SAMPLES + 1]).unwrap_err();
    assert!(matches!(err, DuplexError::Audio(_)), "{err}");
}

#[test]
fn a_checkpoint_with_8_depformer_steps_is_refused_by_name() {
    // Moshi's layout, not PersonaPlex's: the first tensor it lacks is named.
    let dir = tiny_model(8);
    let err = Engine::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("model.safetensors has no tensor depformer")
            && text.contains("wanted for depformer.8."),
        "{text}"
    );
}

#[test]
fn a_missing_or_broken_file_is_named() {
    let dir = tiny_model(16);
    std::fs::remove_file(dir.path().join(MODEL_FILE)).unwrap();
    let err = Engine::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(
        matches!(err, DuplexError::MissingFile(ref p) if p.ends_with(MODEL_FILE)),
        "{err}"
    );
    assert!(err.to_string().contains(MODEL_FILE));

    // A checkpoint of another shape: a clear load error naming the file and the tensor.
    let other = tempfile::tempdir().unwrap();
    let arch = Arch {
        dim: 32,
        ..Arch::tiny()
    };
    write_random_model(other.path(), &arch, 16, DType::F32, 1).unwrap();
    std::fs::copy(other.path().join(MODEL_FILE), dir.path().join(MODEL_FILE)).unwrap();
    let err = Engine::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains(MODEL_FILE) && text.contains("shape"),
        "{text}"
    );

    let voice = Prompt {
        voice_wav: Some(dir.path().join("no-such-voice.wav")),
        ..Prompt::default()
    };
    let good = tiny_model(16);
    let mut engine = Engine::load(good.path(), &Device::Cpu, DType::F32).unwrap();
    let err = engine.start(&voice).err().unwrap();
    assert!(err.to_string().contains("no-such-voice.wav"), "{err}");
}
