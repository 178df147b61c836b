//! Opening audio to play: a local file, or an http(s) URL streamed as it downloads.

use std::path::Path;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decode::{PcmReceiver, decode_media, spawn_decoder};
use crate::media::{MediaError, MediaStream};

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {reason}")]
    File {
        /// The path given.
        path: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// The URL cannot be fetched.
    #[error("cannot fetch {url}: {reason}")]
    Http {
        /// The URL given.
        url: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
}

/// MIME type for a file name's extension (`audio/mpeg` for `.mp3`, ...); `None` if unknown,
/// and then the decoder goes by the bytes alone.
pub fn mime_for_extension(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "opus" => "audio/ogg; codecs=opus",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "m4a" | "mp4" | "aac" => "audio/mp4",
        _ => return None,
    })
}

/// Decodes `source`, a file path or an http(s) URL, as it is read.
///
/// # Errors
/// [`SourceError`] when the file cannot be opened or the URL answers with an error.
pub async fn open(source: &str) -> Result<PcmReceiver, SourceError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        return Ok(decode_media(fetch(source).await?));
    }
    let path = Path::new(source);
    let file = std::fs::File::open(path).map_err(|e| SourceError::File {
        path: source.into(),
        reason: e.to_string(),
    })?;
    let mime = mime_for_extension(source).unwrap_or("application/octet-stream");
    Ok(spawn_decoder(file, mime.to_string()))
}

/// Streams the body of `url` as a media stream (MIME type from `Content-Type`, else the URL's
/// extension).
///
/// # Errors
/// [`SourceError::Http`] for a connection failure or a non-2xx status.
pub async fn fetch(url: &str) -> Result<MediaStream, SourceError> {
    let error = |reason: String| SourceError::Http {
        url: url.to_string(),
        reason,
    };
    let response = reqwest::get(url).await.map_err(|e| error(e.to_string()))?;
    if !response.status().is_success() {
        return Err(error(format!("HTTP {}", response.status())));
    }
    let mime = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|m| m.starts_with("audio/") || m.starts_with("application/ogg"))
        .map(String::from)
        .or_else(|| mime_for_extension(url.split('?').next().unwrap_or(url)).map(String::from))
        .unwrap_or_else(|| "application/octet-stream".into());
    let title = url.rsplit('/').next().map(String::from);
    Ok(media_from_response(response, mime, title, url.to_string()))
}

/// The body of `response` as a media stream of `mime`, read as it arrives; a body error ends
/// the stream with that error. Dropping the stream stops the download.
pub fn media_from_response(
    response: reqwest::Response,
    mime: String,
    title: Option<String>,
    source: String,
) -> MediaStream {
    let size = response.content_length();
    let (tx, rx) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        loop {
            let chunk = tokio::select! {
                c = body.next() => c,
                _ = token.cancelled() => return,
            };
            let item = match chunk {
                None => return,
                Some(chunk) => chunk.map_err(|e| MediaError(e.to_string())),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    MediaStream::new(mime, title, source, size, rx, cancel)
}
