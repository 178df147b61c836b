//! Helpers shared by the integration tests and benches: the built music server as a real child
//! process (stdio or streamable HTTP), loopback HTTP upstreams, and byte checks.
#![allow(dead_code)] // each test crate uses a different part

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use rmcp::ServiceExt as _;
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncBufReadExt as _;

pub type Client = RunningService<RoleClient, ()>;

/// The repository root (tests run with it as the current directory, but be explicit).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the bundled music library.
pub fn music_file(name: &str) -> PathBuf {
    repo_root().join("assets/music").join(name)
}

/// The local chat model's stall limit in the tests, in ms (`[llm] timeout_ms`): generous,
/// because the tests check what a model does, not how fast it does it (that is for the
/// benchmarks), and with every test in one process two models may share the 2 cores of CI, which
/// can hold a stream well past the 30 s default.
pub const TEST_LLM_TIMEOUT_MS: u64 = 300_000;

/// One at a time, the tests that run a chat model on every core (llama.cpp's server or
/// candle: the `local_llm` and `assistant` modules): with every test in one process, two of them
/// at once on CI's 2 cores starved each other until a stream paused past the 30 s stall limit
/// the CLI runs with. Hold the guard for the whole test.
static CHAT_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The chat-model slot, for an async test ([`CHAT_MODEL`]).
pub async fn chat_model_slot() -> tokio::sync::MutexGuard<'static, ()> {
    CHAT_MODEL.lock().await
}

/// The chat-model slot, for a test that is not async ([`CHAT_MODEL`]).
pub fn chat_model_slot_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    CHAT_MODEL.blocking_lock()
}

/// The music server binary (built from crates/mcp-audio by cargo for tests and benches).
pub fn music_server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcp_audio"))
}

/// The test fixture MCP server (tests/fixtures/mcp_fixture.rs), which cargo builds as an example
/// into `target/<profile>/examples/` (`cargo test` does; for benches, `cargo build --release
/// --example mcp_fixture`).
pub fn fixture_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("examples/mcp_fixture");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --example mcp_fixture` (add --release for benches)",
        bin.display()
    );
    bin
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `audio://music/{base64url(url)}`, as the music server names a track.
pub fn track_uri(url: &str) -> String {
    format!("audio://music/{}", BASE64URL.encode(url))
}

/// The music server over stdio, with `args`; its stderr (logs) is discarded unless `RUST_LOG`
/// is set.
pub async fn spawn_stdio(args: &[&str]) -> Client {
    let mut cmd = tokio::process::Command::new(music_server_bin());
    cmd.args(args).current_dir(repo_root());
    let stderr = if std::env::var_os("RUST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    let (transport, _) = TokioChildProcess::builder(cmd)
        .stderr(stderr)
        .spawn()
        .expect("spawn mcp_audio");
    ().serve(transport).await.expect("MCP handshake over stdio")
}

/// The music server over streamable HTTP on an ephemeral port: the process and its endpoint
/// URL (read from the one line it prints on stdout). The process is killed on drop.
pub async fn spawn_http_server(args: &[&str]) -> (tokio::process::Child, String) {
    let mut cmd = tokio::process::Command::new(music_server_bin());
    cmd.args(["--transport", "http", "--bind", "127.0.0.1:0"])
        .args(args)
        .current_dir(repo_root());
    mcp_endpoint_of(cmd).await
}

/// Starts `cmd`, a server that prints `MCP endpoint: URL` as its first line on stdout (the music
/// server and `voxloop duplex mcp --bind` do); the child (killed on drop) and the URL.
pub async fn mcp_endpoint_of(mut cmd: tokio::process::Command) -> (tokio::process::Child, String) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn the MCP server");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .expect("server printed its endpoint in time")
        .unwrap()
        .expect("a line on stdout");
    let url = line
        .strip_prefix("MCP endpoint: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// An rmcp client over streamable HTTP.
pub async fn connect_http(url: &str) -> Client {
    let transport = StreamableHttpClientTransport::from_uri(url.to_string());
    ().serve(transport).await.expect("MCP handshake over HTTP")
}

/// Serves `router` on an ephemeral loopback port; returns `http://127.0.0.1:PORT`.
pub async fn serve_loopback(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// Writes mono `samples` ([-1, 1]) at `rate` Hz as a 16-bit WAV file.
pub fn write_wav(path: &std::path::Path, rate: u32, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        writer
            .write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .unwrap();
    }
    writer.finalize().unwrap();
}

/// A home directory whose `.asoundrc` makes ALSA's default device the null device (plays and
/// records silence in real time), or, with `card: false`, a card that does not exist.
pub fn alsa_home(card: bool) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let config = if card {
        "pcm.!default { type plug slave.pcm \"nullpcm\" }\npcm.nullpcm { type null }\n"
    } else {
        "pcm.!default { type hw card 99 }\n"
    };
    std::fs::write(home.path().join(".asoundrc"), config).unwrap();
    home
}

/// A request counter for loopback upstreams.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicUsize>);

impl Hits {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A model file of `voxloop models` (`whisper-base`, `smollm2`), which must be present.
pub fn model_file(name: &str) -> PathBuf {
    let models = voxloop::models::spec(name).unwrap();
    let path = voxloop::models::model_path(models);
    assert!(
        path.exists(),
        "{} is missing: run `voxloop models fetch {name}` (scripts/test does)",
        path.display()
    );
    path
}

/// The samples of a 16-bit WAV file as f32 in -1..1 (interleaved if it has channels).
pub fn read_wav(path: &std::path::Path) -> Vec<f32> {
    hound::WavReader::open(path)
        .unwrap()
        .into_samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect()
}

/// A bundled track decoded as the playback queue plays it: 24 kHz mono.
pub fn track_at_24k(name: &str, mime: &str) -> Vec<f32> {
    let file = std::fs::File::open(music_file(name)).unwrap();
    let mut converter = voxloop::audio::convert::Converter::new(24_000, 1);
    let mut pcm = Vec::new();
    voxloop::audio::decode::decode(file, mime, &mut |block| {
        pcm.extend(converter.push(&block).unwrap());
        true
    })
    .unwrap();
    pcm.extend(converter.flush());
    pcm
}

/// Normalized cross-correlation of `a` and `b` at the best lag in `-max_lag..=max_lag`
/// (`b[i + lag]` against `a[i]`): the correlation and the lag.
pub fn best_correlation(a: &[f32], b: &[f32], max_lag: i64) -> (f64, i64) {
    let mut best = (f64::MIN, 0);
    for lag in -max_lag..=max_lag {
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..a.len() as i64 {
            let j = i + lag;
            if j < 0 || j >= b.len() as i64 {
                continue;
            }
            let (x, y) = (a[i as usize] as f64, b[j as usize] as f64);
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        let r = ab / (aa.sqrt() * bb.sqrt()).max(1e-12);
        if r > best.0 {
            best = (r, lag);
        }
    }
    best
}

/// A tiny random-weights PersonaPlex (the real structure and file layout) with the default
/// voice (`NATF2`) as a WAV, in a temporary directory.
#[allow(dead_code)]
pub fn tiny_duplex_model() -> tempfile::TempDir {
    use voxloop::duplex::arch::{Arch, write_random_model};
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &Arch::tiny(), 16, candle_core::DType::F32, 11).unwrap();
    let voices = dir.path().join("voices");
    std::fs::create_dir(&voices).unwrap();
    std::fs::copy(
        repo_root().join("assets/speech/cmd_stop_music.wav"),
        voices.join("NATF2.wav"),
    )
    .unwrap();
    dir
}

/// A config file in `dir` serving the duplex model in `model` on the CPU; its path.
#[allow(dead_code)]
pub fn duplex_config_file(
    dir: &std::path::Path,
    model: &std::path::Path,
    mut config: voxloop::config::Config,
) -> PathBuf {
    config.duplex.model_dir = Some(model.to_path_buf());
    config.duplex.device = "cpu".into();
    let file = dir.join("voxloop.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    file
}

/// One scripted LLM reply: streamed words, or one tool call.
#[derive(Clone)]
pub enum Reply {
    /// The reply's words, streamed word by word.
    Words(&'static str),
    /// One call of the named tool with these arguments.
    Call(&'static str, serde_json::Value),
}

/// An OpenAI-compatible endpoint: each request gets the next reply (the last one repeats);
/// the requests are kept.
pub async fn scripted_llm(
    replies: Vec<Reply>,
) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let (replies, seen) = (replies.clone(), seen.clone());
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(body.0);
                    seen.len()
                };
                let reply = replies[(n - 1).min(replies.len() - 1)].clone();
                let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
                    let chunk =
                        serde_json::json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                    format!("data: {chunk}\n\n")
                };
                let mut body = String::new();
                match reply {
                    Reply::Words(text) => {
                        for word in text.split_inclusive(' ') {
                            body.push_str(&chunk(serde_json::json!({"content": word}), serde_json::Value::Null));
                        }
                        body.push_str(&chunk(serde_json::json!({}), serde_json::json!("stop")));
                    }
                    Reply::Call(name, arguments) => {
                        let call = serde_json::json!({"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": name, "arguments": arguments.to_string()}});
                        body.push_str(&chunk(serde_json::json!({"tool_calls": [call]}), serde_json::Value::Null));
                        body.push_str(&chunk(serde_json::json!({}), serde_json::json!("tool_calls")));
                    }
                }
                body.push_str("data: [DONE]\n\n");
                (
                    [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                    body,
                )
            }
        }),
    );
    (format!("{}/v1", serve_loopback(router).await), requests)
}

/// A free loopback port (bound, then let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `voxloop serve`'s HTTP API over `hub` (and the duplex tools of `cohost`) on a loopback port,
/// with `config`'s auth and server sections; its base URL.
pub async fn serve_api(
    config: &voxloop::config::Config,
    hub: Arc<voxloop::tools::hub::ToolHub>,
    cohost: Option<voxloop::api::server::Cohost>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guard =
        voxloop::api::Guard::new(&config.auth, &config.server, &addr.to_string(), "api").unwrap();
    let checks = voxloop::api::server::Checks {
        ready_timeout: std::time::Duration::from_millis(config.tools.start_timeout_ms),
        ..Default::default()
    };
    let runtime =
        voxloop::api::server::Runtime::new(hub, cohost, guard, &config.server, checks, None);
    tokio::spawn(voxloop::api::server::serve(
        listener,
        runtime,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

/// The built `voxloop serve` with the configuration file `config` (logging at `warn`): the
/// process, and what it announced after each of `prefixes` (e.g. `"device server: "`), in that
/// order. Its stdout is read on after that, so that its later prints never fail.
pub async fn spawn_serve(
    config: &std::path::Path,
    prefixes: &[&str],
) -> (tokio::process::Child, Vec<String>) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        // Its own cache directory (the transcode cache's disk tier), beside its config.
        .env(
            "XDG_CACHE_HOME",
            config
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("cache"),
        )
        .env(
            "RUST_LOG",
            std::env::var("VOXLOOP_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("voxloop serve starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
    while found.iter().any(Option::is_none) {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("voxloop serve prints its addresses");
        for (prefix, slot) in prefixes.iter().zip(found.iter_mut()) {
            if let Some(rest) = line.strip_prefix(prefix) {
                *slot = Some(rest.to_string());
            }
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, found.into_iter().map(Option::unwrap).collect())
}

/// A `voxloop serve` configuration file's text: the device server at `device_bind` and the HTTP
/// API at `api_bind` (`127.0.0.1:0` for any free port), the device store in `dir`, the chat model
/// a scripted OpenAI-compatible endpoint at `llm_url`, espeak-ng, the bundled music server.
/// Further tables can follow it.
pub fn scripted_serve_toml(
    dir: &std::path::Path,
    llm_url: &str,
    device_bind: &str,
    api_bind: &str,
) -> String {
    format!(
        r#"[device]
bind = "{device_bind}"
store = "{store}"

[server]
bind = "{api_bind}"

[llm]
provider = "openai"
url = "{llm_url}"
model = "scripted"

[asr]
language = "en"

[tts]
provider = "espeak-ng"

[mcp_servers.music]
command = "{music}"
cwd = "{root}"
"#,
        store = dir.join("devices.json").display(),
        music = music_server_bin().display(),
        root = repo_root().display(),
    )
}

/// Opens an MCP session over raw streamable HTTP at `url` (`initialize`, then
/// `notifications/initialized`), with `key` as a bearer credential when given; its
/// `Mcp-Session-Id`.
pub async fn mcp_open_session(url: &str, key: Option<&str>) -> String {
    let initialize = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "1"}}
    });
    let response = mcp_request(url, key, None, &initialize).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = response.bytes().await;
    let initialized = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(mcp_post(url, key, &id, &initialized).await.status(), 202);
    id
}

/// A JSON-RPC message to MCP session `id` at `url`, with `key` as a bearer credential when
/// given.
pub async fn mcp_post(
    url: &str,
    key: Option<&str>,
    id: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    mcp_request(url, key, Some(id), body).await
}

async fn mcp_request(
    url: &str,
    key: Option<&str>,
    id: Option<&str>,
    body: &serde_json::Value,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2025-06-18")
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(id) = id {
        request = request.header("Mcp-Session-Id", id);
    }
    request.send().await.unwrap()
}

/// A scripted OpenAI-compatible endpoint for device benchmarks: a user request that starts
/// with "play " gets a `musicPlayer` call for the rest of its words; a tool's result gets
/// "Enjoy."; anything else "Hello there.". Returns its base URL (up to `/v1`).
pub async fn music_llm() -> String {
    use serde_json::{Value, json};
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: axum::Json<Value>| async move {
            let last = body.0["messages"].as_array().and_then(|m| m.last());
            let after_tool = last.is_some_and(|m| m["role"] == "tool");
            let text = last.and_then(|m| m["content"].as_str()).unwrap_or_default();
            let chunk = |delta: Value, finish: Value| {
                let chunk =
                    json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {chunk}\n\n")
            };
            let words = |said: &str| {
                chunk(json!({"content": said}), Value::Null) + &chunk(json!({}), json!("stop"))
            };
            let body = match text.strip_prefix("play ") {
                _ if after_tool => words("Enjoy."),
                Some(query) => {
                    let arguments = json!({"query": query}).to_string();
                    let call = json!({"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "musicPlayer", "arguments": arguments}});
                    chunk(json!({"tool_calls": [call]}), Value::Null)
                        + &chunk(json!({}), json!("tool_calls"))
                }
                None => words("Hello there."),
            } + "data: [DONE]\n\n";
            (
                [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                body,
            )
        }),
    );
    serve_loopback(router).await + "/v1"
}

/// A `voxloop serve` for device benchmarks in its own process: `sections` (TOML: `[llm]`,
/// `[asr]`, ...) then a device server taking any number of anonymous sessions, an HTTP API
/// without a per-address rate, and the bundled music server with `music_args`. The config file
/// and the device store go in `dir`. Returns the process and its device WebSocket URL.
pub async fn spawn_device_bench_server(
    dir: &std::path::Path,
    sections: &str,
    music_args: &[String],
) -> (tokio::process::Child, String) {
    let config = format!(
        r#"{sections}
[device]
bind = "127.0.0.1:0"
store = "{store}"
idle_timeout_ms = 600000
max_sessions = 5000
max_sessions_per_ip = 5000

[auth]
allow_anonymous = true

[server]
bind = "127.0.0.1:0"
rate_per_ip = 0

[mcp_servers.music]
command = "{music}"
cwd = "{root}"
args = {args:?}
"#,
        store = dir.join("devices.json").display(),
        music = music_server_bin().display(),
        root = repo_root().display(),
        args = music_args,
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).unwrap();
    let (child, mut found) = spawn_serve(&path, &["device server: "]).await;
    (child, found.remove(0))
}

/// TOML lines from the environment variable `name`, with `\n` written for line breaks (a
/// benchmark's extra config, e.g. `[llm]\nengine_threads = 1`).
pub fn extra_toml(name: &str) -> String {
    std::env::var(name).unwrap_or_default().replace("\\n", "\n")
}

/// A `/proc/PID/status` field as a number (`VmRSS:` in KiB, `Threads:`); NaN when absent.
pub fn proc_status(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Ids of `pid`'s child processes.
pub fn proc_children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
