//! Comparing voice activity detectors on the speech assets with silence and music mixed in:
//! `cargo bench --bench vad`.
//!
//! The test signal (16 kHz): for each English speech clip in assets/speech, 1 s of near-silence
//! (white noise at -60 dBFS), the clip, 1 s of near-silence, 2 s of music alone (the bundled
//! tracks at -12 dBFS), then the clip again over that music. A frame is labelled speech when the
//! clean clip's own level in it is above -40 dBFS. Reported per detector: frame accuracy, speech
//! recall, false alarms on silence and on music alone, and the cost of one frame.

use std::time::Instant;

use voxloop::audio::Pcm;
use voxloop::audio::convert::Converter;
use voxloop::speech::vad::{Vad, VadEngine};

fn load(path: &str) -> Vec<f32> {
    let file = std::fs::File::open(path).unwrap();
    let mime = if path.ends_with(".mp3") {
        "audio/mpeg"
    } else if path.ends_with(".ogg") {
        "audio/ogg"
    } else {
        "audio/wav"
    };
    let mut converter = Converter::new(16_000, 1);
    let mut out = Vec::new();
    voxloop::audio::decode::decode(file, mime, &mut |pcm: Pcm| {
        out.extend(converter.push(&pcm).unwrap());
        true
    })
    .unwrap();
    out.extend(converter.flush());
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Label {
    Speech,
    Silence,
    Music,
    SpeechOverMusic,
    QuietSpeech,
}

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let clips: Vec<String> = std::fs::read_dir(format!("{root}/assets/speech"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path().display().to_string()))
        .filter(|p| p.ends_with(".wav") && !p.contains("_zh_"))
        .collect();
    let mut music = load(&format!("{root}/assets/music/torus_trooper_tt1.ogg"));
    music.extend(load(&format!(
        "{root}/assets/music/tumiki_return_to_home.ogg"
    )));
    let music_gain =
        10f32.powf(-12.0 / 20.0) / music.iter().map(|s| s.abs()).fold(0.0, f32::max).max(1e-6);
    let mut noise_state = 12345u32;
    let mut noise = move || {
        noise_state = noise_state
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        (noise_state as f32 / u32::MAX as f32 - 0.5) * 0.002
    };
    let mut signal = Vec::new();
    let mut labels = Vec::new(); // per sample
    let mut music_at = 0usize;
    let mut next_music = |n: usize| -> Vec<f32> {
        let out: Vec<f32> = (0..n)
            .map(|i| music[(music_at + i) % music.len()] * music_gain)
            .collect();
        music_at += n;
        out
    };
    for clip in &clips {
        let speech = load(clip);
        let level: Vec<bool> = speech
            .chunks(160)
            .flat_map(|c| {
                let rms = (c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32).sqrt();
                std::iter::repeat_n(rms > 0.01, c.len())
            })
            .collect();
        for _ in 0..16_000 {
            signal.push(noise());
            labels.push(Label::Silence);
        }
        for (s, &voiced) in speech.iter().zip(&level) {
            signal.push(s + noise());
            labels.push(if voiced {
                Label::Speech
            } else {
                Label::QuietSpeech
            });
        }
        for _ in 0..16_000 {
            signal.push(noise());
            labels.push(Label::Silence);
        }
        for s in next_music(32_000) {
            signal.push(s);
            labels.push(Label::Music);
        }
        let bed = next_music(speech.len());
        for ((s, m), &voiced) in speech.iter().zip(bed).zip(&level) {
            signal.push(s + m);
            labels.push(if voiced {
                Label::SpeechOverMusic
            } else {
                Label::Music
            });
        }
    }
    println!(
        "{} clips, {:.1} s of test signal; speech frames labelled by the clean clip's level (> -40 dBFS)",
        clips.len(),
        signal.len() as f64 / 16_000.0
    );
    println!(
        "| detector | frame | accuracy | speech recall | speech-over-music recall | false alarms, silence | false alarms, music | cost per 30 ms of audio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let detectors = [
        ("earshot 1.2, p >= 0.5", VadEngine::Earshot, 0.5),
        ("earshot 1.2, p >= 0.7", VadEngine::Earshot, 0.7),
        ("earshot 1.2, p >= 0.85", VadEngine::Earshot, 0.85),
        ("WebRTC VAD (libfvad, aggressive)", VadEngine::Webrtc, 0.5),
    ];
    for (name, engine, threshold) in detectors {
        let mut vad = Vad::new(engine, threshold);
        let started = Instant::now();
        let frames = vad.push(&signal);
        let elapsed = started.elapsed();
        let n = vad.frame_samples();
        let (mut right, mut total) = (0usize, 0usize);
        let mut counts = std::collections::HashMap::<(u8, bool), usize>::new();
        for (i, frame) in frames.iter().enumerate() {
            // The frame's label: the majority of its samples (quiet speech frames are skipped).
            let span = &labels[i * n..(i + 1) * n];
            let count = |l: Label| span.iter().filter(|&&x| x == l).count();
            let label = [
                Label::Speech,
                Label::SpeechOverMusic,
                Label::Silence,
                Label::Music,
                Label::QuietSpeech,
            ]
            .into_iter()
            .max_by_key(|&l| count(l))
            .unwrap();
            if label == Label::QuietSpeech {
                continue;
            }
            let truth = matches!(label, Label::Speech | Label::SpeechOverMusic);
            total += 1;
            right += usize::from(truth == frame.speech);
            *counts.entry((label as u8, frame.speech)).or_default() += 1;
        }
        let rate = |label: Label, said: bool| {
            let yes = counts.get(&(label as u8, said)).copied().unwrap_or(0);
            let no = counts.get(&(label as u8, !said)).copied().unwrap_or(0);
            100.0 * yes as f64 / (yes + no).max(1) as f64
        };
        let per_30ms = elapsed.as_secs_f64() / (signal.len() as f64 / 480.0) * 1e6;
        println!(
            "| {name} | {} ms | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {per_30ms:.1} µs |",
            n * 1000 / 16_000,
            100.0 * right as f64 / total as f64,
            rate(Label::Speech, true),
            rate(Label::SpeechOverMusic, true),
            rate(Label::Silence, true),
            rate(Label::Music, true),
        );
    }
}
