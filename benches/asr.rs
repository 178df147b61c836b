//! Whisper's speed on 2 cores: `cargo bench --bench asr` (needs `voxloop models fetch
//! whisper-base`). Real-time factor (processing time / audio duration) per clip, for the
//! converted base f16 model with the encoder context fitted to the utterance (the default) and
//! with the full 30 s window, with the language given and detected; and, when ../shared has it,
//! the reference q5_1 file (quantized by whisper.cpp's tools; voxloop does not ship it).

use std::time::Instant;

use voxloop::audio::Pcm;
use voxloop::audio::convert::Converter;
use voxloop::speech::SPEECH_RATE;
use voxloop::speech::asr::Asr;
use voxloop::speech::asr::AsrConfig;

fn speech(name: &str) -> Vec<f32> {
    let path = format!("{}/assets/speech/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut converter = Converter::new(SPEECH_RATE, 1);
    let mut out = Vec::new();
    voxloop::audio::decode::decode(
        std::fs::File::open(path).unwrap(),
        "audio/wav",
        &mut |pcm: Pcm| {
            out.extend(converter.push(&pcm).unwrap());
            true
        },
    )
    .unwrap();
    out.extend(converter.flush());
    out
}

fn main() {
    let base = voxloop::models::model_path(voxloop::models::spec("whisper-base").unwrap());
    assert!(
        base.exists(),
        "run `voxloop models fetch whisper-base` first"
    );
    let reference = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models/ggml-base-q5_1.bin"
    ));
    let clips = [
        "cmd_play_horizon.wav",
        "librivox_sense_and_sensibility_0870.wav",
        "jfk.wav",
    ];
    let audio: Vec<(&str, Vec<f32>)> = clips.iter().map(|c| (*c, speech(c))).collect();
    let mut setups = vec![
        (
            "base f16 (converted), fitted context, en",
            base.clone(),
            true,
            "en",
        ),
        (
            "base f16 (converted), 30 s window, en",
            base.clone(),
            false,
            "en",
        ),
        (
            "base f16 (converted), fitted context, auto",
            base.clone(),
            true,
            "auto",
        ),
    ];
    if reference.exists() {
        setups.push((
            "base q5_1 (reference file), fitted context, en",
            reference,
            true,
            "en",
        ));
    }
    println!("2 threads, greedy; median of 3 runs");
    print!("| model, setup |");
    for (name, pcm) in &audio {
        print!(
            " {} ({:.1} s) |",
            name.trim_end_matches(".wav"),
            pcm.len() as f64 / 16_000.0
        );
    }
    println!("\n|---|{}", "---:|".repeat(audio.len()));
    for (label, model, fit, language) in setups {
        let config = AsrConfig {
            model: Some(model),
            language: language.into(),
            threads: 2,
            beam_size: 0,
            fit_context: fit,
            ..AsrConfig::default()
        };
        let asr = Asr::load(&config).unwrap();
        print!("| {label} |");
        for (_, pcm) in &audio {
            let mut times: Vec<f64> = (0..3)
                .map(|_| {
                    let start = Instant::now();
                    asr.transcribe(pcm).unwrap();
                    start.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let seconds = pcm.len() as f64 / 16_000.0;
            print!(" {:.2} s, RTF {:.2} |", times[1], times[1] / seconds);
        }
        println!();
    }
}
