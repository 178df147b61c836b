//! The PersonaPlex co-host on a tiny random-weights model of the same architecture, written by the
//! test in the Hugging Face repo's layout and loaded by the real loading code (issue 8).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use std::time::Duration;
use voxloop::duplex::arch::{Arch, write_random_model};
use voxloop::duplex::engine::{Engine, Prompt, process};
use voxloop::duplex::lifecycle::{Location, ModelManager, Settings};
use voxloop::duplex::{DuplexError, FRAME_SAMPLES, MODEL_FILE, SAMPLE_RATE, voice_from_file};

fn speech(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/speech")
        .join(name)
}

/// A spoken command at 24 kHz.
fn speech_pcm(name: &str) -> Vec<f32> {
    voxloop::audio::decode::decode_file(&speech(name), SAMPLE_RATE).unwrap()
}

/// The tiny model, loaded on the CPU.
fn tiny_engine(dir: &tempfile::TempDir) -> Engine {
    Engine::load(dir.path(), &Device::Cpu, DType::F32).unwrap()
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
    let mut engine = tiny_engine(&dir);
    let input = speech_pcm("cmd_what_time.wav");
    let prompt = Prompt {
        voice: Some(voice_from_file(&speech("cmd_stop_music.wav")).unwrap()),
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
    let mut engine = tiny_engine(&dir);
    let input = speech_pcm("cmd_stop_music.wav");
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

/// A `.pt` voice prompt made from a recording conditions the model exactly as the recording
/// does: the embeddings replay the first frames' inputs and the token buffer the last one's.
#[test]
fn a_pt_voice_prompt_gives_what_its_recording_gives() {
    let dir = tiny_model(16);
    let mut engine = tiny_engine(&dir);
    let recording = speech("cmd_stop_music.wav");
    let voice = engine
        .voice_embeddings(&speech_pcm("cmd_stop_music.wav"))
        .unwrap();
    let pt = dir.path().join("voices-stop.pt");
    voice.write(&pt).unwrap();
    let input = speech_pcm("cmd_what_time.wav");
    let with = |voice: Option<PathBuf>| Prompt {
        voice: voice.map(|path| voice_from_file(&path).unwrap()),
        text: Some("Be kind.".into()),
        seed: 9,
        ..Prompt::default()
    };
    let (from_wav, wav_text) = process(&mut engine, &input, &with(Some(recording))).unwrap();
    let (from_pt, pt_text) = process(&mut engine, &input, &with(Some(pt.clone()))).unwrap();
    assert_eq!(from_wav, from_pt);
    assert_eq!(wav_text, pt_text);
    // The voice matters: without it the reply differs.
    let (plain, _) = process(&mut engine, &input, &with(None)).unwrap();
    assert_ne!(plain, from_pt);

    // A .pt of another model's width is refused naming the file.
    std::fs::write(&pt, b"PK not really").unwrap();
    let err = process(&mut engine, &input, &with(Some(pt))).unwrap_err();
    assert!(err.to_string().contains("voices-stop.pt"), "{err}");
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

    // A voice recording that is not there is refused by name before the model sees it.
    let err = voice_from_file(&dir.path().join("no-such-voice.wav")).unwrap_err();
    assert!(err.to_string().contains("no-such-voice.wav"), "{err}");
}

fn manager(dir: &Path, idle_timeout_s: u64) -> std::sync::Arc<ModelManager> {
    ModelManager::new(Settings {
        model_dir: Some(dir.to_path_buf()),
        device: Device::Cpu,
        dtype: DType::F32,
        idle_timeout_s,
    })
    .unwrap()
}

/// Lets the monitor's work (a move runs on a blocking thread) finish: paused time advances only
/// while every task waits.
async fn settle(manager: &ModelManager, location: Location) {
    for _ in 0..2000 {
        if manager.status().location == location {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("still {:?}, wanted {location:?}", manager.status().location);
}

#[tokio::test(start_paused = true)]
async fn the_model_loads_on_first_use_parks_when_idle_and_comes_back() {
    let dir = tiny_model(16);
    let manager = manager(dir.path(), 300);
    let monitor = manager.spawn_monitor();
    assert_eq!(manager.status().location, Location::Unloaded);

    let mut lease = manager.lease().await.unwrap();
    let (out, _) = process(
        lease.engine(),
        &vec![0.0; FRAME_SAMPLES],
        &Prompt::default(),
    )
    .unwrap();
    assert_eq!(out.len(), FRAME_SAMPLES);
    assert_eq!(manager.status().active_connections, 1);
    // A session holds the model: no second conversation, no transition under it.
    assert!(manager.try_lease().await.unwrap().is_none());
    assert!(matches!(manager.offload().await, Err(DuplexError::Busy)));
    assert!(matches!(manager.release().await, Err(DuplexError::Busy)));
    // An active session is never parked, however long it lasts.
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(manager.status().location, Location::Gpu);
    drop(lease);

    tokio::time::sleep(Duration::from_secs(299)).await;
    assert_eq!(manager.status().location, Location::Gpu);
    assert!(manager.status().idle_time >= 299.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle(&manager, Location::Cpu).await;

    let lease = manager.lease().await.unwrap();
    assert_eq!(manager.status().location, Location::Gpu);
    drop(lease);
    assert!(manager.release().await.unwrap());
    assert!(!manager.release().await.unwrap(), "nothing left to release");
    assert_eq!(manager.status().location, Location::Unloaded);
    let stats = manager.status().statistics;
    assert_eq!(
        (
            stats.total_loads,
            stats.gpu_to_cpu,
            stats.cpu_to_gpu,
            stats.full_releases
        ),
        (1, 1, 1, 1)
    );
    monitor.abort();
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_load_once_and_take_turns() {
    let dir = tiny_model(16);
    let manager = manager(dir.path(), 300);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let manager = manager.clone();
            tokio::spawn(async move {
                let mut lease = manager.lease().await.unwrap();
                let prompt = Prompt {
                    seed: i,
                    ..Prompt::default()
                };
                process(lease.engine(), &vec![0.0; FRAME_SAMPLES], &prompt)
                    .unwrap()
                    .0
                    .len()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), FRAME_SAMPLES);
    }
    let status = manager.status();
    assert_eq!(status.statistics.total_loads, 1);
    assert_eq!(status.active_connections, 0);
    assert_eq!(manager.offload().await.unwrap(), Location::Cpu);
    assert_eq!(
        manager.offload().await.unwrap(),
        Location::Cpu,
        "already parked"
    );
    assert_eq!(manager.status().statistics.gpu_to_cpu, 1);
}

#[tokio::test]
async fn bad_timeouts_and_a_missing_model_are_clear_errors() {
    let dir = tiny_model(16);
    let manager = manager(dir.path(), 300);
    for bad in [-5, 0, 86_401, i64::MAX] {
        let err = manager.set_idle_timeout(bad).unwrap_err();
        assert!(
            matches!(err, DuplexError::BadTimeout(v) if v == bad),
            "{err}"
        );
    }
    manager.set_idle_timeout(10).unwrap();
    assert_eq!(manager.status().idle_timeout, 10);

    let empty = tempfile::tempdir().unwrap();
    let nothing = self::manager(empty.path(), 300);
    let err = nothing.lease().await.err().unwrap();
    assert!(err.to_string().contains(MODEL_FILE), "{err}");
    assert_eq!(nothing.status().location, Location::Unloaded);
    assert_eq!(nothing.status().active_connections, 0);
    let unset = ModelManager::new(Settings {
        model_dir: None,
        device: Device::Cpu,
        dtype: DType::F32,
        idle_timeout_s: 300,
    })
    .unwrap();
    assert!(matches!(
        unset.lease().await.err().unwrap(),
        DuplexError::NoModelDir
    ));
}

#[test]
fn duplex_process_writes_a_reply_as_long_as_the_input_and_its_text() {
    let dir = tiny_model(16);
    std::fs::create_dir(dir.path().join("voices")).unwrap();
    std::fs::copy(
        speech("cmd_stop_music.wav"),
        dir.path().join("voices/NATF2.wav"),
    )
    .unwrap();
    let out = dir.path().join("reply.wav");
    let run = |voice: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
            .args(["duplex", "process", "--input"])
            .arg(speech("cmd_what_time.wav"))
            .arg("--output")
            .arg(&out)
            .args(["--voice", voice, "--prompt", "Be brief."])
            .env("PERSONAPLEX_MODEL_DIR", dir.path())
            .env_remove("VOXLOOP_CONFIG")
            .output()
            .unwrap()
    };
    let result = run("NATF2");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // The input is 16 kHz: the reply is the same duration at 24 kHz.
    let input = hound::WavReader::open(speech("cmd_what_time.wav")).unwrap();
    let seconds = input.duration() as f64 / f64::from(input.spec().sample_rate);
    let reply = hound::WavReader::open(&out).unwrap();
    assert_eq!(reply.spec().sample_rate, SAMPLE_RATE);
    let reply_seconds = reply.duration() as f64 / f64::from(SAMPLE_RATE);
    assert!(
        (reply_seconds - seconds).abs() < 1e-3,
        "{reply_seconds} vs {seconds}"
    );
    assert!(dir.path().join("reply.txt").is_file());

    let result = run("NOPE");
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("unknown voice \"NOPE\""));
    // A GPU_IDLE_TIMEOUT that is not a number is named.
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args([
            "duplex", "process", "--input", "in.wav", "--output", "out.wav",
        ])
        .env("PERSONAPLEX_MODEL_DIR", dir.path())
        .env("GPU_IDLE_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("GPU_IDLE_TIMEOUT: \"soon\" is not a number"),
        "{stderr}"
    );
    // A known voice whose prompt file is absent is named.
    std::fs::remove_file(dir.path().join("voices/NATF2.wav")).unwrap();
    let result = run("NATF2");
    assert!(String::from_utf8_lossy(&result.stderr).contains("voices/NATF2.pt"));
}

#[test]
fn the_voices_and_prompts_are_the_documented_ones() {
    let voices = voxloop::duplex::voices();
    assert_eq!(voices.len(), 18);
    for id in ["NATF0", "NATF3", "NATM3", "VARF4", "VARM0", "VARM4"] {
        assert!(voices.iter().any(|v| v.id == id), "{id}");
    }
    let prompts: Vec<String> = voxloop::duplex::prompt_examples()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(prompts, ["assistant", "customer_service", "casual"]);
}
