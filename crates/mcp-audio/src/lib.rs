//! The music player MCP server: tools `musicPlayer` and `set_volume`, and the library's audio
//! as paged resources (`{uri}?start=S&end=E` until a `[DONE]` blob, [`voxloop_paging`]).
//!
//! Scans a music library (its files are read from disk by the server itself, never through a
//! URL a client could aim elsewhere), and answers MCP over stdio (default) or streamable HTTP
//! at `/mcp`:
//!
//! ```text
//! cargo run --bin mcp_audio                                   # stdio
//! cargo run --bin mcp_audio -- --transport http --bind 127.0.0.1:3001
//! ```
//!
//! Settings come from the `[music]` section of the voxloop config file; flags override it.
//! Logs go to stderr (`RUST_LOG`), never stdout.

#![warn(missing_docs)]

mod catalog;
pub mod config;
mod server;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use rmcp::ServiceExt as _;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::config::MusicConfig;
use crate::server::MusicServer;
use crate::upstream::Upstream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// JSON-RPC lines on stdin/stdout.
    Stdio,
    /// Streamable HTTP at `/mcp`.
    Http,
}

/// Music player MCP server: tools musicPlayer and set_volume, audio served as paged resources.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// voxloop config file; its `[music]` section sets the defaults below.
    #[arg(long, env = "VOXLOOP_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "stdio")]
    transport: Transport,
    /// Address for --transport http [config: music.http_bind, default 127.0.0.1:3001].
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Music library directory [config: music.library, default assets/music].
    #[arg(long)]
    library: Option<PathBuf>,
    /// TOML file of remote tracks [config: music.catalog].
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Allow an upstream host: a name or IP address, optionally with `:port` (repeatable)
    /// [config: music.allow_hosts]. Nothing else is read, loopback included; a listed name
    /// that resolves to an internal address is refused unless that address is listed too.
    #[arg(long = "allow-host")]
    allow_hosts: Vec<String>,
    /// Accept a browser Origin besides loopback ones (repeatable) [config: music.allowed_origins].
    #[arg(long = "allow-origin")]
    allowed_origins: Vec<String>,
    /// Upstream request time limit in ms [config: music.upstream_timeout_ms, default 30000].
    #[arg(long)]
    upstream_timeout_ms: Option<u64>,
    /// Largest page a client may ask for, in bytes [config: music.max_page_bytes, default 524288].
    #[arg(long)]
    max_page_bytes: Option<u64>,
}

impl Args {
    /// The `[music]` settings: config file (or defaults), then these flags on top, checked.
    fn music_config(&self) -> anyhow::Result<MusicConfig> {
        let mut config =
            MusicConfig::load(self.config.as_deref()).context("invalid configuration")?;
        let m = &mut config;
        if let Some(bind) = self.bind {
            m.http_bind = bind;
        }
        if let Some(library) = &self.library {
            m.library = library.clone();
        }
        if let Some(catalog) = &self.catalog {
            m.catalog = Some(catalog.clone());
        }
        m.allow_hosts.extend(self.allow_hosts.iter().cloned());
        m.allowed_origins
            .extend(self.allowed_origins.iter().cloned());
        if let Some(ms) = self.upstream_timeout_ms {
            m.upstream_timeout_ms = ms;
        }
        if let Some(bytes) = self.max_page_bytes {
            m.max_page_bytes = bytes;
        }
        config.validate().context("invalid option")?;
        Ok(config)
    }
}

/// The `mcp_audio` command: parses its arguments, loads the library and serves MCP until stdin
/// closes (stdio) or Ctrl-C (HTTP). Logs go to stderr, filtered by `RUST_LOG`.
///
/// # Errors
/// A bad option or `[music]` value, an unreadable library or catalog, a port that cannot be
/// bound, or a failed stdio handshake.
pub fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    // One thread is plenty: the work is I/O and a base64 encode per page, and a voxloop session
    // runs one such child process per music server.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

/// Human-readable log lines on stderr (stdout carries MCP in stdio mode), `RUST_LOG` or `info`.
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,symphonia=error,rmcp=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = args.music_config()?;

    let (mut tracks, files) = catalog::scan_library(&config.library)?;
    let mut allow_hosts = config.allow_hosts.clone();
    if let Some(path) = &config.catalog {
        let remote = catalog::load_remote_catalog(path)?;
        // The operator listed these tracks, so their hosts (with their ports) are allowed.
        allow_hosts.extend(remote.iter().filter_map(|t| {
            let host = t.url.host_str()?;
            // An IPv6 host comes bracketed, so `[::1]:80` parses as a socket address.
            Some(match t.url.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            })
        }));
        tracks.extend(remote);
    }
    tracing::info!(
        library = %config.library.display(),
        tracks = tracks.len(),
        "music catalog ready"
    );

    let upstream = Upstream::new(
        &allow_hosts,
        files,
        Duration::from_millis(config.upstream_timeout_ms),
    )?;
    let server = MusicServer::new(
        tracks,
        upstream,
        config.max_page_bytes,
        config.list_page_size,
    );

    match args.transport {
        Transport::Stdio => {
            let service = server
                .serve(rmcp::transport::stdio())
                .await
                .context("MCP stdio handshake")?;
            service.waiting().await?;
        }
        Transport::Http => serve_http(server, &config).await?,
    }
    Ok(())
}

/// Streamable HTTP at `/mcp` until Ctrl-C. The `Origin` header, when present, must be a
/// loopback origin or one from `allowed_origins` (MCP transports spec, "Security Warning":
/// servers must validate Origin to prevent DNS rebinding).
async fn serve_http(server: MusicServer, config: &MusicConfig) -> anyhow::Result<()> {
    let mut origins: Vec<String> = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
        .map(String::from)
        .to_vec();
    origins.extend(config.allowed_origins.iter().cloned());
    let http_config = StreamableHttpServerConfig::default()
        .with_allowed_origins(origins)
        .enforce_origin_validation();
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(voxloop_mcp_sessions::BoundedSessions::new(
            config.max_sessions,
            std::time::Duration::from_secs(config.session_idle_s),
        )),
        http_config,
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(config.http_bind)
        .await
        .with_context(|| format!("binding {}", config.http_bind))?;
    let addr = listener.local_addr()?;
    // The one line on stdout in HTTP mode, for scripts and tests that bound port 0.
    println!("MCP endpoint: http://{addr}/mcp");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
