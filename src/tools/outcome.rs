//! What a tool call returned, routed by content type (ARCHITECTURE §2): media to play, text for the LLM,
//! or an action for the runtime, with the flags the terminal rules read.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::connection::Connection;
use super::pager::{PagerSettings, stream_resource};
use crate::media::{MediaStream, is_audio_mime};

/// Something the runtime must do, from a structured `action` response (ARCHITECTURE §2).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Set the playback volume, in percent 0..=100.
    SetVolume {
        /// The volume in percent, 0..=100.
        volume: u8,
    },
    /// Stop what is playing.
    StopPlayback,
    /// Pause the media playing, keeping its place, until [`Action::ResumePlayback`].
    PausePlayback,
    /// Continue the paused media from where it was paused.
    ResumePlayback,
    /// End the session once playback ends.
    ExitConversation,
    /// An action voxloop does not know; reported, not performed.
    Other {
        /// The action as the tool named it.
        name: String,
    },
}

/// The flags of a structured response; any of them set means the LLM is not called again this
/// turn (ARCHITECTURE §2, rule 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flags {
    /// `final_action`: this action ends the turn.
    pub final_action: bool,
    /// `no_further_response`: the model says nothing more this turn.
    pub no_further_response: bool,
    /// `silence_llm`: the model is not called again this turn.
    pub silence_llm: bool,
}

impl Flags {
    /// True when any flag is set.
    pub fn any(&self) -> bool {
        self.final_action || self.no_further_response || self.silence_llm
    }
}

/// How one content block (or the structured response) was routed, for reports and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockReport {
    /// `text`, `image`, `audio`, `resource_link`, `resource`, or `structured`.
    pub block: &'static str,
    /// `llm` (text for the LLM), `media` (played), `action`, or `error` (could not be used).
    pub route: &'static str,
    /// MIME type, URI, size or the problem, as far as known.
    pub detail: String,
}

/// The routed result of one tool call.
#[derive(Debug)]
pub struct ToolOutcome {
    /// The tool's name as offered to the LLM.
    pub tool: String,
    /// The server that ran it (`voxloop` for built-in tools).
    pub server: String,
    /// The tool reported an error (`isError`, a structured `error`), or the call failed.
    pub is_error: bool,
    /// Text for the LLM's tool message, in block order.
    pub text: Vec<String>,
    /// Media to play, in block order.
    pub media: Vec<MediaStream>,
    /// A runtime action, from a structured `action` response.
    pub action: Option<Action>,
    /// Flags of a structured response.
    pub flags: Flags,
    /// How each block was routed.
    pub blocks: Vec<BlockReport>,
}

/// What the router needs to turn resource links into streams.
#[derive(Clone)]
pub struct RouteContext {
    /// The server the result came from, for `resources/read` (`None` for built-in tools).
    pub connection: Option<Arc<Connection>>,
    /// Pager limits.
    pub pager: PagerSettings,
    /// Cancels every stream of this call (barge-in).
    pub cancel: CancellationToken,
}

impl RouteContext {
    /// The context of a source whose results carry no resources to page (built-in tools, the
    /// duplex co-host): no connection, the default pager limits.
    pub fn without_resources(cancel: &CancellationToken) -> RouteContext {
        RouteContext {
            connection: None,
            pager: PagerSettings::from(&crate::tools::config::ToolsConfig::default()),
            cancel: cancel.clone(),
        }
    }
}

impl ToolOutcome {
    fn new(tool: &str, server: &str) -> Self {
        Self {
            tool: tool.to_string(),
            server: server.to_string(),
            is_error: false,
            text: Vec::new(),
            media: Vec::new(),
            action: None,
            flags: Flags::default(),
            blocks: Vec::new(),
        }
    }

    /// The same outcome reported under `offered`, the name the model called the tool by (a
    /// source knows its tools by their own names).
    pub fn renamed(mut self, offered: &str) -> Self {
        offered.clone_into(&mut self.tool);
        self
    }

    /// A call that failed before any result: the error is the text the LLM hears.
    pub fn failed(tool: &str, server: &str, error: impl std::fmt::Display) -> Self {
        let mut outcome = Self::new(tool, server);
        outcome.is_error = true;
        outcome.text.push(format!("Error: {error}"));
        outcome
    }

    /// A result made by voxloop itself (built-in tools).
    pub fn builtin(tool: &str, text: String, action: Option<Action>, flags: Flags) -> Self {
        let mut outcome = Self::new(tool, super::builtin::BUILTIN_SERVER);
        outcome.text.push(text);
        outcome.action = action;
        outcome.flags = flags;
        outcome
    }

    /// Routes an MCP `CallToolResult`: a structured response (in `structuredContent`, or as the
    /// only text block) is read as such; otherwise each content block goes where ARCHITECTURE §2's
    /// table says. Nothing here fails: unusable blocks become text telling the LLM what was wrong.
    pub fn from_result(
        tool: &str,
        server: &str,
        result: CallToolResult,
        ctx: &RouteContext,
    ) -> Self {
        let mut outcome = Self::new(tool, server);
        outcome.is_error = result.is_error == Some(true);
        if let Some(object) = structured(&result) {
            outcome.route_structured(object, ctx);
        } else {
            for block in result.content {
                outcome.route_block(block, ctx);
            }
        }
        outcome
    }

    fn report(&mut self, block: &'static str, route: &'static str, detail: String) {
        self.blocks.push(BlockReport {
            block,
            route,
            detail,
        });
    }

    fn route_block(&mut self, block: ContentBlock, ctx: &RouteContext) {
        match block {
            ContentBlock::Text(t) => {
                self.report("text", "llm", format!("{} chars", t.text.chars().count()));
                self.text.push(t.text);
            }
            ContentBlock::Image(image) => match BASE64.decode(image.data.as_bytes()) {
                Ok(bytes) => {
                    let note = format!(
                        "[The tool returned an image: {}, {} bytes.]",
                        image.mime_type,
                        bytes.len()
                    );
                    self.report(
                        "image",
                        "llm",
                        format!("{}, {} bytes", image.mime_type, bytes.len()),
                    );
                    self.text.push(note);
                }
                Err(e) => self.unusable("image", format!("image data is not valid base64 ({e})")),
            },
            ContentBlock::Audio(audio) => match BASE64.decode(audio.data.as_bytes()) {
                Ok(bytes) if bytes.is_empty() => {
                    self.unusable("audio", "the audio content is empty".into())
                }
                Ok(bytes) => {
                    self.report(
                        "audio",
                        "media",
                        format!("{}, {} bytes", audio.mime_type, bytes.len()),
                    );
                    self.media.push(MediaStream::from_bytes(
                        audio.mime_type,
                        None,
                        Bytes::from(bytes),
                    ));
                }
                Err(e) => self.unusable("audio", format!("audio data is not valid base64 ({e})")),
            },
            ContentBlock::ResourceLink(link) => {
                let mime = link.mime_type.clone().unwrap_or_default();
                let audio = is_audio_mime(&mime) || link.uri.starts_with("audio://");
                match (&ctx.connection, audio) {
                    (Some(connection), true) => {
                        let title = link.title.clone().or(Some(link.name.clone()));
                        let mime = if mime.is_empty() {
                            "application/octet-stream".into()
                        } else {
                            mime
                        };
                        self.report("resource_link", "media", format!("{} {}", mime, link.uri));
                        self.media.push(
                            stream_resource(
                                connection.clone(),
                                link.uri,
                                mime,
                                title,
                                link.size,
                                ctx.pager,
                                CancellationToken::new(),
                            )
                            .linked_to(&ctx.cancel),
                        );
                    }
                    _ => {
                        let note = format!(
                            "[The tool linked a resource: {:?} at {}{}.]",
                            link.name,
                            link.uri,
                            if mime.is_empty() {
                                String::new()
                            } else {
                                format!(", {mime}")
                            }
                        );
                        self.report("resource_link", "llm", link.uri.clone());
                        self.text.push(note);
                    }
                }
            }
            ContentBlock::Resource(embedded) => match embedded.resource {
                ResourceContents::TextResourceContents { uri, text, .. } => {
                    self.report("resource", "llm", format!("text {uri}"));
                    self.text.push(text);
                }
                ResourceContents::BlobResourceContents {
                    uri,
                    mime_type,
                    blob,
                    ..
                } => {
                    let mime = mime_type.unwrap_or_else(|| "application/octet-stream".into());
                    match BASE64.decode(blob.as_bytes()) {
                        Err(e) => self
                            .unusable("resource", format!("blob {uri} is not valid base64 ({e})")),
                        Ok(bytes) if is_audio_mime(&mime) && !bytes.is_empty() => {
                            self.report(
                                "resource",
                                "media",
                                format!("{mime}, {} bytes, {uri}", bytes.len()),
                            );
                            self.media.push(MediaStream::from_bytes(
                                mime,
                                Some(uri),
                                Bytes::from(bytes),
                            ));
                        }
                        Ok(bytes) => {
                            self.report(
                                "resource",
                                "llm",
                                format!("{mime}, {} bytes, {uri}", bytes.len()),
                            );
                            self.text.push(format!(
                                "[The tool returned a file: {uri}, {mime}, {} bytes.]",
                                bytes.len()
                            ));
                        }
                    }
                }
                _ => self.unusable("resource", "unknown resource contents".into()),
            },
            _ => self.unusable(
                "content",
                "a content type this version does not know".into(),
            ),
        }
    }

    /// A block that could not be used: the LLM is told, and the report says why.
    fn unusable(&mut self, block: &'static str, problem: String) {
        tracing::warn!(tool = %self.tool, server = %self.server, "{problem}");
        self.report(block, "error", problem.clone());
        self.text
            .push(format!("[Unusable {block} content: {problem}.]"));
    }

    fn route_structured(&mut self, object: Map<String, Value>, ctx: &RouteContext) {
        let flag = |key: &str| object.get(key).and_then(Value::as_bool).unwrap_or(false);
        self.flags = Flags {
            final_action: flag("final_action"),
            no_further_response: flag("no_further_response"),
            silence_llm: flag("silence_llm"),
        };
        let string = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| object.get(*k).and_then(Value::as_str))
                .map(String::from)
        };
        let kind = object
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match kind {
            "action" => {
                let name = string(&["action", "name"]).unwrap_or_default();
                match parse_action(&name, &object) {
                    Ok(action) => {
                        self.report("structured", "action", name.clone());
                        self.text.push(
                            string(&["message", "text"])
                                .unwrap_or_else(|| format!("Done: {name}.")),
                        );
                        self.action = Some(action);
                    }
                    Err(problem) => {
                        self.is_error = true;
                        self.unusable("structured", problem);
                    }
                }
            }
            "audio" => {
                let mime = string(&["mime_type", "mimeType"])
                    .unwrap_or_else(|| "application/octet-stream".into());
                let title = string(&["title", "name"]);
                if let Some(data) = string(&["data"]) {
                    let block = ContentBlock::audio(data, mime);
                    self.route_block(block, ctx);
                } else if let Some(uri) = string(&["uri", "url"]) {
                    let mut resource = rmcp::model::Resource::new(uri, title.unwrap_or_default())
                        .with_mime_type(mime);
                    if let Some(size) = object.get("size").and_then(Value::as_u64) {
                        resource = resource.with_size(size);
                    }
                    self.route_block(ContentBlock::resource_link(resource), ctx);
                } else {
                    self.unusable(
                        "structured",
                        "an `audio` response needs `data` or `uri`".into(),
                    );
                }
                if let Some(text) = string(&["text", "message"]) {
                    self.text.push(text);
                }
            }
            "error" => {
                self.is_error = true;
                let message = string(&["message", "error", "text"])
                    .unwrap_or_else(|| "the tool failed".into());
                self.report("structured", "llm", "error".into());
                self.text.push(format!("Error: {message}"));
            }
            _ => {
                // "content"
                let text = string(&["text", "content", "message"])
                    .unwrap_or_else(|| Value::Object(object.clone()).to_string());
                self.report("structured", "llm", "content".into());
                self.text.push(text);
            }
        }
    }

    /// The tool message for the LLM's history: the text, and a line for each media item (what
    /// was played is kept, never overwritten).
    pub fn tool_message(&self) -> String {
        let mut lines = self.text.clone();
        for media in &self.media {
            let title = media.title.as_deref().unwrap_or("audio");
            let size = media
                .size
                .map(|s| format!(", {s} bytes"))
                .unwrap_or_default();
            lines.push(format!("[Playing {title:?} ({}{size}).]", media.mime_type));
        }
        if lines.is_empty() {
            lines.push("[The tool returned nothing.]".into());
        }
        lines.join("\n")
    }

    /// The facts the terminal rules decide on.
    pub fn facts(&self) -> super::terminal::OutcomeFacts {
        super::terminal::OutcomeFacts {
            failed: self.is_error,
            media: !self.media.is_empty(),
            stop_flag: self.flags.any(),
            exit: self.action == Some(Action::ExitConversation),
        }
    }
}

/// The structured response in `result`, if it has one: a JSON object whose `type` is `action`,
/// `audio`, `content` or `error`, in `structuredContent` or as the only text block.
fn structured(result: &CallToolResult) -> Option<Map<String, Value>> {
    const TYPES: [&str; 4] = ["action", "audio", "content", "error"];
    let is_structured = |o: &Map<String, Value>| {
        o.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| TYPES.contains(&t))
    };
    if let Some(Value::Object(object)) = &result.structured_content
        && is_structured(object)
    {
        return Some(object.clone());
    }
    if let [block] = result.content.as_slice()
        && let Some(text) = block.as_text()
        && let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&text.text)
        && is_structured(&object)
    {
        return Some(object);
    }
    None
}

fn parse_action(name: &str, object: &Map<String, Value>) -> Result<Action, String> {
    match name {
        "set_volume" => {
            let volume = object.get("volume").or_else(|| object.get("level"));
            match volume.and_then(Value::as_f64) {
                Some(v) if (0.0..=100.0).contains(&v) => Ok(Action::SetVolume {
                    volume: v.round() as u8,
                }),
                _ => Err(format!(
                    "set_volume needs `volume` from 0 to 100, got {}",
                    volume.cloned().unwrap_or(Value::Null)
                )),
            }
        }
        "stop_playback" | "stop" => Ok(Action::StopPlayback),
        "pause_playback" | "pause" => Ok(Action::PausePlayback),
        "resume_playback" | "resume" => Ok(Action::ResumePlayback),
        "exit_conversation" | "exit" => Ok(Action::ExitConversation),
        "" => Err("an `action` response needs an `action` name".into()),
        other => Ok(Action::Other {
            name: other.to_string(),
        }),
    }
}
