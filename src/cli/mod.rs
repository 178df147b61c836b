//! The `voxloop` command line: the clap tree and the dispatch; one module per command group.

mod admin;
mod assistant;
mod audio;
mod duplex;
mod models;
mod serve;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use admin::AuthCommand;
use admin::DevicesCommand;
use admin::devices;
use assistant::chat;
use assistant::listen;
use assistant::run;
use audio::play;
use audio::say;
use audio::transcribe;
use duplex::DuplexCommand;
use models::ModelsCommand;
use tools::ToolsCommand;
use voxloop::config::Config;

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

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    if let Some(path) = &cli.mcp_config {
        config
            .add_mcp_json(path)
            .context("invalid MCP server file")?;
    }
    Ok(config)
}

pub fn main() -> anyhow::Result<ExitCode> {
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
            runtime.block_on(tools::run(&config, command))
        }
        Command::Models(command) => models::run(command),
        Command::Auth(AuthCommand::NewKey { name, role }) => admin::new_key(name, role),
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
            runtime.block_on(duplex::serve(&config, bind.as_deref()))
        }
        Command::Duplex(DuplexCommand::Mcp { bind }) => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(duplex::mcp(&config, bind.as_deref()))
        }
        Command::Duplex(command) => {
            let config = load_config(&cli)?;
            duplex::run(&config, command)
        }
        Command::Serve => {
            let config = load_config(&cli)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve::run(config))
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

/// A listener on `bind`, or an error naming it.
pub(crate) async fn bind_tcp(bind: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))
}

/// Prints a line to stdout; a closed stdout (`serve | head -1`) must not stop a server.
pub(crate) fn announce(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
