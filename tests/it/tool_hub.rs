//! The tool hub against real MCP servers: the music server and the test fixture server
//! (tests/fixtures/mcp_fixture.rs), as child processes over stdio and over streamable HTTP.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use voxloop::config::Config;
use voxloop::media::MediaStream;
use voxloop::tools::config::{McpServerConfig, ToolsConfig};
use voxloop::tools::hub::{ToolCall, ToolHub};
use voxloop::tools::outcome::{Action, ToolOutcome};
use voxloop::tools::terminal::{Decision, StopReason, decide};

const HORIZON: &str = "tumiki_just_over_the_horizon.mp3";
const HOME_FLAC: &str = "tumiki_return_to_home.flac";

fn fixture(args: &[&str]) -> McpServerConfig {
    McpServerConfig {
        command: Some(fixture_bin().display().to_string()),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..McpServerConfig::default()
    }
}

fn music() -> McpServerConfig {
    McpServerConfig {
        command: Some(music_server_bin().display().to_string()),
        cwd: Some(repo_root()),
        ..McpServerConfig::default()
    }
}

/// The hub over `config`'s servers and sections.
async fn start_hub(config: Config) -> ToolHub {
    ToolHub::start(config.hub()).await
}

/// A config with these servers and fast limits for tests.
fn config(servers: Vec<(&str, McpServerConfig)>, tweak: impl FnOnce(&mut ToolsConfig)) -> Config {
    let mut config = Config {
        mcp_servers: servers
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect(),
        ..Config::default()
    };
    config.tools.restart_backoff_ms = 1;
    config.tools.page_retry_backoff_ms = 10;
    tweak(&mut config.tools);
    config.validate().unwrap();
    config
}

async fn call(hub: &ToolHub, name: &str, arguments: Value) -> ToolOutcome {
    hub.call(
        &ToolCall {
            name: name.into(),
            arguments,
        },
        &CancellationToken::new(),
    )
    .await
}

/// All of a media item's bytes, and the error that ended it, if any.
async fn drain(media: &mut MediaStream) -> (Vec<u8>, Option<String>) {
    let mut bytes = Vec::new();
    while let Some(chunk) = media.next_chunk().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(e) => return (bytes, Some(e.to_string())),
        }
    }
    (bytes, None)
}

fn file(name: &str) -> Vec<u8> {
    std::fs::read(music_file(name)).unwrap()
}

#[tokio::test]
async fn lists_tools_of_every_server_and_skips_what_is_broken() {
    let dead = McpServerConfig {
        command: Some("/nonexistent/mcp-server".into()),
        ..McpServerConfig::default()
    };
    let config = config(
        vec![
            ("music", music()),
            ("fixture", fixture(&[])),
            ("dead", dead),
        ],
        |_| {},
    );
    let hub = ToolHub::start(config.hub()).await;
    let failures = hub.startup_failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].server, "dead");
    assert!(
        failures[0].error.contains("/nonexistent/mcp-server"),
        "{}",
        failures[0].error
    );

    let names: Vec<&str> = hub.tools().iter().map(|t| t.name.as_str()).collect();
    for expected in [
        "exit_conversation",
        "stop_playback",
        "set_volume",
        "get_current_time",
        "musicPlayer",
        "text",
        "embedded_blob",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // The built-in keeps `set_volume`; the two servers' tools of that name are prefixed.
    assert!(
        names.contains(&"music_set_volume") && names.contains(&"fixture_set_volume"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("broken_schema")),
        "{names:?}"
    );
    let functions = hub.function_tools();
    let player = functions
        .iter()
        .find(|f| f["function"]["name"] == "musicPlayer")
        .unwrap();
    assert_eq!(player["type"], "function");
    assert_eq!(player["function"]["parameters"]["type"], "object");

    // The fixture's set_volume runs on the fixture under its prefixed name.
    let outcome = call(&hub, "fixture_set_volume", json!({"volume": 3})).await;
    assert_eq!(outcome.text, ["fixture volume"]);
}

#[tokio::test]
async fn tool_listing_follows_cursors_within_bounds() {
    let count = |hub: &ToolHub| hub.tools().iter().filter(|t| t.server == "f").count();
    let paged = start_hub(config(
        vec![("f", fixture(&["--tools-page-size", "3"]))],
        |_| {},
    ))
    .await;
    assert_eq!(count(&paged), 17, "every valid tool, over six pages");
    let looping = start_hub(config(
        vec![("f", fixture(&["--tools-page-size", "3", "--cursor-loop"]))],
        |_| {},
    ))
    .await;
    assert_eq!(
        count(&looping),
        6,
        "a repeated cursor stops the listing after it repeats"
    );
    let capped = start_hub(config(
        vec![("f", fixture(&["--tools-page-size", "3"]))],
        |t| t.list_max_pages = 2,
    ))
    .await;
    assert_eq!(count(&capped), 6, "list_max_pages caps the pages read");
}

#[tokio::test]
async fn every_content_type_is_routed() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;

    let outcome = call(&hub, "text", json!({})).await;
    assert_eq!(outcome.text, ["plain text result"]);
    assert!(outcome.media.is_empty() && !outcome.is_error);

    let outcome = call(&hub, "image", json!({})).await;
    assert_eq!(
        outcome.text,
        ["[The tool returned an image: image/png, 4 bytes.]"]
    );

    let mut outcome = call(&hub, "audio_inline", json!({"file": HOME_FLAC})).await;
    assert_eq!(outcome.media.len(), 1);
    assert_eq!(outcome.media[0].mime_type, "audio/flac");
    let (bytes, error) = drain(&mut outcome.media[0]).await;
    assert_eq!((sha256(&bytes), error), (sha256(&file(HOME_FLAC)), None));

    let outcome = call(&hub, "audio_bad_base64", json!({})).await;
    assert!(outcome.media.is_empty());
    assert_eq!(outcome.blocks[0].route, "error");
    assert!(
        outcome.text[0].contains("not valid base64"),
        "{:?}",
        outcome.text
    );

    let uri = format!("fixture://file/{HORIZON}");
    let mut outcome = call(
        &hub,
        "link",
        json!({"uri": uri, "mime": "audio/mpeg", "size": 709762}),
    )
    .await;
    assert_eq!(outcome.text, ["here it is"]);
    assert_eq!(outcome.media[0].title.as_deref(), Some("fixture track"));
    assert_eq!(outcome.media[0].size, Some(709762));
    let (bytes, error) = drain(&mut outcome.media[0]).await;
    assert_eq!((sha256(&bytes), error), (sha256(&file(HORIZON)), None));
    assert!(
        outcome
            .tool_message()
            .contains("[Playing \"fixture track\" (audio/mpeg, 709762 bytes).]")
    );
    let decision = decide(&[outcome.facts()], 1, 5, false);
    assert_eq!(decision, Decision::Stop(StopReason::Media));

    // A link that is not audio is text for the LLM.
    let outcome = call(
        &hub,
        "link",
        json!({"uri": "fixture://doc", "mime": "text/html"}),
    )
    .await;
    assert!(outcome.media.is_empty());
    assert!(
        outcome.text[1].contains("fixture://doc"),
        "{:?}",
        outcome.text
    );

    let mut outcome = call(&hub, "embedded_audio", json!({"file": HOME_FLAC})).await;
    let (bytes, _) = drain(&mut outcome.media[0]).await;
    assert_eq!(sha256(&bytes), sha256(&file(HOME_FLAC)));

    let outcome = call(&hub, "embedded_blob", json!({})).await;
    assert!(outcome.media.is_empty());
    assert_eq!(
        outcome.text,
        ["[The tool returned a file: fixture://doc.pdf, application/pdf, 13 bytes.]"]
    );

    let outcome = call(&hub, "embedded_text", json!({})).await;
    assert_eq!(outcome.text, ["embedded notes"]);

    let outcome = call(&hub, "fail", json!({})).await;
    assert!(outcome.is_error);
    assert_eq!(outcome.text, ["the fixture failed on purpose"]);
}

#[tokio::test]
async fn structured_responses_set_actions_and_flags() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;
    let value =
        json!({"type": "action", "action": "set_volume", "volume": 30, "final_action": true});
    let outcome = call(&hub, "structured", json!({"value": value})).await;
    assert_eq!(outcome.action, Some(Action::SetVolume { volume: 30 }));
    assert!(outcome.flags.final_action);
    assert_eq!(
        decide(&[outcome.facts()], 1, 5, false),
        Decision::Stop(StopReason::Flagged)
    );

    let value = json!({"type": "action", "action": "exit_conversation"});
    let outcome = call(&hub, "lone_json", json!({"value": value})).await;
    assert_eq!(outcome.action, Some(Action::ExitConversation));
    assert_eq!(
        decide(&[outcome.facts()], 1, 5, false),
        Decision::Stop(StopReason::ExitConversation)
    );

    let value = json!({"type": "content", "text": "twelve degrees", "no_further_response": true});
    let outcome = call(&hub, "lone_json", json!({"value": value})).await;
    assert_eq!(outcome.text, ["twelve degrees"]);
    assert!(outcome.flags.no_further_response);

    let value = json!({"type": "error", "message": "device offline"});
    let outcome = call(&hub, "structured", json!({"value": value})).await;
    assert!(outcome.is_error);
    assert_eq!(outcome.text, ["Error: device offline"]);

    let value = json!({"type": "audio", "uri": format!("fixture://file/{HOME_FLAC}"), "mime_type": "audio/flac", "title": "Home"});
    let mut outcome = call(&hub, "structured", json!({"value": value})).await;
    assert_eq!(outcome.media[0].title.as_deref(), Some("Home"));
    let (bytes, _) = drain(&mut outcome.media[0]).await;
    assert_eq!(sha256(&bytes), sha256(&file(HOME_FLAC)));

    let value = json!({"type": "action", "action": "set_volume", "volume": 300});
    let outcome = call(&hub, "structured", json!({"value": value})).await;
    assert!(outcome.is_error && outcome.action.is_none());
    assert!(
        outcome.text[0].contains("from 0 to 100"),
        "{:?}",
        outcome.text
    );

    // Not one of the four types: a plain result, routed block by block.
    let outcome = call(
        &hub,
        "structured",
        json!({"value": {"type": "weather", "temp": 12}}),
    )
    .await;
    assert_eq!(outcome.text, ["see structured content"]);
    assert_eq!(outcome.action, None);
}

async fn stream_of(hub: &ToolHub, uri: &str) -> (Vec<u8>, Option<String>) {
    let mut outcome = call(hub, "link", json!({"uri": uri})).await;
    assert_eq!(outcome.media.len(), 1, "{:?}", outcome.text);
    drain(&mut outcome.media[0]).await
}

#[tokio::test]
async fn paged_resources_survive_bad_servers() {
    let state = tempfile::tempdir().unwrap();
    let args = ["--state-dir", state.path().to_str().unwrap()];
    let hub = start_hub(config(vec![("fixture", fixture(&args))], |t| {
        t.page_bytes = 64 * 1024;
        t.page_timeout_ms = 500;
        t.page_retries = 1;
        t.max_media_bytes = 300_000;
    }))
    .await;
    let horizon = file(HORIZON);
    let whole = |path: &str| format!("fixture://{path}/{HORIZON}");

    // Ends that are not [DONE], short pages, a page that fails once: the whole file.
    for kind in ["empty_contents", "empty_blob", "short", "flaky"] {
        let hub_small = start_hub(config(vec![("fixture", fixture(&[]))], |t| {
            t.page_bytes = 64 * 1024;
            t.page_retry_backoff_ms = 1;
        }))
        .await;
        let (bytes, error) = stream_of(&hub_small, &whole(kind)).await;
        assert_eq!(error, None, "{kind}");
        assert_eq!(sha256(&bytes), sha256(&horizon), "{kind}");
    }

    // Never [DONE]: stops at the byte cap, with an error.
    let (bytes, error) = stream_of(&hub, "fixture://never_done").await;
    assert!(
        bytes.len() <= 300_000 && bytes.len() >= 200_000,
        "{} bytes",
        bytes.len()
    );
    assert!(error.unwrap().contains("did not end within 300000 bytes"));

    // An error on page 2: pages 0 and 1 stay streamed, then the error.
    let (bytes, error) = stream_of(&hub, &format!("fixture://fail_at/2/{HORIZON}")).await;
    assert_eq!(bytes, horizon[..2 * 65536]);
    assert!(error.unwrap().contains("broken on purpose"));

    // A page that never comes: timeout (and one retry), after page 0.
    let (bytes, error) = stream_of(&hub, &format!("fixture://hang_at/1/{HORIZON}")).await;
    assert_eq!(bytes, horizon[..65536]);
    assert!(error.unwrap().contains("timed out after 500 ms"));

    // Pages that are not blob pages of the size asked.
    for (uri, needle) in [
        (
            format!("fixture://oversize/{HORIZON}"),
            "bytes for a 65536-byte range",
        ),
        ("fixture://text".to_string(), "text contents"),
        ("fixture://bad_base64".to_string(), "invalid base64"),
        ("fixture://nowhere".to_string(), "no resource"),
    ] {
        let (bytes, error) = stream_of(&hub, &uri).await;
        assert!(bytes.is_empty(), "{uri}");
        let error = error.unwrap_or_default();
        assert!(error.contains(needle), "{uri}: {error}");
    }

    // The server exits mid-stream: reconnected once, the stream goes on from where it was.
    let hub = start_hub(config(vec![("fixture", fixture(&args))], |t| {
        t.page_bytes = 64 * 1024
    }))
    .await;
    let (bytes, error) = stream_of(&hub, &format!("fixture://exit_once/3/{HORIZON}")).await;
    assert_eq!(error, None);
    assert_eq!(sha256(&bytes), sha256(&horizon));
    assert!(state.path().join("exited").exists(), "the fixture did exit");
}

#[tokio::test]
async fn cancelling_a_stream_stops_its_pager() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |t| {
        t.page_bytes = 16 * 1024
    }))
    .await;
    let mut outcome = call(&hub, "link", json!({"uri": "fixture://never_done"})).await;
    let media = &mut outcome.media[0];
    for _ in 0..3 {
        media.next_chunk().await.unwrap().unwrap();
    }
    media.cancel();
    // Without the cancel this resource would stream until the 512 MiB cap.
    let (bytes, error) = drain(media).await;
    assert_eq!(error, None);
    assert!(
        bytes.len() <= 16 * 1024,
        "{} bytes after cancel",
        bytes.len()
    );
}

#[tokio::test]
async fn the_music_server_streams_over_stdio_and_http() {
    let (_server, url) = spawn_http_server(&[]).await;
    let http = McpServerConfig {
        url: Some(url),
        ..McpServerConfig::default()
    };
    let hub = start_hub(config(vec![("music", music()), ("radio", http)], |_| {})).await;
    assert!(hub.startup_failures().is_empty());
    for tool in ["musicPlayer", "radio_musicPlayer"] {
        // Both servers have musicPlayer: the names clash, so both are prefixed.
        let name = if tool == "musicPlayer" {
            "music_musicPlayer"
        } else {
            tool
        };
        let mut outcome = call(&hub, name, json!({"query": "horizon"})).await;
        assert_eq!(outcome.media.len(), 1, "{name}: {:?}", outcome.text);
        let (bytes, error) = drain(&mut outcome.media[0]).await;
        assert_eq!(
            (sha256(&bytes), error),
            (sha256(&file(HORIZON)), None),
            "{name}"
        );
    }
}

#[tokio::test]
async fn timeouts_and_cancellation_reach_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |t| {
        t.call_timeout_ms = 300
    }))
    .await;

    let marker = dir.path().join("timeout");
    let outcome = call(&hub, "sleep", json!({"ms": 20_000, "marker": marker})).await;
    assert!(outcome.is_error);
    assert!(
        outcome.text[0].contains("took longer than 300 ms"),
        "{:?}",
        outcome.text
    );
    wait_for_file(&marker).await;

    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;
    let marker = dir.path().join("cancel");
    let cancel = CancellationToken::new();
    let sleeper = ToolCall {
        name: "sleep".into(),
        arguments: json!({"ms": 20_000, "marker": marker}),
    };
    let (outcome, ()) = tokio::join!(hub.call(&sleeper, &cancel), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    assert!(outcome.is_error);
    assert!(
        outcome.text[0].contains("was cancelled"),
        "{:?}",
        outcome.text
    );
    wait_for_file(&marker).await;
}

#[tokio::test]
async fn an_answer_over_the_message_limit_is_named_as_such_and_the_server_goes_on() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |t| {
        t.call_timeout_ms = 1_000;
        t.max_message_bytes = 65_536;
    }))
    .await;
    let outcome = call(&hub, "huge", json!({"bytes": 200_000})).await;
    assert!(outcome.is_error);
    assert!(
        outcome.text[0].contains("over the 65536-byte limit ([tools] max_message_bytes)"),
        "{:?}",
        outcome.text
    );
    let outcome = call(&hub, "huge", json!({"bytes": 1_000})).await;
    assert!(!outcome.is_error, "{:?}", outcome.text);
    assert_eq!(outcome.text[0].len(), 1_000);
}

/// The fixture writes its marker once it sees `notifications/cancelled`.
async fn wait_for_file(path: &std::path::Path) {
    for _ in 0..100 {
        if std::fs::read_to_string(path).is_ok_and(|s| s == "cancelled") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the server never saw notifications/cancelled ({})",
        path.display()
    );
}

#[tokio::test]
async fn a_round_runs_concurrently_and_keeps_call_order() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;
    let calls: Vec<ToolCall> = (0..3)
        .map(|_| ToolCall {
            name: "rendezvous".into(),
            arguments: json!({"n": 3}),
        })
        .chain([ToolCall {
            name: "text".into(),
            arguments: json!({}),
        }])
        .collect();
    let outcomes = hub.call_round(&calls, &CancellationToken::new()).await;
    let texts: Vec<&str> = outcomes.iter().map(|o| o.text[0].as_str()).collect();
    // `rendezvous` returns "all met" only when all three were in the server at once.
    assert_eq!(
        texts,
        ["all met", "all met", "all met", "plain text result"]
    );
}

#[tokio::test]
async fn a_dead_server_restarts_on_next_use() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;
    let outcome = call(&hub, "crash", json!({})).await;
    assert!(outcome.is_error);
    assert!(outcome.text[0].contains("fixture"), "{:?}", outcome.text);
    let outcome = call(&hub, "text", json!({})).await;
    assert_eq!(outcome.text, ["plain text result"], "restarted");
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_are_errors_for_the_llm() {
    let hub = start_hub(config(vec![("fixture", fixture(&[]))], |_| {})).await;
    let outcome = call(&hub, "no_such_tool", json!({})).await;
    assert!(outcome.is_error);
    assert!(
        outcome.text[0].contains("there is no tool \"no_such_tool\""),
        "{:?}",
        outcome.text
    );
    assert!(outcome.text[0].contains("get_current_time"));
    let outcome = call(&hub, "text", json!([1, 2])).await;
    assert!(outcome.is_error && outcome.text[0].contains("must be a JSON object"));
    let outcome = call(&hub, "set_volume", json!({"volume": 40})).await;
    assert_eq!(outcome.action, Some(Action::SetVolume { volume: 40 }));
    assert_eq!(outcome.server, "voxloop");
}

#[tokio::test]
async fn http_servers_get_headers_and_a_bearer_token() {
    let mut cmd = tokio::process::Command::new(fixture_bin());
    cmd.args(["--transport", "http"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = lines.next_line().await.unwrap().unwrap();
    let url = line.strip_prefix("MCP endpoint: ").unwrap().to_string();

    // SAFETY: only this test reads this variable, and it is set before any thread reads it.
    unsafe { std::env::set_var("VOXLOOP_TEST_FIXTURE_TOKEN", "s3cret") };
    let server = McpServerConfig {
        url: Some(url.clone()),
        headers: [("x-fixture".to_string(), "yes".to_string())].into(),
        bearer_token_env: Some("VOXLOOP_TEST_FIXTURE_TOKEN".into()),
        ..McpServerConfig::default()
    };
    let hub = start_hub(config(vec![("remote", server)], |_| {})).await;
    let outcome = call(&hub, "whoami", json!({})).await;
    assert_eq!(outcome.text, ["authorization=Bearer s3cret x-fixture=yes"]);

    let missing = McpServerConfig {
        url: Some(url),
        bearer_token_env: Some("VOXLOOP_TEST_UNSET_TOKEN".into()),
        ..McpServerConfig::default()
    };
    let hub = start_hub(config(vec![("remote", missing)], |_| {})).await;
    assert!(
        hub.startup_failures()[0]
            .error
            .contains("VOXLOOP_TEST_UNSET_TOKEN")
    );
}

// ---- the command line ----

fn voxloop(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args(args)
        .current_dir(repo_root())
        .env_remove("VOXLOOP_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn cli_lists_and_calls_tools_of_the_bundled_music_server() {
    let out = voxloop(&["tools", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("music") && l.contains("musicPlayer")),
        "{list}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = voxloop(&[
        "tools",
        "call",
        "music",
        "musicPlayer",
        r#"{"query": "horizon"}"#,
        "--save-media",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let media = &report["media"][0];
    assert_eq!(media["sha256"], sha256(&file(HORIZON)));
    assert_eq!(media["bytes"], 709762);
    assert_eq!(media["sniffed"], "audio/mpeg");
    assert_eq!(
        report["decision"],
        json!({"decision": "stop", "reason": "media"})
    );
    let saved = std::fs::read(media["saved"].as_str().unwrap()).unwrap();
    assert_eq!(sha256(&saved), sha256(&file(HORIZON)));

    let out = voxloop(&["tools", "call", "music", "set_volume", r#"{"volume": 500}"#]);
    assert!(!out.status.success(), "a tool error exits 1");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["is_error"], true);
}

#[test]
fn cli_reads_claude_style_server_files_and_reports_lying_mime_types() {
    let dir = tempfile::tempdir().unwrap();
    let json_file = dir.path().join("mcp.json");
    let servers = json!({"mcpServers": {"fx": {"command": fixture_bin(), "args": []}}});
    std::fs::write(&json_file, servers.to_string()).unwrap();
    let json_path = json_file.to_str().unwrap();

    let out = voxloop(&["--mcp-config", json_path, "tools", "list"]);
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("fx") && l.contains("embedded_blob")),
        "{list}"
    );
    assert!(
        !list.contains("musicPlayer"),
        "configured servers replace the default"
    );

    let args =
        json!({"uri": format!("fixture://file/{HORIZON}"), "mime": "audio/flac"}).to_string();
    let out = voxloop(&[
        "--mcp-config",
        json_path,
        "tools",
        "call",
        "fx",
        "link",
        &args,
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["media"][0]["mime_type"], "audio/flac");
    assert_eq!(report["media"][0]["sniffed"], "audio/mpeg");
    assert_eq!(report["media"][0]["mime_matches"], false);

    std::fs::write(
        &json_file,
        r#"{"mcpServers": {"old": {"type": "sse", "url": "http://127.0.0.1:1/sse"}}}"#,
    )
    .unwrap();
    let out = voxloop(&["--mcp-config", json_path, "tools", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"sse\" is not supported"));
}
