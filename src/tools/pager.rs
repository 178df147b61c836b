//! The resource pager (ARCHITECTURE §3): streams a paged audio resource into a [`MediaStream`] while
//! it downloads.
//!
//! Pages `{uri}?start=S&end=E` are requested `prefetch + 1` at a time, so the next page is on its
//! way while the current one is consumed; the bytes go out in order through a channel of one
//! page, so memory stays near `(prefetch + 2) x page_bytes` however long the resource is. A page
//! that times out or fails on the server's side is retried with doubling backoff; a closed
//! session is reconnected once; a short page is not the end (the next request starts where it
//! stopped); caps on pages and bytes end a resource that never sends `[DONE]`. Any failure ends
//! the stream with one `Err` after the bytes already delivered.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use rmcp::model::ErrorCode;
use rmcp::service::ServiceError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Session};
use super::paging::{ByteRange, MAX_PAGE_BYTES, Page, PageError, read_page};
use crate::media::{MediaError, MediaStream};
use crate::tools::config::ToolsConfig;

/// The pager's limits (from `[tools]`).
#[derive(Debug, Clone, Copy)]
pub struct PagerSettings {
    /// Bytes per page (1 ..= 512 KiB).
    pub page_bytes: u64,
    /// Pages in flight beyond the one being waited for.
    pub prefetch: usize,
    /// Time for one page.
    pub page_timeout: Duration,
    /// Retries of one page.
    pub retries: u32,
    /// First retry's backoff; doubles for each further one.
    pub retry_backoff: Duration,
    /// Bytes streamed at most.
    pub max_bytes: u64,
    /// Pages streamed at most.
    pub max_pages: u64,
}

impl From<&ToolsConfig> for PagerSettings {
    fn from(t: &ToolsConfig) -> Self {
        Self {
            page_bytes: t.page_bytes,
            prefetch: t.prefetch,
            page_timeout: Duration::from_millis(t.page_timeout_ms),
            retries: t.page_retries,
            retry_backoff: Duration::from_millis(t.page_retry_backoff_ms),
            max_bytes: t.max_media_bytes,
            max_pages: t.max_media_pages,
        }
    }
}

/// Starts streaming `uri` from `connection`'s server; the returned stream yields its bytes.
/// Dropping the stream, or cancelling `cancel`, stops the pager and the pages in flight
/// (rmcp sends `notifications/cancelled` for each).
pub fn stream_resource(
    connection: Arc<Connection>,
    uri: String,
    mime_type: String,
    title: Option<String>,
    size: Option<u64>,
    settings: PagerSettings,
    cancel: CancellationToken,
) -> MediaStream {
    let (tx, rx) = mpsc::channel(1);
    let pager = Pager {
        connection,
        uri: uri.clone(),
        settings,
        session: None,
        reconnected: false,
        retry_page: 0,
        retry_count: 0,
    };
    let token = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = pager.run(tx) => {}
        }
    });
    MediaStream::new(mime_type, title, uri, size, rx, cancel)
}

struct Pager {
    connection: Arc<Connection>,
    uri: String,
    settings: PagerSettings,
    session: Option<Session>,
    reconnected: bool,
    retry_page: u64,
    retry_count: u32,
}

impl Pager {
    async fn run(mut self, tx: mpsc::Sender<Result<Bytes, MediaError>>) {
        if let Err(e) = self.pump(&tx).await {
            tracing::warn!(uri = %self.uri, error = %e, "paged resource ended with an error");
            let _ = tx.send(Err(e.into())).await;
        }
    }

    /// Sends every page's bytes; returns at the end, or with the error that stopped it.
    async fn pump(
        &mut self,
        tx: &mpsc::Sender<Result<Bytes, MediaError>>,
    ) -> Result<(), PageError> {
        let page_bytes = self.settings.page_bytes.clamp(1, MAX_PAGE_BYTES);
        let depth = self.settings.prefetch + 1;
        let (mut delivered, mut pages) = (0u64, 0u64);
        loop {
            // Pages from `delivered` on, `depth` at a time. They are requested from a session
            // fixed for this batch; a short page or a retry starts a new batch.
            let session = self.current_session().await?;
            let mut in_flight = FuturesOrdered::new();
            let mut next = delivered;
            let mut index = pages;
            let mut batch_over = false;
            while !batch_over {
                while in_flight.len() < depth {
                    let range = ByteRange {
                        start: next,
                        end: next + page_bytes,
                    };
                    let peer = session.peer.clone();
                    let (uri, timeout) = (self.uri.clone(), self.settings.page_timeout);
                    in_flight.push_back(async move {
                        (range, read_page(&peer, &uri, index, range, timeout).await)
                    });
                    next += page_bytes;
                    index += 1;
                }
                let (range, result) = in_flight.next().await.expect("pages are in flight");
                match result {
                    Ok(Page::End) => return Ok(()),
                    Ok(Page::Bytes { data, .. }) => {
                        let len = data.len() as u64;
                        if pages >= self.settings.max_pages {
                            return Err(PageError::TooManyPages {
                                uri: self.uri.clone(),
                                max_pages: self.settings.max_pages,
                            });
                        }
                        if delivered + len > self.settings.max_bytes {
                            return Err(PageError::TooManyBytes {
                                uri: self.uri.clone(),
                                max_bytes: self.settings.max_bytes,
                            });
                        }
                        if tx.send(Ok(Bytes::from(data))).await.is_err() {
                            return Ok(()); // the consumer is gone
                        }
                        delivered += len;
                        pages += 1;
                        crate::metrics::get().pager_page(len);
                        // A short page is not the end: what follows starts where it stopped, so
                        // the pages already asked for beyond it are dropped (and cancelled).
                        batch_over = len < range.len();
                    }
                    Err(e) => {
                        self.recover(e, &session, pages).await?;
                        batch_over = true;
                    }
                }
            }
        }
    }

    async fn current_session(&mut self) -> Result<Session, PageError> {
        if let Some(session) = &self.session {
            return Ok(session.clone());
        }
        let session = self
            .connection
            .session()
            .await
            .map_err(|e| PageError::Unavailable {
                uri: self.uri.clone(),
                reason: e.to_string(),
            })?;
        self.session = Some(session.clone());
        Ok(session)
    }

    /// Decides whether a failed page is worth another try (after a backoff, or a reconnect) or
    /// ends the stream. Retries are counted per page.
    async fn recover(
        &mut self,
        error: PageError,
        session: &Session,
        page: u64,
    ) -> Result<(), PageError> {
        let closed = matches!(
            &error,
            PageError::Service {
                source: ServiceError::TransportClosed | ServiceError::TransportSend(_),
                ..
            }
        ) || session.peer.is_transport_closed();
        if closed {
            if self.reconnected {
                return Err(error);
            }
            tracing::warn!(uri = %self.uri, "session closed mid-stream; reconnecting once");
            self.reconnected = true;
            self.connection.reconnect(session).await;
            self.session = None;
            return Ok(());
        }
        let retryable = match &error {
            PageError::Timeout { .. } => true,
            PageError::Service {
                source: ServiceError::McpError(e),
                ..
            } => e.code == ErrorCode::INTERNAL_ERROR,
            _ => false,
        };
        let attempt = self.attempts_for(page);
        if !retryable || attempt >= self.settings.retries {
            return Err(error);
        }
        let backoff = self
            .settings
            .retry_backoff
            .saturating_mul(1 << attempt.min(16));
        tracing::debug!(uri = %self.uri, page, attempt, error = %error, "retrying page");
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    /// Retries already made for `page` (counting this one as made).
    fn attempts_for(&mut self, page: u64) -> u32 {
        if self.retry_page != page {
            self.retry_page = page;
            self.retry_count = 0;
        }
        self.retry_count += 1;
        self.retry_count - 1
    }
}
