//! The audio pipeline's speed: `cargo bench --bench pipeline`.
//!
//! 1. Decode + resample to 24 kHz mono + Opus encode (60 ms frames, the device downlink), per
//!    format, on one thread: seconds of audio per second of work (a multiple of real time).
//! 2. Opus encode alone by complexity (24 kHz mono music, 60 ms frames, 64 kb/s), the ratio to
//!    libopus's default 10 measured side by side.
//! 3. Time from a sentence to its first TTS audio with espeak-ng: from `Tts::synthesize` to the
//!    first decoded PCM block.

use std::io::Cursor;
use std::time::{Duration, Instant};

use voxloop::audio::convert::Converter;
use voxloop::audio::decode::{decode, decode_media};
use voxloop::audio::opus::FrameEncoder;
use voxloop::speech::tts::Tts;
use voxloop::speech::tts::{TtsConfig, TtsProvider};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decodes, converts and encodes `data` once; returns (audio seconds, work seconds).
fn run(data: &[u8], mime: &str) -> (f64, f64) {
    let start = Instant::now();
    let mut converter = Converter::new(24_000, 1);
    let mut encoder = FrameEncoder::new(24_000, 1, 60).unwrap();
    let mut audio_frames = 0usize;
    let mut packets = 0usize;
    decode(Cursor::new(data.to_vec()), mime, &mut |pcm| {
        audio_frames += pcm.frames();
        let samples = converter.push(&pcm).unwrap();
        packets += encoder.push(&samples).unwrap().len();
        true
    })
    .unwrap();
    let tail = converter.flush();
    packets += encoder.push(&tail).unwrap().len();
    assert!(packets > 0);
    let rate = if mime.contains("opus") {
        48_000.0
    } else {
        44_100.0
    };
    (audio_frames as f64 / rate, start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let files = [
        (
            "assets/music/torus_trooper_tt1.mp3",
            "audio/mpeg",
            "MP3 128 kb/s",
        ),
        (
            "assets/music/torus_trooper_tt1.ogg",
            "audio/ogg",
            "Ogg Vorbis",
        ),
        (
            "assets/music/tumiki_return_to_home.flac",
            "audio/flac",
            "FLAC",
        ),
        (
            "tests/data/return_to_home.opus",
            "audio/ogg; codecs=opus",
            "Ogg Opus 48 kb/s",
        ),
    ];
    println!(
        "decode + resample to 24 kHz mono + Opus encode (60 ms, 64 kb/s), one thread, median of 5"
    );
    println!("| format | audio (s) | work (s) | times real time |");
    println!("|---|---:|---:|---:|");
    for (path, mime, label) in files {
        let data = std::fs::read(format!("{root}/{path}")).unwrap();
        let mut factors = Vec::new();
        let mut seconds = (0.0, 0.0);
        for _ in 0..5 {
            seconds = run(&data, mime);
            factors.push(seconds.0 / seconds.1);
        }
        println!(
            "| {label} | {:.1} | {:.3} | {:.0}x |",
            seconds.0,
            seconds.1,
            median(factors)
        );
    }

    // The FLAC at 24 kHz mono, in memory; each complexity encodes it 5 times, interleaved.
    let flac = std::fs::read(format!("{root}/assets/music/tumiki_return_to_home.flac")).unwrap();
    let mut converter = Converter::new(24_000, 1);
    let mut music = Vec::new();
    decode(Cursor::new(flac), "audio/flac", &mut |pcm| {
        music.extend(converter.push(&pcm).unwrap());
        true
    })
    .unwrap();
    music.extend(converter.flush());
    let complexities = [10, 8, 7, 6, 5, 4, 3, 2, 1, 0];
    let mut times = vec![Vec::new(); complexities.len()];
    for _ in 0..5 {
        for (i, c) in complexities.iter().enumerate() {
            let start = Instant::now();
            let mut encoder = FrameEncoder::new(24_000, 1, 60).unwrap();
            encoder.set_complexity(*c).unwrap();
            assert!(!encoder.push(&music).unwrap().is_empty());
            times[i].push(start.elapsed().as_secs_f64());
        }
    }
    let seconds = music.len() as f64 / 24_000.0;
    let base = median(times[0].clone());
    println!("\nOpus encode alone, {seconds:.1} s of music at 24 kHz mono, median of 5");
    println!("| complexity | work (ms) | times real time | speed vs 10 |");
    println!("|---:|---:|---:|---:|");
    for (c, t) in complexities.iter().zip(times) {
        let t = median(t);
        println!(
            "| {c} | {:.1} | {:.0}x | {:.2}x |",
            t * 1000.0,
            seconds / t,
            base / t
        );
    }

    // espeak-ng by name: the default voice is Kokoro, measured in `benches/tts.rs`.
    let tts = Tts::new(&TtsConfig {
        provider: TtsProvider::EspeakNg,
        ..TtsConfig::default()
    });
    let sentences = [
        "Hello.",
        "Here is the song you asked for.",
        "The volume is now thirty percent.",
        "It is a quarter past ten in the morning, and the weather is mild.",
    ];
    println!("\nespeak-ng: sentence to first audio (first decoded PCM block), median of 5");
    println!("| sentence | first audio (ms) | whole sentence (ms) | speech (s) |");
    println!("|---|---:|---:|---:|");
    for sentence in sentences {
        let (mut first, mut whole, mut speech) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..5 {
            let start = Instant::now();
            let media = tts
                .synthesize(sentence)
                .await
                .expect("espeak-ng is installed");
            let mut pcm = decode_media(media);
            let mut got_first = None;
            let mut seconds = 0.0;
            while let Some(block) = pcm.recv().await {
                let block = block.unwrap();
                got_first.get_or_insert_with(|| start.elapsed());
                seconds += block.frames() as f64 / f64::from(block.rate);
            }
            first.push(got_first.unwrap_or(Duration::ZERO).as_secs_f64() * 1e3);
            whole.push(start.elapsed().as_secs_f64() * 1e3);
            speech = seconds;
        }
        println!(
            "| {sentence} | {:.1} | {:.1} | {speech:.2} |",
            median(first),
            median(whole)
        );
    }
}
