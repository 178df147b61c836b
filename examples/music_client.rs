//! A real MCP client for the music player server: asks `musicPlayer` for a song and streams the
//! linked audio resource page by page into a file.
//!
//! ```text
//! cargo build --release --bins --example music_client
//! target/release/examples/music_client "just over the horizon"            # spawns mcp_audio (stdio)
//! target/release/examples/music_client horizon --url http://127.0.0.1:3001/mcp
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use rmcp::ServiceExt as _;
use rmcp::model::CallToolRequestParams;
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use voxloop::media::file_extension;
use voxloop::tools::paging::{PagingLimits, read_paged};

/// Ask the music player MCP server for a song and download it page by page.
#[derive(Debug, Parser)]
struct Args {
    /// Words of the title, artist or file name.
    #[arg(default_value = "just over the horizon")]
    query: String,
    /// Connect to a streamable HTTP server instead of spawning `mcp_audio` over stdio.
    #[arg(long)]
    url: Option<String>,
    /// The music server binary to spawn (default: `mcp_audio` in the parent of this example's
    /// directory, where cargo puts it).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Page size in KiB (1..=512).
    #[arg(long, default_value_t = 100)]
    page_kib: u64,
    /// Where to write the audio (default: out/<title>.<ext>).
    #[arg(long)]
    output: Option<PathBuf>,
}

async fn connect(args: &Args) -> anyhow::Result<RunningService<RoleClient, ()>> {
    if let Some(url) = &args.url {
        let transport = StreamableHttpClientTransport::from_uri(url.clone());
        return ().serve(transport).await.with_context(|| format!("connecting to {url}"));
    }
    let server = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("locating mcp_audio")?
            .join("mcp_audio"),
    };
    let transport = TokioChildProcess::new(tokio::process::Command::new(&server))
        .with_context(|| format!("starting {}", server.display()))?;
    ().serve(transport)
        .await
        .with_context(|| format!("MCP handshake with {}", server.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    voxloop::init_logging();
    let args = Args::parse();
    let client = connect(&args).await?;
    if let Some(server) = client.peer_info().and_then(|info| info.server_info.clone()) {
        println!("server: {} {}", server.name, server.version);
    }
    for tool in client.list_tools(None).await?.tools {
        println!(
            "tool:   {} - {}",
            tool.name,
            tool.description.unwrap_or_default()
        );
    }
    for template in client
        .list_resource_templates(None)
        .await?
        .resource_templates
    {
        println!("template: {}", template.uri_template);
    }

    let request = CallToolRequestParams::new("musicPlayer")
        .with_arguments(json!({"query": args.query}).as_object().unwrap().clone());
    let result = client.call_tool(request).await?;
    let Some(link) = result.content.iter().find_map(|c| c.as_resource_link()) else {
        let text: Vec<String> = result
            .content
            .iter()
            .filter_map(|c| c.as_text())
            .map(|t| t.text.clone())
            .collect();
        bail!(
            "musicPlayer {:?} linked no audio: {}",
            args.query,
            text.join(" ")
        );
    };
    let mime = link.mime_type.clone().unwrap_or_default();
    println!(
        "musicPlayer {:?} -> {:?} ({}, {} bytes)\n  {}",
        args.query,
        link.description.as_deref().unwrap_or(&link.name),
        mime,
        link.size.map_or("?".into(), |s| s.to_string()),
        link.uri
    );

    let output = args.output.clone().unwrap_or_else(|| {
        let stem: String = link
            .name
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("out").join(format!("{stem}.{}", file_extension(&mime)))
    });
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(&output)?);
    let mut hash = Sha256::new();
    let mut write_error = None;
    let limits = PagingLimits {
        page_bytes: args.page_kib * 1024,
        page_timeout: Duration::from_secs(30),
        ..PagingLimits::default()
    };
    let started = Instant::now();
    let summary = read_paged(client.peer(), &link.uri, limits, |bytes| {
        hash.update(bytes);
        if let Err(e) = file.write_all(bytes) {
            write_error.get_or_insert(e);
        }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(e) = write_error {
        return Err(e).with_context(|| format!("writing {}", output.display()));
    }
    file.flush()?;
    let sha: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "read {} pages, {} bytes in {:.3} s ({:.1} MB/s) -> {}\n  sha256 {sha}",
        summary.pages,
        summary.bytes,
        elapsed,
        summary.bytes as f64 / elapsed / 1e6,
        output.display()
    );

    let volume = CallToolRequestParams::new("set_volume")
        .with_arguments(json!({"volume": 30}).as_object().unwrap().clone());
    let action = client.call_tool(volume).await?;
    println!(
        "set_volume 30 -> {}",
        action.structured_content.unwrap_or_default()
    );
    client.cancel().await?;
    Ok(())
}
