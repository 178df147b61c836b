//! The music catalog: local files found in the library directory, plus remote tracks from an
//! optional catalog file, in one stable order (local files by path, then remote tracks as listed).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use reqwest::Url;
use serde::Deserialize;

use crate::upstream::LibraryFiles;
use symphonia::core::formats::FormatOptions;
use symphonia::core::formats::probe::Hint;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::{MetadataOptions, StandardTag};

/// File extensions the library scan picks up, with their MIME types.
const AUDIO_TYPES: &[(&str, &str)] = &[
    ("mp3", "audio/mpeg"),
    ("ogg", "audio/ogg"),
    ("opus", "audio/ogg; codecs=opus"),
    ("flac", "audio/flac"),
    ("wav", "audio/wav"),
    ("m4a", "audio/mp4"),
];

/// One playable track.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub title: String,
    pub artist: Option<String>,
    /// Where the bytes come from: a library file (`library://local/...`, read from disk) or a
    /// remote http(s) URL.
    pub url: Url,
    pub mime_type: String,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// Path relative to the library (local tracks), searched like title and artist.
    pub file_name: Option<String>,
}

impl Track {
    /// `"artist - title"`, or the title alone.
    pub fn description(&self) -> String {
        match &self.artist {
            Some(artist) => format!("{artist} - {}", self.title),
            None => self.title.clone(),
        }
    }
}

/// MIME type for an audio file name, by extension (case-insensitive).
pub fn mime_for_path(path: &str) -> Option<&'static str> {
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    AUDIO_TYPES.iter().find(|(e, _)| *e == ext).map(|(_, m)| *m)
}

/// Scheme of library tracks' URLs: `library://local/{relative path, percent-encoded}`. The URL
/// only names a track of the catalog; the server maps it to the file ([`LibraryFiles`]).
pub const LIBRARY_SCHEME: &str = "library";

/// Scans `library` recursively for audio files: the tracks, and their files by URL.
///
/// Symbolic links are followed only where they stay inside the library (the canonical path
/// must be under the library's canonical path); one that leaves it is skipped with a warning.
/// File names need not be UTF-8 or free of control characters: the URL encodes the name's
/// bytes, the title shows them lossily.
pub fn scan_library(library: &Path) -> anyhow::Result<(Vec<Track>, LibraryFiles)> {
    if !library.is_dir() {
        bail!("music library {} is not a directory", library.display());
    }
    let root = library
        .canonicalize()
        .with_context(|| format!("resolving {}", library.display()))?;
    let mut tracks = Vec::new();
    let mut files = LibraryFiles::new();
    let walk = walkdir::WalkDir::new(library)
        .follow_links(true)
        .sort_by_file_name();
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.loop_ancestor().is_some() || e.io_error().is_some() => {
                tracing::warn!(error = %e, "library entry skipped");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("scanning {}", library.display())),
        };
        let path = entry.path();
        let Some(mime_type) = mime_for_path(&path.to_string_lossy()) else {
            continue;
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let real = match path.canonicalize() {
            Ok(real) if real.starts_with(&root) => real,
            Ok(real) => {
                tracing::warn!(path = %path.display(), target = %real.display(), "a link out of the library; skipped");
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable; skipped");
                continue;
            }
        };
        let relative = path.strip_prefix(library).unwrap_or(path);
        let encoded: Vec<String> = relative
            .iter()
            .map(|part| url::form_urlencoded::byte_serialize(part.as_encoded_bytes()).collect())
            .collect();
        let url = Url::parse(&format!("{LIBRARY_SCHEME}://local/{}", encoded.join("/")))
            .with_context(|| format!("a URL for {}", path.display()))?;
        let shown: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if shown.iter().any(|p| p.contains('\u{FFFD}')) {
            tracing::info!(path = %path.display(), "file name is not UTF-8; listed with its readable part");
        }
        let (title, artist) = read_tags(path);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        tracks.push(Track {
            title: title.unwrap_or_else(|| title_from_file_name(&stem)),
            artist,
            url: url.clone(),
            mime_type: mime_type.to_string(),
            size: Some(entry.metadata()?.len()),
            file_name: Some(shown.join("/")),
        });
        files.insert(url, real);
    }
    Ok((tracks, files))
}

/// Title and artist from the file's tags (ID3, Vorbis comments, FLAC, MP4), when it has them.
/// A file symphonia cannot read has no tags; it is still listed.
fn read_tags(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(file) = File::open(path) else {
        return (None, None);
    };
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probe = symphonia::default::get_probe();
    let Ok(mut format) = probe.probe(
        &hint,
        mss,
        FormatOptions::default(),
        MetadataOptions::default(),
    ) else {
        tracing::warn!(path = %path.display(), "cannot read tags; using the file name");
        return (None, None);
    };
    // Files may carry several tags (an ID3v2 tag in front of another, say): newest first, the
    // first title and the first artist found win.
    let mut metadata = format.metadata();
    let mut revisions = Vec::new();
    while let Some(revision) = metadata.pop() {
        revisions.push(revision);
    }
    revisions.extend(metadata.current().cloned());
    let (mut title, mut artist) = (None, None);
    for revision in revisions.iter().rev() {
        let tags = revision
            .media
            .tags
            .iter()
            .chain(revision.per_track.iter().flat_map(|t| &t.metadata.tags));
        for tag in tags {
            match &tag.std {
                Some(StandardTag::TrackTitle(v)) if title.is_none() => title = non_empty(v),
                Some(StandardTag::Artist(v)) if artist.is_none() => artist = non_empty(v),
                _ => {}
            }
        }
    }
    (title, artist)
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// `"tumiki_just_over_the_horizon"` -> `"Tumiki Just Over The Horizon"`.
fn title_from_file_name(stem: &str) -> String {
    stem.split(['_', '-', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            let first = chars.next().map(|c| c.to_uppercase().collect::<String>());
            first.unwrap_or_default() + chars.as_str()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One `[[track]]` of a remote catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteTrack {
    title: String,
    artist: Option<String>,
    url: String,
    mime_type: Option<String>,
    size: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteCatalog {
    #[serde(default)]
    track: Vec<RemoteTrack>,
}

/// Reads a catalog file of remote tracks:
///
/// ```toml
/// [[track]]
/// title = "Song"
/// artist = "Someone"            # optional
/// url = "https://cdn.example/song.mp3"
/// mime_type = "audio/mpeg"      # optional when the URL ends in a known extension
/// size = 1234567                # optional, bytes
/// ```
pub fn load_remote_catalog(path: &PathBuf) -> anyhow::Result<Vec<Track>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading catalog {}", path.display()))?;
    let catalog: RemoteCatalog =
        toml::from_str(&text).with_context(|| format!("catalog {}", path.display()))?;
    catalog
        .track
        .into_iter()
        .map(|t| {
            let url = Url::parse(&t.url)
                .with_context(|| format!("catalog {}: track {:?} url", path.display(), t.title))?;
            if !matches!(url.scheme(), "http" | "https") {
                bail!(
                    "catalog {}: track {:?}: url must be http(s)",
                    path.display(),
                    t.title
                );
            }
            let mime_type = match t.mime_type {
                Some(m) => m,
                None => mime_for_path(url.path())
                    .with_context(|| {
                        format!(
                            "catalog {}: track {:?} needs mime_type (unknown extension)",
                            path.display(),
                            t.title
                        )
                    })?
                    .to_string(),
            };
            Ok(Track {
                title: t.title,
                artist: t.artist,
                url,
                mime_type,
                size: t.size,
                file_name: None,
            })
        })
        .collect()
}

/// Lower-case words of `s`, split at anything that is not a letter or digit.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A word as it sounds, roughly: lower-case, with spellings of the same sound made one
/// ("ph" f, "ck"/"q" k, "z" s, "au" o) and doubled letters single, so that hearing slips such
/// as "Taurus" for "Torus" compare equal.
fn sound(word: &str) -> String {
    let word = word
        .to_lowercase()
        .replace("ph", "f")
        .replace("ck", "k")
        .replace('q', "k")
        .replace('z', "s")
        .replace("au", "o");
    let mut out = String::new();
    for c in word.chars() {
        if !out.ends_with(c) {
            out.push(c);
        }
    }
    out
}

/// How alike two words are, 0..=1: 1 when one starts the other (at least 3 characters, or the
/// whole of both), else 1 - their Levenshtein distance over the longer one's length, compared
/// as they sound ([`sound`]).
fn word_similarity(query: &str, word: &str) -> f64 {
    let (q, w) = (sound(query), sound(word));
    if q == w || (q.chars().count() >= 3 && w.starts_with(&q)) {
        return 1.0;
    }
    strsim::normalized_levenshtein(&q, &w)
}

/// How well `track` matches the query words, 0..=1: the better of (a) the query words' mean best
/// similarity to a word of the title (weight 1), the artist (0.9) or the file name (0.8), and
/// (b) the similarity of the query and the title written without spaces (a hearing slip that
/// splits words differently: "me turn to toe" for "return to home").
fn score(track: &Track, query_words: &[String]) -> f64 {
    let fields = [
        (words(&track.title), 1.0),
        (words(track.artist.as_deref().unwrap_or("")), 0.9),
        (words(track.file_name.as_deref().unwrap_or("")), 0.8),
    ];
    let coverage = query_words
        .iter()
        .map(|q| {
            fields
                .iter()
                .flat_map(|(field, weight)| {
                    field.iter().map(move |w| word_similarity(q, w) * weight)
                })
                .fold(0.0, f64::max)
        })
        .sum::<f64>()
        / query_words.len() as f64;
    let joined = |ws: &[String]| ws.iter().map(|w| sound(w)).collect::<String>();
    let whole = strsim::normalized_levenshtein(&joined(query_words), &joined(&fields[0].0));
    coverage.max(whole)
}

/// Words of a spoken request that name no track ("play some music", "I would like to hear
/// ..."), and short function words ("of", "by") whose slips would only dilute a match ("the
/// storm of the horizon", as whisper heard "just over the horizon"): left out of the query words.
const REQUEST_WORDS: &[&str] = &[
    "a",
    "and",
    "at",
    "by",
    "from",
    "in",
    "of",
    "with",
    "an",
    "any",
    "can",
    "could",
    "hear",
    "i",
    "i'd",
    "like",
    "listen",
    "me",
    "music",
    "my",
    "on",
    "play",
    "please",
    "put",
    "some",
    "something",
    "song",
    "songs",
    "the",
    "to",
    "track",
    "tune",
    "want",
    "would",
    "you",
    "let's",
    "us",
    "for",
];

/// Chinese request words ("播放音乐", "我想听一首歌"): removed from the query before it is split.
const REQUEST_WORDS_ZH: &[&str] = &[
    "我想听",
    "我要听",
    "播放",
    "放一首",
    "来一首",
    "一首",
    "音乐",
    "歌曲",
    "听",
    "请",
    "首",
    "歌",
];

/// The least [`score`] that counts as a match: a query less alike than this to every track
/// gets "no match" and suggestions, never a random track.
pub const MIN_MATCH_SCORE: f64 = 0.6;

/// The query words of a spoken request: lower-case words without [`REQUEST_WORDS`] (and the
/// Chinese ones).
fn query_words(query: &str) -> Vec<String> {
    let mut query = query.to_lowercase().replace('’', "'");
    for w in REQUEST_WORDS_ZH {
        query = query.replace(w, " ");
    }
    query
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty() && !REQUEST_WORDS.contains(w))
        .map(str::to_string)
        .collect()
}

/// The best match for `query` on title, artist and file name, tolerant of hearing slips
/// ([`score`] at least [`MIN_MATCH_SCORE`]); ties go to the earlier track. No query, a blank
/// one, or one of only request words ("play some music"): the first track. Nothing alike
/// enough: `None`.
pub fn best_match<'a>(tracks: &'a [Track], query: Option<&str>) -> Option<&'a Track> {
    let query = query.map(str::trim).filter(|q| !q.is_empty());
    let Some(query) = query else {
        return tracks.first();
    };
    if let Some(exact) = tracks.iter().find(|t| t.title.eq_ignore_ascii_case(query)) {
        return Some(exact);
    }
    let query_words = query_words(query);
    if query_words.is_empty() {
        return tracks.first();
    }
    let mut best: Option<(&Track, f64)> = None;
    for track in tracks {
        let s = score(track, &query_words);
        if s >= MIN_MATCH_SCORE && best.is_none_or(|(_, b)| s > b) {
            best = Some((track, s));
        }
    }
    best.map(|(t, _)| t)
}

/// Up to `n` titles most like `query` (for a "no match" answer), best first.
pub fn suggestions<'a>(tracks: &'a [Track], query: Option<&str>, n: usize) -> Vec<&'a str> {
    let words = query_words(query.unwrap_or_default());
    let mut scored: Vec<(f64, usize, &Track)> = tracks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let s = if words.is_empty() {
                0.0
            } else {
                score(t, &words)
            };
            (s, i, t)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut titles: Vec<&str> = Vec::new();
    for (_, _, track) in scored {
        if titles.len() < n && !titles.contains(&track.title.as_str()) {
            titles.push(&track.title);
        }
    }
    titles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(title: &str, artist: Option<&str>, file: &str) -> Track {
        Track {
            title: title.into(),
            artist: artist.map(Into::into),
            url: Url::parse("http://127.0.0.1/x").unwrap(),
            mime_type: "audio/mpeg".into(),
            size: None,
            file_name: Some(file.into()),
        }
    }

    #[test]
    fn file_name_titles() {
        assert_eq!(
            title_from_file_name("tumiki_just_over-the horizon"),
            "Tumiki Just Over The Horizon"
        );
    }

    #[test]
    fn matching_prefers_title_then_artist_then_file() {
        let tracks = [
            track("Alpha", Some("Zed"), "one.mp3"),
            track("Beta Horizon", None, "two.mp3"),
            track("Gamma", Some("Horizon Band"), "three.mp3"),
        ];
        assert_eq!(
            best_match(&tracks, Some("HORIZON")).unwrap().title,
            "Beta Horizon"
        );
        assert_eq!(best_match(&tracks, Some("zed")).unwrap().title, "Alpha");
        assert_eq!(best_match(&tracks, Some("three")).unwrap().title, "Gamma");
        assert_eq!(best_match(&tracks, Some("gamma")).unwrap().title, "Gamma");
        assert_eq!(best_match(&tracks, None).unwrap().title, "Alpha");
        assert_eq!(best_match(&tracks, Some("  ")).unwrap().title, "Alpha");
        assert!(best_match(&tracks, Some("nothing like it")).is_none());
        // Request words name no track.
        assert_eq!(
            best_match(&tracks, Some("Play some music")).unwrap().title,
            "Alpha"
        );
        assert_eq!(
            best_match(&tracks, Some("play the song gamma, please"))
                .unwrap()
                .title,
            "Gamma"
        );
        assert!(best_match(&[], None).is_none());
    }

    #[test]
    fn hearing_slips_still_find_the_track_and_strangers_find_none() {
        let tracks = [
            track("Tumiki Just Over The Horizon", None, "a.mp3"),
            track("Torus Trooper Tt1", None, "b.mp3"),
            track("Tumiki Return To Home", None, "c.flac"),
        ];
        let title = |q: &str| best_match(&tracks, Some(q)).map(|t| t.title.as_str());
        assert_eq!(title("Taurus trooper"), Some("Torus Trooper Tt1"));
        assert_eq!(
            title("I would like to hear taurus trooper"),
            Some("Torus Trooper Tt1")
        );
        assert_eq!(title("me turn to toe"), Some("Tumiki Return To Home"));
        assert_eq!(
            title("just over the horizont"),
            Some("Tumiki Just Over The Horizon")
        );
        assert_eq!(
            title("the storm of the horizon"),
            Some("Tumiki Just Over The Horizon")
        );
        assert_eq!(title("some music"), Some("Tumiki Just Over The Horizon"));
        assert_eq!(title("播放音乐"), Some("Tumiki Just Over The Horizon"));
        assert_eq!(title("jazz"), None);
        assert_eq!(title("Bohemian Rhapsody by Queen"), None);
        assert_eq!(
            suggestions(&tracks, Some("taurus"), 2)[0],
            "Torus Trooper Tt1"
        );
        assert_eq!(suggestions(&tracks, Some("jazz"), 5).len(), 3);
    }

    #[test]
    fn mime_by_extension() {
        assert_eq!(mime_for_path("a/B.MP3"), Some("audio/mpeg"));
        assert_eq!(mime_for_path("x.flac"), Some("audio/flac"));
        assert_eq!(mime_for_path("x.txt"), None);
        assert_eq!(mime_for_path("noext"), None);
    }
}
