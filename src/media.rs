//! Media from tool results, as one type: a MIME type plus a byte stream that a decoder can start
//! on before it ends (ARCHITECTURE §2). Inline `audio` content and audio blobs arrive whole; audio
//! `resource_link`s arrive page by page from the tool layer's pager (`tools::pager`).

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use voxloop_paging::PageError;

/// Why a media stream ended early: the transfer failed (a page, a TTS request, a file read).
/// Bytes delivered before it stay valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MediaError(pub String);

impl From<PageError> for MediaError {
    fn from(e: PageError) -> Self {
        Self(e.to_string())
    }
}

/// One media item to play: what it is, and its bytes as they arrive.
///
/// Dropping it (or calling [`MediaStream::cancel`]) stops the transfer behind it.
#[derive(Debug)]
pub struct MediaStream {
    /// MIME type as the tool declared it (e.g. `audio/mpeg`); `application/octet-stream` when it
    /// gave none. It may lie: check with [`sniff_container`].
    pub mime_type: String,
    /// Title for history and logs (the resource's name), if known.
    pub title: Option<String>,
    /// Where the bytes come from: a resource URI, or `inline` for content that arrived whole.
    pub source: String,
    /// Size in bytes if the tool said (a `resource_link`'s `size`) or the bytes are all here.
    pub size: Option<u64>,
    chunks: mpsc::Receiver<Result<Bytes, MediaError>>,
    cancel: CancellationToken,
    /// Cancelled to cut the link from a turn's token ([`MediaStream::linked_to`]).
    turn_link: Option<CancellationToken>,
    _guard: DropGuard,
}

impl MediaStream {
    /// A stream fed by `chunks`; `cancel` is cancelled when the stream is cancelled or dropped.
    pub fn new(
        mime_type: String,
        title: Option<String>,
        source: String,
        size: Option<u64>,
        chunks: mpsc::Receiver<Result<Bytes, MediaError>>,
        cancel: CancellationToken,
    ) -> Self {
        let _guard = cancel.clone().drop_guard();
        Self {
            mime_type,
            title,
            source,
            size,
            chunks,
            cancel,
            turn_link: None,
            _guard,
        }
    }

    /// The stream, stopped also when `turn` is cancelled (a barge-in, a new request), until
    /// [`MediaStream::detach`]. Spawns a task: call it inside a tokio runtime.
    pub fn linked_to(mut self, turn: &CancellationToken) -> Self {
        let link = CancellationToken::new();
        let (turn, stream, unlinked) = (turn.clone(), self.cancel.clone(), link.clone());
        tokio::spawn(async move {
            tokio::select! {
                // A detach that came first wins over a turn cancelled after it.
                biased;
                _ = unlinked.cancelled() => {}
                _ = stream.cancelled() => {}
                _ = turn.cancelled() => stream.cancel(),
            }
        });
        self.turn_link = Some(link);
        self
    }

    /// Cuts the link to the turn that asked for it: from now on only dropping or cancelling
    /// the stream stops it. The transcode cache does this, because the frames it makes serve
    /// other sessions too; its fill stops when no session reads them.
    pub fn detach(&mut self) {
        if let Some(link) = self.turn_link.take() {
            link.cancel();
        }
    }

    /// The same bytes, ending with an error instead when fewer than `size` arrive (a transfer
    /// stopped part way ends like a whole one otherwise). Spawns a task that forwards the
    /// chunks; dropping the result stops it and the transfer. Call it inside a tokio runtime.
    pub fn checked_size(mut self) -> Self {
        let Some(size) = self.size else { return self };
        let (tx, rx) = mpsc::channel(1);
        let forward = CancellationToken::new();
        let stopped = forward.clone();
        let mut checked = Self::new(
            self.mime_type.clone(),
            self.title.clone(),
            self.source.clone(),
            self.size,
            rx,
            forward,
        );
        checked.turn_link = self.turn_link.take();
        tokio::spawn(async move {
            let mut received = 0u64;
            loop {
                let chunk = tokio::select! {
                    chunk = self.next_chunk() => chunk,
                    _ = stopped.cancelled() => return,
                };
                let item = match chunk {
                    Some(Ok(bytes)) => {
                        received += bytes.len() as u64;
                        Ok(bytes)
                    }
                    Some(Err(e)) => Err(e),
                    None if received < size => Err(MediaError(format!(
                        "{} ended after {received} of its {size} bytes",
                        self.source
                    ))),
                    None => return,
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        checked
    }

    /// Media whose bytes are all here already (inline audio, an embedded blob).
    pub fn from_bytes(mime_type: String, title: Option<String>, bytes: Bytes) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let size = Some(bytes.len() as u64);
        tx.try_send(Ok(bytes)).expect("a fresh channel has room");
        Self::new(
            mime_type,
            title,
            "inline".into(),
            size,
            rx,
            CancellationToken::new(),
        )
    }

    /// The next piece of bytes in order; `None` at the end. An `Err` is the last item: the bytes
    /// before it stay valid.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, MediaError>> {
        self.chunks.recv().await
    }

    /// [`MediaStream::next_chunk`] for a blocking thread (a decoder). Must not be called from
    /// inside an async task.
    pub fn blocking_next_chunk(&mut self) -> Option<Result<Bytes, MediaError>> {
        self.chunks.blocking_recv()
    }

    /// The next piece if one has arrived: `Poll::Pending` when none waits yet, else as
    /// [`MediaStream::next_chunk`].
    pub fn try_next_chunk(&mut self) -> std::task::Poll<Option<Result<Bytes, MediaError>>> {
        match self.chunks.try_recv() {
            Ok(chunk) => std::task::Poll::Ready(Some(chunk)),
            Err(mpsc::error::TryRecvError::Empty) => std::task::Poll::Pending,
            Err(mpsc::error::TryRecvError::Disconnected) => std::task::Poll::Ready(None),
        }
    }

    /// Stops the transfer (pending page requests are cancelled). Chunks already received may
    /// still be read.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

/// True for MIME types voxloop plays: `audio/*` and `application/ogg`.
pub fn is_audio_mime(mime: &str) -> bool {
    let essence = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("audio/") || essence == "application/ogg"
}

/// A file extension (without the dot) for a MIME type, for saving media: `mp3`, `ogg`, `opus`,
/// `flac`, `wav`, `m4a`, else `bin`.
pub fn file_extension(mime: &str) -> &'static str {
    let m = mime.to_ascii_lowercase();
    let essence = m.split(';').next().unwrap_or("").trim();
    match essence {
        "audio/mpeg" | "audio/mp3" => "mp3",
        "audio/opus" => "opus",
        "audio/ogg" | "application/ogg" if m.contains("opus") => "opus",
        "audio/ogg" | "application/ogg" => "ogg",
        "audio/flac" | "audio/x-flac" => "flac",
        "audio/wav" | "audio/x-wav" | "audio/wave" => "wav",
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" => "m4a",
        _ => "bin",
    }
}

/// The container the first bytes of a file show, as a MIME type: `audio/mpeg` (ID3 tag or an
/// MPEG audio frame sync), `audio/ogg` (`OggS`; `audio/ogg; codecs=opus` when the first page
/// holds `OpusHead`), `audio/flac` (`fLaC`), `audio/wav` (`RIFF....WAVE`), `audio/mp4`
/// (`....ftyp`). `None` when the bytes match none of them (raw PCM, or not audio).
pub fn sniff_container(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"ID3") {
        return Some("audio/mpeg");
    }
    if head.starts_with(b"OggS") {
        let first_page = &head[..head.len().min(128)];
        let opus = first_page.windows(8).any(|w| w == b"OpusHead");
        return Some(if opus {
            "audio/ogg; codecs=opus"
        } else {
            "audio/ogg"
        });
    }
    if head.starts_with(b"fLaC") {
        return Some("audio/flac");
    }
    if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        return Some("audio/wav");
    }
    if head.len() >= 8 && &head[4..8] == b"ftyp" {
        return Some("audio/mp4");
    }
    // MPEG audio frame sync: 11 set bits, a valid version (not 01) and layer (not 00).
    if head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 {
        let version = (head[1] >> 3) & 0b11;
        let layer = (head[1] >> 1) & 0b11;
        if version != 0b01 && layer != 0b00 {
            return Some("audio/mpeg");
        }
    }
    None
}

/// True when a declared MIME type names the container `sniffed` found, allowing the common
/// aliases (`audio/mp3`, `audio/x-wav`, `audio/x-flac`, `audio/opus`, `audio/m4a`, ...).
pub fn mime_matches(declared: &str, sniffed: &str) -> bool {
    let canonical = |m: &str| -> &'static str {
        let m = m.to_ascii_lowercase();
        let essence = m.split(';').next().unwrap_or("").trim().to_string();
        let opus = m.contains("opus");
        match essence.as_str() {
            "audio/mpeg" | "audio/mp3" | "audio/mpeg3" | "audio/x-mpeg" => "mpeg",
            "audio/ogg" | "application/ogg" | "audio/vorbis" if !opus => "ogg",
            "audio/ogg" | "application/ogg" | "audio/opus" => "opus",
            "audio/flac" | "audio/x-flac" => "flac",
            "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => "wav",
            "audio/mp4" | "audio/m4a" | "audio/x-m4a" | "audio/aac" => "mp4",
            _ => "other",
        }
    };
    let (d, s) = (canonical(declared), canonical(sniffed));
    // An Ogg declared without codecs may hold Opus.
    d == s || (d == "ogg" && s == "opus")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/assets/music/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn sniffs_the_bundled_tracks() {
        assert_eq!(
            sniff_container(&asset("torus_trooper_tt1.mp3")),
            Some("audio/mpeg")
        );
        assert_eq!(
            sniff_container(&asset("torus_trooper_tt1.ogg")),
            Some("audio/ogg")
        );
        assert_eq!(
            sniff_container(&asset("tumiki_return_to_home.flac")),
            Some("audio/flac")
        );
        assert_eq!(sniff_container(b"RIFF\0\0\0\0WAVEfmt "), Some("audio/wav"));
        assert_eq!(
            sniff_container(&[0xFF, 0xFB, 0x90, 0x64]),
            Some("audio/mpeg")
        );
        assert_eq!(sniff_container(b"%PDF-1.7"), None);
        assert_eq!(sniff_container(b""), None);
    }

    #[test]
    fn mime_aliases() {
        assert!(mime_matches("audio/mp3", "audio/mpeg"));
        assert!(mime_matches("audio/ogg", "audio/ogg; codecs=opus"));
        assert!(mime_matches("audio/x-wav", "audio/wav"));
        assert!(!mime_matches("audio/flac", "audio/mpeg"));
        assert!(!mime_matches("audio/ogg; codecs=opus", "audio/ogg"));
        assert!(is_audio_mime("Audio/MPEG"));
        assert_eq!(file_extension("audio/ogg; codecs=opus"), "opus");
        assert_eq!(file_extension("audio/flac"), "flac");
        assert_eq!(file_extension("text/plain"), "bin");
        assert!(is_audio_mime("application/ogg"));
        assert!(!is_audio_mime("image/png"));
    }

    #[tokio::test]
    async fn inline_media_yields_its_bytes_once() {
        let mut media =
            MediaStream::from_bytes("audio/wav".into(), None, Bytes::from_static(b"abc"));
        assert_eq!(media.size, Some(3));
        assert_eq!(
            media.next_chunk().await.unwrap().unwrap(),
            Bytes::from_static(b"abc")
        );
        assert!(media.next_chunk().await.is_none());
    }
}
