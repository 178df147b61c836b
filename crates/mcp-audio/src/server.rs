//! The MCP side of the music player: tools `musicPlayer` and `set_volume`, the catalog as
//! resources, and the paged audio resource template (ARCHITECTURE §4).

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use reqwest::Url;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde_json::{Value, json};
use voxloop_paging::{DONE_BLOB, parse_range_query};

use crate::catalog::{Track, best_match, mime_for_path, suggestions};
use crate::upstream::{RangeBytes, Upstream, UpstreamError};

/// URI prefix of track resources: `audio://music/{base64url(upstream URL)}`.
pub const URI_PREFIX: &str = "audio://music/";
/// The resource template clients read pages with (RFC 6570 form).
pub const URI_TEMPLATE: &str = "audio://music/{musicUrl}{?start,end}";

/// Arguments of `musicPlayer`.
#[derive(JsonSchema)]
#[allow(dead_code)] // only its schema is used; arguments are checked by hand for clear errors
struct MusicPlayerArgs {
    /// Words from the title, the artist or the file name. Leave it out for the first track.
    query: Option<String>,
}

/// Arguments of `set_volume`.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct SetVolumeArgs {
    /// Playback volume in percent, an integer from 1 to 100.
    #[schemars(range(min = 1, max = 100))]
    volume: u8,
}

/// The music player MCP server. Cheap to clone: one per HTTP session shares the catalog.
#[derive(Clone)]
pub struct MusicServer {
    tracks: Arc<Vec<Track>>,
    upstream: Upstream,
    max_page_bytes: u64,
    list_page_size: usize,
}

/// The resource URI of a track.
pub fn track_uri(url: &Url) -> String {
    format!("{URI_PREFIX}{}", BASE64URL.encode(url.as_str()))
}

/// Splits `audio://music/{b64}?query` into the upstream URL and the query.
fn parse_track_uri(uri: &str) -> Result<(Url, Option<&str>), McpError> {
    let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(|| {
        McpError::resource_not_found(
            format!("no resource {uri:?}: URIs start with {URI_PREFIX}"),
            None,
        )
    })?;
    let (encoded, query) = match rest.split_once('?') {
        Some((e, q)) => (e, Some(q)),
        None => (rest, None),
    };
    let bad = |why: String| McpError::invalid_params(format!("`musicUrl` {why}"), None);
    let bytes = BASE64URL
        .decode(encoded.trim_end_matches('='))
        .map_err(|e| bad(format!("is not base64url: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 once decoded".into()))?;
    let url = Url::parse(&text).map_err(|e| bad(format!("{text:?} is not a URL: {e}")))?;
    if !matches!(
        url.scheme(),
        "http" | "https" | crate::catalog::LIBRARY_SCHEME
    ) {
        return Err(bad(format!(
            "{text:?} is not an http(s) URL nor a library track"
        )));
    }
    Ok((url, query))
}

impl MusicServer {
    pub fn new(
        tracks: Vec<Track>,
        upstream: Upstream,
        max_page_bytes: u64,
        list_page_size: usize,
    ) -> Self {
        Self {
            tracks: Arc::new(tracks),
            upstream,
            max_page_bytes,
            list_page_size,
        }
    }

    fn tools() -> Vec<Tool> {
        let empty = Arc::new(JsonObject::new());
        vec![
            Tool::new(
                "musicPlayer",
                "Play a song from the music library (by title, artist or file name) when the user \
                 asks to play, hear or put on music. Returns a resource_link to the audio, read \
                 in byte-range pages with resources/read.",
                empty.clone(),
            )
            .with_input_schema::<MusicPlayerArgs>(),
            Tool::new(
                "set_volume",
                "Set the playback volume, in percent from 1 to 100.",
                empty,
            )
            .with_input_schema::<SetVolumeArgs>(),
        ]
    }

    fn resource(track: &Track) -> Resource {
        let mut resource = Resource::new(track_uri(&track.url), track.title.clone())
            .with_description(track.description())
            .with_mime_type(track.mime_type.clone());
        if let Some(size) = track.size {
            resource = resource.with_size(size);
        }
        resource
    }

    /// `musicPlayer {query?}`: a resource_link to the best match, or a text result when nothing
    /// matches.
    fn music_player(&self, args: &JsonObject) -> CallToolResult {
        let query = match args.get("query") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                return CallToolResult::error(vec![ContentBlock::text(format!(
                    "`query` must be a string, got {other}"
                ))]);
            }
        };
        if self.tracks.is_empty() {
            return CallToolResult::success(vec![ContentBlock::text(
                "The music library is empty: there is nothing to play.",
            )]);
        }
        match best_match(&self.tracks, query) {
            Some(track) => {
                tracing::info!(?query, title = %track.title, "musicPlayer");
                CallToolResult::success(vec![ContentBlock::resource_link(Self::resource(track))])
            }
            None => {
                let some = suggestions(&self.tracks, query, 3);
                tracing::info!(?query, "musicPlayer: no match");
                CallToolResult::success(vec![ContentBlock::text(format!(
                    "No match: nothing in the music library is called {:?}. Titles that come closest: {}.",
                    query.unwrap_or_default(),
                    some.join(", ")
                ))])
            }
        }
    }

    /// `set_volume {volume}`: an `action` response for the runtime's playback (ARCHITECTURE §2).
    /// The volume change is the whole answer, so `final_action` is set.
    fn set_volume(args: &JsonObject) -> CallToolResult {
        match parse_volume(args.get("volume")) {
            Ok(volume) => CallToolResult::structured(json!({
                "type": "action",
                "action": "set_volume",
                "volume": volume,
                "final_action": true,
            })),
            Err(message) => CallToolResult::error(vec![ContentBlock::text(message)]),
        }
    }

    fn mime_for(&self, url: &Url) -> String {
        self.tracks
            .iter()
            .find(|t| &t.url == url)
            .map(|t| t.mime_type.clone())
            .or_else(|| mime_for_path(url.path()).map(String::from))
            .unwrap_or_else(|| "application/octet-stream".into())
    }
}

/// `volume` as an integer 1..=100. JSON numbers with no fraction and decimal strings are
/// accepted (small models often quote numbers); anything else is an error naming the range.
fn parse_volume(value: Option<&Value>) -> Result<u8, String> {
    const RANGE: &str = "`volume` must be an integer from 1 to 100";
    let number = match value {
        None | Some(Value::Null) => return Err(format!("{RANGE}; it is missing")),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match number {
        Some(v) if v.fract() == 0.0 && (1.0..=100.0).contains(&v) => Ok(v as u8),
        _ => Err(format!(
            "{RANGE}, got {}",
            value.map(Value::to_string).unwrap_or_default()
        )),
    }
}

impl ServerHandler for MusicServer {
    /// `logging/setLevel` (MCP spec, "Logging"): accepted and recorded in the server's own log.
    /// This server sends no `notifications/message`; its diagnostics go to its tracing log.
    /// (SEP-2577 deprecates logging; clients of the spec versions before it still send this.)
    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        tracing::debug!(level = ?request.level, "MCP client set its logging level");
        Ok(())
    }

    #[allow(deprecated)] // the logging capability, for clients before SEP-2577
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new(
            "voxloop-mcp-audio",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "A music player. Call musicPlayer to find and play a song, set_volume to change the \
             volume. Audio is served as a resource: read {uri}?start=S&end=E (bytes, end \
             exclusive) page by page until a blob equal to [DONE].",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(Self::tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let args = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            "musicPlayer" => self.music_player(&args),
            "set_volume" => Self::set_volume(&args),
            other => {
                return Err(McpError::invalid_params(
                    format!("unknown tool {other:?}; tools: musicPlayer, set_volume"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let start = match request.and_then(|r| r.cursor) {
            None => 0,
            Some(cursor) => cursor
                .parse::<usize>()
                .ok()
                .filter(|&n| n < self.tracks.len())
                .ok_or_else(|| {
                    McpError::invalid_params(format!("invalid cursor {cursor:?}"), None)
                })?,
        };
        let end = (start + self.list_page_size).min(self.tracks.len());
        let page = self.tracks[start..end].iter().map(Self::resource).collect();
        let mut result = ListResourcesResult::with_all_items(page);
        result.next_cursor = (end < self.tracks.len()).then(|| end.to_string());
        Ok(result)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        let template = ResourceTemplate::new(URI_TEMPLATE, "music-track").with_description(format!(
            "Bytes [start, end) of a track, at most {} per page, as one blob. `musicUrl` is the \
             base64url of the track's http(s) URL. Past the end the blob is [DONE].",
            self.max_page_bytes
        ));
        Ok(ListResourceTemplatesResult::with_all_items(vec![template]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let uri = request.uri;
        let (url, query) = parse_track_uri(&uri)?;
        let range = parse_range_query(query, self.max_page_bytes)
            .map_err(|e| McpError::invalid_params(e.to_string(), None))?;
        let bytes = match self.upstream.fetch(&url, range).await {
            Ok(RangeBytes::Bytes(bytes)) => bytes,
            Ok(RangeBytes::PastEnd) => DONE_BLOB.to_vec(),
            Err(
                e @ (UpstreamError::HostNotAllowed(_)
                | UpstreamError::UserInfo(_)
                | UpstreamError::NotInLibrary(_)),
            ) => {
                return Err(McpError::invalid_params(e.to_string(), None));
            }
            Err(e) => {
                tracing::warn!(%uri, error = %e, "resources/read failed");
                return Err(McpError::internal_error(e.to_string(), None));
            }
        };
        tracing::debug!(%url, start = range.start, end = range.end, bytes = bytes.len(), "page");
        let contents =
            ResourceContents::blob(BASE64.encode(&bytes), uri).with_mime_type(self.mime_for(&url));
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_parsing() {
        assert_eq!(parse_volume(Some(&json!(30))), Ok(30));
        assert_eq!(parse_volume(Some(&json!(100.0))), Ok(100));
        assert_eq!(parse_volume(Some(&json!(" 7 "))), Ok(7));
        for bad in [
            json!(0),
            json!(101),
            json!(30.5),
            json!("loud"),
            json!(true),
            json!([30]),
        ] {
            let err = parse_volume(Some(&bad)).unwrap_err();
            assert!(err.contains("from 1 to 100"), "{bad}: {err}");
        }
        assert!(parse_volume(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn track_uris_round_trip() {
        let url = Url::parse("http://127.0.0.1:8080/a b/ü.mp3").unwrap();
        let uri = format!("{}?start=0&end=10", track_uri(&url));
        let (parsed, query) = parse_track_uri(&uri).unwrap();
        assert_eq!(parsed, url);
        assert_eq!(query, Some("start=0&end=10"));
    }

    #[test]
    fn bad_track_uris() {
        let file = BASE64URL.encode("file:///etc/passwd");
        assert!(
            parse_track_uri(&format!("{URI_PREFIX}{file}"))
                .unwrap_err()
                .message
                .contains("http(s)")
        );
        assert!(
            parse_track_uri(&format!("{URI_PREFIX}!!!"))
                .unwrap_err()
                .message
                .contains("base64url")
        );
        let err = parse_track_uri("audio://other/x").unwrap_err();
        assert_eq!(err.code, rmcp::model::ErrorCode::RESOURCE_NOT_FOUND);
    }
}
