//! `voxloop duplex ...`: the PersonaPlex co-host (files, its server, its MCP tools, test models).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::announce;
use super::bind_tcp;
use voxloop::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum DuplexCommand {
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

pub(crate) fn run(config: &Config, command: &DuplexCommand) -> anyhow::Result<ExitCode> {
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
            let recording = voxloop::audio::decode::decode_file(voice, duplex::SAMPLE_RATE)
                .with_context(|| format!("reading {}", voice.display()))?;
            let mut model = engine::Engine::load(&dir, &settings.device, settings.dtype)?;
            let embeddings = model.voice_embeddings(&recording)?;
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
            let pcm = voxloop::audio::decode::decode_file(input, SAMPLE_RATE)
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

pub(crate) async fn serve(config: &Config, bind: Option<&str>) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn mcp(config: &Config, bind: Option<&str>) -> anyhow::Result<ExitCode> {
    use rmcp::ServiceExt as _;
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
        std::sync::Arc::new(config.server.mcp_sessions()),
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
