//! Paged audio resources (ARCHITECTURE §3): the protocol both ends share, and a sequential reader.
//!
//! A `resource_link` to audio is read with `resources/read` on `{uri}?start=S&end=E`: byte
//! offsets, `end` exclusive, for `S = 0, P, 2P, ...`. Each answer is one blob (base64). The end of
//! the stream is a blob whose decoded bytes equal [`DONE_BLOB`]; an empty `contents` list or an
//! empty blob also ends it. A page shorter than asked is *not* the end by itself (an upstream may
//! answer short ranges).

#![warn(missing_docs)]

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rmcp::model::{ReadResourceRequestParams, ResourceContents};
use rmcp::service::{Peer, RoleClient, ServiceError};

/// The decoded bytes of the blob that ends a paged resource.
pub const DONE_BLOB: &[u8] = b"[DONE]";

/// Largest page, in bytes, a client asks for and a server answers: MCP peers cap one message at
/// 1 MiB (Python HTTP client), 10 MiB (TypeScript stdio) and 16 MiB (rmcp stdio line), and base64
/// adds a third (ARCHITECTURE §3).
pub const MAX_PAGE_BYTES: u64 = 512 * 1024;

/// Default page size in bytes (ARCHITECTURE §3).
pub const DEFAULT_PAGE_BYTES: u64 = 100 * 1024;

/// A byte range `[start, end)` of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte, counted from 0.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A bad `start`/`end` query; the message names the parameter (for JSON-RPC -32602).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RangeQueryError(pub String);

/// `{uri}?start=S&end=E` (or `&start=...` when `uri` already has a query).
pub fn page_uri(uri: &str, range: ByteRange) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}start={}&end={}", range.start, range.end)
}

/// Parses the query of a paged `resources/read` URI (server side).
///
/// `start` defaults to 0 and `end` to `start + max_page`; both must be non-negative decimal
/// integers with `end > start` and `end - start <= max_page`. Other parameters are ignored.
///
/// # Errors
/// A [`RangeQueryError`] naming the bad parameter and what is allowed.
pub fn parse_range_query(query: Option<&str>, max_page: u64) -> Result<ByteRange, RangeQueryError> {
    let (mut start, mut end) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        if slot.is_some() {
            return Err(RangeQueryError(format!("`{key}` is given twice")));
        }
        *slot = Some(parse_offset(key, value)?);
    }
    let start = start.unwrap_or(0);
    let end = end.unwrap_or(start.saturating_add(max_page));
    if end <= start {
        return Err(RangeQueryError(format!(
            "`end` ({end}) must be greater than `start` ({start})"
        )));
    }
    if end - start > max_page {
        return Err(RangeQueryError(format!(
            "`end` - `start` is {} bytes; a page is at most {max_page} bytes",
            end - start
        )));
    }
    Ok(ByteRange { start, end })
}

fn parse_offset(key: &str, value: &str) -> Result<u64, RangeQueryError> {
    let valid = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    match valid.then(|| value.parse::<u64>().ok()).flatten() {
        Some(n) => Ok(n),
        None => Err(RangeQueryError(format!(
            "`{key}` must be a non-negative integer byte offset, got {value:?}"
        ))),
    }
}

/// What one page read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// Decoded bytes (never empty) and the blob's MIME type, if it had one.
    Bytes {
        /// The decoded bytes, never empty.
        data: Vec<u8>,
        /// The blob's MIME type, if it had one.
        mime_type: Option<String>,
    },
    /// The end of the resource: a [`DONE_BLOB`], an empty blob or an empty `contents` list.
    End,
}

/// Why reading a paged resource failed. Bytes already handed out stay handed out.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// No answer within the page timeout.
    #[error("page {page} of {uri} timed out after {} ms", timeout.as_millis())]
    Timeout {
        /// The resource's URI.
        uri: String,
        /// The page's index, from 0.
        page: u64,
        /// The per-page time limit that passed.
        timeout: Duration,
    },
    /// The server answered with a JSON-RPC error, or the session closed.
    #[error("page {page} of {uri}: {source}")]
    Service {
        /// The resource's URI.
        uri: String,
        /// The page's index, from 0.
        page: u64,
        /// The underlying error.
        #[source]
        source: ServiceError,
    },
    /// The answer was not a blob page of the size asked for.
    #[error("page {page} of {uri}: {reason}")]
    BadPage {
        /// The resource's URI.
        uri: String,
        /// The page's index, from 0.
        page: u64,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The server could not be reached: it failed to start, or is waiting to restart.
    #[error("{uri}: {reason}")]
    Unavailable {
        /// The resource's URI.
        uri: String,
        /// Why the server cannot be reached.
        reason: String,
    },
    /// The resource did not end within the page cap.
    #[error("{uri} did not end within {max_pages} pages")]
    TooManyPages {
        /// The resource's URI.
        uri: String,
        /// The cap on pages ([`PagingLimits`]; voxloop's `[tools] max_media_pages`).
        max_pages: u64,
    },
    /// The resource did not end within the byte cap.
    #[error("{uri} did not end within {max_bytes} bytes")]
    TooManyBytes {
        /// The resource's URI.
        uri: String,
        /// The cap on bytes ([`PagingLimits`]; voxloop's `[tools] max_media_bytes`).
        max_bytes: u64,
    },
}

/// Limits for [`read_paged`]; every one is a config value in the runtime.
#[derive(Debug, Clone, Copy)]
pub struct PagingLimits {
    /// Bytes asked for per page (1 ..= [`MAX_PAGE_BYTES`]).
    pub page_bytes: u64,
    /// Pages read at most before giving up.
    pub max_pages: u64,
    /// Bytes read at most before giving up.
    pub max_bytes: u64,
    /// Time limit for one page.
    pub page_timeout: Duration,
}

impl Default for PagingLimits {
    fn default() -> Self {
        Self {
            page_bytes: DEFAULT_PAGE_BYTES,
            max_pages: 10_000,
            max_bytes: 512 * 1024 * 1024,
            page_timeout: Duration::from_secs(30),
        }
    }
}

/// Totals of a finished [`read_paged`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSummary {
    /// Pages that carried bytes (the end marker not counted).
    pub pages: u64,
    /// Bytes handed to the callback.
    pub bytes: u64,
    /// MIME type of the first page, if the server gave one.
    pub mime_type: Option<String>,
}

/// Reads page `index` (`range`) of `uri` with one `resources/read`.
///
/// # Errors
/// [`PageError::Timeout`], [`PageError::Service`], or [`PageError::BadPage`] for text contents,
/// invalid base64, or more bytes than asked for.
pub async fn read_page(
    peer: &Peer<RoleClient>,
    uri: &str,
    index: u64,
    range: ByteRange,
    timeout: Duration,
) -> Result<Page, PageError> {
    let request = ReadResourceRequestParams::new(page_uri(uri, range));
    let result = tokio::time::timeout(timeout, peer.read_resource(request))
        .await
        .map_err(|_| PageError::Timeout {
            uri: uri.to_string(),
            page: index,
            timeout,
        })?
        .map_err(|source| PageError::Service {
            uri: uri.to_string(),
            page: index,
            source,
        })?;
    let bad = |reason: String| PageError::BadPage {
        uri: uri.to_string(),
        page: index,
        reason,
    };
    let Some(first) = result.contents.into_iter().next() else {
        return Ok(Page::End);
    };
    let ResourceContents::BlobResourceContents {
        blob, mime_type, ..
    } = first
    else {
        return Err(bad("expected a blob, got text contents".into()));
    };
    let data = BASE64
        .decode(blob.as_bytes())
        .map_err(|e| bad(format!("invalid base64 blob: {e}")))?;
    if data.is_empty() || data == DONE_BLOB {
        return Ok(Page::End);
    }
    if data.len() as u64 > range.len() {
        return Err(bad(format!(
            "{} bytes for a {}-byte range",
            data.len(),
            range.len()
        )));
    }
    Ok(Page::Bytes { data, mime_type })
}

/// Reads `uri` page by page from offset 0 until its end, handing each page's bytes to `on_bytes`
/// in order. Sequential: the next page is asked for once `on_bytes` has returned.
///
/// # Errors
/// Any [`read_page`] error, or [`PageError::TooManyPages`] / [`PageError::TooManyBytes`] when
/// the resource does not end within `limits`.
pub async fn read_paged(
    peer: &Peer<RoleClient>,
    uri: &str,
    limits: PagingLimits,
    mut on_bytes: impl FnMut(&[u8]),
) -> Result<PagedSummary, PageError> {
    let page_bytes = limits.page_bytes.clamp(1, MAX_PAGE_BYTES);
    let mut summary = PagedSummary {
        pages: 0,
        bytes: 0,
        mime_type: None,
    };
    loop {
        if summary.pages >= limits.max_pages {
            return Err(PageError::TooManyPages {
                uri: uri.to_string(),
                max_pages: limits.max_pages,
            });
        }
        let range = ByteRange {
            start: summary.bytes,
            end: summary.bytes + page_bytes,
        };
        match read_page(peer, uri, summary.pages, range, limits.page_timeout).await? {
            Page::End => return Ok(summary),
            Page::Bytes { data, mime_type } => {
                if summary.bytes + data.len() as u64 > limits.max_bytes {
                    return Err(PageError::TooManyBytes {
                        uri: uri.to_string(),
                        max_bytes: limits.max_bytes,
                    });
                }
                on_bytes(&data);
                summary.pages += 1;
                summary.bytes += data.len() as u64;
                summary.mime_type = summary.mime_type.or(mime_type);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = MAX_PAGE_BYTES;

    #[test]
    fn page_uri_appends_the_range() {
        let r = ByteRange { start: 0, end: 10 };
        assert_eq!(
            page_uri("audio://music/x", r),
            "audio://music/x?start=0&end=10"
        );
        assert_eq!(page_uri("a://b?v=1", r), "a://b?v=1&start=0&end=10");
    }

    #[test]
    fn range_query_defaults_and_parses() {
        assert_eq!(
            parse_range_query(None, MAX),
            Ok(ByteRange { start: 0, end: MAX })
        );
        assert_eq!(
            parse_range_query(Some("start=5&end=9&x=y"), MAX),
            Ok(ByteRange { start: 5, end: 9 })
        );
        assert_eq!(
            parse_range_query(Some("start=7"), 100),
            Ok(ByteRange { start: 7, end: 107 })
        );
    }

    #[test]
    fn range_query_errors_name_the_parameter() {
        let cases = [
            ("start=-1&end=5", "`start`"),
            ("start=1&end=abc", "`end`"),
            ("start=&end=5", "`start`"),
            ("start=+1&end=5", "`start`"),
            ("start=5&end=5", "greater than `start`"),
            ("start=9&end=5", "greater than `start`"),
            ("start=0&end=524289", "at most 524288 bytes"),
            ("start=1&start=2", "given twice"),
            ("start=99999999999999999999", "`start`"),
        ];
        for (query, needle) in cases {
            let err = parse_range_query(Some(query), MAX).unwrap_err();
            assert!(err.0.contains(needle), "{query}: {err}");
        }
    }
}
