//! voxloop's browser page (`voxloop serve` at `/`) in a real headless Chromium, driven over
//! WebDriver by selenium (tests/clients/browser.py), its microphone the recorded command
//! assets/speech/cmd_play_horizon.wav (Chromium's fake capture device). The server is the real
//! `voxloop serve` process (real whisper, the bundled music server, the page's WebCodecs Opus
//! both ways); the chat model is a scripted OpenAI-compatible endpoint that asks for the track.
//! On a failure the page's screenshot is kept in target/browser-artifacts.

use crate::common;
use crate::real_clients::{client_script, run_client};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use common::*;

/// A `voxloop serve` configuration: fixed ports (so a restart comes back at the same address),
/// the scripted model at `llm_url`, espeak-ng, the bundled music server, and `extra` TOML.
fn config_file(dir: &Path, llm_url: &str, extra: &str) -> (PathBuf, u16) {
    let (device, api) = (free_port(), free_port());
    let toml = scripted_serve_toml(
        dir,
        llm_url,
        &format!("127.0.0.1:{device}"),
        &format!("127.0.0.1:{api}"),
    ) + extra;
    let path = dir.join("voxloop.toml");
    std::fs::write(&path, toml).unwrap();
    (path, api)
}

/// Starts `voxloop serve` and waits for its HTTP API to answer `/health`.
async fn serve(config: &Path, api: u16) -> tokio::process::Child {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{api}/health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(response) = reqwest::get(&health).await
            && response.status().is_success()
        {
            return child;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "voxloop serve did not answer within 120 s: {}",
            std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn page_env() -> [(&'static str, String); 1] {
    let artifacts = repo_root().join("target/browser-artifacts");
    [("VOXLOOP_ARTIFACTS", artifacts.display().to_string())]
}

/// The microphone's recording: the command, then 3 s of silence, so that the server's VAD hears
/// the end of the turn (Chromium plays the file in a loop).
fn microphone_wav() -> PathBuf {
    static WAV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    WAV.get_or_init(|| {
        let dir = repo_root().join("target/browser-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("microphone-{}.wav", std::process::id()));
        let mut samples = read_wav(&repo_root().join("assets/speech/cmd_play_horizon.wav"));
        samples.extend(std::iter::repeat_n(0.0, 3 * 16_000));
        write_wav(&path, 16_000, &samples);
        path
    })
    .clone()
}

async fn browser(args: &[&str]) -> Value {
    let script = client_script("browser.py");
    let wav = microphone_wav();
    let mut all = vec![
        script.to_str().unwrap(),
        args[0],
        args[1],
        wav.to_str().unwrap(),
    ];
    all.extend(&args[2..]);
    let env = page_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_client(&all, &env).await
}

/// The model asks for the track the request names.
async fn music_model() -> String {
    let call = Reply::Call("musicPlayer", json!({"query": "horizon"}));
    scripted_llm(vec![call, Reply::Words("Enjoy.")]).await.0
}

#[tokio::test]
async fn the_page_hears_a_request_shows_the_tool_call_plays_the_reply_and_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (config, api) = config_file(dir.path(), &music_model().await, "");
    let _server = serve(&config, api).await;
    let seen = browser(&["talk", &format!("http://127.0.0.1:{api}/")]).await;
    eprintln!("page: {seen}");
    let heard = seen["heard"][0].as_str().unwrap().to_lowercase();
    assert!(heard.contains("horizon"), "{seen}");
    let tool = seen["tools"][0].as_str().unwrap();
    assert!(
        tool.starts_with("musicPlayer(") && tool.contains("[music, ok]"),
        "{seen}"
    );
    // The track's title is shown as it starts (the firmware's `sentence_start`).
    assert!(
        seen["reply"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("Horizon")),
        "{seen}"
    );
    let before = &seen["before_stop"];
    assert!(before["framesDecoded"].as_u64().unwrap() >= 34, "{seen}");
    assert!(before["framesOut"].as_u64().unwrap() > 0, "{seen}");
    // Stop: no frame arrives more than 200 ms after the click.
    let gap = seen["last_frame_after_stop_ms"].as_f64().unwrap();
    assert!(gap <= 200.0, "a frame arrived {gap} ms after Stop: {seen}");
    assert_eq!(seen["after_stop"]["state"], "idle", "{seen}");
    assert!(
        seen["status"].as_str().unwrap().contains("MCP music"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_wrong_token_gets_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let key = "voxloop-browser-test-key";
    let sha = sha256(key.as_bytes());
    let extra =
        format!("\n[[auth.api_keys]]\nname = \"tester\"\nrole = \"user\"\nsha256 = \"{sha}\"\n");
    let (config, api) = config_file(dir.path(), &music_model().await, &extra);
    let _server = serve(&config, api).await;
    let seen = browser(&["wrong-token", &format!("http://127.0.0.1:{api}/")]).await;
    let message = seen["message"].as_str().unwrap();
    assert!(message.contains("not accepted (401)"), "{seen}");
    assert_eq!(seen["signin_shown"], true, "{seen}");
}

#[tokio::test]
async fn the_page_reconnects_after_the_server_restarts_mid_talk() {
    let dir = tempfile::tempdir().unwrap();
    let (config, api) = config_file(dir.path(), &music_model().await, "");
    let server = serve(&config, api).await;
    let marker = dir.path().join("listening");
    let url = format!("http://127.0.0.1:{api}/");
    let args = ["reconnect", url.as_str(), marker.to_str().unwrap()];
    let page = browser(&args);
    let restart = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(server);
        // The old process must have let go of its ports before the new one binds them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        serve(&config, api).await
    };
    let (seen, _restarted) = tokio::join!(page, restart);
    let states: Vec<&str> = seen["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let reconnecting = states.iter().position(|s| *s == "reconnecting").unwrap();
    assert_eq!(states.last(), Some(&"listening"), "{seen}");
    assert!(reconnecting < states.len() - 1, "{seen}");
}
