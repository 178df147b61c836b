//! The transcode cache's disk tier: the frames of an entry written to a file when its fill ends
//! (every frame: complete; or the frames made before every session left: partial), and read
//! back when a later session, perhaps of a later server, opens the same resource. A complete file
//! serves without decoding anything; a partial one serves its frames while a fill resumes after
//! them (`encode_into` in the parent module). Files are bounded by their total bytes
//! (`[audio] transcode_cache_disk_mb`), least recently used first out.
//!
//! One file per entry, named by the sha256 of its key, in a format of this module's own (all
//! integers little-endian):
//!
//! ```text
//! "VXTC" version:u8=1 complete:u8
//! uri_len:u32 uri size:u64 mime_len:u16 mime rate:u32 frame_ms:u32 bitrate:i32 complexity:i32
//! frames:u32 { packet_len:u16 rms:f32 packet }*frames
//! ```
//!
//! The key is stored whole and compared on read, so a name collision is a miss. A file that
//! does not parse is deleted and counted as a miss. Files are written under a temporary name and
//! renamed, so a reader never sees half a file; servers may share a directory (each bounds what
//! it has seen of it).

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{EncodedFrame, Key};

const MAGIC: &[u8; 4] = b"VXTC";
const VERSION: u8 = 1;
const SUFFIX: &str = "frames";

/// Frames read back from a file.
pub(super) struct Stored {
    pub frames: Vec<EncodedFrame>,
    /// Every frame of the resource (else the first `frames.len()`).
    pub complete: bool,
}

#[derive(Debug, Clone, Copy)]
struct FileInfo {
    bytes: u64,
    /// The tier's clock at its last write or read.
    used: u64,
    complete: bool,
    frames: usize,
}

struct Index {
    files: HashMap<String, FileInfo>,
    total: u64,
    clock: u64,
}

/// The directory of stored entries; one per process, shared by the cache.
pub struct DiskTier {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
}

impl DiskTier {
    /// The tier in `dir` (created if missing), bounded by `max_bytes`. The files already there
    /// are indexed, their modification times giving the least recently used order, and evicted
    /// down to the bound.
    ///
    /// # Errors
    /// When `dir` cannot be created or listed.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Ok(meta) = item.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.ends_with(".tmp") {
                // A write that never finished (a crash); another server's live write is younger.
                if modified.elapsed().is_ok_and(|age| age.as_secs() > 3600) {
                    let _ = std::fs::remove_file(item.path());
                }
                continue;
            }
            if name.ends_with(SUFFIX) && meta.is_file() {
                found.push((modified, name, meta.len()));
            }
        }
        found.sort();
        let mut index = Index {
            files: HashMap::new(),
            total: 0,
            clock: 0,
        };
        for (_, name, bytes) in found {
            index.clock += 1;
            index.total += bytes;
            // Whether it is complete and how long is read when it is first opened.
            index.files.insert(
                name,
                FileInfo {
                    bytes,
                    used: index.clock,
                    complete: false,
                    frames: 0,
                },
            );
        }
        let tier = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(index),
        };
        tier.evict();
        Ok(tier)
    }

    /// Bytes of the files indexed now.
    pub fn bytes(&self) -> u64 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored frames of `key`, if a file holds them. Blocking (file I/O).
    pub(super) fn load(&self, key: &Key) -> Option<Stored> {
        let name = file_name(key);
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            index.files.get_mut(&name)?.used = clock;
        }
        let path = self.dir.join(&name);
        let parsed = std::fs::read(&path).and_then(|data| parse(&data, key));
        let metrics = crate::metrics::get();
        match parsed {
            Ok(stored) => {
                // The modification time is the order a later server evicts in.
                if let Ok(file) = std::fs::File::options().append(true).open(&path) {
                    let _ = file.set_modified(SystemTime::now());
                }
                if let Some(file) = self.lock().files.get_mut(&name) {
                    file.complete = stored.complete;
                    file.frames = stored.frames.len();
                }
                metrics.transcode_cache_disk(if stored.complete {
                    "complete"
                } else {
                    "partial"
                });
                Some(stored)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "transcode cache: a stored entry does not read; deleted");
                    let _ = std::fs::remove_file(&path);
                }
                metrics.transcode_cache_disk("unreadable");
                self.forget(&name);
                None
            }
        }
    }

    /// Writes `frames` of `key` unless a file holds them already (complete, or as many). Blocking
    /// (file I/O); a failed write is logged and leaves no file.
    pub(super) fn store(&self, key: &Key, frames: &[EncodedFrame], complete: bool) {
        let name = file_name(key);
        if self
            .lock()
            .files
            .get(&name)
            .is_some_and(|f| f.complete || (!complete && f.frames >= frames.len()))
        {
            return;
        }
        let data = encode(key, frames, complete);
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            "{name}.{}.{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let path = self.dir.join(&name);
        if let Err(e) = std::fs::write(&tmp, &data).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), error = %e, "transcode cache: could not store an entry");
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        {
            let mut index = self.lock();
            index.clock += 1;
            let file = FileInfo {
                bytes: data.len() as u64,
                used: index.clock,
                complete,
                frames: frames.len(),
            };
            if let Some(old) = index.files.insert(name, file) {
                index.total -= old.bytes;
            }
            index.total += file.bytes;
        }
        self.evict();
    }

    fn forget(&self, name: &str) {
        let mut index = self.lock();
        if let Some(old) = index.files.remove(name) {
            index.total -= old.bytes;
        }
    }

    /// Deletes the least recently used files until the rest fit in `max_bytes`.
    fn evict(&self) {
        let mut index = self.lock();
        while index.total > self.max_bytes {
            let Some(name) = index
                .files
                .iter()
                .min_by_key(|(_, f)| f.used)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            if let Some(old) = index.files.remove(&name) {
                index.total -= old.bytes;
            }
            // Another server sharing the directory may have deleted it first.
            let _ = std::fs::remove_file(self.dir.join(&name));
            tracing::debug!(file = %name, "transcode cache: evicted from disk");
        }
        crate::metrics::get().transcode_cache_disk_bytes(index.total);
    }
}

/// The key's fields in the file's order.
fn key_bytes(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.uri.len() + key.mime.len() + 32);
    out.extend_from_slice(&(key.uri.len() as u32).to_le_bytes());
    out.extend_from_slice(key.uri.as_bytes());
    out.extend_from_slice(&key.size.to_le_bytes());
    out.extend_from_slice(&(key.mime.len() as u16).to_le_bytes());
    out.extend_from_slice(key.mime.as_bytes());
    out.extend_from_slice(&key.format.rate.to_le_bytes());
    out.extend_from_slice(&key.format.frame_ms.to_le_bytes());
    out.extend_from_slice(&key.format.bitrate.to_le_bytes());
    out.extend_from_slice(&key.format.complexity.to_le_bytes());
    out
}

pub(super) fn file_name(key: &Key) -> String {
    let digest = Sha256::digest(key_bytes(key));
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.{SUFFIX}")
}

fn encode(key: &Key, frames: &[EncodedFrame], complete: bool) -> Vec<u8> {
    let packets: usize = frames.iter().map(|f| f.packet.len() + 6).sum();
    let mut out = Vec::with_capacity(packets + key.uri.len() + 64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(u8::from(complete));
    out.extend_from_slice(&key_bytes(key));
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    for frame in frames {
        out.extend_from_slice(&(frame.packet.len() as u16).to_le_bytes());
        out.extend_from_slice(&frame.rms.to_le_bytes());
        out.extend_from_slice(&frame.packet);
    }
    out
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads a file written by [`encode`] for `key`.
fn parse(data: &[u8], key: &Key) -> io::Result<Stored> {
    let mut r = data;
    let mut head = [0u8; 6];
    r.read_exact(&mut head)?;
    if &head[..4] != MAGIC || head[4] != VERSION || head[5] > 1 {
        return Err(invalid("not a transcode cache file of this version"));
    }
    let expected = key_bytes(key);
    if r.len() < expected.len() || r[..expected.len()] != expected[..] {
        return Err(invalid("the file holds another resource or format"));
    }
    r = &r[expected.len()..];
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let count = u32::from_le_bytes(n) as usize;
    // Each frame is at least 6 bytes: a count the file cannot hold is corrupt, not allocated.
    if count > r.len() / 6 {
        return Err(invalid("more frames than bytes"));
    }
    let mut frames = Vec::with_capacity(count);
    for _ in 0..count {
        let mut len = [0u8; 2];
        let mut rms = [0u8; 4];
        r.read_exact(&mut len)?;
        r.read_exact(&mut rms)?;
        let len = u16::from_le_bytes(len) as usize;
        if len == 0 || len > r.len() {
            return Err(invalid("a frame runs past the end"));
        }
        frames.push(EncodedFrame {
            packet: Bytes::copy_from_slice(&r[..len]),
            rms: f32::from_le_bytes(rms),
        });
        r = &r[len..];
    }
    if !r.is_empty() {
        return Err(invalid("bytes after the last frame"));
    }
    Ok(Stored {
        frames,
        complete: head[5] == 1,
    })
}
