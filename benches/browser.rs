//! The browser page against the device simulator: time from the end of a spoken request to the
//! first audible frame of the reply, through voxloop's page in headless Chromium (WebCodecs Opus,
//! tests/clients/browser.py) and through the PyPI xiaozhi-sdk (libopus), side by side against
//! one `voxloop serve` (release build, real whisper base, the bundled music server; the chat
//! model a scripted OpenAI-compatible endpoint on loopback that asks for the track, so the
//! figure is the speech path, not a model's thinking).
//!
//! ```text
//! cargo bench --bench browser            # 5 runs each, alternating
//! cargo bench --bench browser -- 10      # 10 runs each
//! ```
//!
//! Needs what `scripts/test` installs: the clients' venv (selenium, xiaozhi-sdk) and Debian's
//! chromium and chromedriver. How each end of the interval is taken: tests/clients/latency.py.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// `voxloop serve` with the scripted model; its device WebSocket URL and its page's URL.
async fn start_server(llm_url: &str, dir: &Path) -> (tokio::process::Child, String, String) {
    let config = common::scripted_serve_toml(dir, llm_url, "127.0.0.1:0", "127.0.0.1:0");
    let path = dir.join("browser.toml");
    std::fs::write(&path, config).unwrap();
    let (child, found) = common::spawn_serve(&path, &["device server: ", "browser page: "]).await;
    let page = found[1].split_whitespace().next().unwrap().to_string();
    (child, found[0].clone(), page)
}

/// The request, then 3 s of silence; and where the request ends, in ms.
fn microphone(dir: &Path) -> (PathBuf, f64) {
    let root = common::repo_root();
    let mut samples = common::read_wav(&root.join("assets/speech/cmd_play_horizon.wav"));
    let speech_ms = samples.len() as f64 / 16.0;
    samples.extend(std::iter::repeat_n(0.0, 3 * 16_000));
    let path = dir.join("microphone.wav");
    common::write_wav(&path, 16_000, &samples);
    (path, speech_ms)
}

async fn latency(mode: &str, url: &str, wav: &Path, speech_ms: f64) -> f64 {
    let root = common::repo_root();
    let output = tokio::process::Command::new(root.join("target/clients-venv/bin/python"))
        .arg(root.join("tests/clients/latency.py"))
        .args([
            mode,
            url,
            wav.to_str().unwrap(),
            &speech_ms.to_string(),
            "1",
        ])
        .current_dir(root.join("tests/clients"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("a run within 300 s")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{mode}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    seen["latency_ms"][0].as_f64().unwrap()
}

fn summary(name: &str, values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let p50 = values[values.len() / 2];
    println!(
        "{name:<22} p50 {p50:7.0} ms   mean {mean:7.0} ms   min {:7.0}   max {:7.0}   ({} runs)",
        values[0],
        values[values.len() - 1],
        values.len()
    );
    json!({"p50": p50, "mean": mean})
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let call = common::Reply::Call("musicPlayer", json!({"query": "horizon"}));
        let (llm, _) = common::scripted_llm(vec![call]).await;
        let (_server, device, page) = start_server(&llm, dir.path()).await;
        let (wav, speech_ms) = microphone(dir.path());
        println!("end of speech to first audible frame, \"Play the song just over the horizon.\" ({speech_ms:.0} ms), {runs} runs each, alternating");
        let (mut in_page, mut in_sdk) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            in_page.push(latency("page", &page, &wav, speech_ms).await);
            in_sdk.push(latency("sdk", &device, &wav, speech_ms).await);
        }
        let page = summary("browser page", &mut in_page);
        let sdk = summary("xiaozhi-sdk (Python)", &mut in_sdk);
        println!(
            "page / sdk, p50: {:.2}",
            page["p50"].as_f64().unwrap() / sdk["p50"].as_f64().unwrap()
        );
    });
}
