//! The PersonaPlex co-host's surfaces on a tiny random-weights model (issue 8): the REST API and
//! the `/api/chat` WebSocket on real loopback sockets, and `voxloop duplex mcp` as a real child
//! process (stdio) and over streamable HTTP, through an rmcp client.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use futures_util::{SinkExt as _, StreamExt as _};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use voxloop::audio::oggopus::{OggOpusReader, OggOpusWriter};
use voxloop::duplex::SAMPLE_RATE;
use voxloop::duplex::arch::{Arch, write_random_model};
use voxloop::duplex::config::DuplexConfig;
use voxloop::duplex::engine::Engine;
use voxloop::duplex::service::Duplex;

fn speech(name: &str) -> std::path::PathBuf {
    common::repo_root().join("assets/speech").join(name)
}

/// A tiny model with voices: NATF2 as a `.pt` made from a recording, NATM1 as a WAV.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &Arch::tiny(), 16, DType::F32, 11).unwrap();
    let voices = dir.path().join("voices");
    std::fs::create_dir(&voices).unwrap();
    let mut engine = Engine::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let recording = voxloop::audio::decode::decode_file(
        &speech("cmd_stop_music.wav"),
        voxloop::duplex::SAMPLE_RATE,
    )
    .unwrap();
    engine
        .voice_embeddings(&recording)
        .unwrap()
        .write(&voices.join("NATF2.pt"))
        .unwrap();
    std::fs::copy(speech("cmd_set_volume_30.wav"), voices.join("NATM1.wav")).unwrap();
    dir
}

fn config(dir: &Path) -> DuplexConfig {
    DuplexConfig {
        model_dir: Some(dir.to_path_buf()),
        device: "cpu".into(),
        ..DuplexConfig::default()
    }
}

async fn rest_server(dir: &Path) -> (String, Arc<Duplex>) {
    let duplex = Duplex::start(&config(dir)).unwrap();
    // Nothing configured in [auth]: open to loopback callers (tests/serve.rs covers the auth).
    let guard = voxloop::api::Guard::new(
        &Default::default(),
        &Default::default(),
        "127.0.0.1:0",
        "duplex",
    )
    .unwrap();
    let router = voxloop::duplex::server::router(duplex.clone(), 8 << 20, guard);
    (common::serve_loopback(router).await, duplex)
}

/// A multipart/form-data body (RFC 7578) of text fields and one `file` part.
fn multipart(fields: &[(&str, &str)], file: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = "voxloop-test-boundary-7d2f";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .bytes(),
        );
    }
    if let Some(file) = file {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
            )
            .bytes(),
        );
        body.extend_from_slice(file);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_offline(
    base: &str,
    fields: &[(&str, &str)],
    file: Option<&[u8]>,
) -> reqwest::Response {
    let (content_type, body) = multipart(fields, file);
    reqwest::Client::new()
        .post(format!("{base}/api/offline"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn rest_endpoints_answer_and_offline_replies_as_long_as_the_input() {
    let dir = model_dir();
    let (base, _duplex) = rest_server(dir.path()).await;

    let health = get_json(&format!("{base}/health")).await;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["model_files_present"], true);
    let voices = get_json(&format!("{base}/api/voices")).await;
    assert_eq!(voices["voices"].as_array().unwrap().len(), 18);
    let prompts = get_json(&format!("{base}/api/prompts")).await;
    assert_eq!(prompts["prompts"].as_array().unwrap().len(), 3);
    let status = get_json(&format!("{base}/api/gpu/status")).await;
    assert_eq!(status["location"], "unloaded");

    // A 16 kHz WAV in, a 24 kHz WAV of the same duration out, the text in a header.
    let input = std::fs::read(speech("cmd_what_time.wav")).unwrap();
    // The input at 24 kHz, as long as the reply must be.
    let input_samples =
        voxloop::audio::decode::decode_file(&speech("cmd_what_time.wav"), SAMPLE_RATE)
            .unwrap()
            .len();
    let response = post_offline(
        &base,
        &[
            ("voice_prompt", "NATF2.pt"),
            ("text_prompt", "Be brief."),
            ("seed", "4"),
        ],
        Some(&input),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "audio/wav");
    let text: String =
        serde_json::from_str(response.headers()["x-text-output"].to_str().unwrap()).unwrap();
    let time: f64 = response.headers()["x-processing-time"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(time > 0.0);
    let wav = response.bytes().await.unwrap();
    let reader = hound::WavReader::new(&wav[..]).unwrap();
    assert_eq!(reader.spec().sample_rate, SAMPLE_RATE);
    assert_eq!(reader.duration() as usize, input_samples);
    // Same request, same seed: the same reply.
    let again = post_offline(
        &base,
        &[
            ("voice_prompt", "NATF2"),
            ("text_prompt", "Be brief."),
            ("seed", "4"),
        ],
        Some(&input),
    )
    .await;
    let again_text: String =
        serde_json::from_str(again.headers()["x-text-output"].to_str().unwrap()).unwrap();
    assert_eq!(again.bytes().await.unwrap(), wav);
    assert_eq!(again_text, text);

    let status = get_json(&format!("{base}/api/gpu/status")).await;
    assert_eq!(status["location"], "gpu", "{status}");
    assert_eq!(status["statistics"]["total_loads"], 1);

    // Bad input: a clear 400 each, and the server goes on.
    for (fields, file, needle) in [
        (vec![], None, "no `file` field"),
        (
            vec![],
            Some(&b"RIFF but not really audio"[..]),
            "the upload",
        ),
        (
            vec![("voice_prompt", "NOBODY")],
            Some(&input[..]),
            "unknown voice",
        ),
        (
            vec![("seed", "soon")],
            Some(&input[..]),
            "`seed` must be an integer",
        ),
    ] {
        let response = post_offline(&base, &fields, file).await;
        assert_eq!(response.status(), 400, "{needle}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "error");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    }

    let post = |path: &str| {
        let request = reqwest::Client::new().post(format!("{base}{path}")).send();
        async move { request.await.unwrap().json::<Value>().await.unwrap() }
    };
    let offload = post("/api/gpu/offload").await;
    assert_eq!(offload, json!({"status": "success", "location": "cpu"}));
    let release = post("/api/gpu/release").await;
    assert_eq!(release, json!({"status": "success", "released": true}));
    let status = get_json(&format!("{base}/api/gpu/status")).await;
    assert_eq!(status["location"], "unloaded");
    assert_eq!(
        status["statistics"],
        json!({"total_loads": 1, "gpu_to_cpu": 1, "cpu_to_gpu": 0, "full_releases": 1})
    );
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, query: &str) -> Socket {
    let url = format!("{}/api/chat?{query}", base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next message within 30 s.
async fn next(socket: &mut Socket) -> Option<Message> {
    tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .expect("a message in time")
        .map(Result::unwrap)
}

/// The close code the server ends with, skipping other messages; the `0x05` (error) text if any.
async fn close_code(socket: &mut Socket) -> (Option<CloseCode>, String) {
    let mut error = String::new();
    loop {
        match next(socket).await {
            Some(Message::Close(frame)) => return (frame.map(|f| f.code), error),
            Some(Message::Binary(data)) if data.first() == Some(&0x05) => {
                error = String::from_utf8_lossy(&data[1..]).into_owned();
            }
            Some(_) => {}
            None => return (None, error),
        }
    }
}

#[tokio::test]
async fn a_conversation_streams_ogg_opus_both_ways_and_a_second_one_is_busy() {
    let dir = model_dir();
    let (base, _duplex) = rest_server(dir.path()).await;
    let mut socket = connect(&base, "voice_prompt=NATM1&text_prompt=Be%20kind.&seed=3").await;
    assert_eq!(
        next(&mut socket).await,
        Some(Message::Binary(vec![0x00].into())),
        "the ready byte first"
    );

    // One conversation per model: a second socket is closed with 1013.
    let mut second = connect(&base, "").await;
    assert_eq!(close_code(&mut second).await.0, Some(CloseCode::Again));

    // The user's speech as an Ogg/Opus stream, sent in 80 ms pieces.
    let user =
        voxloop::audio::decode::decode_file(&speech("cmd_what_time.wav"), SAMPLE_RATE).unwrap();
    let mut writer = OggOpusWriter::new(SAMPLE_RATE, 20).unwrap();
    for chunk in user.chunks(1920) {
        let pages = writer.push(chunk).unwrap();
        if !pages.is_empty() {
            let mut message = vec![0x01];
            message.extend(pages);
            socket.send(Message::Binary(message.into())).await.unwrap();
        }
    }
    // Every whole 80 ms frame the server decoded gets an 80 ms reply.
    let frames = user.len() / 1920;
    let mut reader = OggOpusReader::new(SAMPLE_RATE);
    let mut reply = Vec::new();
    let mut text = String::new();
    while reply.len() < (frames - 1) * 1920 {
        match next(&mut socket).await {
            Some(Message::Binary(data)) => match data[0] {
                0x01 => reply.extend(reader.push(&data[1..]).unwrap()),
                0x02 => text.push_str(std::str::from_utf8(&data[1..]).unwrap()),
                other => panic!("unexpected kind {other}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    let rms = (reply.iter().map(|s| s * s).sum::<f32>() / reply.len() as f32).sqrt();
    assert!(rms > 1e-4, "silent reply, rms {rms}");
    assert!(reply.iter().all(|s| s.is_finite()));
    socket.close(None).await.unwrap();
    while let Some(Ok(_)) = socket.next().await {}

    // The model is free again: a new conversation starts.
    let mut third = connect(&base, "voice_prompt=NATF2").await;
    assert_eq!(
        next(&mut third).await,
        Some(Message::Binary(vec![0x00].into()))
    );
    third.close(None).await.unwrap();
}

#[tokio::test]
async fn bad_chat_requests_get_a_message_and_a_close_code() {
    let dir = model_dir();
    let (base, _duplex) = rest_server(dir.path()).await;
    let mut unknown = connect(&base, "voice_prompt=NOBODY").await;
    let (code, error) = close_code(&mut unknown).await;
    assert_eq!(code, Some(CloseCode::Policy));
    assert!(error.contains("unknown voice"), "{error}");

    // An Ogg stream that is not Opus.
    let mut socket = connect(&base, "").await;
    assert_eq!(
        next(&mut socket).await,
        Some(Message::Binary(vec![0x00].into()))
    );
    let mut pages = ogg::writing::PacketWriter::new(Vec::new());
    pages
        .write_packet(
            b"\x01vorbis".to_vec(),
            1,
            ogg::writing::PacketWriteEndInfo::EndStream,
            0,
        )
        .unwrap();
    let mut message = vec![0x01];
    message.extend(pages.into_inner());
    socket.send(Message::Binary(message.into())).await.unwrap();
    let (code, error) = close_code(&mut socket).await;
    assert_eq!(code, Some(CloseCode::Invalid));
    assert!(error.contains("not an Ogg/Opus stream"), "{error}");
}

/// `voxloop duplex mcp` over stdio, on the model in `dir`.
async fn mcp_stdio(dir: &Path) -> common::Client {
    use rmcp::ServiceExt as _;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"));
    cmd.args(["duplex", "mcp"])
        .env("PERSONAPLEX_MODEL_DIR", dir)
        .env_remove("VOXLOOP_CONFIG")
        .env_remove("GPU_IDLE_TIMEOUT")
        .current_dir(common::repo_root());
    let (transport, _) = rmcp::transport::TokioChildProcess::builder(cmd)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ().serve(transport).await.expect("MCP handshake")
}

async fn call(client: &common::Client, tool: &str, args: Value) -> (Value, bool) {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(args) = args {
        params = params.with_arguments(args);
    }
    let result = client.call_tool(params).await.expect("tools/call");
    (
        result.structured_content.expect("structured content"),
        result.is_error == Some(true),
    )
}

#[tokio::test]
async fn every_mcp_tool_answers_over_stdio() {
    let dir = model_dir();
    let client = mcp_stdio(dir.path()).await;
    let tools: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(tools, voxloop::duplex::mcp::TOOLS);

    let (health, _) = call(&client, "health_check", json!({})).await;
    assert_eq!(health["status"], "success");
    assert_eq!(health["model_files_present"], true);
    let (models, _) = call(&client, "list_available_models", json!({})).await;
    assert_eq!(models["models"][0]["id"], "nvidia/personaplex-7b-v1");
    assert_eq!(models["models"][0]["available"], true);
    let (voices, _) = call(&client, "list_voices", json!({})).await;
    assert_eq!(voices["voices"].as_array().unwrap().len(), 18);
    let (examples, _) = call(&client, "get_prompt_examples", json!({})).await;
    assert_eq!(examples["examples"].as_array().unwrap().len(), 3);

    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("reply.wav");
    let input = speech("cmd_play_horizon.wav");
    let (done, is_error) = call(
        &client,
        "process_audio",
        json!({"input_file": input, "output_file": output, "seed": 8}),
    )
    .await;
    assert!(!is_error, "{done}");
    assert_eq!(done["status"], "success");
    assert!(done["processing_time"].as_f64().unwrap() > 0.0);
    assert!(
        done["voice_used"]
            .as_str()
            .unwrap()
            .ends_with("voices/NATF2.pt")
    );
    let input_duration = {
        let r = hound::WavReader::open(&input).unwrap();
        f64::from(r.duration()) / f64::from(r.spec().sample_rate)
    };
    let written = hound::WavReader::open(&output).unwrap();
    assert_eq!(written.spec().sample_rate, SAMPLE_RATE);
    let seconds = f64::from(written.duration()) / f64::from(SAMPLE_RATE);
    assert!(
        (seconds - input_duration).abs() < 1e-3,
        "{seconds} vs {input_duration}"
    );
    assert_eq!(
        std::fs::read_to_string(output.with_extension("txt")).unwrap(),
        format!("{}\n", done["generated_text"].as_str().unwrap())
    );

    let (status, _) = call(&client, "get_gpu_status", json!({})).await;
    assert_eq!(status["status"], "success");
    assert_eq!(status["location"], "gpu");
    assert_eq!(status["idle_timeout"], 300);
    let (timeout, _) = call(
        &client,
        "update_gpu_timeout",
        json!({"timeout_seconds": 60}),
    )
    .await;
    assert_eq!(timeout["status"], "success");
    let (status, _) = call(&client, "get_gpu_status", json!({})).await;
    assert_eq!(status["idle_timeout"], 60);
    let (offloaded, _) = call(&client, "offload_gpu", json!({})).await;
    assert_eq!(offloaded["location"], "cpu");
    let (released, _) = call(&client, "release_gpu", json!({})).await;
    assert_eq!(released["released"], true);

    // Bad input: a `status: "error"` result naming the cause, and the server goes on.
    let not_audio = out.path().join("notes.wav");
    std::fs::write(&not_audio, "these are words, not audio").unwrap();
    for (tool, args, needle) in [
        (
            "update_gpu_timeout",
            json!({"timeout_seconds": -5}),
            "out of range",
        ),
        (
            "update_gpu_timeout",
            json!({"timeout_seconds": 10_000_000}),
            "out of range",
        ),
        (
            "update_gpu_timeout",
            json!({"timeout_seconds": "soon"}),
            "must be an integer",
        ),
        (
            "process_audio",
            json!({"input_file": "/no/such.wav", "output_file": output}),
            "input file not found",
        ),
        (
            "process_audio",
            json!({"input_file": not_audio, "output_file": output}),
            "notes.wav",
        ),
        (
            "process_audio",
            json!({"input_file": input, "output_file": output, "voice_prompt": "NOBODY"}),
            "unknown voice",
        ),
        (
            "process_audio",
            json!({"input_file": input, "output_file": "/no/such/dir/out.wav"}),
            "does not exist",
        ),
    ] {
        let (result, is_error) = call(&client, tool, args).await;
        assert!(is_error, "{tool}: {result}");
        assert_eq!(result["status"], "error");
        let error = result["error"].as_str().unwrap();
        assert!(error.contains(needle), "{tool}: {error:?} lacks {needle:?}");
    }
    let (health, _) = call(&client, "health_check", json!({})).await;
    assert_eq!(health["status"], "success");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn the_mcp_server_serves_streamable_http_with_bind() {
    let dir = model_dir();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"));
    cmd.args(["duplex", "mcp", "--bind", "127.0.0.1:0"])
        .env("PERSONAPLEX_MODEL_DIR", dir.path())
        .env_remove("VOXLOOP_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = line.strip_prefix("MCP endpoint: ").unwrap();
    let client = common::connect_http(url).await;
    let (health, _) = call(&client, "health_check", json!({})).await;
    assert_eq!(health["status"], "success");
    let (voices, _) = call(&client, "list_voices", json!({})).await;
    assert_eq!(voices["voices"][2]["id"], "NATF2");
    client.cancel().await.unwrap();
}
