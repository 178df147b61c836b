//! One MCP server as the hub sees it: started (a child process over stdio, or a streamable HTTP
//! session), restarted with backoff when it dies, its tools listed with a bounded pager, and
//! tools called with a timeout and cancellation.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use rmcp::ServiceExt as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, JsonObject, PaginatedRequestParams, Tool,
};
use rmcp::service::{Peer, RoleClient, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, ReadBuf};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::tools::config::{McpServerConfig, ToolsConfig};

/// The longest wait between restarts of a server that keeps dying.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Why talking to an MCP server failed. Each message names the server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The server could not be started or did not complete the MCP handshake.
    #[error("MCP server `{server}` could not start: {reason}")]
    Start {
        /// The MCP server's name in the config.
        server: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The server is down and its restart is backing off.
    #[error("MCP server `{server}` is down; next restart in {} ms", wait.as_millis())]
    BackingOff {
        /// The MCP server's name in the config.
        server: String,
        /// How long until the next restart is tried.
        wait: Duration,
    },
    /// The call took longer than its time limit and was cancelled.
    #[error("MCP server `{server}`: `{tool}` took longer than {} ms and was cancelled", timeout.as_millis())]
    Timeout {
        /// The MCP server's name in the config.
        server: String,
        /// The tool called.
        tool: String,
        /// The time limit that passed.
        timeout: Duration,
    },
    /// A message from the server was longer than the cap.
    #[error(
        "MCP server `{server}`: its answer to `{tool}` was a line of {bytes} bytes, over the {max}-byte limit ([tools] max_message_bytes), and was dropped"
    )]
    Oversized {
        /// The MCP server's name in the config.
        server: String,
        /// The tool called.
        tool: String,
        /// The line's length as far as it was read.
        bytes: u64,
        /// The cap in bytes (`[tools] max_message_bytes`).
        max: usize,
    },
    /// The call was cancelled (barge-in).
    #[error("MCP server `{server}`: `{tool}` was cancelled")]
    Cancelled {
        /// The MCP server's name in the config.
        server: String,
        /// The tool called.
        tool: String,
    },
    /// The server exited or hung up.
    #[error("MCP server `{server}` closed the connection (it exited or hung up)")]
    Closed {
        /// The MCP server's name in the config.
        server: String,
    },
    /// Any other rmcp error.
    #[error("MCP server `{server}`: {source}")]
    Service {
        /// The MCP server's name in the config.
        server: String,
        /// rmcp's error.
        #[source]
        source: ServiceError,
    },
}

type Client = RunningService<RoleClient, ()>;

/// A started server: the MCP client, and the child process of a stdio server (killed when
/// this is dropped).
struct Running {
    client: Client,
    _child: Option<tokio::process::Child>,
}

/// The stdout of a stdio server, measured line by line: a line over `max` bytes (which rmcp's
/// transport drops, so that its request would only time out) is noted in `oversized`, for the
/// error of the request that waited for it.
struct LineMeter<R> {
    inner: R,
    line: u64,
    max: u64,
    oversized: Arc<AtomicU64>,
    server: String,
}

impl<R: AsyncRead + Unpin> AsyncRead for LineMeter<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            for &byte in &buf.filled()[before..] {
                if byte == b'\n' {
                    if this.line > this.max {
                        tracing::warn!(server = %this.server, bytes = this.line, max = this.max, "MCP server sent a message over [tools] max_message_bytes; dropped");
                        this.oversized.store(this.line, Ordering::Relaxed);
                    }
                    this.line = 0;
                } else {
                    this.line += 1;
                }
            }
        }
        poll
    }
}

/// A started session of a server: its peer, and which start it came from.
#[derive(Clone)]
pub struct Session {
    /// Sends requests to the server.
    pub peer: Peer<RoleClient>,
    generation: u64,
}

struct State {
    client: Option<Running>,
    /// Counts starts, so that a stale [`Session`] cannot tear down a newer one.
    generation: u64,
    /// Failed starts in a row, for the backoff.
    failures: u32,
    last_failure: Option<Instant>,
}

/// A connection to one configured MCP server.
pub struct Connection {
    name: String,
    config: McpServerConfig,
    start_timeout: Duration,
    call_timeout: Duration,
    restart_backoff: Duration,
    list_max_pages: u32,
    /// Longest line read from a stdio server (`[tools] max_message_bytes`).
    max_message_bytes: usize,
    /// The length of the last oversized line a stdio server sent, 0 when none since the last
    /// error that reported one.
    oversized: Arc<AtomicU64>,
    state: Mutex<State>,
}

impl Connection {
    /// A connection that starts the server on first use ([`Connection::session`]).
    pub fn new(name: &str, config: McpServerConfig, tools: &ToolsConfig) -> Self {
        Self {
            name: name.to_string(),
            config,
            start_timeout: Duration::from_millis(tools.start_timeout_ms),
            call_timeout: Duration::from_millis(tools.call_timeout_ms),
            restart_backoff: Duration::from_millis(tools.restart_backoff_ms),
            list_max_pages: tools.list_max_pages,
            max_message_bytes: tools.max_message_bytes,
            oversized: Arc::default(),
            state: Mutex::new(State {
                client: None,
                generation: 0,
                failures: 0,
                last_failure: None,
            }),
        }
    }

    /// The server's name in the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A live session's peer: the running one, or a fresh start if the server is not running
    /// (never started, exited, or hung up). After a failed start, the next one waits
    /// `restart_backoff_ms`, doubling up to [`MAX_RESTART_BACKOFF`].
    ///
    /// # Errors
    /// [`ConnectionError::Start`] or, inside the backoff window, [`ConnectionError::BackingOff`].
    pub async fn session(&self) -> Result<Session, ConnectionError> {
        let mut state = self.state.lock().await;
        if let Some(Running { client, .. }) = &state.client {
            if !client.is_closed() && !client.peer().is_transport_closed() {
                return Ok(Session {
                    peer: client.peer().clone(),
                    generation: state.generation,
                });
            }
            tracing::warn!(server = %self.name, "MCP server is gone; restarting");
            state.client = None;
        }
        if let Some(last) = state.last_failure {
            let backoff = self
                .restart_backoff
                .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
                .min(MAX_RESTART_BACKOFF);
            let since = last.elapsed();
            if since < backoff {
                return Err(ConnectionError::BackingOff {
                    server: self.name.clone(),
                    wait: backoff - since,
                });
            }
        }
        match tokio::time::timeout(self.start_timeout, self.start()).await {
            Ok(Ok(running)) => {
                let peer = running.client.peer().clone();
                state.client = Some(running);
                state.generation += 1;
                state.failures = 0;
                state.last_failure = None;
                Ok(Session {
                    peer,
                    generation: state.generation,
                })
            }
            result => {
                state.failures += 1;
                state.last_failure = Some(Instant::now());
                let reason = match result {
                    Ok(Err(reason)) => reason,
                    _ => format!(
                        "no MCP handshake within {} ms",
                        self.start_timeout.as_millis()
                    ),
                };
                Err(ConnectionError::Start {
                    server: self.name.clone(),
                    reason,
                })
            }
        }
    }

    /// Drops `session` if it is still the current one, so that the next
    /// [`Connection::session`] starts the server again.
    pub async fn reconnect(&self, session: &Session) {
        let mut state = self.state.lock().await;
        if state.generation == session.generation
            && let Some(Running { mut client, .. }) = state.client.take()
        {
            let _ = client.close_with_timeout(Duration::from_secs(1)).await;
        }
    }

    async fn start(&self) -> Result<Running, String> {
        if let Some(command) = &self.config.command {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(&self.config.args)
                .envs(&self.config.env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            if let Some(cwd) = &self.config.cwd {
                cmd.current_dir(cwd);
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {command:?}: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(format!("{command:?}: no stdin or stdout pipe"));
            };
            let stdout = LineMeter {
                inner: stdout,
                line: 0,
                max: self.max_message_bytes as u64,
                oversized: self.oversized.clone(),
                server: self.name.clone(),
            };
            let transport = AsyncRwTransport::<RoleClient, _, _>::new(stdout, stdin)
                .with_max_line_length(self.max_message_bytes);
            if let Some(stderr) = child.stderr.take() {
                let server = self.name.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!(target: "voxloop::mcp_server", server = %server, "{line}");
                    }
                });
            }
            let client = ().serve(transport).await.map_err(|e| e.to_string())?;
            Ok(Running {
                client,
                _child: Some(child),
            })
        } else {
            let url = self.config.url.clone().unwrap_or_default();
            let mut headers = HashMap::new();
            for (name, value) in &self.config.headers {
                let name = HeaderName::try_from(name.as_str())
                    .map_err(|e| format!("header {name:?}: {e}"))?;
                let value = HeaderValue::try_from(value.as_str())
                    .map_err(|e| format!("header {name}: {e}"))?;
                headers.insert(name, value);
            }
            let mut config =
                StreamableHttpClientTransportConfig::with_uri(url).custom_headers(headers);
            if let Some(var) = &self.config.bearer_token_env {
                let token = std::env::var(var)
                    .map_err(|_| format!("environment variable {var} (bearer token) is not set"))?;
                config = config.auth_header(token);
            }
            let transport =
                StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
            let client = ().serve(transport).await.map_err(|e| e.to_string())?;
            Ok(Running {
                client,
                _child: None,
            })
        }
    }

    /// The error of a request that got no answer in time: an oversized answer when the server
    /// sent one since the last such error, else a timeout.
    fn timeout_error(&self, tool: &str) -> ConnectionError {
        match self.oversized.swap(0, Ordering::Relaxed) {
            0 => ConnectionError::Timeout {
                server: self.name.clone(),
                tool: tool.to_string(),
                timeout: self.call_timeout,
            },
            bytes => ConnectionError::Oversized {
                server: self.name.clone(),
                tool: tool.to_string(),
                bytes,
                max: self.max_message_bytes,
            },
        }
    }

    /// Every tool the server offers, read page by page: at most `list_max_pages` pages, and a
    /// cursor seen before ends the listing (rmcp's `list_all_tools` follows cursors unbounded).
    ///
    /// # Errors
    /// As [`Connection::session`], or the server's error for `tools/list`.
    pub async fn list_tools(&self) -> Result<Vec<Tool>, ConnectionError> {
        let peer = self.session().await?.peer;
        let mut tools = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor = None;
        for _ in 0..self.list_max_pages {
            let params = cursor
                .clone()
                .map(|c| PaginatedRequestParams::default().with_cursor(Some(c)));
            let page = tokio::time::timeout(self.call_timeout, peer.list_tools(params))
                .await
                .map_err(|_| self.timeout_error("tools/list"))?
                .map_err(|e| self.service_error(e))?;
            tools.extend(page.tools);
            match page.next_cursor {
                None => return Ok(tools),
                Some(next) if !seen.insert(next.clone()) => {
                    tracing::warn!(server = %self.name, cursor = %next, "tools/list repeated a cursor; stopping");
                    return Ok(tools);
                }
                Some(next) => cursor = Some(next),
            }
        }
        tracing::warn!(server = %self.name, pages = self.list_max_pages, "tools/list did not end; keeping what was read");
        Ok(tools)
    }

    /// The names (titles where given) of the resources the server lists, read page by page as
    /// [`Self::list_tools`] reads tools, at most `max` of them. A server without resources gives
    /// none; its error for `resources/list` is returned.
    ///
    /// # Errors
    /// As [`Connection::session`], or the server's error for `resources/list`.
    pub async fn list_resource_titles(&self, max: usize) -> Result<Vec<String>, ConnectionError> {
        let session = self.session().await?;
        let has_resources = session
            .peer
            .peer_info()
            .is_some_and(|info| info.capabilities.resources.is_some());
        if !has_resources {
            return Ok(Vec::new());
        }
        let peer = session.peer;
        let mut titles = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor = None;
        for _ in 0..self.list_max_pages {
            let params = cursor
                .clone()
                .map(|c| PaginatedRequestParams::default().with_cursor(Some(c)));
            let page = tokio::time::timeout(self.call_timeout, peer.list_resources(params))
                .await
                .map_err(|_| self.timeout_error("resources/list"))?
                .map_err(|e| self.service_error(e))?;
            for resource in page.resources {
                let title = resource.title.clone().unwrap_or(resource.name.clone());
                if titles.len() < max && !title.trim().is_empty() {
                    titles.push(title);
                }
            }
            match page.next_cursor {
                Some(next) if titles.len() < max && seen.insert(next.clone()) => {
                    cursor = Some(next)
                }
                _ => break,
            }
        }
        Ok(titles)
    }

    /// Calls `tool` with `arguments`. On timeout or when `cancel` fires, the request is dropped,
    /// which sends MCP `notifications/cancelled` to the server.
    ///
    /// # Errors
    /// [`ConnectionError`]: start failure, timeout, cancellation, a closed connection (the next
    /// call restarts the server), or a JSON-RPC error.
    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: JsonObject,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, ConnectionError> {
        let session = self.session().await?;
        let peer = &session.peer;
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
        let result = tokio::select! {
            result = tokio::time::timeout(self.call_timeout, peer.call_tool(params)) => result,
            _ = cancel.cancelled() => {
                return Err(ConnectionError::Cancelled { server: self.name.clone(), tool: tool.into() });
            }
        };
        match result {
            Err(_) => Err(self.timeout_error(tool)),
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => {
                if peer.is_transport_closed() || matches!(e, ServiceError::TransportClosed) {
                    self.reconnect(&session).await;
                }
                Err(self.service_error(e))
            }
        }
    }

    fn service_error(&self, source: ServiceError) -> ConnectionError {
        match source {
            ServiceError::TransportClosed | ServiceError::TransportSend(_) => {
                ConnectionError::Closed {
                    server: self.name.clone(),
                }
            }
            source => ConnectionError::Service {
                server: self.name.clone(),
                source,
            },
        }
    }
}
