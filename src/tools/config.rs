//! `[tools]` and `[mcp_servers.NAME]`: the tool hub's limits (calls, paged media, terminal
//! rules, ARCHITECTURE §2-§3) and the MCP servers it connects to, each checking itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

use super::paging::MAX_PAGE_BYTES;
use crate::breaker::BreakerConfig;

/// `[tools]`: limits of the tool hub. Every duration is in milliseconds, every size in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// Time for one tool call; on expiry the call is cancelled (`notifications/cancelled`).
    pub call_timeout_ms: u64,
    /// Time for a server to start and finish the MCP handshake.
    pub start_timeout_ms: u64,
    /// `tools/list` pages read at most per server (a server that keeps sending cursors is cut
    /// off there; a repeated cursor stops at once).
    pub list_max_pages: u32,
    /// Longest message (one JSON-RPC line) read from a stdio MCP server, bytes; a longer one is
    /// dropped and the request that waited for it fails naming this limit.
    pub max_message_bytes: usize,
    /// Wait before restarting a server that died, doubled after each failed start, at most 30 s.
    pub restart_backoff_ms: u64,
    /// Bytes asked for per `resources/read` page of paged audio (ARCHITECTURE §3).
    pub page_bytes: u64,
    /// Pages requested ahead of the one being consumed (0: strictly one at a time).
    pub prefetch: usize,
    /// Time for one page.
    pub page_timeout_ms: u64,
    /// Retries of a page that timed out or failed on the server's side, with doubling backoff.
    pub page_retries: u32,
    /// First retry backoff.
    pub page_retry_backoff_ms: u64,
    /// Bytes one media item may stream at most (a resource that never sends `[DONE]` stops here).
    pub max_media_bytes: u64,
    /// Pages one media item may stream at most.
    pub max_media_pages: u64,
    /// Tool rounds per turn before a spoken fallback (ARCHITECTURE §2, rule 5).
    pub max_tool_rounds: u32,
    /// Call the LLM again after media started playing (ARCHITECTURE §2, rule 2).
    pub continue_after_media: bool,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            call_timeout_ms: 60_000,
            max_message_bytes: 16 << 20,
            start_timeout_ms: 30_000,
            list_max_pages: 50,
            restart_backoff_ms: 1_000,
            page_bytes: crate::tools::paging::DEFAULT_PAGE_BYTES,
            prefetch: 2,
            page_timeout_ms: 30_000,
            page_retries: 2,
            page_retry_backoff_ms: 250,
            max_media_bytes: 512 * 1024 * 1024,
            max_media_pages: 100_000,
            max_tool_rounds: 5,
            continue_after_media: false,
        }
    }
}

impl ToolsConfig {
    /// Checks every `[tools]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `tools.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "tools.max_message_bytes",
            self.max_message_bytes,
            1_024..=1_073_741_824,
            "bytes",
        )?;
        in_range(
            "tools.call_timeout_ms",
            self.call_timeout_ms,
            1..=3_600_000,
            "milliseconds",
        )?;
        in_range(
            "tools.start_timeout_ms",
            self.start_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range(
            "tools.list_max_pages",
            self.list_max_pages,
            1..=10_000,
            "pages",
        )?;
        in_range(
            "tools.restart_backoff_ms",
            self.restart_backoff_ms,
            1..=30_000,
            "milliseconds",
        )?;
        in_range(
            "tools.page_bytes",
            self.page_bytes,
            1..=MAX_PAGE_BYTES,
            "bytes (512 KiB at most, ARCHITECTURE §3)",
        )?;
        in_range("tools.prefetch", self.prefetch, 0..=8, "pages")?;
        in_range(
            "tools.page_timeout_ms",
            self.page_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range("tools.page_retries", self.page_retries, 0..=10, "retries")?;
        in_range(
            "tools.page_retry_backoff_ms",
            self.page_retry_backoff_ms,
            0..=60_000,
            "milliseconds",
        )?;
        in_range(
            "tools.max_media_bytes",
            self.max_media_bytes,
            1..=(64 << 30),
            "bytes",
        )?;
        in_range(
            "tools.max_media_pages",
            self.max_media_pages,
            1..=100_000_000,
            "pages",
        )?;
        in_range(
            "tools.max_tool_rounds",
            self.max_tool_rounds,
            1..=50,
            "rounds",
        )?;
        Ok(())
    }
}

/// One MCP server, in the shape MCP hosts use: a child process spoken to over stdio (`command`,
/// `args`, `env`, `cwd`), or a streamable HTTP endpoint (`url`, `headers`, `bearer_token_env`).
/// Exactly one of `command` and `url` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpServerConfig {
    /// Program to start (stdio transport).
    pub command: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables added to voxloop's own for the child.
    pub env: BTreeMap<String, String>,
    /// Working directory of the child (default: voxloop's).
    pub cwd: Option<PathBuf>,
    /// Streamable HTTP endpoint, e.g. `http://127.0.0.1:3001/mcp`.
    pub url: Option<String>,
    /// Extra HTTP headers sent with every request.
    pub headers: BTreeMap<String, String>,
    /// Name of an environment variable holding a bearer token for `Authorization`.
    pub bearer_token_env: Option<String>,
}

impl McpServerConfig {
    /// Checks that exactly one transport is given and that its settings make sense.
    ///
    /// # Errors
    /// [`InvalidSetting`] naming `mcp_servers.NAME.KEY`.
    pub fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let invalid = |key: &str, value: String, allowed: &str| InvalidSetting {
            key: format!("mcp_servers.{name}{key}"),
            value,
            allowed: allowed.to_string(),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "",
                format!("{name:?}"),
                "a server name of letters, digits, '_' and '-'",
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) | (None, None) => Err(invalid(
                "",
                "a table".into(),
                "exactly one of `command` (stdio) and `url` (streamable HTTP)",
            )),
            (Some(command), None) if command.trim().is_empty() => {
                Err(invalid(".command", "\"\"".into(), "a program name or path"))
            }
            (Some(_), None) if !self.headers.is_empty() || self.bearer_token_env.is_some() => {
                Err(invalid(
                    ".headers",
                    "set".into(),
                    "`headers` and `bearer_token_env` only with `url`",
                ))
            }
            (None, Some(url)) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                Err(invalid(
                    ".url",
                    format!("{url:?}"),
                    "an http:// or https:// URL",
                ))
            }
            (None, Some(_))
                if !self.args.is_empty() || !self.env.is_empty() || self.cwd.is_some() =>
            {
                Err(invalid(
                    ".args",
                    "set".into(),
                    "`args`, `env` and `cwd` only with `command`",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// What the tool hub starts from (`ToolHub::start`): the sections of the config file it reads,
/// borrowed (`Config::hub` gives them).
#[derive(Debug, Clone, Copy)]
pub struct HubSettings<'a> {
    /// `[mcp_servers.NAME]`; empty: the bundled music server.
    pub servers: &'a BTreeMap<String, McpServerConfig>,
    /// `[tools]`.
    pub tools: &'a ToolsConfig,
    /// `[breaker]`: one breaker per server.
    pub breaker: &'a BreakerConfig,
    /// The config file, passed to the bundled music server so that it reads the same `[music]`.
    pub config_file: Option<&'a Path>,
}
