//! The local chat model with the real SmolLM2-135M-Instruct GGUF on both engines (candle, and
//! llama.cpp's real `llama-server` as a child process): its tokenizer, a greeting answered in
//! words, tool calls decoded under the grammar and run on the real music server,
//! cancellation, a server that dies mid-reply, and the main job (`voxloop run` on a recorded
//! command) end to end.
//!
//! The model and the server must be present (`voxloop models fetch smollm2 llama-server`;
//! scripts/test fetches them once).

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use voxloop::config::Config;
use voxloop::llm::config::DEFAULT_SYSTEM_PROMPT;
use voxloop::llm::config::{LlmConfig, LocalEngine};
use voxloop::llm::local::LocalModel;
use voxloop::llm::{ChatMessage, LlmError, LlmEvent, Role, ToolCallRequest};
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::{ToolCall, ToolHub};

fn model_path() -> PathBuf {
    model_file("smollm2")
}

/// Both engines.
const ENGINES: [LocalEngine; 2] = [LocalEngine::Candle, LocalEngine::LlamaCpp];

/// One loaded model per engine for all tests.
fn model_on(engine: LocalEngine) -> &'static LocalModel {
    static CANDLE: OnceLock<LocalModel> = OnceLock::new();
    static LLAMA: OnceLock<LocalModel> = OnceLock::new();
    let cell = match engine {
        LocalEngine::Candle => &CANDLE,
        LocalEngine::LlamaCpp => &LLAMA,
    };
    cell.get_or_init(|| {
        let config = LlmConfig {
            max_tokens: 48,
            engine,
            timeout_ms: TEST_LLM_TIMEOUT_MS,
            ..LlmConfig::default()
        };
        let model = LocalModel::load(&model_path(), &config).unwrap();
        assert_eq!(
            model.engine(),
            engine,
            "no llama-server: voxloop models fetch llama-server"
        );
        model
    })
}

fn model() -> &'static LocalModel {
    model_on(LocalEngine::Candle)
}

/// The tool hub over the real music server (stdio), as the assistant has it.
async fn hub() -> Arc<ToolHub> {
    let mut config = Config::default();
    let music = McpServerConfig {
        command: Some(music_server_bin().display().to_string()),
        cwd: Some(repo_root()),
        ..McpServerConfig::default()
    };
    config.mcp_servers.insert("music".into(), music);
    Arc::new(ToolHub::start(config.hub()).await)
}

fn request(user: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(Role::System, DEFAULT_SYSTEM_PROMPT),
        ChatMessage::new(Role::User, user),
    ]
}

/// Runs a completion through the streaming interface: the text, the tool calls and the finish
/// reason.
async fn complete(
    model: &LocalModel,
    messages: &[ChatMessage],
    tools: &[Value],
) -> (String, Vec<ToolCallRequest>, String) {
    let mut rx = model
        .stream(messages, tools, &CancellationToken::new())
        .await
        .unwrap();
    let (mut text, mut calls) = (String::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event.unwrap() {
            LlmEvent::Text(t) => text.push_str(&t),
            LlmEvent::ToolCall(c) => calls.push(c),
            LlmEvent::Done { finish_reason, .. } => return (text, calls, finish_reason),
        }
    }
    panic!("the stream ended without Done; text so far {text:?}");
}

#[test]
fn the_tokenizer_comes_from_the_gguf_metadata() {
    let _slot = chat_model_slot_blocking();
    let model = model();
    let text = "<|im_start|>user\nPlay track 42, héllo!<|im_end|>\n";
    let ids = model.tokenize(text).unwrap();
    let start = model.token_id("<|im_start|>").unwrap();
    let end = model.token_id("<|im_end|>").unwrap();
    // Control tokens stay whole, digits are split one by one, and the text comes back intact.
    assert_eq!(ids[0], start);
    assert!(ids.contains(&end));
    let four = model.tokenize("4").unwrap();
    let two = model.tokenize("2").unwrap();
    assert_eq!((four.len(), two.len()), (1, 1));
    assert!(ids.windows(2).any(|w| w == [four[0], two[0]]), "{ids:?}");
    assert_eq!(model.detokenize(&ids).unwrap(), text);
    // No prefix space: "Play" at the start is the same token as after a newline.
    let play = model.tokenize("Play").unwrap();
    assert!(ids.windows(play.len()).any(|w| w == play.as_slice()));
}

#[tokio::test]
async fn a_greeting_is_answered_in_words() {
    let _slot = chat_model_slot().await;
    let hub = hub().await;
    for engine in ENGINES {
        let (text, calls, finish) = complete(
            model_on(engine),
            &request("Hello, how are you?"),
            &hub.function_tools(),
        )
        .await;
        assert!(calls.is_empty(), "{engine:?}: {calls:?}");
        assert!(text.split_whitespace().count() >= 2, "{engine:?}: {text:?}");
        assert!(["stop", "length"].contains(&finish.as_str()), "{finish}");
    }
}

#[tokio::test]
async fn play_some_music_calls_the_music_player_and_the_call_runs() {
    let _slot = chat_model_slot().await;
    let hub = hub().await;
    for engine in ENGINES {
        play_some_music_on(engine, &hub).await;
    }
}

async fn play_some_music_on(engine: LocalEngine, hub: &ToolHub) {
    let (text, calls, finish) = complete(
        model_on(engine),
        &request("Play some music."),
        &hub.function_tools(),
    )
    .await;
    assert_eq!(finish, "tool_calls");
    assert!(text.is_empty(), "{text:?}");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].name, "musicPlayer");
    let arguments: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    // The schema's only property is an optional string query, copied from the request.
    let object = arguments.as_object().unwrap();
    assert!(object.keys().all(|k| k == "query"), "{arguments}");
    if let Some(query) = object.get("query") {
        assert!(
            "Play some music".contains(query.as_str().unwrap()),
            "{arguments}"
        );
    }
    // The server accepts the call and links a track.
    let outcome = hub
        .call_round(
            &[ToolCall {
                name: calls[0].name.clone(),
                arguments,
            }],
            &CancellationToken::new(),
        )
        .await
        .remove(0);
    assert!(!outcome.is_error, "{:?}", outcome.tool_message());
    assert_eq!(outcome.media.len(), 1);
}

#[tokio::test]
async fn a_constrained_integer_stays_in_the_schema_range() {
    let _slot = chat_model_slot().await;
    let hub = hub().await;
    let tools: Vec<Value> = hub
        .function_tools()
        .into_iter()
        .filter(|t| t["function"]["name"] == "set_volume")
        .collect();
    for engine in ENGINES {
        set_volume_on(engine, &hub, &tools).await;
    }
}

async fn set_volume_on(engine: LocalEngine, hub: &ToolHub, tools: &[Value]) {
    let (_, calls, finish) =
        complete(model_on(engine), &request("Set the volume to 30."), tools).await;
    assert_eq!(finish, "tool_calls");
    assert_eq!(calls[0].name, "set_volume");
    let arguments: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    let volume = arguments["volume"].as_i64().unwrap();
    assert!((1..=100).contains(&volume), "{arguments}");
    let outcome = hub
        .call_round(
            &[ToolCall {
                name: "set_volume".into(),
                arguments,
            }],
            &CancellationToken::new(),
        )
        .await
        .remove(0);
    assert!(!outcome.is_error, "{:?}", outcome.tool_message());
    assert!(outcome.action.is_some());
}

#[tokio::test]
async fn cancelling_stops_generation_before_the_end() {
    let _slot = chat_model_slot().await;
    for engine in ENGINES {
        cancel_on(engine).await;
    }
}

async fn cancel_on(engine: LocalEngine) {
    let cancel = CancellationToken::new();
    let mut rx = model_on(engine)
        .stream(&request("Tell me a long story about a cat."), &[], &cancel)
        .await
        .unwrap();
    let first = rx.recv().await.unwrap().unwrap();
    assert!(matches!(first, LlmEvent::Text(_)), "{first:?}");
    cancel.cancel();
    // At most one token was on its way; then the stream closes without a Done.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rest = Vec::new();
        while let Some(event) = rx.recv().await {
            rest.push(event.unwrap());
        }
        rest
    })
    .await
    .unwrap();
    assert!(rest.len() <= 2, "{rest:?}");
    assert!(!rest.iter().any(|e| matches!(e, LlmEvent::Done { .. })));
}

/// llama.cpp's server killed mid-reply: the reply ends with a clear error (no panic, no hang),
/// and the next request starts the server again and is answered.
#[tokio::test]
async fn a_llama_server_that_dies_mid_reply_is_an_error_and_is_started_again() {
    let _slot = chat_model_slot().await;
    let config = LlmConfig {
        max_tokens: 200,
        temperature: 0.0,
        timeout_ms: TEST_LLM_TIMEOUT_MS,
        ..LlmConfig::default()
    };
    let model = LocalModel::load(&model_path(), &config).unwrap();
    assert_eq!(model.engine(), LocalEngine::LlamaCpp);
    let cancel = CancellationToken::new();
    let mut rx = model
        .stream(&request("Tell me a long story about a cat."), &[], &cancel)
        .await
        .unwrap();
    let first = rx.recv().await.unwrap().unwrap();
    assert!(matches!(first, LlmEvent::Text(_)), "{first:?}");
    let pid = model.llama_server().unwrap().pid().await.unwrap();
    // The server's API key is in a file, not in the command line other users can read.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(args.contains(&&b"--api-key-file"[..]), "{args:?}");
    assert!(!args.contains(&&b"--api-key"[..]), "{args:?}");
    // It runs at the configured niceness (field 19 of /proc/PID/stat, after the command's
    // parenthesised name).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[16], config.engine_nice.to_string(), "{stat}");
    assert_eq!(config.engine_nice, 10);
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let last = tokio::time::timeout(Duration::from_secs(20), async {
        let mut last = None;
        while let Some(event) = rx.recv().await {
            last = Some(event);
        }
        last
    })
    .await
    .expect("the stream ended");
    let error = match last {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(matches!(error, LlmError::Model { .. }), "{error}");
    assert!(error.to_string().contains("llama-server"), "{error}");
    // The next request gets a new server.
    let (text, _, finish) = complete(&model, &request("Hello, how are you?"), &[]).await;
    assert!(!text.is_empty(), "{text:?}");
    assert!(["stop", "length"].contains(&finish.as_str()), "{finish}");
    let again = model.llama_server().unwrap().pid().await.unwrap();
    assert_ne!(again, pid);
}

/// Without the llama-server program the model runs on candle (with a warning), not fails.
#[test]
fn a_missing_llama_server_falls_back_to_candle() {
    let _slot = chat_model_slot_blocking();
    let config = LlmConfig {
        llama_server: Some("/nonexistent/llama-server".into()),
        ..LlmConfig::default()
    };
    let model = LocalModel::load(&model_path(), &config).unwrap();
    assert_eq!(model.engine(), LocalEngine::Candle);
    let (events, _) = model.complete_blocking(&request("Hello!"), &[]).unwrap();
    assert!(
        matches!(events.last(), Some(LlmEvent::Done { .. })),
        "{events:?}"
    );
}

#[test]
fn a_missing_model_file_names_the_fetch_command() {
    let _slot = chat_model_slot_blocking();
    let Err(error) = LocalModel::load(
        std::path::Path::new("/nonexistent/model.gguf"),
        &LlmConfig::default(),
    ) else {
        panic!("loaded a missing file");
    };
    assert!(matches!(error, LlmError::Model { .. }));
    assert!(
        error.to_string().contains("voxloop models fetch"),
        "{error}"
    );
    // A file that is not GGUF.
    let Err(error) = LocalModel::load(
        &music_file("tumiki_return_to_home.flac"),
        &LlmConfig::default(),
    ) else {
        panic!("loaded a FLAC file as a model");
    };
    assert!(
        error.to_string().contains("tumiki_return_to_home.flac"),
        "{error}"
    );
}

/// The README's main job on its built-in defaults: whisper base hears the recorded command, the
/// local model calls musicPlayer on the bundled server, and the track is in the output WAV.
#[test]
fn the_main_job_plays_the_requested_track_into_a_wav() {
    let _slot = chat_model_slot_blocking();
    model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reply.wav");
    let run = Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args([
            "run",
            "--input",
            "assets/speech/cmd_play_horizon.wav",
            "--output",
        ])
        .arg(&out)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("heard: Play the song just over the horizon"),
        "{stdout}"
    );
    assert!(stdout.contains("tool musicPlayer("), "{stdout}");
    assert!(
        stdout.contains("Playing \"Tumiki Just Over The Horizon\""),
        "{stdout}"
    );
    assert!(stdout.contains("first LLM token"), "{stdout}");

    // The track is the end of the WAV: it correlates with the decoded MP3 at 24 kHz.
    let audio = read_wav(&out);
    let track = track_at_24k("tumiki_just_over_the_horizon.mp3", "audio/mpeg");
    assert!(
        audio.len() + 2400 >= track.len(),
        "{} < {}",
        audio.len(),
        track.len()
    );
    let offset = audio.len().saturating_sub(track.len());
    let window = 24_000 * 5..24_000 * 7;
    let (r, lag) = best_correlation(
        &track[window.clone()],
        &audio[offset + window.start..],
        2400,
    );
    assert!(r > 0.99, "correlation {r} at lag {lag}");
}

/// 300 tools a big MCP server might offer (a smart home's devices), none of them about music.
fn many_tools() -> Vec<Value> {
    (0..300)
        .map(|i| {
            json!({"type": "function", "function": {
                "name": format!("home_device_{i}_switch"),
                "description": format!("Turns device number {i} of the house (a lamp, a heater or a blind) on or off, and reports its state and power draw."),
                "parameters": {"type": "object", "properties": {
                    "on": {"type": "boolean", "description": "true to switch it on"},
                    "room": {"type": "string", "description": "the room the device is in"}},
                    "required": ["on"]}}})
        })
        .collect()
}

#[test]
fn tools_are_ranked_by_the_request_words_in_their_names_then_descriptions() {
    let mut tools = many_tools();
    tools.push(
        json!({"type": "function", "function": {"name": "musicPlayer",
        "description": "Play music from the library: a song, an artist or an album."}}),
    );
    let ranked = voxloop::llm::local::tools_by_relevance("Play something by Queen.", &tools);
    assert_eq!(ranked[0], 300, "the music player first");
    // Equals keep their offered order.
    assert_eq!(&ranked[1..4], &[0, 1, 2]);
    let ranked = voxloop::llm::local::tools_by_relevance("switch the lamp in room 7 off", &tools);
    assert!(ranked[0] < 300);
}

#[tokio::test]
async fn three_hundred_tools_are_narrowed_to_the_relevant_ones_that_fit_the_context() {
    let _slot = chat_model_slot().await;
    let hub = hub().await;
    let mut tools = many_tools();
    tools.extend(hub.function_tools());
    let model = model();
    let messages = request("Play something by Queen.");
    // Every tool together is far past the model's 4096 tokens.
    let all = LocalModel::render_prompt(model.format(), &messages, &tools, "");
    assert!(model.tokenize(&all).unwrap().len() > 8_000);
    let (prompt_tokens, offered) = model.offered(&messages, &tools).unwrap();
    assert!(prompt_tokens + 48 <= 4096, "{prompt_tokens}");
    assert!(
        offered.len() > 5 && offered.len() < tools.len(),
        "{offered:?}"
    );
    assert!(offered.iter().any(|t| t == "musicPlayer"), "{offered:?}");
    // With few tools nothing is left out.
    let (_, few) = model.offered(&messages, &hub.function_tools()).unwrap();
    assert_eq!(few.len(), hub.function_tools().len());
}

#[tokio::test]
async fn warm_ups_are_shared_and_a_completion_past_the_queue_is_busy() {
    // One slot, no wait: the queue is full while one completion runs.
    let config = LlmConfig {
        max_tokens: 16,
        engine: LocalEngine::LlamaCpp,
        engine_slots: 1,
        max_wait_ms: 0,
        timeout_ms: TEST_LLM_TIMEOUT_MS,
        ..LlmConfig::default()
    };
    let model = LocalModel::load(&model_path(), &config).unwrap();
    let hub = hub().await;
    let tools = hub.function_tools();
    let system = [ChatMessage::new(Role::System, DEFAULT_SYSTEM_PROMPT)];

    // Eight sessions warming up the same prefix at once: it is computed once, and each waits
    // for that one computation (none is refused, though only one may run).
    let warmed =
        futures_util::future::join_all((0..8).map(|_| model.warm_up_async(&system, &tools))).await;
    assert!(warmed.iter().all(Result::is_ok), "{warmed:?}");
    assert_eq!(model.warm_ups(), 1);
    // A device with a tool of its own has its own prefix: computed once more, then shared.
    let mut own = tools.clone();
    own.push(json!({"type": "function", "function": {
        "name": "self_light_on", "description": "Turns the light on.",
        "parameters": {"type": "object", "properties": {}}}}));
    for _ in 0..2 {
        model.warm_up_async(&system, &own).await.unwrap();
    }
    model.warm_up_async(&system, &tools).await.unwrap();
    assert_eq!(model.warm_ups(), 2);

    // A long request holds the one slot for its prefill (seconds); a second completion meanwhile
    // is refused at once, and a conversation says the busy sentence instead of an apology.
    let long = ["the quick brown fox jumps over the lazy dog"; 300].join(" ");
    let cancel = CancellationToken::new();
    let mut first = model.stream(&request(&long), &[], &cancel).await.unwrap();
    let second = model.stream(&request("Hello!"), &[], &cancel).await;
    match second {
        Err(LlmError::Busy(busy)) => assert_eq!((busy.stage, busy.workers), ("llm", 1)),
        other => panic!("expected busy, got {:?}", other.map(|_| "a stream")),
    }
    let dir = tempfile::tempdir().unwrap();
    let queue = voxloop::audio::queue::PlaybackQueue::new(
        voxloop::audio::sink::Sink::Wav(
            voxloop::audio::sink::WavSink::create(&dir.path().join("out.wav"), 24_000, 1).unwrap(),
        ),
        voxloop::audio::queue::QueueSettings::default(),
    );
    let mut events = queue.events();
    let mut tts = voxloop::speech::tts::TtsConfig::default();
    tts.provider = voxloop::speech::tts::TtsProvider::EspeakNg;
    let mut conversation = voxloop::conversation::Conversation::new(
        voxloop::llm::ChatModel::Local(model.clone()),
        hub,
        voxloop::speech::tts::Tts::new(&tts),
        queue,
        voxloop::conversation::ConversationSettings::new(&config, &Default::default()),
    );
    let report = conversation.turn("Tell me a joke.", &cancel).await;
    assert!(
        matches!(&report.end, voxloop::conversation::TurnEnd::Busy(e) if e.contains("llm")),
        "{report:?}"
    );
    let said = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(voxloop::audio::queue::QueueEvent::SegmentStart {
                segment: voxloop::audio::queue::SegmentKind::Sentence { text },
                ..
            })) => break text,
            Ok(Ok(_)) => continue,
            other => panic!("no sentence was said: {other:?}"),
        }
    };
    assert_eq!(said, voxloop::compute::BUSY_SENTENCE);
    // Once the first completion ends, the slot takes the next one.
    while first.recv().await.is_some() {}
    let (text, _, _) = complete(&model, &request("Hello!"), &[]).await;
    assert!(!text.is_empty());
}

#[tokio::test]
async fn three_hundred_turns_on_the_local_model_keep_answering_within_the_window() {
    let config = LlmConfig {
        max_tokens: 8,
        engine: LocalEngine::LlamaCpp,
        // A small window keeps each turn's prompt short; windowing is what is tested.
        history_tokens: 120,
        timeout_ms: TEST_LLM_TIMEOUT_MS,
        ..LlmConfig::default()
    };
    let model = LocalModel::load(&model_path(), &config).unwrap();
    let mut tts = voxloop::speech::tts::TtsConfig::default();
    tts.provider = voxloop::speech::tts::TtsProvider::EspeakNg;
    let queue = voxloop::audio::queue::PlaybackQueue::new(
        voxloop::audio::sink::Sink::Null(voxloop::audio::sink::NullSink::new(24_000, 1, false)),
        voxloop::audio::queue::QueueSettings::default(),
    );
    let mut conversation = voxloop::conversation::Conversation::new(
        voxloop::llm::ChatModel::Local(model),
        hub().await,
        voxloop::speech::tts::Tts::new(&tts),
        queue,
        voxloop::conversation::ConversationSettings::new(&config, &Default::default()),
    );
    let cancel = CancellationToken::new();
    let mut longest = 0;
    for turn in 0..300 {
        let request = format!("Tell me one short fact about the number {turn}.");
        let report = conversation.turn(&request, &cancel).await;
        assert!(
            !matches!(
                report.end,
                voxloop::conversation::TurnEnd::Failed(_) | voxloop::conversation::TurnEnd::Busy(_)
            ),
            "turn {turn}: {report:?}"
        );
        assert!(report.llm_calls >= 1, "turn {turn}: the model was asked");
        assert!(
            !report.said.is_empty() || !report.tools.is_empty(),
            "turn {turn}: nothing said or done: {report:?}"
        );
        // The history kept is the window, however long the conversation.
        longest = longest.max(conversation.history().len());
    }
    // At most `history_turns` (10) turns of a user message, a reply, a call's result and the
    // reply after it; without the window it would be every one of 300 turns.
    assert!(longest <= 4 * 10, "history grew to {longest} messages");
}
