//! The turn loop against a scripted OpenAI-compatible endpoint on loopback (real HTTP and SSE,
//! tool calls streamed in pieces), the real music server over stdio, espeak-ng, and a WAV sink
//! whose PCM is checked.

use crate::common;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use common::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use voxloop::audio::queue::{
    PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason as QueueStop,
};
use voxloop::audio::sink::{NullSink, Sink, WavSink};
use voxloop::config::Config;
use voxloop::conversation::{Conversation, ConversationSettings, Handler, TurnEnd};
use voxloop::llm::ChatModel;
use voxloop::llm::Role;
use voxloop::llm::config::LlmConfig;
use voxloop::llm::openai::OpenAiClient;
use voxloop::speech::tts::Tts;
use voxloop::speech::tts::TtsProvider;
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::ToolHub;
use voxloop::tools::terminal::StopReason;

/// One scripted reply: SSE chunks, each after a delay in ms.
type Script = Vec<(Value, u64)>;

fn text(t: &str) -> Script {
    vec![
        (
            json!({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}),
            0,
        ),
        (
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            0,
        ),
    ]
}

/// A tool call whose arguments arrive in three pieces.
fn tool(name: &str, arguments: Value) -> Script {
    let args = arguments.to_string();
    let third = args.len() / 3;
    let piece = |i: usize, id: Option<&str>, name: Option<&str>, a: &str| {
        let mut function = json!({"arguments": a});
        if let Some(name) = name {
            function["name"] = json!(name);
        }
        let mut call = json!({"index": 0, "type": "function", "function": function});
        if let Some(id) = id {
            call["id"] = json!(id);
        }
        let _ = i;
        (
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]}),
            0,
        )
    };
    vec![
        piece(0, Some("call_1"), Some(name), &args[..third]),
        piece(1, None, None, &args[third..2 * third]),
        piece(2, None, None, &args[2 * third..]),
        (
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            0,
        ),
    ]
}

/// The scripted endpoint: each request gets the next script (then "Okay."); requests are kept.
async fn scripted(scripts: Vec<Script>) -> (String, Arc<Mutex<Vec<Value>>>) {
    let queue = Arc::new(Mutex::new(VecDeque::from(scripts)));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<Value>| {
            let queue = queue.clone();
            let seen = seen.clone();
            async move {
                seen.lock().await.push(body.0);
                let script = queue
                    .lock()
                    .await
                    .pop_front()
                    .unwrap_or_else(|| text("Okay."));
                let stream =
                    futures_util::stream::unfold(script.into_iter(), |mut it| async move {
                        let (chunk, delay) = it.next()?;
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        Some((Ok::<_, std::io::Error>(format!("data: {chunk}\n\n")), it))
                    });
                let done = futures_util::stream::once(async { Ok("data: [DONE]\n\n".to_string()) });
                let body =
                    axum::body::Body::from_stream(futures_util::StreamExt::chain(stream, done));
                ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
            }
        }),
    );
    (format!("{}/v1", serve_loopback(router).await), requests)
}

struct Rig {
    conversation: Conversation,
    requests: Arc<Mutex<Vec<Value>>>,
    wav: PathBuf,
    _dir: tempfile::TempDir,
}

async fn rig(scripts: Vec<Script>, max_rounds: u32) -> Rig {
    let (url, requests) = scripted(scripts).await;
    rig_at(scripted_llm(url), requests, max_rounds).await
}

fn scripted_llm(url: String) -> LlmConfig {
    LlmConfig {
        url,
        model: "scripted".into(),
        retry_backoff_ms: 1,
        ..LlmConfig::default()
    }
}

async fn rig_at(llm: LlmConfig, requests: Arc<Mutex<Vec<Value>>>, max_rounds: u32) -> Rig {
    rig_on(llm, requests, max_rounds, false).await
}

/// With `paced`, the output is a null sink at real-time pace (music lasts as long as it
/// plays), else the WAV file.
async fn rig_on(
    llm: LlmConfig,
    requests: Arc<Mutex<Vec<Value>>>,
    max_rounds: u32,
    paced: bool,
) -> Rig {
    let mut config = Config {
        llm: llm.clone(),
        ..Config::default()
    };
    let music = McpServerConfig {
        command: Some(music_server_bin().display().to_string()),
        cwd: Some(repo_root()),
        ..McpServerConfig::default()
    };
    config.mcp_servers.insert("music".into(), music);
    config.tools.max_tool_rounds = max_rounds;
    // These tests are about the turn loop and its timing; espeak-ng speaks in milliseconds and
    // in parallel. The default voice (Kokoro) has its own tests (tests/kokoro.rs).
    config.tts.provider = TtsProvider::EspeakNg;
    let hub = Arc::new(ToolHub::start(config.hub()).await);
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("reply.wav");
    let sink = if paced {
        Sink::Null(NullSink::new(24_000, 1, true))
    } else {
        Sink::Wav(WavSink::create(&wav, 24_000, 1).unwrap())
    };
    let queue = PlaybackQueue::new(
        sink,
        QueueSettings {
            volume: 100,
            ..QueueSettings::default()
        },
    );
    let settings = ConversationSettings::new(&config.llm, &config.tools);
    let conversation = Conversation::new(
        ChatModel::OpenAi(Box::new(OpenAiClient::new(&llm))),
        hub,
        Tts::new(&config.tts),
        queue,
        settings,
    );
    Rig {
        conversation,
        requests,
        wav,
        _dir: dir,
    }
}

impl Rig {
    async fn turn(&mut self, text: &str) -> voxloop::conversation::TurnReport {
        self.conversation
            .turn(text, &CancellationToken::new())
            .await
    }

    /// Plays everything out and returns the WAV's samples.
    async fn output(self) -> Vec<f32> {
        let queue = self.conversation.queue().clone();
        drop(self.conversation);
        queue.close().await.unwrap();
        read_wav(&self.wav)
    }
}

fn rms(samples: &[f32]) -> f32 {
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32).sqrt()
}

#[tokio::test]
async fn history_is_windowed_by_turns_and_by_tokens() {
    let users = |request: &Value| -> Vec<String> {
        request["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    // Two turns kept.
    let (url, requests) = scripted(vec![]).await;
    let llm = LlmConfig {
        url,
        model: "scripted".into(),
        system_prompt: "Be brief.".into(),
        history_turns: 2,
        ..LlmConfig::default()
    };
    let mut rig = rig_at(llm, requests.clone(), 5).await;
    for text in ["one", "two", "three"] {
        rig.turn(text).await;
    }
    let sent = requests.lock().await.clone();
    assert_eq!(users(&sent[2]), ["two", "three"]);
    assert_eq!(sent[2]["messages"][0]["content"], "Be brief.");
    // What left the window is forgotten: the history holds the window, not every turn.
    let kept: Vec<&str> = rig
        .conversation
        .history()
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(kept, ["two", "three"]);
    // A token window smaller than one long turn (300 bytes, an estimated 75 tokens): only the
    // current turn is sent.
    let (url, requests) = scripted(vec![]).await;
    let llm = LlmConfig {
        url,
        model: "scripted".into(),
        history_tokens: 64,
        ..LlmConfig::default()
    };
    let mut rig = rig_at(llm, requests.clone(), 5).await;
    let long = ["word"; 60].join(" ");
    for text in [long.as_str(), long.as_str(), "short"] {
        rig.turn(text).await;
    }
    let sent = requests.lock().await.clone();
    assert_eq!(users(&sent[1]), [long.as_str()]);
    assert_eq!(users(&sent[2]), ["short"]);
}

#[tokio::test]
async fn a_text_turn_is_spoken() {
    let mut rig = rig(vec![text("Hello there. How can I help you today?")], 5).await;
    let report = rig.turn("Hi").await;
    assert_eq!(report.end, TurnEnd::Answered);
    assert_eq!(report.llm_calls, 1);
    assert_eq!(report.said, "Hello there. How can I help you today?");
    assert!(
        report.first_token_ms.is_some() && report.first_audio_ms.is_some(),
        "{report:?}"
    );
    let history = rig.conversation.history().to_vec();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].content, "Hello there. How can I help you today?");
    let audio = rig.output().await;
    assert!(
        audio.len() > 24_000 && rms(&audio) > 0.02,
        "{} samples, rms {}",
        audio.len(),
        rms(&audio)
    );
}

#[tokio::test]
async fn a_tool_result_goes_back_to_the_model() {
    let mut rig = rig(
        vec![tool("get_current_time", json!({})), text("It is late.")],
        5,
    )
    .await;
    // Not a phrase the built-in intents know: the model chooses the tool.
    let report = rig.turn("Could you check the clock for me?").await;
    assert_eq!(report.llm_calls, 2);
    assert_eq!(report.tools[0].name, "get_current_time");
    assert_eq!(report.said, "It is late.");
    let requests = rig.requests.lock().await.clone();
    let messages = requests[1]["messages"].as_array().unwrap();
    let tool_message = messages
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("a tool message");
    assert!(
        tool_message["content"]
            .as_str()
            .unwrap()
            .starts_with("It is "),
        "{tool_message}"
    );
    assert_eq!(tool_message["tool_call_id"], "call_1");
    assert_eq!(
        requests[0]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["function"]["name"] == "musicPlayer")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_linked_track_plays_and_the_model_is_not_called_again() {
    let mut rig = rig(
        vec![tool("musicPlayer", json!({"query": "return to home"}))],
        5,
    )
    .await;
    let report = rig.turn("Play return to home").await;
    assert_eq!(report.end, TurnEnd::Stopped(StopReason::Media));
    assert_eq!(report.llm_calls, 1);
    assert!(
        report.tools[0]
            .result
            .contains("Playing \"Tumiki Return To Home\""),
        "{:?}",
        report.tools
    );
    let audio = rig.output().await;
    // The track is what played: the output correlates with the decoded FLAC at 24 kHz.
    let track = track_at_24k("tumiki_return_to_home.flac", "audio/flac");
    assert!(
        (audio.len() as i64 - track.len() as i64).abs() < 2400,
        "{} vs {}",
        audio.len(),
        track.len()
    );
    let window = 24_000 * 5..24_000 * 7;
    let (r, _) = best_correlation(&audio[window.clone()], &track[window], 0);
    assert!(r > 0.99, "correlation {r}");
}

#[tokio::test]
async fn set_volume_changes_the_output_level_and_ends_the_turn() {
    let mut rig = rig(vec![tool("set_volume", json!({"volume": 30}))], 5).await;
    let report = rig.turn("Make the sound thirty percent").await;
    assert_eq!(report.end, TurnEnd::Stopped(StopReason::Flagged));
    assert_eq!(report.llm_calls, 1);
    assert_eq!(rig.conversation.queue().volume(), 30);
}

#[tokio::test]
async fn exit_conversation_ends_the_session() {
    let mut rig = rig(vec![tool("exit_conversation", json!({}))], 5).await;
    let report = rig.turn("Goodbye").await;
    assert_eq!(report.end, TurnEnd::Stopped(StopReason::ExitConversation));
    assert!(rig.conversation.exit_requested());
}

#[tokio::test]
async fn failing_tools_are_reported_to_the_model() {
    let mut rig = rig(
        vec![
            tool("no_such_tool", json!({})),
            text("Sorry, I could not do that."),
        ],
        5,
    )
    .await;
    let report = rig.turn("Do something odd").await;
    assert_eq!(report.llm_calls, 2);
    assert!(report.tools[0].is_error);
    let requests = rig.requests.lock().await.clone();
    let tool_message = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap()
        .clone();
    assert!(
        tool_message["content"]
            .as_str()
            .unwrap()
            .contains("there is no tool"),
        "{tool_message}"
    );
    assert_eq!(report.said, "Sorry, I could not do that.");
}

#[tokio::test]
async fn tool_rounds_stop_at_the_limit_with_a_spoken_fallback() {
    let mut rig = rig(
        vec![
            tool("get_current_time", json!({})),
            tool("get_current_time", json!({})),
            tool("get_current_time", json!({})),
        ],
        2,
    )
    .await;
    let report = rig.turn("Loop").await;
    assert_eq!(report.end, TurnEnd::Stopped(StopReason::MaxRounds));
    assert_eq!(report.llm_calls, 2);
    assert!(report.said.contains("couldn't finish"), "{}", report.said);
}

#[tokio::test]
async fn barge_in_mid_reply_keeps_only_what_was_said() {
    let mut slow = text("First sentence here. ");
    slow.insert(1, (json!({"choices": [{"index": 0, "delta": {"content": "Second sentence never heard."}, "finish_reason": null}]}), 3000));
    let mut rig = rig(vec![slow], 5).await;
    let queue = rig.conversation.queue().clone();
    let cancel = CancellationToken::new();
    let mut events = queue.events();
    let barge = {
        let cancel = cancel.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if matches!(
                    event,
                    QueueEvent::SegmentStart {
                        segment: SegmentKind::Sentence { .. },
                        ..
                    }
                ) {
                    queue.stop(QueueStop::BargeIn).await;
                    cancel.cancel();
                    return;
                }
            }
        })
    };
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        rig.conversation.turn("Tell me two things", &cancel),
    )
    .await
    .expect("the turn ends");
    barge.await.unwrap();
    assert_eq!(report.end, TurnEnd::Cancelled);
    assert_eq!(report.said, "First sentence here.");
    let last = rig
        .conversation
        .history()
        .iter()
        .rev()
        .find(|m| m.role == Role::Assistant)
        .unwrap()
        .clone();
    assert_eq!(last.content, "First sentence here. [interrupted]");
}

#[tokio::test]
async fn an_unreachable_model_gets_a_spoken_apology_and_the_session_goes_on() {
    let llm = LlmConfig {
        url: "http://127.0.0.1:9/v1".into(),
        retries: 0,
        ..LlmConfig::default()
    };
    let mut rig = rig_at(llm, Arc::default(), 5).await;
    let report = rig.turn("Hello?").await;
    assert!(
        matches!(&report.end, TurnEnd::Failed(e) if e.contains("unreachable")),
        "{:?}",
        report.end
    );
    // [breaker] failures (5) unreachable turns open the LLM's circuit breaker: the next turn
    // fails fast with the breaker's message, and is still answered with the apology.
    for _ in 1..5 {
        let report = rig.turn("Still there?").await;
        assert!(matches!(&report.end, TurnEnd::Failed(e) if e.contains("unreachable")));
    }
    let report = rig.turn("Hello again?").await;
    assert!(
        matches!(&report.end, TurnEnd::Failed(e) if e.contains("circuit breaker opened after 5 consecutive failures")),
        "{:?}",
        report.end
    );
    let audio = rig.output().await;
    assert!(rms(&audio) > 0.02, "the apology was spoken");
}

/// `voxloop` as a process, with a config whose [llm] is the scripted endpoint.
async fn voxloop_with(url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("voxloop.toml");
    std::fs::write(
        &config,
        format!(
            "[llm]\nprovider = \"openai\"\nurl = {url:?}\nmodel = \"scripted\"\n[asr]\nlanguage = \"en\"\n"
        ),
    )
    .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .current_dir(repo_root())
        .output()
        .await
        .unwrap()
}

/// The stdout of a run that must have succeeded (else its stderr is the failure).
fn succeeded(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn chat_runs_typed_turns_through_the_bundled_music_server() {
    let (url, requests) = scripted(vec![tool(
        "musicPlayer",
        json!({"query": "return to home"}),
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reply.wav");
    let output = voxloop_with(
        &url,
        &[
            "chat",
            "--text",
            "Play return to home",
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let stdout = succeeded(&output);
    assert!(
        stdout.contains("tool musicPlayer({\"query\":\"return to home\"}) [music, ok]"),
        "{stdout}"
    );
    assert!(stdout.contains("end: Stopped(Media)"), "{stdout}");
    assert_eq!(requests.lock().await.len(), 1);
    let seconds = hound::WavReader::open(&out).unwrap().duration() as f64 / 24_000.0;
    assert!((22.0..22.4).contains(&seconds), "{seconds} s: the track");
}

/// With `--json`, stdout is one JSON object a turn and nothing else (the note of the file
/// written goes to stderr), so scripts can read it line by line.
#[tokio::test]
async fn chat_json_prints_only_json_lines() {
    let (url, _) = scripted(vec![text("Paris is the capital of France.")]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reply.wav");
    let output = voxloop_with(
        &url,
        &[
            "chat",
            "--json",
            "--text",
            "What is the capital of France?",
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let stdout = succeeded(&output);
    let turns: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(turns.len(), 1, "{stdout}");
    assert_eq!(turns[0]["said"], "Paris is the capital of France.");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("wrote"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn run_hears_a_spoken_command_and_plays_the_track() {
    let (url, requests) = scripted(vec![tool("musicPlayer", json!({"query": "horizon"}))]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reply.wav");
    let output = voxloop_with(
        &url,
        &[
            "run",
            "--input",
            "assets/speech/cmd_play_horizon.wav",
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let stdout = succeeded(&output);
    assert!(
        stdout.contains("heard: Play the song just over the horizon."),
        "{stdout}"
    );
    assert!(stdout.contains("tool musicPlayer"), "{stdout}");
    // The model was asked with what was heard.
    let request = requests.lock().await[0].clone();
    let user = request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "user")
        .unwrap()
        .clone();
    assert_eq!(user["content"], "Play the song just over the horizon.");
    let seconds = hound::WavReader::open(&out).unwrap().duration() as f64 / 24_000.0;
    assert!(seconds > 55.0, "{seconds} s: the 59 s track");
}

#[tokio::test]
async fn built_in_intents_answer_without_the_model() {
    let mut rig = rig(vec![text("The model should not be asked.")], 5).await;
    let report = rig.turn("Set the volume to forty percent.").await;
    assert_eq!(report.handled_by, Handler::Intent);
    assert_eq!(report.llm_calls, 0);
    assert_eq!(report.tools[0].name, "set_volume");
    assert_eq!(report.tools[0].arguments, json!({"volume": 40}));
    assert_eq!(rig.conversation.queue().volume(), 40);
    assert_eq!(report.said, "");

    // The volume, asked: the runtime answers from its own, with no tool and no model.
    let report = rig.turn("What's the volume right now?").await;
    assert_eq!(report.handled_by, Handler::Intent);
    assert!(report.tools.is_empty(), "{:?}", report.tools);
    assert_eq!(report.said, "The volume is 40 percent.");
    assert!(report.first_audio_ms.is_some());

    let report = rig.turn("What time is it right now?").await;
    assert_eq!(report.handled_by, Handler::Intent);
    assert_eq!(report.tools[0].name, "get_current_time");
    // The reply says the time the tool returned.
    let result = &report.tools[0].result;
    let hh_mm = result
        .split(' ')
        .find(|w| w.contains(':'))
        .expect("a time in the result");
    assert!(report.said.contains(hh_mm), "{} / {result}", report.said);
    assert!(report.first_audio_ms.is_some());

    // Asked in Chinese, the time is said in Chinese (the turn once passed the model's empty
    // reply instead of the request, and the answer came in English).
    let report = rig.turn("现在几点了？").await;
    assert_eq!(report.tools[0].name, "get_current_time");
    assert!(report.said.starts_with("现在是"), "{}", report.said);

    let report = rig.turn("Goodbye, that is all for today.").await;
    assert_eq!(report.tools[0].name, "exit_conversation");
    assert_eq!(report.said, "Goodbye.");
    assert!(rig.conversation.exit_requested());
    assert!(rig.requests.lock().await.is_empty(), "the model was asked");
}

/// Waits for a media segment to start and returns its id; a held one coming back first fails.
async fn media_started(events: &mut tokio::sync::broadcast::Receiver<QueueEvent>) -> u64 {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("a song starts")
            .unwrap();
        match event {
            QueueEvent::SegmentStart {
                id,
                segment: SegmentKind::Media { .. },
            } => return id,
            QueueEvent::Resumed { id } => panic!("held media {id} came back"),
            _ => {}
        }
    }
}

/// What smart speakers do: "louder" or "what time is it" over a song leaves the song playing
/// after the answer, from where it was; a request for another song replaces it; "stop" ends
/// it. Real music server, real track, a sink at real-time pace.
#[tokio::test]
async fn music_goes_on_after_a_turn_that_does_not_replace_or_stop_it() {
    let (url, requests) = scripted(vec![
        tool("musicPlayer", json!({"query": "return to home"})),
        tool("musicPlayer", json!({"query": "torus trooper"})),
    ])
    .await;
    let mut rig = rig_on(scripted_llm(url), requests, 5, true).await;
    let queue = rig.conversation.queue().clone();
    let mut events = queue.events();
    let next = |events: &mut tokio::sync::broadcast::Receiver<QueueEvent>| {
        let event = events.try_recv();
        event.ok()
    };
    rig.turn("Play return to home").await;
    let song = media_started(&mut events).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A volume change says nothing: the song is held for the turn (or, if the turn ends before
    // the player has acted on the interrupt, not even that) and goes on at once.
    let report = rig.turn("Set the volume to thirty percent.").await;
    assert_eq!(report.handled_by, Handler::Intent);
    assert_eq!(queue.volume(), 30);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = Vec::new();
    while let Some(event) = next(&mut events) {
        seen.push(event);
    }
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, QueueEvent::SegmentEnd { id, .. } if *id == song)),
        "{seen:?}"
    );
    assert!(
        matches!(seen.last(), Some(QueueEvent::Resumed { id }) if *id == song),
        "{seen:?}"
    );
    assert!(queue.is_busy() && queue.output_level() > 0.0);

    // A question: the answer is spoken, then the song goes on.
    let report = rig.turn("What time is it?").await;
    assert!(!report.said.is_empty());
    let mut order: Vec<&str> = Vec::new();
    while order.last() != Some(&"resumed") {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("the song goes on after the answer")
            .unwrap();
        order.push(match event {
            QueueEvent::Held { id, .. } if id == song => "held",
            QueueEvent::SegmentStart {
                segment: SegmentKind::Sentence { .. },
                ..
            } => "sentence",
            QueueEvent::Resumed { id } if id == song => "resumed",
            QueueEvent::SegmentEnd { id, .. } if id == song => "song ended",
            _ => continue,
        });
    }
    // The answer is spoken before the song goes on.
    assert!(order.contains(&"sentence"), "{order:?}");
    assert!(!order.contains(&"song ended"), "{order:?}");

    // Another song replaces it: the first ends, the second plays.
    rig.turn("Play torus trooper").await;
    let second = media_started(&mut events).await;
    assert_ne!(second, song);
    assert!(!queue.has_held());

    // "Stop" ends it, and nothing comes back.
    let report = rig.turn("Stop the music.").await;
    assert_eq!(report.tools[0].name, "stop_playback");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queue.is_busy() && !queue.has_held());
}

/// "Pause" keeps the song's place through other turns until "resume" continues it from there;
/// "resume" with nothing paused says so.
#[tokio::test]
async fn pause_keeps_the_songs_place_until_resume() {
    let (url, requests) = scripted(vec![tool(
        "musicPlayer",
        json!({"query": "return to home"}),
    )])
    .await;
    let mut rig = rig_on(scripted_llm(url), requests.clone(), 5, true).await;
    let queue = rig.conversation.queue().clone();
    let mut events = queue.events();
    rig.turn("Play return to home").await;
    let song = media_started(&mut events).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let report = rig.turn("Pause the music.").await;
    assert_eq!(report.tools[0].name, "pause_playback");
    assert_eq!(report.said, "");
    // Another turn, with an answer, does not bring it back.
    let report = rig.turn("What time is it?").await;
    assert!(!report.said.is_empty());
    tokio::time::timeout(Duration::from_secs(20), queue.idle())
        .await
        .expect("the answer ends");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        queue.has_held() && !queue.is_busy(),
        "held {} busy {}",
        queue.has_held(),
        queue.is_busy()
    );

    let report = rig.turn("Resume the music.").await;
    assert_eq!(report.tools[0].name, "resume_playback");
    assert_eq!(report.said, "");
    let mut held_at = None;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the song goes on")
            .unwrap();
        match event {
            QueueEvent::Held { id, played_ms } if id == song => held_at = Some(played_ms),
            QueueEvent::Resumed { id } if id == song => break,
            QueueEvent::SegmentEnd { id, .. } if id == song => panic!("the song ended"),
            _ => {}
        }
    }
    // It was held about where it was paused (500 ms in), not restarted.
    let held_at = held_at.expect("held");
    assert!((300..2_000).contains(&held_at), "held at {held_at} ms");
    assert!(queue.is_busy());

    let report = rig.turn("Stop.").await;
    assert_eq!(report.tools[0].name, "stop_playback");
    // At once: the player may not have acted on the stop yet, and the next turn's interrupt
    // must not bring back what the stop ended.
    let report = rig.turn("Resume.").await;
    assert_eq!(report.said, "Nothing is paused.", "{report:?}");
    assert!(
        requests.lock().await.len() == 1,
        "the model was asked beyond the song"
    );
}

#[tokio::test]
async fn non_speech_transcripts_end_the_turn_quietly() {
    let mut rig = rig(vec![text("Shoutout to those who had invested.")], 5).await;
    for heard in [
        "[BLANK_AUDIO]",
        "[POP]",
        " (music) ",
        "",
        "Thanks for watching!",
    ] {
        let report = rig.turn(heard).await;
        assert_eq!(report.end, TurnEnd::Ignored, "{heard:?}");
        assert_eq!(report.said, "");
    }
    assert!(rig.requests.lock().await.is_empty(), "the model was asked");
}

#[tokio::test]
async fn markup_and_loops_never_reach_tts() {
    let mut rig = rig(
        vec![
            text("**Sure!** <tool_call>{\"name\": \"set_volume\", \"arguments\": {\"volume\": 20}}</tool_call> Here you go: `code`."),
            text("What? What? What? What? What? What? What?"),
            text("One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five twenty-six twenty-seven twenty-eight twenty-nine thirty thirty-one thirty-two thirty-three thirty-four thirty-five thirty-six thirty-seven thirty-eight thirty-nine forty forty-one forty-two forty-three forty-four forty-five forty-six forty-seven forty-eight forty-nine fifty fifty-one fifty-two fifty-three fifty-four fifty-five fifty-six fifty-seven fifty-eight fifty-nine sixty sixty-one sixty-two."),
        ],
        5,
    )
    .await;
    let report = rig.turn("Tell me something.").await;
    // "Here you go:" announced only code, which is not spoken: so it is not said either.
    assert_eq!(report.said, "Sure!");
    let report = rig.turn("Say it again.").await;
    assert_eq!(report.said, "What?");
    let report = rig.turn("Count for me.").await;
    assert_eq!(
        report.said.split_whitespace().count(),
        60,
        "{}",
        report.said
    );
}

/// What the turn task did, in order, as an observer saw it.
struct Recorder(tokio::sync::mpsc::UnboundedSender<String>);

impl voxloop::conversation::turns::TurnObserver for Recorder {
    async fn started(&mut self, job: &voxloop::conversation::turns::Job) -> bool {
        let _ = self.0.send(format!("started {job:?}"));
        true
    }

    async fn finished(
        &mut self,
        _conversation: &Conversation,
        report: Option<voxloop::conversation::TurnReport>,
        cancel: &CancellationToken,
    ) -> bool {
        let report = report.unwrap();
        let _ = self.0.send(format!(
            "finished {:?} {:?} cancelled={}",
            report.said,
            report.end,
            cancel.is_cancelled()
        ));
        true
    }
}

#[tokio::test]
async fn the_turn_task_runs_jobs_in_order_and_a_new_request_supersedes_the_running_one() {
    use voxloop::conversation::turns::{Job, Turns};
    // The first reply stalls for a minute after its first words; the second answers at once.
    let mut slow = text("Let me think.");
    slow[1].1 = 60_000;
    let Rig {
        conversation,
        requests,
        ..
    } = rig(vec![slow, text("The second answer.")], 5).await;
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut turns = Turns::start(conversation, Recorder(tx));
    assert!(!turns.is_running());
    let job = |text: &str| Job::Turn {
        text: text.into(),
        asr_ms: Some(7),
    };
    assert!(turns.submit(job("first request")).await);
    assert!(turns.is_running());
    // Wait until the model is writing the first reply.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while requests.lock().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the model was never asked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(turns.submit(job("second request")).await);
    let mut events = Vec::new();
    while events.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .expect("the turn task stalled")
            .unwrap();
        events.push(event);
    }
    assert_eq!(
        events[0],
        "started Turn { text: \"first request\", asr_ms: Some(7) }"
    );
    assert!(
        events[1].starts_with("finished") && events[1].ends_with("Cancelled cancelled=true"),
        "{events:?}"
    );
    assert_eq!(
        events[2],
        "started Turn { text: \"second request\", asr_ms: Some(7) }"
    );
    assert_eq!(
        events[3],
        "finished \"The second answer.\" Answered cancelled=false"
    );
    assert!(!turns.is_running());
    let conversation = turns.finish().await.unwrap();
    assert!(!conversation.exit_requested());
}
