//! `voxloop tools ...`: the configured MCP servers and built-in tools, listed and called.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use voxloop::config::Config;
use voxloop::media::{MediaStream, file_extension, mime_matches, sniff_container};
use voxloop::tools::hub::ToolHub;
use voxloop::tools::terminal::decide;

#[derive(Debug, Subcommand)]
pub(crate) enum ToolsCommand {
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

pub(crate) async fn run(config: &Config, command: &ToolsCommand) -> anyhow::Result<ExitCode> {
    let hub = ToolHub::start(config.hub()).await;
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
pub(crate) async fn drain(
    media: &mut MediaStream,
    index: usize,
    dir: Option<&Path>,
) -> anyhow::Result<Value> {
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
