//! Clients nobody here wrote, against voxloop's servers (issue 21):
//! - the PyPI `xiaozhi-sdk` 0.5.1 as a smart speaker: its own OTA check (with the shared-token
//!   opt-in, and through an activation the test approves as the owner), its WebSocket connect
//!   with what OTA gave, a spoken request answered with audio, and its own device tool called
//!   over device-side MCP; the device server is bound to 0.0.0.0;
//! - the official Python MCP SDK (PyPI `mcp` 2.3.0) listing and calling tools on all three of
//!   voxloop's MCP servers (`mcp_audio`, `voxloop duplex mcp`, `voxloop serve`'s `/mcp`).
//!
//! The Python clients run from the virtual environment `scripts/clients-venv` makes
//! (`target/clients-venv`, or `$VOXLOOP_CLIENTS_PYTHON`); `scripts/test` makes it first.
//! Real whisper and the default voice (Kokoro); the LLM is a scripted OpenAI-compatible endpoint
//! on loopback.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use voxloop::config::Config;
use voxloop::conversation::assistant::{Assistant, Input};
use voxloop::device::activation::DeviceStore;
use voxloop::llm::config::LlmProvider;
use voxloop::tools::config::McpServerConfig;

use common::*;

/// The clients' Python interpreter.
pub(crate) fn python() -> PathBuf {
    let path = std::env::var_os("VOXLOOP_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/clients-venv/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/clients-venv (scripts/test does) to install xiaozhi-sdk and mcp",
        path.display()
    );
    path
}

pub(crate) fn client_script(name: &str) -> PathBuf {
    repo_root().join("tests/clients").join(name)
}

/// Runs a client script; its one JSON line of output.
pub(crate) async fn run_client(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut command = tokio::process::Command::new(python());
    command
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .expect("the client finished within 240 s")
        .expect("the client ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client {args:?} failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

/// An OpenAI-compatible endpoint that calls the device's lamp tool for a request about the
/// horizon, says "The lamp is on." after a tool result, and "Hello." to anything else.
async fn scripted_llm() -> String {
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: axum::Json<Value>| async move {
            let messages = body.0["messages"].as_array().cloned().unwrap_or_default();
            let last = messages.last().cloned().unwrap_or_default();
            let chunk = |delta: Value, finish: Value| {
                let chunk =
                    json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {chunk}\n\n")
            };
            let heard = last["content"].as_str().unwrap_or_default().to_lowercase();
            let mut out = String::new();
            if last["role"] == "user" && heard.contains("horizon") {
                let call = json!({"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "device_self_lamp_turn_on", "arguments": "{}"}});
                out.push_str(&chunk(json!({"tool_calls": [call]}), Value::Null));
                out.push_str(&chunk(json!({}), json!("tool_calls")));
            } else {
                let text = if last["role"] == "tool" {
                    "The lamp is on."
                } else {
                    "Hello."
                };
                out.push_str(&chunk(json!({"content": text}), Value::Null));
                out.push_str(&chunk(json!({}), json!("stop")));
            }
            out.push_str("data: [DONE]\n\n");
            (
                [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                out,
            )
        }),
    );
    format!("{}/v1", serve_loopback(router).await)
}

/// The device server bound to 0.0.0.0 with whisper, the default voice, the scripted LLM and its own
/// device store; `tweak` adjusts the config. Its port.
async fn device_server(store: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> u16 {
    let mut config = Config::default();
    config.auth.tokens = vec!["shared-device-token".into()];
    config.device.store = Some(store.to_path_buf());
    config.llm.provider = LlmProvider::Openai;
    config.llm.url = scripted_llm().await;
    config.llm.model = "scripted".into();
    config.llm.builtin_intents = false;
    config.asr.language = "en".into();
    tweak(&mut config);
    // The default voice is loaded before the first session, as `voxloop serve` does.
    let assistant = Assistant::start(&config, Input::Speech).await.unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve =
        voxloop::device::server::serve(listener, &config, Some(assistant), std::future::pending());
    tokio::spawn(async move { serve.await.unwrap() });
    port
}

/// `voxloop serve`'s HTTP API over `config`'s MCP servers; the URL of its `/mcp`.
async fn serve_mcp(config: &Config) -> String {
    let hub = Arc::new(voxloop::tools::hub::ToolHub::start(config.hub()).await);
    format!("{}/mcp", serve_api(config, hub, None).await)
}

/// The config of `voxloop serve` with the bundled music server behind the tool hub.
fn with_music(mut config: Config) -> Config {
    config.mcp_servers.insert(
        "music".into(),
        McpServerConfig {
            command: Some(music_server_bin().display().to_string()),
            cwd: Some(repo_root()),
            ..McpServerConfig::default()
        },
    );
    config
}

/// What the SDK's run must show: the request heard, the lamp tool called once over
/// device-side MCP, the reply spoken as audio, `capabilities.vision` received.
fn check_conversation(seen: &Value) {
    let messages = seen["messages"].as_array().unwrap();
    let heard: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "stt")
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(
        heard.iter().any(|h| h.to_lowercase().contains("horizon")),
        "{seen}"
    );
    assert_eq!(seen["tool_calls"], json!([{}]), "{seen}");
    assert!(
        messages
            .iter()
            .any(|m| m["type"] == "tts" && m["text"] == "The lamp is on."),
        "{seen}"
    );
    assert!(messages.iter().any(|m| m["type"] == "llm"), "{seen}");
    // "The lamp is on." as audio the SDK decoded: over half a second, and not silence.
    assert!(seen["reply_ms"].as_u64().unwrap() >= 600, "{seen}");
    assert!(seen["reply_peak"].as_u64().unwrap() > 1000, "{seen}");
    assert!(
        seen["vision_url"]
            .as_str()
            .unwrap()
            .ends_with("/xiaozhi/vision/explain"),
        "{seen}"
    );
    assert_eq!(seen["vision_token_given"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn xiaozhi_sdk_with_the_shared_token_opt_in_talks_and_its_tool_is_called() {
    let dir = tempfile::tempdir().unwrap();
    let port = device_server(&dir.path().join("devices.json"), |c| {
        c.device.ota_shared_token = true;
    })
    .await;
    let ota = format!("http://127.0.0.1:{port}/xiaozhi/ota/");
    let wav = repo_root().join("assets/speech/cmd_play_horizon.wav");
    let seen = run_client(
        &[
            client_script("xiaozhi_device.py").to_str().unwrap(),
            &ota,
            "02:00:00:00:00:01",
            wav.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(seen["activated_by_owner"], false, "{seen}");
    check_conversation(&seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn xiaozhi_sdk_is_activated_by_the_owner_then_talks() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("devices.json");
    let port = device_server(&store_path, |_| {}).await;
    let ota = format!("http://127.0.0.1:{port}/xiaozhi/ota/");
    let wav = repo_root().join("assets/speech/cmd_play_horizon.wav");
    let mac = "02:00:00:00:00:02";
    // The owner: waits for the device's code to appear, gives the pending session time to speak
    // it, and approves it, as `voxloop devices approve CODE` does (the SDK polls for 30 s).
    let owner = tokio::spawn(async move {
        let store = DeviceStore::new(&store_path, 600, 16);
        for _ in 0..600 {
            let pending = store.snapshot().unwrap().pending;
            if let Some(p) = pending.iter().find(|p| p.device_id == mac) {
                tokio::time::sleep(Duration::from_secs(8)).await;
                return store.approve(&p.code).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no activation appeared for {mac}");
    });
    let seen = run_client(
        &[
            client_script("xiaozhi_device.py").to_str().unwrap(),
            &ota,
            mac,
            wav.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(owner.await.unwrap(), mac);
    assert_eq!(seen["activated_by_owner"], true, "{seen}");
    // While pending, the session spoke the activation code.
    assert!(
        seen["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "tts"
                && m["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("not activated"))),
        "{seen}"
    );
    check_conversation(&seen);
}

/// The official Python MCP SDK against `mcp_audio` over stdio.
#[tokio::test]
async fn python_mcp_sdk_uses_the_music_server() {
    let seen = run_client(
        &[
            client_script("mcp_sdk_client.py").to_str().unwrap(),
            "stdio",
            music_server_bin().to_str().unwrap(),
        ],
        &[
            ("MCP_CALL_TOOL", "musicPlayer"),
            ("MCP_CALL_ARGS", r#"{"query": "horizon"}"#),
        ],
    )
    .await;
    assert_eq!(
        seen["tools"],
        json!(["musicPlayer", "set_volume"]),
        "{seen}"
    );
    assert_eq!(seen["schema_types"], json!(["object"]));
    assert_eq!(seen["set_level"], true);
    assert_eq!(seen["call"]["content_types"], json!(["resource_link"]));
    assert!(seen["first_page_base64_chars"].as_u64().unwrap() > 1000);
}

/// The official Python MCP SDK against `voxloop duplex mcp` over stdio (a tiny random-weights
/// model): every schema an object, a parameterless tool called.
#[tokio::test]
async fn python_mcp_sdk_uses_the_duplex_server() {
    let model = tiny_duplex_model();
    let dir = tempfile::tempdir().unwrap();
    let file = duplex_config_file(dir.path(), model.path(), Config::default());
    let seen = run_client(
        &[
            client_script("mcp_sdk_client.py").to_str().unwrap(),
            "stdio",
            env!("CARGO_BIN_EXE_voxloop"),
            "--config",
            file.to_str().unwrap(),
            "duplex",
            "mcp",
        ],
        &[("MCP_CALL_TOOL", "list_voices")],
    )
    .await;
    assert!(
        seen["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("health_check")),
        "{seen}"
    );
    assert_eq!(seen["schema_types"], json!(["object"]), "{seen}");
    assert_eq!(seen["set_level"], true);
    assert_eq!(seen["call"]["is_error"], false, "{seen}");
    assert_eq!(seen["call"]["structured"]["status"], "success", "{seen}");
}

/// The official Python MCP SDK against `voxloop serve`'s `/mcp` (streamable HTTP, an API key),
/// with the music server behind the tool hub.
#[tokio::test]
async fn python_mcp_sdk_uses_the_serve_endpoint() {
    let mut config = with_music(Config::default());
    const KEY: &str = "vxk_python_sdk_test_key";
    config.auth.api_keys = vec![voxloop::api::config::ApiKeyConfig {
        name: "python".into(),
        role: voxloop::api::config::Role::User,
        sha256: voxloop::api::auth::hash_key(KEY),
    }];
    let url = serve_mcp(&config).await;
    let seen = run_client(
        &[
            client_script("mcp_sdk_client.py").to_str().unwrap(),
            "http",
            &url,
            "--bearer",
            KEY,
        ],
        &[("MCP_CALL_TOOL", "get_current_time")],
    )
    .await;
    let tools = seen["tools"].as_array().unwrap();
    assert!(tools.contains(&json!("musicPlayer")), "{seen}");
    assert!(tools.contains(&json!("get_current_time")), "{seen}");
    assert_eq!(seen["schema_types"], json!(["object"]), "{seen}");
    assert_eq!(seen["set_level"], true);
    assert!(
        seen["call"]["text"].as_str().unwrap().starts_with("It is "),
        "{seen}"
    );
}

/// An npm client's executable from `scripts/clients-npm`.
fn npm_bin(name: &str) -> PathBuf {
    let path = repo_root()
        .join("target/clients-npm/node_modules/.bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/clients-npm (scripts/test does)",
        path.display()
    );
    path
}

/// Runs an npm client with a throwaway HOME; (exit code, stdout, stderr).
async fn run_npm(name: &str, args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(npm_bin(name))
            .args(args)
            .env("HOME", home.path())
            .current_dir(repo_root())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client finished within 120 s")
    .expect("the client ran");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn mcp_inspector_cli_reads_a_music_page_and_finds_portable_schemas() {
    let track = "library://local/tumiki_just_over_the_horizon.mp3";
    let uri = format!("{}?start=0&end=64", track_uri(track));
    let music = music_server_bin();
    let music = music.to_str().unwrap();
    let (code, stdout, stderr) = run_npm(
        "inspector",
        &["--cli", "--method", "resources/read", "--uri", &uri, music],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let page: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let blob = page["contents"][0]["blob"].as_str().unwrap();
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, blob).unwrap();
    let file = std::fs::read(music_file("tumiki_just_over_the_horizon.mp3")).unwrap();
    assert_eq!(bytes, file[..64]);
    // `--strict` exits 6 on a tool schema that is not portable.
    let (code, stdout, stderr) = run_npm(
        "inspector",
        &["--cli", "--method", "tools/list", "--strict", music],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

/// The MCP conformance suite's server scenarios that apply to voxloop's servers (the others
/// need the suite's own fixture tools and resources, such as `test_simple_text` or
/// `test://static-binary`), on all three.
#[tokio::test(flavor = "multi_thread")]
async fn mcp_conformance_server_scenarios_pass_on_all_three_servers() {
    let common = [
        "server-initialize",
        "ping",
        "logging-set-level",
        "tools-list",
        "server-sse-polling",
    ];
    // The music server over streamable HTTP.
    let (_music, music_url) = spawn_http_server(&[]).await;
    // `voxloop duplex mcp` over streamable HTTP, on a tiny random-weights model.
    let model = tiny_duplex_model();
    let dir = tempfile::tempdir().unwrap();
    let file = duplex_config_file(dir.path(), model.path(), Config::default());
    let mut duplex = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"));
    duplex
        .arg("--config")
        .arg(&file)
        .args(["duplex", "mcp", "--bind", "127.0.0.1:0"]);
    let (_duplex, duplex_url) = mcp_endpoint_of(duplex).await;
    // `voxloop serve`'s `/mcp` (loopback, no credentials configured: open to local callers).
    let config = with_music(Config::default());
    let serve_url = serve_mcp(&config).await;

    let mut failures = Vec::new();
    for (server, url, extra) in [
        ("mcp_audio", &music_url, &["resources-list"][..]),
        ("voxloop duplex mcp", &duplex_url, &[][..]),
        ("voxloop serve /mcp", &serve_url, &[][..]),
    ] {
        for scenario in common.iter().chain(extra) {
            let (code, stdout, stderr) = run_npm(
                "conformance",
                &["server", "--url", url, "--scenario", scenario],
            )
            .await;
            if code != 0 {
                failures.push(format!("{server} {scenario}:\n{stdout}\n{stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
