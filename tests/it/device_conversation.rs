//! A device's conversation through the device server, with a device simulator
//! (tokio-tungstenite, Opus through libopus) speaking each protocol version: hello, listen
//! start, the Opus frames of a spoken command from assets/speech, then `stt`, `llm {emotion}`,
//! `tts start`, `sentence_start`, paced Opus frames (decoded: not silent; never more than the
//! lead plus one frame ahead of real time) and `tts stop`; and `abort` in mid-reply; the
//! camera's vision endpoint. Real whisper (base, the
//! model scripts/test fetches), real espeak-ng, a scripted OpenAI-compatible endpoint.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voxloop::audio::opus::{FrameDecoder, FrameEncoder};
use voxloop::config::Config;
use voxloop::conversation::assistant::{Assistant, Input};
use voxloop::device::protocol::{BinaryFrame, ProtocolVersion};
use voxloop::llm::config::LlmProvider;
use voxloop::speech::tts::TtsProvider;
use voxloop::tools::config::McpServerConfig;

use common::*;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn serve(reply: &'static str) -> SocketAddr {
    serve_with(vec![Reply::Words(reply)], |_| {}).await.0
}

/// The device server with the scripted LLM and the music server; `tweak` adjusts the config.
async fn serve_with(
    replies: Vec<Reply>,
    tweak: impl FnOnce(&mut Config),
) -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let (addr, requests, _) = serve_assistant(replies, tweak).await;
    (addr, requests)
}

/// As [`serve_with`], and the assistant the server runs (its shared parts).
async fn serve_assistant(
    replies: Vec<Reply>,
    tweak: impl FnOnce(&mut Config),
) -> (SocketAddr, Arc<Mutex<Vec<Value>>>, Assistant) {
    let mut config = Config::default();
    config.auth.allow_anonymous = true;
    config.llm.provider = LlmProvider::Openai;
    let (url, requests) = scripted_llm(replies).await;
    config.llm.url = url;
    config.llm.model = "scripted".into();
    // These tests are about the model's turns; the built-in intents are tested on their own.
    config.llm.builtin_intents = false;
    config.asr.language = "en".into();
    // The tests are about the session and its pacing; espeak-ng speaks in milliseconds and in
    // parallel (the default voice, Kokoro, has tests/kokoro.rs and tests/real_clients.rs).
    config.tts.provider = TtsProvider::EspeakNg;
    config.mcp_servers.insert(
        "music".into(),
        McpServerConfig {
            command: Some(music_server_bin().display().to_string()),
            cwd: Some(repo_root()),
            ..McpServerConfig::default()
        },
    );
    tweak(&mut config);
    let assistant = Assistant::start(&config, Input::Speech).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = voxloop::device::server::serve(
        listener,
        &config,
        Some(assistant.clone()),
        std::future::pending(),
    );
    tokio::spawn(async move { serve.await.unwrap() });
    (addr, requests, assistant)
}

async fn device(addr: SocketAddr, version: ProtocolVersion) -> Socket {
    device_with(addr, version, false).await
}

async fn device_with(addr: SocketAddr, version: ProtocolVersion, mcp: bool) -> Socket {
    let mut request = format!("ws://{addr}/xiaozhi/v1/")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "protocol-version",
        version.number().to_string().parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .unwrap();
    let hello = json!({"type": "hello", "version": version.number(), "transport": "websocket",
        "features": {"mcp": mcp},
        "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}});
    socket.send(Message::text(hello.to_string())).await.unwrap();
    let reply = next(&mut socket).await;
    assert!(
        matches!(reply, Event::Json(ref v) if v["type"] == "hello"),
        "{reply:?}"
    );
    socket
}

/// The spoken command as the firmware sends it: 16 kHz mono Opus in 60 ms frames, then 1.2 s
/// of silence for the server's VAD to end the turn.
fn command_frames(name: &str) -> Vec<Vec<u8>> {
    let mut samples = read_wav(&repo_root().join("assets/speech").join(name));
    samples.extend(vec![0.0; 16_000 * 6 / 5]);
    let mut encoder = FrameEncoder::new(16_000, 1, 60).unwrap();
    let mut frames = encoder.push(&samples).unwrap();
    frames.extend(encoder.finish().unwrap());
    frames
}

/// `listen start` in `mode` (auto, manual or realtime).
async fn listen_start(socket: &mut Socket, mode: &str) {
    let listen = json!({"type": "listen", "state": "start", "mode": mode});
    socket
        .send(Message::text(listen.to_string()))
        .await
        .unwrap();
}

/// A message's `text`, lower case (what whisper heard, to compare with the spoken command).
fn heard(message: &Value) -> String {
    message["text"].as_str().unwrap_or_default().to_lowercase()
}

/// `listen start` in auto mode, then the spoken command's frames.
async fn say(socket: &mut Socket, version: ProtocolVersion, name: &str) {
    listen_start(socket, "auto").await;
    for frame in command_frames(name) {
        socket
            .send(Message::binary(version.encode_opus(&frame, 0)))
            .await
            .unwrap();
    }
}

#[derive(Debug)]
enum Event {
    Json(Value),
    Opus(Vec<u8>),
}

async fn next(socket: &mut Socket) -> Event {
    next_framed(socket, ProtocolVersion::V1).await
}

async fn next_framed(socket: &mut Socket, version: ProtocolVersion) -> Event {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a message within 30 s")
            .expect("the socket is open")
            .unwrap();
        match message {
            Message::Text(text) => return Event::Json(serde_json::from_str(&text).unwrap()),
            Message::Binary(bytes) => match version.decode(&bytes).unwrap() {
                BinaryFrame::Opus(packet) => return Event::Opus(packet),
                BinaryFrame::Json(text) => {
                    return Event::Json(serde_json::from_str(&text).unwrap());
                }
            },
            _ => continue,
        }
    }
}

const REPLY: &str = "It is ten o'clock in the morning. Is there anything else?";

#[tokio::test]
async fn a_spoken_command_gets_stt_and_a_paced_spoken_reply_in_every_version() {
    let addr = serve(REPLY).await;
    for version in [
        ProtocolVersion::V1,
        ProtocolVersion::V2,
        ProtocolVersion::V3,
    ] {
        let mut socket = device(addr, version).await;
        say(&mut socket, version, "cmd_what_time.wav").await;
        let mut texts = Vec::new();
        let mut frames: Vec<(Instant, Vec<u8>)> = Vec::new();
        loop {
            match next_framed(&mut socket, version).await {
                Event::Json(v) => {
                    let done = v["type"] == "tts" && v["state"] == "stop";
                    texts.push(v);
                    if done {
                        break;
                    }
                }
                Event::Opus(packet) => frames.push((Instant::now(), packet)),
            }
        }
        let kinds: Vec<String> = texts
            .iter()
            .map(|v| {
                format!(
                    "{} {}",
                    v["type"].as_str().unwrap(),
                    v["state"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(kinds[0], "stt ", "{texts:?}");
        assert!(heard(&texts[0]).contains("what time"), "{texts:?}");
        // The reply's mood for the display (the firmware expects one with each reply).
        assert_eq!(kinds[1], "llm ", "{texts:?}");
        assert_eq!(texts[1]["emotion"], "neutral");
        assert_eq!(kinds[2], "tts start", "{texts:?}");
        assert_eq!(kinds.last().unwrap(), "tts stop");
        let sentences: Vec<&str> = texts
            .iter()
            .filter(|v| v["state"] == "sentence_start")
            .map(|v| v["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            sentences,
            [
                "It is ten o'clock in the morning.",
                "Is there anything else?"
            ]
        );
        // The frames decode to speech, about as long as espeak-ng's (a few seconds).
        let mut decoder = FrameDecoder::new(24_000, 1).unwrap();
        let mut pcm = Vec::new();
        for (_, packet) in &frames {
            pcm.extend(decoder.decode(packet).unwrap().samples);
        }
        let seconds = pcm.len() as f64 / 24_000.0;
        assert!((2.0..10.0).contains(&seconds), "{seconds} s of reply");
        let rms = (pcm.iter().map(|s| (*s as f64).powi(2)).sum::<f64>() / pcm.len() as f64).sqrt();
        assert!(rms > 0.01, "rms {rms}");
        // Paced: frame i never arrives more than the lead (120 ms) plus one frame (60 ms) ahead
        // of real time, counted from the first frame.
        let first = frames[0].0;
        for (i, (at, _)) in frames.iter().enumerate() {
            let due_ms = i as f64 * 60.0;
            let arrived_ms = at.duration_since(first).as_secs_f64() * 1000.0;
            assert!(
                due_ms - arrived_ms <= 180.0,
                "frame {i} arrived at {arrived_ms:.0} ms, {:.0} ms ahead",
                due_ms - arrived_ms
            );
        }
        // And not in a burst: the reply took about its own duration to arrive.
        let span = frames.last().unwrap().0.duration_since(first).as_secs_f64();
        assert!(
            span > seconds - 0.3,
            "{span} s to send {seconds} s of audio"
        );
    }
}

#[tokio::test]
async fn abort_stops_the_frames_within_one_frame_time() {
    const LONG: &str = "Once upon a time there was a small speaker on a kitchen shelf. \
        It told long stories every evening. It knew the names of all the stars. \
        It sang to the plants when nobody was home. It was a very patient speaker.";
    let addr = serve(LONG).await;
    let mut socket = device(addr, ProtocolVersion::V3).await;
    say(&mut socket, ProtocolVersion::V3, "cmd_what_time.wav").await;
    let mut received = 0;
    while received < 10 {
        if let Event::Opus(_) = next_framed(&mut socket, ProtocolVersion::V3).await {
            received += 1;
        }
    }
    socket
        .send(Message::text(
            r#"{"type":"abort","reason":"wake_word_detected"}"#,
        ))
        .await
        .unwrap();
    let aborted = Instant::now();
    let mut late = Vec::new();
    loop {
        match next_framed(&mut socket, ProtocolVersion::V3).await {
            Event::Opus(_) => late.push(aborted.elapsed()),
            Event::Json(v) if v["type"] == "tts" && v["state"] == "stop" => break,
            Event::Json(_) => {}
        }
    }
    // Frames already on the wire may still arrive; none is sent a frame time after the abort
    // (60 ms, with 40 ms for the loopback and the scheduler).
    assert!(
        late.iter().all(|d| *d <= Duration::from_millis(100)),
        "frames after the abort at {late:?}"
    );
    assert!(aborted.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_corrupt_opus_packet_gets_an_alert_and_the_session_goes_on() {
    let addr = serve(REPLY).await;
    let mut socket = device(addr, ProtocolVersion::V1).await;
    listen_start(&mut socket, "auto").await;
    // Code 3 (several frames) with a frame count of 0: no valid Opus packet (RFC 6716 3.2.5).
    socket
        .send(Message::binary(vec![0x03, 0x00]))
        .await
        .unwrap();
    let Event::Json(alert) = next(&mut socket).await else {
        panic!("expected an alert");
    };
    assert_eq!(alert["type"], "alert");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("undecodable Opus packet"),
        "{alert}"
    );
    // The same session still hears the command.
    say(&mut socket, ProtocolVersion::V1, "cmd_what_time.wav").await;
    loop {
        if let Event::Json(v) = next(&mut socket).await
            && v["type"] == "stt"
        {
            assert!(heard(&v).contains("what time"), "{v}");
            break;
        }
    }
}

#[tokio::test]
async fn manual_mode_ends_the_turn_at_listen_stop() {
    let addr = serve(REPLY).await;
    let mut socket = device(addr, ProtocolVersion::V2).await;
    listen_start(&mut socket, "manual").await;
    // The command without its trailing silence: only listen stop can end the turn.
    let frames = command_frames("cmd_what_time.wav");
    for frame in &frames[..frames.len() - 20] {
        socket
            .send(Message::binary(ProtocolVersion::V2.encode_opus(frame, 0)))
            .await
            .unwrap();
    }
    socket
        .send(Message::text(r#"{"type":"listen","state":"stop"}"#))
        .await
        .unwrap();
    let Event::Json(stt) = next_framed(&mut socket, ProtocolVersion::V2).await else {
        panic!("expected stt");
    };
    assert_eq!(stt["type"], "stt");
    assert!(heard(&stt).contains("what time"), "{stt}");
}

#[tokio::test]
async fn a_manual_turn_without_listen_stop_is_heard_at_the_utterance_cap() {
    let addr = serve_with(vec![Reply::Words(REPLY)], |c| c.vad.max_utterance_ms = 2000)
        .await
        .0;
    let mut socket = device(addr, ProtocolVersion::V1).await;
    listen_start(&mut socket, "manual").await;
    // The command (1.3 s and 1.2 s of silence) and never `listen stop`: the server hears what
    // it has at 2 s instead of buffering without end.
    let frames = command_frames("cmd_what_time.wav");
    for frame in &frames {
        socket
            .send(Message::binary(ProtocolVersion::V1.encode_opus(frame, 0)))
            .await
            .unwrap();
    }
    loop {
        if let Event::Json(v) = next(&mut socket).await
            && v["type"] == "stt"
        {
            assert!(heard(&v).contains("what time"), "{v}");
            break;
        }
    }
}

/// The device's side of device-side MCP, as the xiaozhi-esp32 firmware answers: `initialize`,
/// `tools/list` in two pages (a `nextCursor` after the first), and `tools/call` (answered with
/// `true`, as the firmware's set_volume does, unless `answer_calls` is false). Returns the
/// calls' params, and `{cancelled: requestId}` for a `notifications/cancelled`.
async fn device_mcp(socket: &mut Socket, payload: &Value, answer_calls: bool) -> Option<Value> {
    let id = payload.get("id").cloned();
    let result = match payload["method"].as_str().unwrap() {
        "initialize" => {
            assert_eq!(payload["params"]["protocolVersion"], "2024-11-05");
            json!({"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                "serverInfo": {"name": "xiaozhi-simulator", "version": "1.0"}})
        }
        "notifications/initialized" => {
            assert!(id.is_none());
            return None;
        }
        "tools/list" if payload["params"].get("cursor").is_none() => json!({
            "tools": [{"name": "self.get_device_status", "description": "The device's status.",
                "inputSchema": {"type": "object", "properties": {}}}],
            "nextCursor": "self.audio_speaker.set_volume",
        }),
        "tools/list" => {
            assert_eq!(payload["params"]["cursor"], "self.audio_speaker.set_volume");
            json!({"tools": [{"name": "self.audio_speaker.set_volume",
                "description": "Set the speaker's volume.",
                "inputSchema": {"type": "object", "required": ["volume"], "properties":
                    {"volume": {"type": "integer", "minimum": 0, "maximum": 100}}}}]})
        }
        "tools/call" => {
            if answer_calls {
                let result =
                    json!({"content": [{"type": "text", "text": "true"}], "isError": false});
                let answer = json!({"type": "mcp", "payload":
                    {"jsonrpc": "2.0", "id": id, "result": result}});
                socket
                    .send(Message::text(answer.to_string()))
                    .await
                    .unwrap();
            }
            // rmcp asks for progress with `_meta.progressToken` (MCP "Progress"); the firmware
            // ignores it.
            let mut params = payload["params"].clone();
            params.as_object_mut().unwrap().remove("_meta");
            return Some(params);
        }
        // A call given up on (timeout, barge-in) is followed by its cancellation.
        "notifications/cancelled" => {
            assert!(id.is_none());
            return Some(json!({"cancelled": payload["params"]["requestId"]}));
        }
        other => panic!("unexpected device MCP method {other}"),
    };
    let answer = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": id, "result": result}});
    socket
        .send(Message::text(answer.to_string()))
        .await
        .unwrap();
    None
}

/// Answers the server's device-side MCP discovery: until the last `tools/list` page is sent.
/// Returns the `initialize` request's params.
async fn answer_discovery(socket: &mut Socket) -> Value {
    let mut methods = Vec::new();
    let mut initialize = Value::Null;
    while methods.len() < 4 {
        let Event::Json(v) = next(socket).await else {
            panic!("audio before the device's tools were listed");
        };
        assert_eq!(v["type"], "mcp", "{v}");
        methods.push(v["payload"]["method"].as_str().unwrap().to_string());
        if v["payload"]["method"] == "initialize" {
            initialize = v["payload"]["params"].clone();
        }
        device_mcp(socket, &v["payload"], true).await;
    }
    assert_eq!(
        methods,
        [
            "initialize",
            "notifications/initialized",
            "tools/list",
            "tools/list"
        ]
    );
    initialize
}

/// Until `tts stop`: answers device MCP; returns the tool calls' params and the sentences.
async fn converse_with_mcp(socket: &mut Socket, answer_calls: bool) -> (Vec<Value>, Vec<String>) {
    let (mut calls, mut sentences) = (Vec::new(), Vec::new());
    loop {
        match next(socket).await {
            Event::Json(v) if v["type"] == "mcp" => {
                calls.extend(device_mcp(socket, &v["payload"], answer_calls).await);
            }
            Event::Json(v) if v["type"] == "tts" && v["state"] == "sentence_start" => {
                sentences.push(v["text"].as_str().unwrap().to_string());
            }
            Event::Json(v) if v["type"] == "tts" && v["state"] == "stop" => break,
            // voxloop's `tool` messages go only to clients that ask (the browser page).
            Event::Json(v) if v["type"] == "tool" => panic!("a device got {v}"),
            _ => {}
        }
    }
    (calls, sentences)
}

#[tokio::test]
async fn the_llm_calls_the_devices_own_tools_over_device_side_mcp() {
    let replies = vec![
        Reply::Call(
            "device_self_audio_speaker_set_volume",
            json!({"volume": 30}),
        ),
        Reply::Words("The volume is now thirty percent."),
    ];
    let (addr, requests) = serve_with(replies, |_| {}).await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    // A notification from the device (no id) is accepted: the session goes on.
    let note = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "method": "notifications/message",
        "params": {"level": "info", "data": "booted"}}});
    socket.send(Message::text(note.to_string())).await.unwrap();
    answer_discovery(&mut socket).await;
    say(&mut socket, ProtocolVersion::V1, "cmd_set_volume_30.wav").await;
    let (calls, sentences) = converse_with_mcp(&mut socket, true).await;
    assert_eq!(
        calls,
        [json!({"name": "self.audio_speaker.set_volume", "arguments": {"volume": 30}})]
    );
    assert_eq!(sentences, ["The volume is now thirty percent."]);
    let requests = requests.lock().unwrap().clone();
    // Both pages of device tools were offered beside the music server's.
    let offered: Vec<&str> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    for name in [
        "device_self_get_device_status",
        "device_self_audio_speaker_set_volume",
        "musicPlayer",
    ] {
        assert!(offered.contains(&name), "{name} not in {offered:?}");
    }
    // One volume: the device's speaker; voxloop's own PCM gain is not offered beside it.
    assert!(!offered.contains(&"set_volume"), "{offered:?}");
    let request = requests[0]["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(request.contains("volume"), "{request}");
    // The device's answer went back to the LLM as the tool message.
    let tool_message = requests[1]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(tool_message["role"], "tool");
    assert_eq!(tool_message["content"], "true");
}

#[tokio::test]
async fn a_volume_request_sets_the_devices_own_speaker_without_the_model() {
    let replies = vec![Reply::Words("The model should not be asked.")];
    let (addr, requests) = serve_with(replies, |c| c.llm.builtin_intents = true).await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    answer_discovery(&mut socket).await;
    say(&mut socket, ProtocolVersion::V1, "cmd_set_volume_30.wav").await;
    let (calls, sentences) = converse_with_mcp(&mut socket, true).await;
    // One volume for the model and the user: the device's speaker, not voxloop's PCM gain.
    assert_eq!(
        calls,
        [json!({"name": "self.audio_speaker.set_volume", "arguments": {"volume": 30}})]
    );
    assert!(sentences.is_empty(), "{sentences:?}");
    assert!(requests.lock().unwrap().is_empty(), "the model was asked");
}

#[tokio::test]
async fn a_device_tool_call_without_an_answer_times_out_and_the_llm_hears_why() {
    let replies = vec![
        Reply::Call(
            "device_self_audio_speaker_set_volume",
            json!({"volume": 30}),
        ),
        Reply::Words("Sorry, the speaker did not respond."),
    ];
    let (addr, requests) = serve_with(replies, |c| c.device.mcp_request_timeout_ms = 300).await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    answer_discovery(&mut socket).await;
    say(&mut socket, ProtocolVersion::V1, "cmd_set_volume_30.wav").await;
    let (calls, sentences) = converse_with_mcp(&mut socket, false).await;
    // The call, then its cancellation once the server gave up on it.
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["name"], "self.audio_speaker.set_volume");
    assert!(calls[1]["cancelled"].is_number(), "{calls:?}");
    assert_eq!(sentences, ["Sorry, the speaker did not respond."]);
    let requests = requests.lock().unwrap().clone();
    let tool_message = requests[1]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let content = tool_message["content"].as_str().unwrap();
    assert!(
        content.contains("did not answer tools/call within 300 ms"),
        "{content}"
    );
}

#[tokio::test]
async fn listen_detect_text_is_a_request_unless_it_is_the_wake_word() {
    let (addr, requests) = serve_with(vec![Reply::Words("Here you go.")], |_| {}).await;
    let mut socket = device(addr, ProtocolVersion::V3).await;
    let detect = |text: &str| {
        Message::text(json!({"type": "listen", "state": "detect", "text": text}).to_string())
    };
    socket.send(detect("你好小智")).await.unwrap();
    socket.send(detect("Hey, voxloop!")).await.unwrap();
    socket.send(detect("Tell me a joke")).await.unwrap();
    let Event::Json(stt) = next_framed(&mut socket, ProtocolVersion::V3).await else {
        panic!("expected stt");
    };
    assert_eq!(stt["type"], "stt");
    assert_eq!(stt["text"], "Tell me a joke");
    loop {
        if let Event::Json(v) = next_framed(&mut socket, ProtocolVersion::V3).await
            && v["type"] == "tts"
            && v["state"] == "stop"
        {
            break;
        }
    }
    // Only the request reached the LLM.
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let last = requests[0]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["content"], "Tell me a joke");
}

/// An OpenAI-compatible vision endpoint: answers "A red mug on a desk." and keeps the requests.
async fn scripted_vision() -> (String, Arc<Mutex<Vec<Value>>>) {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(body.0);
                axum::Json(json!({"choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "A red mug on a desk."}}]}))
            }
        }),
    );
    (format!("{}/v1", serve_loopback(router).await), requests)
}

/// A multipart body as the firmware's camera sends it: `question`, then the image as `file`.
fn camera_form(question: &str, image: Option<Vec<u8>>) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new().text("question", question.to_string());
    if let Some(image) = image {
        let part = reqwest::multipart::Part::bytes(image)
            .file_name("camera.jpg")
            .mime_str("image/jpeg")
            .unwrap();
        form = form.part("file", part);
    }
    form
}

#[tokio::test]
async fn the_camera_posts_to_the_vision_endpoint_announced_in_initialize() {
    let (vision_url, vision_requests) = scripted_vision().await;
    let (addr, _) = serve_with(vec![Reply::Words("Hello.")], |c| {
        c.vision.url = vision_url;
        c.vision.model = "scripted-vision".into();
        c.vision.max_image_bytes = 1 << 20;
    })
    .await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    let initialize = answer_discovery(&mut socket).await;
    let url = initialize["capabilities"]["vision"]["url"]
        .as_str()
        .unwrap()
        .to_string();
    let token = initialize["capabilities"]["vision"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(url, format!("http://{addr}/xiaozhi/vision/explain"));
    let http = reqwest::Client::new();
    let jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4, 0xff, 0xd9];
    let post = |token: Option<&str>, form: reqwest::multipart::Form| {
        let mut request = http.post(&url).multipart(form);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = post(
        Some(&token),
        camera_form("What is on the desk?", Some(jpeg.clone())),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["success"], true);
    assert_eq!(answer["response"], "A red mug on a desk.");
    let sent = vision_requests.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "scripted-vision");
    let content = &sent["messages"][0]["content"];
    assert_eq!(content[0]["text"], "What is on the desk?");
    assert!(
        content[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/jpeg;base64,/9j/"),
        "{sent}"
    );
    // Bad input: a clear 4xx each, and the session is not disturbed.
    let (status, answer) = post(None, camera_form("x", Some(jpeg.clone()))).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(Some("vxv_made_up"), camera_form("x", Some(jpeg.clone()))).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(Some(&token), camera_form("x", None)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("no image"),
        "{answer}"
    );
    let (status, answer) = post(Some(&token), camera_form("x", Some(vec![7u8; 20 << 20]))).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(vision_requests.lock().unwrap().len(), 1);
    socket
        .send(Message::text(
            json!({"type": "listen", "state": "detect", "text": "hello there"}).to_string(),
        ))
        .await
        .unwrap();
    let (_, sentences) = converse_with_mcp(&mut socket, true).await;
    assert_eq!(sentences, ["Hello."]);
    // The token dies with the session.
    socket.close(None).await.unwrap();
    drop(socket);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = post(Some(&token), camera_form("x", Some(jpeg))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn without_a_vision_model_the_camera_gets_a_clear_503() {
    let (addr, _) = serve_with(vec![Reply::Words("Hello.")], |_| {}).await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    let initialize = answer_discovery(&mut socket).await;
    let vision = &initialize["capabilities"]["vision"];
    let response = reqwest::Client::new()
        .post(vision["url"].as_str().unwrap())
        .bearer_auth(vision["token"].as_str().unwrap())
        .multipart(camera_form("x", Some(vec![0xff, 0xd8, 0xff, 0xd9])))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("[vision] url"),
        "{answer}"
    );
}

#[tokio::test]
async fn playing_a_track_shows_its_title_as_the_sentence() {
    let replies = vec![
        Reply::Call("musicPlayer", json!({"query": "horizon"})),
        Reply::Words("Enjoy."),
    ];
    let (addr, _) = serve_with(replies, |_| {}).await;
    let mut socket = ask_for_the_track(addr).await;
    let title = loop {
        if let Event::Json(v) = next(&mut socket).await
            && v["type"] == "tts"
            && v["state"] == "sentence_start"
        {
            break v["text"].as_str().unwrap().to_string();
        }
    };
    assert!(title.to_lowercase().contains("horizon"), "{title}");
    let abort = json!({"type": "abort", "reason": "wake_word_detected"});
    socket.send(Message::text(abort.to_string())).await.unwrap();
}

/// What a smart speaker does with its music: the wake word (`abort` with its reason) pauses the
/// track for the request, a volume change says nothing, and the track goes on; a button's
/// `abort` (no reason) ends it, and the next request does not bring it back.
#[tokio::test]
async fn the_wake_word_pauses_music_for_a_request_and_a_button_abort_ends_it() {
    let replies = vec![
        Reply::Call("musicPlayer", json!({"query": "horizon"})),
        Reply::Words("The model should not be asked."),
    ];
    let (addr, requests) = serve_with(replies, |c| c.llm.builtin_intents = true).await;
    let mut socket = ask_for_the_track(addr).await;
    let playing = frames_within(&mut socket, Duration::from_secs(2)).await;
    assert!(playing > 10, "{playing} frames of the track in 2 s");

    let louder = || json!({"type": "listen", "state": "detect", "text": "Set the volume to thirty percent."});
    for (abort, goes_on) in [
        (
            json!({"type": "abort", "reason": "wake_word_detected"}),
            true,
        ),
        (json!({"type": "abort"}), false),
    ] {
        socket.send(Message::text(abort.to_string())).await.unwrap();
        // Frames already on the wire, and the request.
        tokio::time::sleep(Duration::from_millis(200)).await;
        socket
            .send(Message::text(louder().to_string()))
            .await
            .unwrap();
        let frames = frames_within(&mut socket, Duration::from_secs(2)).await;
        if goes_on {
            // 60 ms frames: most of 2 s of the track, at the new volume.
            assert!(frames > 15, "{frames} frames in 2 s after the wake word");
        } else {
            assert_eq!(frames, 0, "the track came back after a button abort");
        }
    }
    // The volume was the built-in intent's (it says nothing): the model was asked only for
    // the track.
    assert_eq!(requests.lock().unwrap().len(), 1);
}

/// Opus frames that arrive within `window` (messages are read and skipped).
async fn frames_within(socket: &mut Socket, window: Duration) -> usize {
    let end = tokio::time::Instant::now() + window;
    let mut frames = 0;
    while let Ok(Some(message)) = tokio::time::timeout_at(end, socket.next()).await {
        if matches!(message.unwrap(), Message::Binary(_)) {
            frames += 1;
        }
    }
    frames
}

/// A device that has asked for "just over the horizon" by text.
async fn ask_for_the_track(addr: SocketAddr) -> Socket {
    let mut socket = device(addr, ProtocolVersion::V1).await;
    let detect = json!({"type": "listen", "state": "detect", "text": "play just over the horizon"});
    socket
        .send(Message::text(detect.to_string()))
        .await
        .unwrap();
    socket
}

/// Reads until an `alert` whose message names `key`; everything before it is skipped.
async fn alert_naming(socket: &mut Socket, key: &str) -> String {
    loop {
        if let Event::Json(v) = next(socket).await
            && v["type"] == "alert"
        {
            let message = v["message"].as_str().unwrap().to_string();
            if message.contains(key) {
                return message;
            }
        }
    }
}

#[tokio::test]
async fn a_device_over_its_tool_caps_gets_alerts_and_only_its_first_tools_are_offered() {
    let (addr, requests) = serve_with(vec![Reply::Words("Hello.")], |c| {
        c.device.mcp_max_tools = 3;
        c.device.mcp_max_tool_bytes = 1024;
    })
    .await;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    // The device offers a 10 KB tool, then ten small ones, in one page.
    let tool = |name: String, description: String| json!({"name": name, "description": description, "inputSchema": {"type": "object"}});
    let mut tools = vec![tool("self.huge".into(), "x".repeat(10_000))];
    tools.extend((0..10).map(|i| tool(format!("self.small_{i}"), "A small tool.".into())));
    let mut alerts = Vec::new();
    while alerts.len() < 2 {
        let Event::Json(v) = next(&mut socket).await else {
            continue;
        };
        let (method, id) = (v["payload"]["method"].as_str(), v["payload"]["id"].clone());
        let result = match (v["type"].as_str(), method) {
            (Some("alert"), _) => {
                alerts.push(v["message"].as_str().unwrap().to_string());
                continue;
            }
            (Some("mcp"), Some("initialize")) => json!({"protocolVersion": "2024-11-05",
                "capabilities": {"tools": {}}, "serverInfo": {"name": "hostile", "version": "1"}}),
            (Some("mcp"), Some("tools/list")) => json!({"tools": tools}),
            _ => continue,
        };
        let answer =
            json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": id, "result": result}});
        socket
            .send(Message::text(answer.to_string()))
            .await
            .unwrap();
    }
    alerts.sort();
    assert!(
        alerts[0].contains("over 1024 bytes (device.mcp_max_tool_bytes)"),
        "{alerts:?}"
    );
    assert!(
        alerts[1].contains("more than 3 tools (device.mcp_max_tools)"),
        "{alerts:?}"
    );
    // The next turn offers the model the first three small tools and nothing else of the device's.
    let detect = json!({"type": "listen", "state": "detect", "text": "hello there"});
    socket
        .send(Message::text(detect.to_string()))
        .await
        .unwrap();
    loop {
        if let Event::Json(v) = next(&mut socket).await
            && v["type"] == "tts"
            && v["state"] == "stop"
        {
            break;
        }
    }
    let requests = requests.lock().unwrap().clone();
    let offered: Vec<String> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .filter(|n| n.starts_with("device_"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        offered,
        [
            "device_self_small_0",
            "device_self_small_1",
            "device_self_small_2"
        ]
    );
}

#[tokio::test]
async fn a_device_past_its_mcp_byte_cap_gets_an_alert_and_the_session_goes_on() {
    let addr = serve_with(vec![Reply::Words("Still here.")], |c| {
        c.device.mcp_max_session_bytes = 4096;
    })
    .await
    .0;
    let mut socket = device_with(addr, ProtocolVersion::V1, true).await;
    let note = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "method": "notifications/message",
        "params": {"level": "info", "data": "y".repeat(1500)}}});
    for _ in 0..4 {
        socket.send(Message::text(note.to_string())).await.unwrap();
    }
    let message = alert_naming(&mut socket, "device.mcp_max_session_bytes").await;
    assert!(message.contains("your tools are off"), "{message}");
    // The conversation itself goes on.
    let detect = json!({"type": "listen", "state": "detect", "text": "are you there"});
    socket
        .send(Message::text(detect.to_string()))
        .await
        .unwrap();
    let said = loop {
        if let Event::Json(v) = next(&mut socket).await
            && v["type"] == "tts"
            && v["state"] == "sentence_start"
        {
            break v["text"].as_str().unwrap().to_string();
        }
    };
    assert_eq!(said, "Still here.");
}

#[tokio::test]
async fn a_message_flood_is_dropped_with_an_alert_while_another_session_keeps_playing() {
    let replies = vec![
        Reply::Call("musicPlayer", json!({"query": "horizon"})),
        Reply::Words("Enjoy."),
    ];
    let (addr, _) = serve_with(replies, |c| c.device.max_messages_per_s = 20).await;
    // One device plays a track.
    let mut player = device(addr, ProtocolVersion::V1).await;
    let detect = json!({"type": "listen", "state": "detect", "text": "play just over the horizon"});
    player
        .send(Message::text(detect.to_string()))
        .await
        .unwrap();
    while !matches!(next(&mut player).await, Event::Opus(_)) {}
    // Another floods the server with 2000 `listen start` messages.
    let mut flooder = device(addr, ProtocolVersion::V1).await;
    let listen = json!({"type": "listen", "state": "start", "mode": "auto"}).to_string();
    for _ in 0..2000 {
        flooder.send(Message::text(listen.clone())).await.unwrap();
    }
    let message = alert_naming(&mut flooder, "device.max_messages_per_s").await;
    assert!(
        message.contains("more than 20 messages a second"),
        "{message}"
    );
    // The player still gets its frames at real-time pace: 2 s of them within 2.5 s.
    let started = Instant::now();
    let mut frames = 0;
    while frames < 33 {
        if let Event::Opus(_) = next(&mut player).await {
            frames += 1;
        }
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{frames} frames"
        );
    }
    // The flooder's session is still open: after the flood, its messages are taken again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let detect = json!({"type": "listen", "state": "detect", "text": "hello"});
    flooder
        .send(Message::text(detect.to_string()))
        .await
        .unwrap();
    loop {
        if let Event::Json(v) = next(&mut flooder).await
            && v["type"] == "stt"
        {
            assert_eq!(v["text"], "hello");
            break;
        }
    }
}

#[tokio::test]
async fn an_utterance_that_waits_too_long_for_whisper_hears_the_busy_answer() {
    // No wait at all: two devices speaking at once cannot both have whisper.
    let (addr, _) = serve_with(vec![Reply::Words(REPLY)], |c| c.asr.max_wait_ms = 0).await;
    let mut first = device(addr, ProtocolVersion::V1).await;
    let mut second = device(addr, ProtocolVersion::V1).await;
    tokio::join!(
        say(&mut first, ProtocolVersion::V1, "cmd_what_time.wav"),
        say(&mut second, ProtocolVersion::V1, "cmd_what_time.wav"),
    );
    /// The first sentence the device hears, and whether an `stt` came before it.
    async fn first_sentence(socket: &mut Socket) -> (String, bool) {
        let mut heard = false;
        loop {
            if let Event::Json(v) = next(socket).await {
                heard |= v["type"] == "stt";
                if v["type"] == "tts" && v["state"] == "sentence_start" {
                    return (v["text"].as_str().unwrap().to_string(), heard);
                }
            }
        }
    }
    let (a, b) = tokio::join!(first_sentence(&mut first), first_sentence(&mut second));
    let mut answers = [a, b];
    answers.sort_by_key(|(_, heard)| !heard);
    // One was heard and answered; the other was told to ask again, without an stt.
    assert!(answers[0].1, "{answers:?}");
    assert_eq!(answers[0].0, "It is ten o'clock in the morning.");
    assert_eq!(
        answers[1],
        (voxloop::compute::BUSY_SENTENCE.to_string(), false),
        "{answers:?}"
    );
}

#[tokio::test]
async fn a_sentence_that_waits_too_long_for_kokoro_hears_the_busy_answer() {
    // Two sentences: `[llm] max_reply_sentences`' default.
    const REPLY: &str = "The first sentence is here. The second one ends it.";
    // Kokoro speaks (one sentence at a time) and no sentence may wait for another.
    let (addr, _) = serve_with(vec![Reply::Words(REPLY), Reply::Words(REPLY)], |c| {
        c.tts.provider = TtsProvider::Kokoro;
        c.tts.max_wait_ms = 0;
    })
    .await;
    let mut first = device(addr, ProtocolVersion::V1).await;
    let mut second = device(addr, ProtocolVersion::V1).await;
    let detect = json!({"type": "listen", "state": "detect", "text": "tell me two things"});
    let (a, b) = tokio::join!(
        first.send(Message::text(detect.to_string())),
        second.send(Message::text(detect.to_string())),
    );
    a.unwrap();
    b.unwrap();
    /// The sentences a device hears until `tts stop`.
    async fn sentences(socket: &mut Socket) -> Vec<String> {
        let mut said = Vec::new();
        loop {
            if let Event::Json(v) = next(socket).await
                && v["type"] == "tts"
            {
                match v["state"].as_str() {
                    Some("sentence_start") => said.push(v["text"].as_str().unwrap().to_string()),
                    Some("stop") => return said,
                    _ => {}
                }
            }
        }
    }
    let (a, b) = tokio::join!(sentences(&mut first), sentences(&mut second));
    let whole: Vec<String> = REPLY
        .split_inclusive(". ")
        .map(|s| s.trim().to_string())
        .collect();
    let mut heard = [a, b];
    heard.sort_by_key(|said| said.last() == Some(&voxloop::compute::BUSY_SENTENCE.to_string()));
    // One device heard the whole reply; the other, refused a turn at the voice, was told once
    // that the assistant is busy, and heard nothing of its reply after that.
    assert_eq!(heard[0], whole, "{heard:?}");
    let (busy, before) = heard[1].split_last().expect("a sentence");
    assert_eq!(busy, voxloop::compute::BUSY_SENTENCE, "{heard:?}");
    assert!(whole.starts_with(before), "{heard:?}");
}

/// A device that asks for the track: its first `n` Opus packets, and the device, still
/// playing.
async fn track_packets(
    addr: SocketAddr,
    n: usize,
    started: Option<tokio::sync::oneshot::Sender<()>>,
) -> (Vec<Vec<u8>>, Socket) {
    let mut socket = ask_for_the_track(addr).await;
    let mut started = started;
    let mut packets = Vec::new();
    while packets.len() < n {
        if let Event::Opus(packet) = next(&mut socket).await {
            packets.push(packet);
            if packets.len() == 5
                && let Some(started) = started.take()
            {
                let _ = started.send(());
            }
        }
    }
    (packets, socket)
}

/// RMS of the decoded packets.
fn decoded_rms(packets: &[Vec<u8>]) -> f32 {
    let mut decoder = FrameDecoder::new(24_000, 1).unwrap();
    let samples: Vec<f32> = packets
        .iter()
        .flat_map(|p| decoder.decode(p).unwrap().samples)
        .collect();
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt()
}

#[tokio::test]
async fn devices_playing_one_track_get_the_same_encoded_frames_and_another_gain_is_encoded_again() {
    let call = || vec![Reply::Call("musicPlayer", json!({"query": "horizon"}))];
    let (addr, _, assistant) = serve_assistant(call(), |_| {}).await;
    // The second device asks while the first plays: the track is decoded and encoded once.
    let (started, first_playing) = tokio::sync::oneshot::channel();
    let first = tokio::spawn(track_packets(addr, 40, Some(started)));
    first_playing.await.unwrap();
    let (second, _playing) = track_packets(addr, 40, None).await;
    let (first, _playing_too) = first.await.unwrap();
    assert_eq!(first, second, "the same packets, byte for byte");
    // One entry while both play: the second was a hit.
    assert_eq!(assistant.transcode.stats().entries, 1);
    assert!(assistant.transcode.stats().bytes > 0);
    // At 50 % the cached frames are decoded, the gain applied, and encoded again.
    let (quiet_addr, _) = serve_with(call(), |c| c.audio.device_volume = 50).await;
    let (quiet, _) = track_packets(quiet_addr, 40, None).await;
    assert_ne!(quiet[10..], first[10..]);
    let ratio = decoded_rms(&quiet[5..]) / decoded_rms(&first[5..]);
    let gain = voxloop::audio::convert::volume_gain(50);
    assert!(
        (ratio / gain - 1.0).abs() < 0.2,
        "level ratio {ratio}, gain {gain}"
    );
}
