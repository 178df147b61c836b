//! A soak of the device server (issue 23): many sessions connecting, talking, playing,
//! aborting and leaving, over and over, while the server's resources are sampled.
//!
//! ```text
//! cargo bench --bench device_soak                  # 200 sessions for 30 minutes
//! cargo bench --bench device_soak -- 50 5          # 50 sessions for 5 minutes
//! ```
//!
//! The server is the real `voxloop serve` in its own process with the bundled music server;
//! this process runs the devices (protocol v3) and the far end of the LLM API (a scripted
//! endpoint on loopback: `musicPlayer` for "play ...", a short sentence otherwise). The voice is
//! espeak-ng: the soak is about what sessions leave behind, and Kokoro's one-at-a-time queue
//! would answer most of 200 sessions' sentences with the busy sentence. Each device loops:
//! connect and say hello; ask for the track and take 2 to 6 s of its frames; `abort`; say
//! "hello" and wait for the spoken answer's `tts stop`; close; wait 0.5 to 2.5 s. A cycle that
//! gets no frame, no `tts stop`, or an error within 30 s is counted as failed, and the device
//! starts its next cycle. Every 30 s: the server's resident set (MiB), open file descriptors and
//! threads, and the music server's resident set. Sessions start spread over the first 10 s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long one step of a cycle may take before the cycle counts as failed.
const STEP_LIMIT: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

async fn start_server(llm_url: &str, dir: &std::path::Path) -> (tokio::process::Child, String) {
    let sections = format!(
        r#"[llm]
provider = "openai"
url = "{llm_url}"
model = "scripted"
builtin_intents = false

[tts]
provider = "espeak-ng"
"#
    );
    common::spawn_device_bench_server(dir, &sections, &[]).await
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until `done` accepts a message (text as JSON, or `None` for an Opus frame).
async fn until(
    socket: &mut Socket,
    mut done: impl FnMut(Option<&Value>) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| "timed out".to_string())?
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        let seen = match message {
            Message::Text(text) => done(Some(&serde_json::from_str(&text).unwrap_or_default())),
            Message::Binary(bytes) if bytes.first() == Some(&0) => done(None),
            _ => false,
        };
        if seen {
            return Ok(());
        }
    }
}

async fn send(socket: &mut Socket, message: Value) -> Result<(), String> {
    socket
        .send(Message::text(message.to_string()))
        .await
        .map_err(|e| e.to_string())
}

/// One cycle of one device.
async fn cycle(url: &str, play_ms: u64) -> Result<(), String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request
        .headers_mut()
        .insert("protocol-version", "3".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let hello = json!({"type": "hello", "version": 3, "transport": "websocket",
        "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}});
    send(&mut socket, hello).await?;
    until(&mut socket, |m| m.is_some_and(|v| v["type"] == "hello")).await?;
    send(
        &mut socket,
        json!({"type": "listen", "state": "detect", "text": "play horizon"}),
    )
    .await?;
    until(&mut socket, |m| m.is_none()).await?;
    tokio::time::sleep(Duration::from_millis(play_ms)).await;
    send(
        &mut socket,
        json!({"type": "abort", "reason": "wake_word_detected"}),
    )
    .await?;
    send(
        &mut socket,
        json!({"type": "listen", "state": "detect", "text": "hello"}),
    )
    .await?;
    until(&mut socket, |m| {
        m.is_some_and(|v| v["type"] == "tts" && v["state"] == "stop")
    })
    .await?;
    let _ = socket.close(None).await;
    Ok(())
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = args.first().copied().unwrap_or(200) as usize;
    let minutes = args.get(1).copied().unwrap_or(30);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let llm_url = common::music_llm().await;
        let dir = tempfile::tempdir().unwrap();
        let (server, url) = start_server(&llm_url, dir.path()).await;
        let pid = server.id().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let music = common::proc_children(pid);
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let started = Instant::now();
        let end = started + Duration::from_secs(minutes * 60);
        let mut devices = Vec::new();
        for i in 0..sessions {
            let (url, ok, failed, errors) = (url.clone(), ok.clone(), failed.clone(), errors.clone());
            devices.push(tokio::spawn(async move {
                // Spread over the first 10 s; a fixed pseudo-random walk per device.
                tokio::time::sleep(Duration::from_millis(i as u64 * 10_000 / sessions as u64)).await;
                let mut state = i as u64 * 2_654_435_761 + 1;
                let mut next = move |range: u64| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (state >> 33) % range
                };
                while Instant::now() < end {
                    match cycle(&url, 2_000 + next(4_000)).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(500 + next(2_000))).await;
                }
            }));
        }
        println!("| minute | server RSS (MiB) | open files | threads | music server RSS (MiB) | cycles done | failed |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        let sample = |at: Instant| {
            let music_rss: f64 = music.iter().map(|p| common::proc_status(*p, "VmRSS:")).sum::<f64>() / 1024.0;
            println!(
                "| {:.1} | {:.0} | {} | {} | {:.0} | {} | {} |",
                at.duration_since(started).as_secs_f64() / 60.0,
                common::proc_status(pid, "VmRSS:") / 1024.0,
                open_files(pid),
                common::proc_status(pid, "Threads:"),
                music_rss,
                ok.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
            );
        };
        sample(Instant::now());
        while Instant::now() < end {
            tokio::time::sleep(SAMPLE_EVERY).await;
            sample(Instant::now());
        }
        for device in devices {
            let _ = device.await;
        }
        // After every session has left.
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!("after every session left:");
        sample(Instant::now());
        let mut errors = errors.lock().unwrap().clone();
        errors.sort();
        errors.dedup();
        println!("distinct errors: {:?}", &errors[..errors.len().min(5)]);
        drop(server);
    });
}
