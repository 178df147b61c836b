//! Fetching byte ranges of a track from its upstream with HTTP Range requests (RFC 9110 §14).
//!
//! DESIGN §4 has one request per page (`Range: bytes=S-(E-1)`). That costs a whole upstream
//! round trip per page (about 0.2 ms on loopback, an RTT against a remote host) and, from an
//! upstream that ignores Range, a download from byte 0 for every page. So this module asks for
//! `bytes=S-` instead and keeps the open response as a *cursor*: the next page that starts where
//! the last one ended is read from the same response, and a sequential read of a whole track is
//! one upstream request. Any other offset opens a new one. The answers are as DESIGN §4 says:
//! 206 gives the bytes, 200 (Range ignored) is skipped to `S` while it streams, never held whole,
//! and 416 or an empty answer past the end means the track is over.
//!
//! Memory is bounded: a cursor holds at most one body chunk besides the socket's buffers, and at
//! most [`MAX_CURSORS`] are kept (least recently used dropped first, idle ones after
//! [`CURSOR_IDLE`]).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use voxloop::tools::paging::ByteRange;

/// Open upstream responses kept for sequential reads.
pub const MAX_CURSORS: usize = 16;
/// A cursor unused this long is dropped (and its connection closed).
pub const CURSOR_IDLE: Duration = Duration::from_secs(60);

/// What an upstream range request produced.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeBytes {
    /// The bytes of the range (never empty; shorter than asked at the end of the file).
    Bytes(Vec<u8>),
    /// The range starts at or past the end of the file.
    PastEnd,
}

/// Why a range could not be fetched. The message is what the MCP client sees.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream host {0:?} is not allowed (loopback only, plus --allow-host)")]
    HostNotAllowed(String),
    #[error("upstream {url} timed out after {ms} ms")]
    Timeout { url: Url, ms: u128 },
    #[error("upstream {url} answered HTTP {status}")]
    Status { url: Url, status: StatusCode },
    #[error("upstream {url}: {reason}")]
    Protocol { url: Url, reason: String },
    #[error("upstream {url}: {source}")]
    Transport {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An open upstream response positioned at `offset` of the track.
struct Cursor {
    url: Url,
    /// Track offset of the next byte this cursor yields.
    offset: u64,
    /// Bytes before `skip_to` are discarded (a 200 answer starts at byte 0).
    skip_to: u64,
    /// Bytes received but not yet handed out.
    pending: Bytes,
    /// `None` once the response has ended: the cursor then only marks the end of the track.
    body: Option<Body>,
    last_used: Instant,
}

impl Cursor {
    /// Up to `len` bytes from `offset` on; fewer only at the end of the response.
    async fn read(&mut self, len: u64) -> reqwest::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        while (out.len() as u64) < len {
            if self.pending.is_empty() {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match body.next().await {
                    Some(chunk) => self.pending = chunk?,
                    None => {
                        self.body = None;
                        break;
                    }
                }
            }
            if self.offset < self.skip_to {
                let skip = (self.skip_to - self.offset).min(self.pending.len() as u64);
                let _ = self.pending.split_to(skip as usize);
                self.offset += skip;
                continue;
            }
            let take = (len - out.len() as u64).min(self.pending.len() as u64) as usize;
            out.extend_from_slice(&self.pending.split_to(take));
            self.offset += take as u64;
        }
        self.last_used = Instant::now();
        Ok(out)
    }
}

/// An HTTP client for upstream ranges, limited to allowed hosts.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    allow_hosts: Arc<Vec<String>>,
    timeout: Duration,
    cursors: Arc<Mutex<Vec<Cursor>>>,
}

impl Upstream {
    /// `allow_hosts`: hosts allowed besides loopback (names or IP addresses).
    /// `timeout`: for one page: the request (if one is needed) and reading its bytes.
    pub fn new(allow_hosts: Vec<String>, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        // One spelling per host, so that `is_allowed` can compare strings.
        let allow_hosts = allow_hosts
            .into_iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) => h.to_lowercase(),
            })
            .collect();
        Ok(Self {
            client,
            allow_hosts: Arc::new(allow_hosts),
            timeout,
            cursors: Arc::default(),
        })
    }

    /// True when `url`'s host is loopback or on the allow-list.
    pub fn is_allowed(&self, url: &Url) -> bool {
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) if ip.is_loopback() => return true,
            Some(url::Host::Ipv6(ip)) if ip.is_loopback() => return true,
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(url::Host::Domain(name)) => name.to_lowercase(),
            None => return false,
        };
        host == "localhost" || self.allow_hosts.contains(&host)
    }

    /// Fetches `range` of `url`. No request is made to a host that is not allowed.
    ///
    /// # Errors
    /// [`UpstreamError`]: host not allowed, timeout, an unexpected status, or a broken answer.
    pub async fn fetch(&self, url: &Url, range: ByteRange) -> Result<RangeBytes, UpstreamError> {
        if !self.is_allowed(url) {
            return Err(UpstreamError::HostNotAllowed(
                url.host_str().unwrap_or_default().to_string(),
            ));
        }
        let timeout = UpstreamError::Timeout {
            url: url.clone(),
            ms: self.timeout.as_millis(),
        };
        tokio::time::timeout(self.timeout, self.fetch_inner(url, range))
            .await
            .map_err(|_| timeout)?
    }

    async fn fetch_inner(&self, url: &Url, range: ByteRange) -> Result<RangeBytes, UpstreamError> {
        // A kept response may have been closed by the upstream while it sat idle: on an error,
        // one fresh request from the same offset.
        if let Some(mut cursor) = self.take_cursor(url, range.start) {
            match cursor.read(range.len()).await {
                Ok(bytes) => return Ok(self.keep(cursor, bytes)),
                Err(e) => {
                    tracing::debug!(%url, error = %e, "kept upstream response failed; reopening")
                }
            }
        }
        let Some(mut cursor) = self.open(url, range.start).await? else {
            return Ok(RangeBytes::PastEnd);
        };
        let bytes = cursor
            .read(range.len())
            .await
            .map_err(|e| self.transport_error(url, e))?;
        Ok(self.keep(cursor, bytes))
    }

    /// The page's answer; the cursor is kept for the next page unless nothing was read.
    fn keep(&self, cursor: Cursor, bytes: Vec<u8>) -> RangeBytes {
        if bytes.is_empty() {
            return RangeBytes::PastEnd;
        }
        self.put_cursor(cursor);
        RangeBytes::Bytes(bytes)
    }

    /// Removes and returns the cursor of `url` at `offset`, dropping idle ones on the way.
    fn take_cursor(&self, url: &Url, offset: u64) -> Option<Cursor> {
        let mut cursors = self.cursors.lock().expect("cursor lock");
        cursors.retain(|c| c.last_used.elapsed() < CURSOR_IDLE);
        let index = cursors
            .iter()
            .position(|c| &c.url == url && c.offset == offset)?;
        Some(cursors.swap_remove(index))
    }

    /// Keeps `cursor` for the next page. One that has ended is kept too, as an end marker, so
    /// the page after the last costs no request.
    fn put_cursor(&self, cursor: Cursor) {
        let mut cursors = self.cursors.lock().expect("cursor lock");
        if cursors.len() >= MAX_CURSORS {
            let oldest = (0..cursors.len()).min_by_key(|&i| cursors[i].last_used);
            if let Some(i) = oldest {
                cursors.swap_remove(i);
            }
        }
        cursors.push(cursor);
    }

    /// Opens `url` from byte `start` with `Range: bytes=start-`. `None` when `start` is at or past
    /// the end.
    async fn open(&self, url: &Url, start: u64) -> Result<Option<Cursor>, UpstreamError> {
        let response = self
            .client
            .get(url.clone())
            .header(RANGE, format!("bytes={start}-"))
            .send()
            .await
            .map_err(|e| self.transport_error(url, e))?;
        // Track offset of the body's first byte.
        let body_offset = match response.status() {
            StatusCode::PARTIAL_CONTENT => match content_range_start(response.headers()) {
                Some(got) if got != start => {
                    return Err(UpstreamError::Protocol {
                        url: url.clone(),
                        reason: format!("asked for bytes from {start}, got a range from {got}"),
                    });
                }
                _ => start,
            },
            // Range ignored: the body starts at byte 0 and is skipped to `start` as it streams.
            StatusCode::OK => 0,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let size = match unsatisfied_range_size(response.headers()) {
                    Some(size) => Some(size),
                    None => self.head_size(url).await?,
                };
                return match size {
                    Some(size) if start >= size => Ok(None),
                    Some(size) => Err(UpstreamError::Protocol {
                        url: url.clone(),
                        reason: format!(
                            "answered 416 for bytes from {start} of a {size}-byte file"
                        ),
                    }),
                    None => Err(UpstreamError::Protocol {
                        url: url.clone(),
                        reason: "answered 416 and gave no size (Content-Range or HEAD)".into(),
                    }),
                };
            }
            status => {
                return Err(UpstreamError::Status {
                    url: url.clone(),
                    status,
                });
            }
        };
        Ok(Some(Cursor {
            url: url.clone(),
            offset: body_offset,
            skip_to: start,
            pending: Bytes::new(),
            body: Some(Box::pin(response.bytes_stream())),
            last_used: Instant::now(),
        }))
    }

    async fn head_size(&self, url: &Url) -> Result<Option<u64>, UpstreamError> {
        let response = self
            .client
            .head(url.clone())
            .send()
            .await
            .map_err(|e| self.transport_error(url, e))?;
        if !response.status().is_success() {
            return Ok(None);
        }
        Ok(response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    fn transport_error(&self, url: &Url, source: reqwest::Error) -> UpstreamError {
        if source.is_timeout() {
            UpstreamError::Timeout {
                url: url.clone(),
                ms: self.timeout.as_millis(),
            }
        } else {
            UpstreamError::Transport {
                url: url.clone(),
                source,
            }
        }
    }
}

/// `Content-Range: bytes S-E/N` -> `S`.
fn content_range_start(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?.split('/').next()?;
    range.split('-').next()?.trim().parse().ok()
}

/// `Content-Range: bytes */N` (the form a 416 carries) -> `N`.
fn unsatisfied_range_size(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes */")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn content_range_forms() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/1000"),
        );
        assert_eq!(content_range_start(&h), Some(100));
        assert_eq!(unsatisfied_range_size(&h), None);
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */1000"));
        assert_eq!(unsatisfied_range_size(&h), Some(1000));
    }

    #[test]
    fn allow_list() {
        let hosts = vec!["CDN.example".into(), "10.0.0.1".into(), "0:0::1:1".into()];
        let up = Upstream::new(hosts, Duration::from_secs(1)).unwrap();
        let ok = |u: &str| up.is_allowed(&Url::parse(u).unwrap());
        assert!(ok("http://127.0.0.1:9/x"));
        assert!(ok("http://127.8.0.1/x"));
        assert!(ok("http://[::1]:80/x"));
        assert!(ok("http://LOCALHOST/x"));
        assert!(ok("https://cdn.example/x"));
        assert!(ok("http://10.0.0.1/x"));
        assert!(ok("http://[::1:1]/x"));
        assert!(!ok("http://example.com/x"));
        assert!(!ok("http://cdn.example.evil/x"));
        assert!(!ok("http://10.0.0.2/x"));
        assert!(!ok("http://0.0.0.0/x"));
    }
}
