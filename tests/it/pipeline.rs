//! The audio pipeline on real files: decode, resample, Opus, the playback queue, sinks and TTS.

use crate::common;

use std::io::Cursor;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use voxloop::audio::Pcm;
use voxloop::audio::convert::Converter;
use voxloop::audio::decode::{DecodeError, Decoder, PcmReceiver, decode, spawn_decoder};
use voxloop::audio::opus::{FrameDecoder, FrameEncoder};
use voxloop::audio::queue::{PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason};
use voxloop::audio::sink::{NullSink, Sink, WavSink};
use voxloop::speech::tts::{Tts, TtsError};
use voxloop::speech::tts::{TtsConfig, TtsProvider};

/// A reader that hands out at most `piece` bytes per read, as a network source does.
struct Pieces {
    data: Vec<u8>,
    pos: usize,
    piece: usize,
}

impl std::io::Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decodes bytes read `piece` at a time: the samples, the rate and channels.
fn decode_bytes(data: Vec<u8>, mime: &str, piece: usize) -> (Vec<f32>, u32, u16) {
    let mut samples = Vec::new();
    let summary = decode(
        Pieces {
            data,
            pos: 0,
            piece,
        },
        mime,
        &mut |pcm| {
            samples.extend_from_slice(&pcm.samples);
            true
        },
    )
    .unwrap_or_else(|e| panic!("{mime}: {e}"));
    (samples, summary.rate, summary.channels)
}

fn decode_asset(name: &str, mime: &str) -> Vec<f32> {
    decode_bytes(std::fs::read(music_file(name)).unwrap(), mime, 1 << 20).0
}

const TRACKS: [(&str, &str, u64); 6] = [
    // Frames from sox 14.4.2 (`soxi -s`), an independent decoder; 44100 Hz mono.
    ("torus_trooper_tt1.mp3", "audio/mpeg", 2_646_000),
    ("torus_trooper_tt1.ogg", "audio/ogg", 2_646_000),
    ("tumiki_just_over_the_horizon.mp3", "audio/mpeg", 2_605_252),
    ("tumiki_just_over_the_horizon.ogg", "audio/ogg", 2_605_290),
    ("tumiki_return_to_home.ogg", "audio/ogg", 976_984),
    ("tumiki_return_to_home.flac", "audio/flac", 976_984),
];

#[test]
fn tracks_decode_to_their_known_durations() {
    for (name, mime, expected) in TRACKS {
        let (samples, rate, channels) =
            decode_bytes(std::fs::read(music_file(name)).unwrap(), mime, 1 << 20);
        assert_eq!((rate, channels), (44_100, 1), "{name}");
        let frames = samples.len() as i64;
        // Vorbis and FLAC: exact. These MP3s carry no LAME/Xing gapless tag, so the stream holds
        // the encoder's delay (576) up to the next whole 1152-sample MP3 frame as well.
        let tolerance = if mime == "audio/mpeg" { 1152 + 576 } else { 0 };
        assert!(
            (frames - expected as i64).abs() <= tolerance,
            "{name}: {frames} frames, expected {expected}"
        );
    }
    // Ogg Opus (tests/data, made from the FLAC with opusenc 0.2 at 48 kb/s): 48 kHz, the FLAC's
    // duration within one 20 ms Opus frame.
    let (samples, rate, _) = decode_bytes(
        std::fs::read(repo_root().join("tests/data/return_to_home.opus")).unwrap(),
        "audio/ogg; codecs=opus",
        1 << 20,
    );
    assert_eq!(rate, 48_000);
    let expected = 976_984.0 * 48_000.0 / 44_100.0;
    assert!(
        (samples.len() as f64 - expected).abs() <= 960.0,
        "{} vs {expected}",
        samples.len()
    );
}

#[test]
fn decoding_from_1_kib_pieces_gives_the_same_pcm() {
    for (name, mime, _) in TRACKS
        .iter()
        .filter(|t| t.0.contains("horizon") || t.0.contains("home"))
    {
        let data = std::fs::read(music_file(name)).unwrap();
        let (whole, _, _) = decode_bytes(data.clone(), mime, data.len());
        let (pieces, _, _) = decode_bytes(data, mime, 1024);
        assert!(
            whole == pieces,
            "{name}: PCM differs when read in 1 KiB pieces"
        );
    }
}

#[test]
fn flac_and_vorbis_of_one_track_agree() {
    let flac = decode_asset("tumiki_return_to_home.flac", "audio/flac");
    let vorbis = decode_asset("tumiki_return_to_home.ogg", "audio/ogg");
    // Two seconds from the middle, aligned within +-64 samples.
    let window = &flac[441_000..441_000 + 88_200];
    let other = &vorbis[441_000..441_000 + 88_200];
    let (r, lag) = best_correlation(window, other, 64);
    assert!(r > 0.99, "correlation {r:.4} at lag {lag}");
}

/// A session playing a track waits on its listener (the pacer) nearly all the time. Its decoder
/// must hold no thread while it waits: on a runtime with 2 blocking threads, 8 decoders whose
/// receivers nobody has read yet each get their first block out, and then every one plays to
/// the end with all its frames. (When each decoder held a blocking thread for its whole track,
/// the third never started: device sessions past tokio's 512 threads waited for the first ones
/// to finish.)
#[test]
fn decoders_waiting_for_their_listener_hold_no_thread() {
    let (name, mime, frames) = TRACKS[4];
    let bytes = std::fs::read(music_file(name)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut receivers: Vec<PcmReceiver> = (0..8)
            .map(|_| spawn_decoder(Cursor::new(bytes.clone()), mime.to_string()))
            .collect();
        let mut counts = Vec::new();
        for (i, rx) in receivers.iter_mut().enumerate() {
            let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("decoder {i} never got a thread"))
                .expect("a block")
                .expect("decoded");
            counts.push(first.frames() as u64);
        }
        for (rx, count) in receivers.iter_mut().zip(&mut counts) {
            while let Some(block) = rx.recv().await {
                *count += block.expect("decoded").frames() as u64;
            }
        }
        assert!(
            counts.iter().all(|&c| c == frames),
            "{counts:?} != {frames}"
        );
    });
}

/// A media stream whose bytes come in pieces with pauses, as pages and TTS bodies do, decoded on
/// a multi-threaded runtime: in 48 KiB pieces (blocks decoded on the async task while the bytes
/// are at hand) the PCM is bit-identical to decoding the whole file; a transfer in pieces smaller
/// than a block needs (blocking jobs that wait for the rest) that fails after 200 KiB gives the
/// PCM of those bytes and then the transfer's error.
#[test]
fn media_arriving_in_pieces_decodes_as_the_whole_file_does() {
    use voxloop::media::{MediaError, MediaStream};
    let bytes = std::fs::read(music_file("torus_trooper_tt1.mp3")).unwrap();
    let whole = decode_bytes(bytes.clone(), "audio/mpeg", 1 << 20).0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = |data: Vec<u8>, piece: usize, fail: bool| {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                for piece in data.chunks(piece) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if tx
                        .send(Ok(bytes::Bytes::copy_from_slice(piece)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if fail {
                    let _ = tx.send(Err(MediaError("connection reset".into()))).await;
                }
            });
            let cancel = tokio_util::sync::CancellationToken::new();
            MediaStream::new("audio/mpeg".into(), None, "test".into(), None, rx, cancel)
        };
        let mut pcm = voxloop::audio::decode::decode_media(stream(bytes.clone(), 48 << 10, false));
        let mut samples = Vec::new();
        while let Some(block) = pcm.recv().await {
            samples.extend(block.expect("decoded").samples);
        }
        assert_eq!(samples.len(), whole.len());
        assert!(samples == whole, "the PCM differs from the whole file's");

        // Pieces of 300 bytes: a 100 ms block (about 1.6 KB) outruns what has arrived, and the
        // decoder waits for the rest inside its read.
        let failing = stream(bytes[..200 << 10].to_vec(), 300, true);
        let mut pcm = voxloop::audio::decode::decode_media(failing);
        let mut frames = 0;
        let mut error = None;
        while let Some(block) = pcm.recv().await {
            match block {
                Ok(block) => frames += block.frames(),
                Err(e) => error = Some(e.to_string()),
            }
        }
        assert!(frames > 44_100 * 12, "{frames} frames before the error");
        let error = error.expect("the transfer's error");
        assert!(error.contains("connection reset"), "{error}");
    });
}

/// A listener that leaves (a barge-in drops the song) while the next bytes are late stops the
/// transfer at once: the media stream is dropped, which cancels its pending page requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_listener_stops_a_stalled_transfer() {
    use voxloop::media::MediaStream;
    let bytes = std::fs::read(music_file("torus_trooper_tt1.mp3")).unwrap();
    let (tx, rx) = mpsc::channel(1);
    let cancel = tokio_util::sync::CancellationToken::new();
    let media = MediaStream::new(
        "audio/mpeg".into(),
        None,
        "test".into(),
        None,
        rx,
        cancel.clone(),
    );
    tx.send(Ok(bytes::Bytes::copy_from_slice(&bytes[..20 << 10])))
        .await
        .unwrap();
    // Less than 32 KiB and no end yet: the decoder waits for the next chunk, which never comes
    // (tx stays open). The listener leaves.
    let pcm = voxloop::audio::decode::decode_media(media);
    drop(pcm);
    tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
        .await
        .expect("the transfer was not stopped");
    drop(tx);
}

/// The pull decoder joins packets up to the block size asked for, and hands out what it decoded
/// before an input failure first, the failure on the next call, then nothing.
#[test]
fn the_pull_decoder_joins_packets_and_reports_a_failure_after_the_pcm() {
    let bytes = std::fs::read(music_file("torus_trooper_tt1.mp3")).unwrap();
    let mut decoder = Decoder::open(Cursor::new(bytes.clone()), "audio/mpeg").unwrap();
    let one = decoder.next_block(0).unwrap().unwrap();
    assert_eq!(one.frames(), 1152, "one MP3 frame");
    let joined = decoder.next_block(4410).unwrap().unwrap();
    assert!(
        (4410..4410 + 1152).contains(&joined.frames()),
        "{}",
        joined.frames()
    );
    assert_eq!(decoder.summary().frames, (1152 + joined.frames()) as u64);

    /// 200 KiB of the MP3, then an I/O error.
    struct Breaks(Cursor<Vec<u8>>);
    impl std::io::Read for Breaks {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::other("connection reset")),
                n => Ok(n),
            }
        }
    }
    let mut decoder = Decoder::open(
        Breaks(Cursor::new(bytes[..200 << 10].to_vec())),
        "audio/mpeg",
    )
    .unwrap();
    let mut frames = 0;
    let err = loop {
        match decoder.next_block(44_100) {
            Ok(Some(pcm)) => frames += pcm.frames(),
            Ok(None) => panic!("ended without the input's error"),
            Err(e) => break e,
        }
    };
    // 200 KiB of 128 kb/s is 12.8 s: all of it came out before the error.
    assert!(frames > 44_100 * 12, "{frames} frames before the error");
    assert!(
        matches!(&err, DecodeError::Input { reason, .. } if reason.contains("connection reset")),
        "{err}"
    );
    assert!(decoder.next_block(44_100).unwrap().is_none());
}

fn snr_db(reference: &[f32], test: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = reference
        .iter()
        .zip(test)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    10.0 * (signal / noise.max(1e-20)).log10()
}

#[test]
fn opus_round_trip_keeps_over_20_db_snr() {
    let flac = decode_asset("tumiki_return_to_home.flac", "audio/flac");
    let mut converter = Converter::new(24_000, 1);
    let mut input = converter
        .push(&Pcm {
            rate: 44_100,
            channels: 1,
            samples: flac[..441_000].to_vec(),
        })
        .unwrap();
    input.extend(converter.flush());
    // libopus's own complexity, and the device downlink's default.
    let device = voxloop::audio::AudioConfig::default().device_opus_complexity;
    for complexity in [10, device] {
        let mut encoder = FrameEncoder::new(24_000, 1, 60).unwrap();
        encoder.set_complexity(complexity).unwrap();
        let mut decoder = FrameDecoder::new(24_000, 1).unwrap();
        let mut packets = encoder.push(&input).unwrap();
        packets.extend(encoder.finish().unwrap());
        let mut output = Vec::new();
        for packet in &packets {
            output.extend(decoder.decode(packet).unwrap().samples);
        }
        // Align for the codec's look-ahead, then compare 8 s.
        let reference = &input[24_000..24_000 * 9];
        let (_, lag) = best_correlation(&reference[..4800], &output[24_000..24_000 + 4800], 400);
        let start = (24_000 + lag) as usize;
        let snr = snr_db(reference, &output[start..start + reference.len()]);
        println!(
            "Opus 24 kHz mono, 60 ms frames, {} b/s, complexity {complexity}: SNR {snr:.1} dB",
            voxloop::audio::opus::DEFAULT_BITRATE
        );
        assert!(
            snr > 20.0,
            "complexity {complexity}: SNR {snr:.1} dB (lag {lag})"
        );
    }
}

#[test]
fn bad_input_is_a_clear_error_and_keeps_what_decoded() {
    let mp3 = std::fs::read(music_file("torus_trooper_tt1.mp3")).unwrap();
    // Truncated in the middle of a frame: the first ~6 s play, then the stream ends.
    let mut frames = 0;
    let _ = decode(
        Cursor::new(mp3[..100_001].to_vec()),
        "audio/mpeg",
        &mut |p| {
            frames += p.frames();
            true
        },
    );
    assert!(frames > 44_100 * 5, "{frames} frames from a truncated file");

    // Corrupt: 20 KiB of garbage in the middle of the FLAC. What is valid still decodes.
    let mut flac = std::fs::read(music_file("tumiki_return_to_home.flac")).unwrap();
    for (i, b) in flac[500_000..520_480].iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8;
    }
    let mut frames = 0;
    let result = decode(Cursor::new(flac), "audio/flac", &mut |p| {
        frames += p.frames();
        true
    });
    assert!(
        frames > 44_100 * 8,
        "{frames} frames before the damage ({result:?})"
    );

    // A MIME type that lies: decoded by the bytes.
    let (samples, rate, _) = decode_bytes(mp3.clone(), "audio/flac", 1 << 20);
    assert_eq!(rate, 44_100);
    assert!(samples.len() > 2_600_000);

    // Zero length, and a source that breaks off.
    assert!(matches!(
        decode(Cursor::new(Vec::new()), "audio/mpeg", &mut |_| true),
        Err(DecodeError::Empty(_))
    ));
    struct Broken(usize);
    impl std::io::Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(0);
            self.0 -= n;
            Ok(n)
        }
    }
    let err = decode(Broken(1000), "audio/pcm;rate=16000", &mut |_| true).unwrap_err();
    assert!(
        matches!(err, DecodeError::Input { frames: 500, .. }),
        "{err}"
    );
}

/// A segment of `frames` frames of constant `level` at 16 kHz, fed in 10 ms blocks.
fn tone(level: f32, frames: usize) -> PcmReceiver {
    let (tx, rx) = mpsc::channel(1024);
    for block in vec![level; frames].chunks(160) {
        tx.try_send(Ok(Pcm {
            rate: 16_000,
            channels: 1,
            samples: block.to_vec(),
        }))
        .unwrap();
    }
    rx
}

/// A queue at full volume playing into a 16 kHz mono WAV file in a temporary directory.
fn wav_queue() -> (tempfile::TempDir, std::path::PathBuf, PlaybackQueue) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.wav");
    let sink = Sink::Wav(WavSink::create(&path, 16_000, 1).unwrap());
    let queue = PlaybackQueue::new(sink, settings(100));
    (dir, path, queue)
}

fn settings(volume: u8) -> QueueSettings {
    QueueSettings {
        frame_ms: 20,
        volume,
        ramp_ms: 10,
        overlap_turns: false,
        resume_media: true,
    }
}

#[tokio::test]
async fn the_queue_plays_segments_in_order_with_events() {
    let (_dir, path, queue) = wav_queue();
    let mut events = queue.events();
    for (i, level) in [0.1f32, 0.2, 0.3].into_iter().enumerate() {
        let kind = SegmentKind::Sentence {
            text: format!("sentence {i}"),
        };
        queue.enqueue(kind, tone(level, 3200)).await;
    }
    queue.close().await.unwrap();
    let samples: Vec<i16> = hound::WavReader::open(&path)
        .unwrap()
        .samples()
        .map(Result::unwrap)
        .collect();
    assert_eq!(samples.len(), 9600);
    for (i, level) in [0.1f32, 0.2, 0.3].iter().enumerate() {
        let expected = (level * 32767.0).round() as i16;
        assert!(
            samples[i * 3200..(i + 1) * 3200]
                .iter()
                .all(|&s| s == expected),
            "segment {i}"
        );
    }
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let starts: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            QueueEvent::SegmentStart { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [1, 2, 3]);
    assert!(
        matches!(&seen[0], QueueEvent::SegmentStart { segment: SegmentKind::Sentence { text }, .. } if text == "sentence 0")
    );
    assert!(matches!(
        seen[1],
        QueueEvent::SegmentEnd {
            id: 1,
            played_ms: 200,
            error: None
        }
    ));
    assert_eq!(
        seen.last(),
        Some(&QueueEvent::Stopped {
            reason: StopReason::Finished
        })
    );
}

#[tokio::test(start_paused = true)]
async fn stop_silences_within_one_frame_and_drops_the_queue() {
    let sink = Sink::Null(NullSink::new(16_000, 1, true));
    let queue = PlaybackQueue::new(sink, settings(100));
    let mut events = queue.events();
    queue
        .enqueue(
            SegmentKind::Media {
                title: Some("long".into()),
            },
            tone(0.5, 16_000 * 10),
        )
        .await;
    queue
        .enqueue(
            SegmentKind::Media {
                title: Some("next".into()),
            },
            tone(0.5, 16_000),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.stop(StopReason::BargeIn).await;
    let Some(Sink::Null(sink)) = queue.close().await else {
        panic!("the null sink")
    };
    // Paced at real time (virtual clock): 500 ms had played; at most one 20 ms frame more.
    let played_ms = sink.frames * 1000 / 16_000;
    assert!((500..=520).contains(&played_ms), "{played_ms} ms played");
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(
        seen.contains(&QueueEvent::Stopped {
            reason: StopReason::BargeIn
        }),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, QueueEvent::SegmentStart { id: 2, .. })),
        "the queued segment was dropped"
    );
}

#[tokio::test]
async fn volume_applies_at_once_with_a_ramp() {
    let (_dir, path, queue) = wav_queue();
    queue.set_volume(50);
    queue
        .enqueue(SegmentKind::Media { title: None }, tone(0.8, 1600))
        .await;
    queue.close().await.unwrap();
    let samples: Vec<i16> = hound::WavReader::open(&path)
        .unwrap()
        .samples()
        .map(Result::unwrap)
        .collect();
    // 100 % to 50 % ramps over 10 ms (160 frames), then 0.8 x 0.5^3 = 0.1.
    assert!(
        samples.windows(2).all(|w| (w[0] - w[1]).abs() < 200),
        "no jump"
    );
    assert!(
        samples[200..]
            .iter()
            .all(|&s| s == (0.1f32 * 32767.0).round() as i16)
    );
}

fn voxloop(args: &[&str], home: Option<&std::path::Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voxloop"));
    cmd.args(args)
        .current_dir(repo_root())
        .env_remove("VOXLOOP_CONFIG");
    if let Some(home) = home {
        cmd.env("HOME", home);
    }
    cmd.output().unwrap()
}

#[test]
fn say_speaks_non_silent_speech_of_plausible_length() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("say.wav");
    let text = "Hello, I am voxloop. The song you asked for is playing now.";
    let result = voxloop(&["say", text, "--output", out.to_str().unwrap()], None);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let reader = hound::WavReader::open(&out).unwrap();
    let spec = reader.spec();
    let samples: Vec<f32> = reader
        .into_samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    let seconds = samples.len() as f64 / spec.sample_rate as f64;
    // Eleven words at 170 words per minute: about 4 s.
    assert!((2.0..8.0).contains(&seconds), "{seconds:.2} s");
    let rms = (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt();
    assert!(rms > 0.02, "rms {rms}");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("speaking: Hello, I am voxloop."),
        "{stdout}"
    );
}

#[test]
fn play_writes_what_plays_and_reports_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("play.wav");
    let result = voxloop(
        &[
            "play",
            "tests/data/return_to_home.opus",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let reader = hound::WavReader::open(&out).unwrap();
    assert_eq!(reader.spec().sample_rate, 24_000);
    let seconds = reader.duration() as f64 / 24_000.0;
    assert!((22.1..22.2).contains(&seconds), "{seconds}");

    let empty = dir.path().join("empty.mp3");
    std::fs::write(&empty, b"").unwrap();
    let result = voxloop(
        &[
            "play",
            empty.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("no audio in the data"));
}

#[test]
fn the_speaker_path_runs_on_alsas_null_device() {
    // Half a second of tone; ALSA's null device consumes it in real time.
    let home = alsa_home(true);
    let clip = home.path().join("tone.wav");
    let tone: Vec<f32> = (0..8000).map(|i| (i as f32 * 0.1).sin() * 0.25).collect();
    write_wav(&clip, 16_000, &tone);
    let result = voxloop(&["play", clip.to_str().unwrap()], Some(home.path()));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("speaker open"), "{stderr}");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("played 0.50 s"), "{stdout}\n{stderr}");
}

#[tokio::test]
async fn a_tts_provider_that_is_down_is_a_clear_error() {
    let missing = TtsConfig {
        provider: TtsProvider::EspeakNg,
        espeak_command: "/nonexistent/espeak-ng".into(),
        ..TtsConfig::default()
    };
    let err = Tts::new(&missing).synthesize("hello").await.err().unwrap();
    assert!(matches!(err, TtsError::NotInstalled { .. }), "{err}");
    assert!(err.to_string().contains("apt-get install espeak-ng"));

    let down = TtsConfig {
        provider: TtsProvider::Openai,
        url: "http://127.0.0.1:9/v1".into(),
        ..TtsConfig::default()
    };
    let err = Tts::new(&down).synthesize("hello").await.err().unwrap();
    assert!(matches!(err, TtsError::Http { .. }), "{err}");
}

#[tokio::test]
async fn an_openai_compatible_tts_endpoint_streams_speech() {
    // A scripted endpoint on loopback: checks the request, answers a 0.25 s WAV.
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 24_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = Cursor::new(Vec::new());
    let mut writer = hound::WavWriter::new(&mut wav, spec).unwrap();
    for i in 0..6000 {
        writer
            .write_sample(((i as f32 * 0.05).sin() * 10_000.0) as i16)
            .unwrap();
    }
    writer.finalize().unwrap();
    let wav: &'static [u8] = wav.into_inner().leak();
    let router = axum::Router::new().route(
        "/v1/audio/speech",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| async move {
            assert_eq!(body["input"], "Good morning.");
            assert_eq!(body["response_format"], "wav");
            ([(axum::http::header::CONTENT_TYPE, "audio/wav")], wav)
        }),
    );
    let base = serve_loopback(router).await;
    let config = TtsConfig {
        provider: TtsProvider::Openai,
        url: format!("{base}/v1"),
        voice: "alloy".into(),
        ..TtsConfig::default()
    };
    let media = Tts::new(&config).synthesize("Good morning.").await.unwrap();
    let mut pcm = voxloop::audio::decode::decode_media(media);
    let mut frames = 0;
    while let Some(block) = pcm.recv().await {
        frames += block.unwrap().frames();
    }
    assert_eq!(frames, 6000);
}

#[test]
fn no_sound_card_is_a_clear_error_pointing_at_output() {
    let home = alsa_home(false);
    let result = voxloop(
        &["play", "tests/data/return_to_home.opus"],
        Some(home.path()),
    );
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("no usable audio output device"), "{stderr}");
    assert!(stderr.contains("--output OUT.wav"), "{stderr}");
}

#[tokio::test(start_paused = true)]
async fn device_frames_are_paced_never_more_than_the_lead_ahead() {
    use voxloop::audio::sink::OpusSink;
    let (tx, mut rx) = mpsc::channel(1024);
    let sink = OpusSink::new(24_000, 60, 64_000, Duration::from_millis(120), tx).unwrap();
    let queue = PlaybackQueue::new(Sink::Opus(sink), settings(100));
    let (tone_tx, tone_rx) = mpsc::channel(1024);
    // A 440 Hz tone (Opus removes DC, so a constant level would decode as silence).
    let sine: Vec<f32> = (0..48_000)
        .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / 24_000.0).sin() * 0.5)
        .collect();
    for block in sine.chunks(240) {
        tone_tx
            .try_send(Ok(Pcm {
                rate: 24_000,
                channels: 1,
                samples: block.to_vec(),
            }))
            .unwrap();
    }
    drop(tone_tx);
    queue
        .enqueue(SegmentKind::Media { title: None }, tone_rx)
        .await;
    let start = tokio::time::Instant::now();
    let mut decoder = FrameDecoder::new(24_000, 1).unwrap();
    let mut received = 0u32;
    let closing = tokio::spawn(queue.close());
    while let Some(packet) = rx.recv().await {
        received += 1;
        // Audio received so far may be ahead of real time by the lead plus one frame at most.
        let audio = Duration::from_millis(60) * received;
        let ahead = audio.saturating_sub(start.elapsed());
        assert!(
            ahead <= Duration::from_millis(180),
            "frame {received}: {ahead:?} ahead"
        );
        let pcm = decoder.decode(&packet).unwrap();
        assert_eq!(pcm.samples.len(), 1440);
        if received > 3 {
            let rms = (pcm.samples.iter().map(|s| s * s).sum::<f32>() / 1440.0).sqrt();
            assert!(rms > 0.1, "frame {received} is not silent: {rms}");
        }
        if received == 34 {
            break;
        }
    }
    assert_eq!(received, 34, "2 s in 60 ms frames, the last one padded");
    closing.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_device_stream_sends_its_last_partial_frame_when_playback_ends() {
    use voxloop::audio::sink::OpusSink;
    let (tx, mut rx) = mpsc::channel(1024);
    let sink = OpusSink::new(24_000, 60, 64_000, Duration::from_millis(120), tx).unwrap();
    let queue = PlaybackQueue::new(Sink::Opus(sink), settings(100));
    // 100 ms at 16 kHz: one whole 60 ms frame and 40 ms that wait for more.
    queue
        .enqueue(SegmentKind::Media { title: None }, tone(0.5, 1600))
        .await;
    queue.idle().await;
    let mut frames = 0;
    while rx.try_recv().is_ok() {
        frames += 1;
    }
    assert_eq!(
        frames, 2,
        "the 40 ms tail must go out padded, not wait for the next reply"
    );
}
