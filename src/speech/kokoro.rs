//! Kokoro-82M (hexgrad, Apache-2.0), a neural TTS of 82M parameters, run with ONNX Runtime
//! through the `ort` crate (`load-dynamic`: `libonnxruntime.so` from the PyPI `onnxruntime`
//! wheel, loaded at run time).
//!
//! The graph (`kokoro-v1.0.int8.onnx`, kokoro-onnx's int8 export) takes `tokens` int64 `[1, n+2]`
//! (phoneme ids, 0 at both ends), `style` f32 `[1, 256]` and `speed` f32 `[1]`, and gives
//! `audio` f32 at 24 kHz. A voice is 510 rows of 256 floats (`voices/NAME.bin` in npm's
//! `kokoro-js`): the row for `n` phonemes is the style. At most 510 phonemes go in one run;
//! longer text is cut at punctuation, else at a space ([`chunks`]).
//!
//! One ONNX Runtime session serves the process (ONNX Runtime's `Run` takes the session
//! mutably here), behind a mutex: syntheses run one at a time on `threads` cores, off the async
//! runtime, so many sessions queue instead of thrashing the CPU.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Output sample rate, Hz.
pub const SAMPLE_RATE: u32 = 24_000;
/// Most phonemes in one run of the model (its context is 512 with the two end tokens).
pub const MAX_PHONEMES: usize = 510;
/// Floats in one style row.
const STYLE_DIM: usize = 256;
/// Rows in a voice.
const VOICE_ROWS: usize = 510;

/// The phoneme vocabulary (kokoro-onnx's `vocab`, the model's own ids): symbol -> id.
fn vocab() -> &'static HashMap<char, i64> {
    static VOCAB: OnceLock<HashMap<char, i64>> = OnceLock::new();
    VOCAB.get_or_init(|| {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../assets/kokoro/vocab.json"))
                .expect("the bundled vocabulary is JSON");
        json["vocab"]
            .as_object()
            .expect("a vocab object")
            .iter()
            .filter_map(|(k, v)| Some((k.chars().next()?, v.as_i64()?)))
            .collect()
    })
}

/// Phoneme ids of `phonemes`; symbols outside the vocabulary are left out.
pub fn tokenize(phonemes: &str) -> Vec<i64> {
    let vocab = vocab();
    phonemes
        .chars()
        .filter_map(|c| vocab.get(&c).copied())
        .collect()
}

/// `phonemes` cut into pieces of at most [`MAX_PHONEMES`] symbols: after a sentence mark if one
/// is near enough, else after a clause mark, else at a space, else anywhere.
pub fn chunks(phonemes: &str) -> Vec<String> {
    let chars: Vec<char> = phonemes.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    while chars.len() - start > MAX_PHONEMES {
        let window = &chars[start..start + MAX_PHONEMES];
        let cut = [
            &['.', '!', '?', '…'][..],
            &[',', ';', ':', '—'][..],
            &[' '][..],
        ]
        .iter()
        .find_map(|marks| {
            window
                .iter()
                .rposition(|c| marks.contains(c))
                .filter(|&i| i > MAX_PHONEMES / 4)
        })
        .map(|i| i + 1)
        .unwrap_or(MAX_PHONEMES);
        out.push(
            chars[start..start + cut]
                .iter()
                .collect::<String>()
                .trim()
                .to_string(),
        );
        start += cut;
    }
    out.push(chars[start..].iter().collect::<String>().trim().to_string());
    out.retain(|c| !c.is_empty());
    out
}

/// Why Kokoro could not load or speak.
#[derive(Debug, thiserror::Error)]
pub enum KokoroError {
    /// A model or voice file is missing or unreadable.
    #[error("Kokoro file {path}: {reason}")]
    File {
        /// The model or voice file.
        path: PathBuf,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// ONNX Runtime could not be loaded or set up.
    #[error("ONNX Runtime ({library}): {reason}")]
    Runtime {
        /// The shared library loaded.
        library: PathBuf,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
    /// A voice not in the voices file.
    #[error("unknown Kokoro voice {voice:?}; the voices are: {known}")]
    UnknownVoice {
        /// The voice asked for.
        voice: String,
        /// The valid voices, comma-separated.
        known: String,
    },
    /// The model failed while running (ONNX Runtime's message).
    #[error("Kokoro inference failed: {0}")]
    Inference(String),
}

/// The files Kokoro needs, in the model directory (`voxloop models fetch kokoro
/// kokoro-voices onnxruntime`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KokoroFiles {
    /// The ONNX graph.
    pub model: PathBuf,
    /// npm's `kokoro-js` package (its `package/voices/*.bin`).
    pub voices: PathBuf,
    /// `libonnxruntime.so`.
    pub runtime: PathBuf,
}

impl KokoroFiles {
    /// The files in `dir` under the names `voxloop models` gives them.
    pub fn in_dir(dir: &Path) -> Self {
        let file = |name: &str| {
            dir.join(
                crate::models::spec(name)
                    .map(|s| s.file)
                    .unwrap_or_default(),
            )
        };
        Self {
            model: file("kokoro"),
            voices: file("kokoro-voices"),
            runtime: file("onnxruntime"),
        }
    }

    /// The first file that is missing.
    pub fn missing(&self) -> Option<&Path> {
        [&self.model, &self.voices, &self.runtime]
            .into_iter()
            .find(|p| !p.is_file())
            .map(PathBuf::as_path)
    }
}

/// A loaded Kokoro: the session and every voice of the package.
pub struct Kokoro {
    session: Mutex<ort::session::Session>,
    /// Voice name -> 510 x 256 floats.
    voices: HashMap<String, Vec<f32>>,
}

/// Reads every `package/voices/NAME.bin` of the `kokoro-js` tarball.
fn read_voices(path: &Path) -> Result<HashMap<String, Vec<f32>>, KokoroError> {
    let bad = |reason: String| KokoroError::File {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut voices = HashMap::new();
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let Some(voice) = name
            .strip_prefix("package/voices/")
            .and_then(|n| n.strip_suffix(".bin"))
            .map(str::to_string)
        else {
            continue;
        };
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() != VOICE_ROWS * STYLE_DIM * 4 {
            return Err(bad(format!(
                "voice {voice} has {} bytes, expected {} (510 x 256 f32)",
                bytes.len(),
                VOICE_ROWS * STYLE_DIM * 4
            )));
        }
        let floats = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        voices.insert(voice, floats);
    }
    if voices.is_empty() {
        return Err(bad("no package/voices/*.bin in it".into()));
    }
    Ok(voices)
}

impl Kokoro {
    /// Loads ONNX Runtime from `files.runtime` (once per process), the graph with `threads`
    /// intra-op threads (0: ONNX Runtime's choice, one per core), and the voices.
    ///
    /// # Errors
    /// [`KokoroError`]: a file missing or unreadable, a runtime that does not load.
    pub fn load(files: &KokoroFiles, threads: usize) -> Result<Self, KokoroError> {
        if let Some(missing) = files.missing() {
            return Err(KokoroError::File {
                path: missing.to_path_buf(),
                reason: "missing (voxloop models fetch kokoro kokoro-voices onnxruntime)".into(),
            });
        }
        let environment = runtime(&files.runtime)?;
        let inference = |e: ort::Error| KokoroError::File {
            path: files.model.clone(),
            reason: e.to_string(),
        };
        // Threads sleep between runs instead of spinning: whisper and the chat model share the
        // cores.
        let mut builder = ort::session::Session::builder(environment)
            .map_err(inference)?
            .with_intra_op_spinning(false)
            .map_err(|e| inference(e.into()))?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| inference(e.into()))?;
        }
        let session = builder.commit_from_file(&files.model).map_err(inference)?;
        Ok(Self {
            session: Mutex::new(session),
            voices: read_voices(&files.voices)?,
        })
    }

    /// The voices, sorted.
    pub fn voice_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.voices.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Checks that `voice` exists.
    ///
    /// # Errors
    /// [`KokoroError::UnknownVoice`] naming the valid ones.
    pub fn check_voice(&self, voice: &str) -> Result<(), KokoroError> {
        if self.voices.contains_key(voice) {
            return Ok(());
        }
        Err(KokoroError::UnknownVoice {
            voice: voice.to_string(),
            known: self.voice_names().join(", "),
        })
    }

    /// Speech for `phonemes` (misaki's symbols, [`super::g2p`]) in `voice` at `speed` (1.0:
    /// the voice's own): mono f32 samples at [`SAMPLE_RATE`]. Blocks: call it off the async
    /// runtime.
    ///
    /// # Errors
    /// [`KokoroError::UnknownVoice`], or the runtime's error.
    pub fn synthesize(
        &self,
        phonemes: &str,
        voice: &str,
        speed: f32,
    ) -> Result<Vec<f32>, KokoroError> {
        self.check_voice(voice)?;
        let style_rows = &self.voices[voice];
        let mut audio = Vec::new();
        for chunk in chunks(phonemes) {
            let ids = tokenize(&chunk);
            if ids.is_empty() {
                continue;
            }
            let row = ids.len().min(VOICE_ROWS - 1);
            let style = style_rows[row * STYLE_DIM..(row + 1) * STYLE_DIM].to_vec();
            let mut tokens = Vec::with_capacity(ids.len() + 2);
            tokens.push(0);
            tokens.extend(ids);
            tokens.push(0);
            let failed = |e: ort::Error| KokoroError::Inference(e.to_string());
            let tokens =
                ort::value::Tensor::from_array(([1usize, tokens.len()], tokens)).map_err(failed)?;
            let style =
                ort::value::Tensor::from_array(([1usize, STYLE_DIM], style)).map_err(failed)?;
            let speed = ort::value::Tensor::from_array(([1usize], vec![speed])).map_err(failed)?;
            let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
            let outputs = session
                .run(ort::inputs![
                    "tokens" => tokens,
                    "style" => style,
                    "speed" => speed,
                ])
                .map_err(failed)?;
            let (_, samples) = outputs["audio"]
                .try_extract_tensor::<f32>()
                .map_err(failed)?;
            audio.extend_from_slice(samples);
        }
        Ok(audio)
    }
}

/// ONNX Runtime's environment, loaded from `library` once per process; a second, different
/// library is an error (one runtime per process).
fn runtime(library: &Path) -> Result<&'static ort::environment::Environment, KokoroError> {
    static LOADED: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> =
        OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let builder = ort::init_from(library).map_err(|e| e.to_string())?;
        let environment = builder
            .with_name("voxloop")
            .build()
            .map_err(|e| e.to_string())?;
        Ok((library.to_path_buf(), environment))
    });
    match loaded {
        Ok((path, environment)) if path == library => Ok(environment),
        Ok((path, _)) => Err(KokoroError::Runtime {
            library: library.to_path_buf(),
            reason: format!("ONNX Runtime was already loaded from {}", path.display()),
        }),
        Err(reason) => Err(KokoroError::Runtime {
            library: library.to_path_buf(),
            reason: reason.clone(),
        }),
    }
}

/// The process's Kokoro for `files`, loaded on first use and shared (the model is 92 MB and
/// takes about a second to load). A failed load is not cached: the next call tries again.
///
/// # Errors
/// As [`Kokoro::load`].
pub fn shared(files: &KokoroFiles, threads: usize) -> Result<Arc<Kokoro>, KokoroError> {
    static LOADED: OnceLock<Mutex<HashMap<KokoroFiles, Arc<Kokoro>>>> = OnceLock::new();
    let cache = LOADED.get_or_init(Mutex::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(kokoro) = cache.get(files) {
        return Ok(kokoro.clone());
    }
    let kokoro = Arc::new(Kokoro::load(files, threads)?);
    cache.insert(files.clone(), kokoro.clone());
    Ok(kokoro)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_is_kokoros() {
        assert_eq!(vocab().len(), 114);
        assert_eq!(tokenize("həlˈO"), vec![50, 83, 54, 156, 31]);
        // Unknown symbols are left out.
        assert_eq!(tokenize("a#b"), vec![43, 44]);
    }

    #[test]
    fn long_phoneme_strings_are_cut_under_the_limit_at_marks() {
        let sentence = "ðɪs ɪz ə sˈɛntəns, wɪð ə kˈɔmə. ";
        let long = sentence.repeat(60);
        let pieces = chunks(&long);
        assert!(pieces.len() > 1);
        for piece in &pieces {
            assert!(piece.chars().count() <= MAX_PHONEMES, "{}", piece.len());
            assert!(piece.ends_with('.'), "cut after a sentence: {piece:?}");
        }
        let total: usize = pieces.iter().map(|p| p.chars().count()).sum();
        assert!(total + pieces.len() >= long.trim().chars().count());
        // No marks at all: cut at spaces, then anywhere.
        let words = "ab ".repeat(400);
        assert!(
            chunks(&words)
                .iter()
                .all(|p| p.chars().count() <= MAX_PHONEMES)
        );
        let solid = "a".repeat(1200);
        assert_eq!(chunks(&solid).len(), 3);
        assert!(chunks("").is_empty());
    }
}
