//! Devices that finish a spoken command at the same moment (issue 23's burst benchmark).
//!
//! ```text
//! cargo bench --bench device_burst                 # 1 4 16 32 devices at once
//! cargo bench --bench device_burst -- 1 16         # chosen counts
//! BURST_EXTRA='[llm]\nengine_threads = 1' cargo bench --bench device_burst   # config added
//! ```
//!
//! The server is the real `voxloop serve` in its own process on the built-in models: whisper
//! base, the local Qwen2.5 model on llama.cpp's server, Kokoro, with the bundled music server as
//! its MCP server (`voxloop models fetch` brings them). For each count N: a fresh server, a
//! device that says each command once and waits for its answer's first audio (so that the
//! models are loaded and warm, as on a server that has been up a while), then N
//! devices (protocol v1) that each send `listen start` (manual), the Opus frames of a recorded
//! command, and, all together, `listen stop`. Half of them ask "What time is it?" (a built-in
//! intent: whisper and Kokoro), half "Play the song just over the horizon." (whisper, the
//! model's tool call, the music server, a paged track). The count 1 is each command alone,
//! one after the other: the baseline.
//!
//! From each device's `listen stop`: to its `stt` (ASR), and to the first Opus frame of the
//! answer (speech or music), by command. A device told the busy sentence (a stage's queue
//! refused it) is counted as `busy`; one that heard neither an answer nor the busy sentence
//! within 120 s is `lost`. Times are p50 / p95 / max over the devices that got them; the ratios
//! are each p50 over the same command's p50 alone, measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use voxloop::audio::opus::FrameEncoder;

/// The longest a device waits for its answer.
const DEADLINE: Duration = Duration::from_secs(120);
const COMMANDS: [&str; 2] = ["cmd_what_time.wav", "cmd_play_horizon.wav"];

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `voxloop serve` on the built-in models: (child, the device server's WebSocket URL).
async fn start_server(dir: &std::path::Path) -> (tokio::process::Child, String) {
    let sections = format!(
        "[asr]\nlanguage = \"en\"\n{}",
        common::extra_toml("BURST_EXTRA")
    );
    common::spawn_device_bench_server(dir, &sections, &[]).await
}

/// The command's Opus frames as the firmware sends them: 16 kHz mono, 60 ms.
fn frames(name: &str) -> Vec<Vec<u8>> {
    let samples = common::read_wav(&common::repo_root().join("assets/speech").join(name));
    let mut encoder = FrameEncoder::new(16_000, 1, 60).unwrap();
    let mut frames = encoder.push(&samples).unwrap();
    frames.extend(encoder.finish().unwrap());
    frames
}

async fn connect(url: &str) -> Socket {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("protocol-version", "1".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = json!({"type": "hello", "version": 1, "transport": "websocket",
        "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}});
    socket.send(Message::text(hello.to_string())).await.unwrap();
    loop {
        if let Some(Ok(Message::Text(text))) = socket.next().await
            && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["type"] == "hello")
        {
            return socket;
        }
    }
}

/// `listen start` (manual) and the command's frames; the turn ends at `listen stop`.
async fn speak(socket: &mut Socket, frames: &[Vec<u8>]) {
    let start = json!({"type": "listen", "state": "start", "mode": "manual"});
    socket.send(Message::text(start.to_string())).await.unwrap();
    for frame in frames {
        socket.send(Message::binary(frame.clone())).await.unwrap();
    }
}

/// What one device saw after its `listen stop`.
#[derive(Debug, Default)]
struct Outcome {
    command: usize,
    stt_ms: Option<f64>,
    audio_ms: Option<f64>,
    busy: bool,
}

/// Sends `listen stop` at `at` and reads until the answer's first frame, the busy sentence or
/// the deadline.
async fn listen(mut socket: Socket, at: tokio::time::Instant) -> Outcome {
    tokio::time::sleep_until(at).await;
    let stop = json!({"type": "listen", "state": "stop"});
    socket.send(Message::text(stop.to_string())).await.unwrap();
    let stopped = Instant::now();
    let ms = || stopped.elapsed().as_secs_f64() * 1000.0;
    let mut outcome = Outcome::default();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
        match message {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                match (v["type"].as_str(), v["state"].as_str()) {
                    (Some("stt"), _) => outcome.stt_ms = Some(ms()),
                    (Some("tts"), Some("sentence_start"))
                        if v["text"] == voxloop::compute::BUSY_SENTENCE =>
                    {
                        outcome.busy = true;
                        break;
                    }
                    _ => {}
                }
            }
            Message::Binary(_) if outcome.audio_ms.is_none() && !outcome.busy => {
                outcome.audio_ms = Some(ms());
                break;
            }
            _ => {}
        }
    }
    let _ = socket.close(None).await;
    outcome
}

/// p50, p95 and max of `values`, in ms, by nearest rank (the value at rank ceil(p x n): of
/// two values, p50 is the lower).
fn quantiles(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let rank = (p * values.len() as f64).ceil() as usize;
        values
            .get(rank.clamp(1, values.len().max(1)) - 1)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (q(0.5), q(0.95), q(1.0))
}

/// One command's figures in a step.
#[derive(Clone, Copy)]
struct Figures {
    stt: (f64, f64, f64),
    audio: (f64, f64, f64),
}

struct Step {
    devices: usize,
    /// By command, as [`COMMANDS`].
    figures: Vec<Figures>,
    answered: usize,
    busy: usize,
    lost: usize,
}

async fn step(devices: usize, frames: &[Vec<Vec<u8>>]) -> Step {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = start_server(dir.path()).await;
    // The primer: each command once, so that the models are loaded and warm.
    for command in frames {
        let mut primer = connect(&url).await;
        speak(&mut primer, command).await;
        let primed = listen(primer, tokio::time::Instant::now()).await;
        assert!(
            primed.audio_ms.is_some(),
            "the primer got no answer: {primed:?}"
        );
    }
    // One device is each command alone, in turn; more are all at once.
    let rounds = if devices == 1 { frames.len() } else { 1 };
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        let mut sockets = Vec::new();
        for i in 0..devices {
            let command = (i + round) % frames.len();
            let mut socket = connect(&url).await;
            speak(&mut socket, &frames[command]).await;
            sockets.push((command, socket));
        }
        // Every device's frames are in, and each session has prepared its turn task.
        let at = tokio::time::Instant::now() + Duration::from_secs(2);
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|(command, socket)| {
                tokio::spawn(async move {
                    Outcome {
                        command,
                        ..listen(socket, at).await
                    }
                })
            })
            .collect();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
    }
    let answered = outcomes.iter().filter(|o| o.audio_ms.is_some()).count();
    let busy = outcomes.iter().filter(|o| o.busy).count();
    let figures = (0..frames.len())
        .map(|c| {
            let of = || outcomes.iter().filter(move |o| o.command == c);
            Figures {
                stt: quantiles(of().filter_map(|o| o.stt_ms).collect()),
                audio: quantiles(of().filter_map(|o| o.audio_ms).collect()),
            }
        })
        .collect();
    Step {
        devices,
        figures,
        answered,
        busy,
        lost: outcomes.len() - answered - busy,
    }
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1, 4, 16, 32]
    } else {
        counts
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let frames: Vec<Vec<Vec<u8>>> = COMMANDS.iter().map(|c| frames(c)).collect();
    println!(
        "devices | command | stt p50 / p95 / max ms | first audio p50 / p95 / max ms | p50 ÷ alone (stt, audio) | answered | busy | lost"
    );
    let mut alone: Option<Vec<Figures>> = None;
    for n in counts {
        let s = runtime.block_on(step(n, &frames));
        let base = alone.get_or_insert_with(|| s.figures.clone()).clone();
        for (c, (f, b)) in s.figures.iter().zip(&base).enumerate() {
            let totals = if c == 0 {
                format!("{:>8} | {:>4} | {:>4}", s.answered, s.busy, s.lost)
            } else {
                String::new()
            };
            println!(
                "{:>7} | {:<10} | {:>6.0} / {:>6.0} / {:>6.0} | {:>6.0} / {:>6.0} / {:>6.0} | {:>4.1}x, {:>4.1}x | {totals}",
                s.devices,
                COMMANDS[c]
                    .trim_start_matches("cmd_")
                    .trim_end_matches(".wav"),
                f.stt.0,
                f.stt.1,
                f.stt.2,
                f.audio.0,
                f.audio.1,
                f.audio.2,
                f.stt.0 / b.stt.0,
                f.audio.0 / b.audio.0,
            );
        }
    }
}
