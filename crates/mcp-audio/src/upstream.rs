//! Fetching byte ranges of a track from its upstream with HTTP Range requests (RFC 9110 §14).
//!
//! ARCHITECTURE §4 has one request per page (`Range: bytes=S-(E-1)`). That costs a whole upstream
//! round trip per page (about 0.2 ms on loopback, an RTT against a remote host) and, from an
//! upstream that ignores Range, a download from byte 0 for every page. So this module asks for
//! `bytes=S-` instead and keeps the open response as a *cursor*: the next page that starts where
//! the last one ended is read from the same response, and a sequential read of a whole track is
//! one upstream request. Any other offset opens a new one. The answers are as ARCHITECTURE §4 says:
//! 206 gives the bytes, 200 (Range ignored) is skipped to `S` while it streams, never held whole,
//! and 416 or an empty answer past the end means the track is over.
//!
//! Memory is bounded: a cursor holds at most one body chunk besides the socket's buffers, and at
//! most [`MAX_CURSORS`] are kept (least recently used dropped first, idle ones after
//! [`CURSOR_IDLE`]).
//!
//! Which upstreams may be read ([`UpstreamPolicy`]): a URL names a track a client may forge, so
//! nothing is reached unless the operator listed its host (`--allow-host`, `[music]
//! allow_hosts`, the remote catalog's hosts with their ports). The URL's host is compared in
//! its normalised form (the WHATWG URL parser turns `2130706433`, `0x7f.1` and `127.1` into
//! `127.0.0.1`); a URL with user information is refused (no credentials are forwarded); a
//! listed *name* is resolved by the client's own resolver, which refuses loopback, private,
//! link-local and other internal addresses unless that address itself is listed, so a name
//! cannot be pointed at an internal service (checked at connect time: no window between the
//! check and the connection). Library files are read from disk by the server itself
//! ([`LibraryFiles`]); no URL reaches them but the catalog's own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use voxloop_paging::ByteRange;

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
    #[error("upstream host {0:?} is not allowed (only hosts listed with --allow-host)")]
    HostNotAllowed(String),
    #[error("upstream URL {0} carries user information; credentials are never forwarded")]
    UserInfo(String),
    #[error("no track of the library has the URL {0}")]
    NotInLibrary(String),
    #[error("library file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {url} timed out after {ms} ms")]
    Timeout { url: Url, ms: u128 },
    #[error("upstream {url} answered HTTP {status}")]
    Status { url: Url, status: StatusCode },
    #[error("upstream {url}: {reason}")]
    Protocol { url: Url, reason: String },
    #[error("upstream {url}: {}", chain(source))]
    Transport {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An error and its sources, `: `-joined (reqwest's own message names only the request; the
/// cause, such as a refused name, is in the sources).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

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

/// One `--allow-host` entry: a host name or IP address, and a port when it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedHost {
    /// Lowercase name, or the IP address as `IpAddr` prints it.
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    fn parse(entry: &str) -> Self {
        let entry = entry.trim();
        if let Ok(addr) = entry.parse::<SocketAddr>() {
            return Self {
                host: addr.ip().to_string(),
                port: Some(addr.port()),
            };
        }
        let bare = entry.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Self {
                host: ip.to_string(),
                port: None,
            };
        }
        match entry.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => Self {
                host: name.to_lowercase(),
                port: port.parse().ok(),
            },
            _ => Self {
                host: entry.to_lowercase(),
                port: None,
            },
        }
    }
}

/// True for addresses no upstream should have unless listed: loopback, private (RFC 1918,
/// IPv6 unique local), link-local (the cloud metadata address among them), carrier-grade NAT,
/// unspecified, broadcast, multicast, documentation ranges, and IPv4-mapped forms of these.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Which upstreams may be read (see the module's documentation).
#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    allowed: Vec<AllowedHost>,
}

impl UpstreamPolicy {
    /// The policy of these `--allow-host` entries (`host`, `host:port`, `ip`, `ip:port`,
    /// `[v6]:port`).
    pub fn new(entries: &[String]) -> Self {
        Self {
            allowed: entries.iter().map(|e| AllowedHost::parse(e)).collect(),
        }
    }

    /// Whether the address `ip` was listed itself, without a port (then a listed name may
    /// resolve to it even when it is internal; the resolver does not see the port, so an entry
    /// with one lists that address for URLs naming it only).
    fn lists_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical().to_string();
        self.allowed
            .iter()
            .any(|a| a.host == ip && a.port.is_none())
    }

    /// Checks `url` before any request.
    ///
    /// # Errors
    /// [`UpstreamError::UserInfo`] or [`UpstreamError::HostNotAllowed`].
    pub fn check(&self, url: &Url) -> Result<(), UpstreamError> {
        if !url.username().is_empty() || url.password().is_some() {
            let mut shown = url.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            return Err(UpstreamError::UserInfo(shown.to_string()));
        }
        let refused = || UpstreamError::HostNotAllowed(url.host_str().unwrap_or_default().into());
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused());
        }
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).to_canonical().to_string(),
            Some(url::Host::Domain(name)) => name.to_lowercase(),
            None => return Err(refused()),
        };
        let port = url.port_or_known_default();
        let listed = self
            .allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| Some(p) == port));
        if listed { Ok(()) } else { Err(refused()) }
    }
}

/// The upstream client's resolver: the system's, less the internal addresses the policy does
/// not list. A name with nothing left fails to resolve, so no connection is made.
struct GuardedResolver {
    policy: UpstreamPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_internal(a.ip()) || policy.lists_address(a.ip()))
                .collect();
            if kept.is_empty() {
                let shown: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
                let message = format!(
                    "{name} resolves only to internal addresses ({}); list the address with --allow-host to allow it",
                    shown.join(", ")
                );
                return Err(message.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// The library's files by their track URL (`library://local/...`): the only files the server
/// reads, each canonicalised inside the library when the catalog was made.
pub type LibraryFiles = HashMap<Url, PathBuf>;

/// An HTTP client for upstream ranges, limited by an [`UpstreamPolicy`], and the library's files.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    policy: UpstreamPolicy,
    library: Arc<LibraryFiles>,
    timeout: Duration,
    cursors: Arc<Mutex<Vec<Cursor>>>,
}

impl Upstream {
    /// `allow_hosts`: the hosts that may be read (see [`UpstreamPolicy::new`]); `library`: the
    /// catalog's files; `timeout`: for one page: the request (if one is needed) and reading its
    /// bytes.
    pub fn new(
        allow_hosts: &[String],
        library: LibraryFiles,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let policy = UpstreamPolicy::new(allow_hosts);
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .build()?;
        Ok(Self {
            client,
            policy,
            library: Arc::new(library),
            timeout,
            cursors: Arc::default(),
        })
    }

    /// Checks `url` against the policy, or finds it in the library, before any request.
    ///
    /// # Errors
    /// As [`UpstreamPolicy::check`]; [`UpstreamError::NotInLibrary`] for a library URL that
    /// is no track.
    pub fn check(&self, url: &Url) -> Result<(), UpstreamError> {
        if url.scheme() == crate::catalog::LIBRARY_SCHEME {
            return match self.library.contains_key(url) {
                true => Ok(()),
                false => Err(UpstreamError::NotInLibrary(url.to_string())),
            };
        }
        self.policy.check(url)
    }

    /// Fetches `range` of `url`. No request is made to a host the policy refuses.
    ///
    /// # Errors
    /// [`UpstreamError`]: host not allowed, timeout, an unexpected status, or a broken answer.
    pub async fn fetch(&self, url: &Url, range: ByteRange) -> Result<RangeBytes, UpstreamError> {
        self.check(url)?;
        if let Some(path) = self.library.get(url) {
            return read_file(path, range).await;
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
/// `range` of a library file, read from disk.
async fn read_file(path: &std::path::Path, range: ByteRange) -> Result<RangeBytes, UpstreamError> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let failed = |source| UpstreamError::File {
        path: path.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(failed)?;
    let size = file.metadata().await.map_err(failed)?.len();
    if range.start >= size {
        return Ok(RangeBytes::PastEnd);
    }
    file.seek(std::io::SeekFrom::Start(range.start))
        .await
        .map_err(failed)?;
    let len = range.len().min(size - range.start);
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len)
        .read_to_end(&mut bytes)
        .await
        .map_err(failed)?;
    if bytes.is_empty() {
        return Ok(RangeBytes::PastEnd);
    }
    Ok(RangeBytes::Bytes(bytes))
}

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
    fn only_listed_hosts_in_every_spelling_and_no_userinfo() {
        let hosts = vec![
            "CDN.example".into(),
            "10.0.0.1".into(),
            "0:0::1:1".into(),
            "127.0.0.1:8123".into(),
        ];
        let up = Upstream::new(&hosts, LibraryFiles::new(), Duration::from_secs(1)).unwrap();
        let ok = |u: &str| up.check(&Url::parse(u).unwrap()).is_ok();
        assert!(ok("https://cdn.example/x"));
        assert!(ok("http://10.0.0.1/x"));
        assert!(ok("http://[::1:1]/x"));
        assert!(ok("http://127.0.0.1:8123/x"));
        // Loopback is not allowed by default, in any spelling, nor another listed host's port.
        for refused in [
            "http://127.0.0.1:9/x",
            "http://127.0.0.1:8124/x",
            "http://2130706433:8124/x",
            "http://0x7f.1:9/x",
            "http://127.1/x",
            "http://[::1]:80/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://LOCALHOST/x",
            "http://example.com/x",
            "http://cdn.example.evil/x",
            "http://10.0.0.2/x",
            "http://0.0.0.0/x",
            "http://169.254.169.254/latest/meta-data/",
            "ftp://cdn.example/x",
            "library://local/not-a-track.mp3",
        ] {
            assert!(!ok(refused), "{refused} was allowed");
        }
        // The normalised numeric forms equal the listed address and port.
        assert!(ok("http://2130706433:8123/x"));
        assert!(ok("http://0x7f.1:8123/x"));
        let err = up
            .check(&Url::parse("https://user:pw@cdn.example/x").unwrap())
            .unwrap_err();
        assert!(matches!(err, UpstreamError::UserInfo(_)), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_listed_name_that_resolves_to_loopback_is_refused_at_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Upstream::new(
            &["localhost".into()],
            LibraryFiles::new(),
            Duration::from_secs(2),
        )
        .unwrap();
        let url = Url::parse(&format!("http://localhost:{port}/x.mp3")).unwrap();
        let err = up
            .fetch(&url, ByteRange { start: 0, end: 10 })
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("internal addresses"), "{err:?}");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "a connection was made");
    }
}
