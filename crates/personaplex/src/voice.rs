//! PersonaPlex's `.pt` voice prompts (the repo's `voices/NATF2.pt` and the others; ARCHITECTURE §6).
//!
//! A `.pt` file is what the fork's `LMGen` saves with `save_voice_prompt_embeddings`
//! (`moshi/models/lm.py`): a `torch.save` of `{"embeddings": [N, 1, 1, dim], "cache":
//! [1, 17, CT]}`. `embeddings` are the LM's input embeddings (text plus every audio stream's
//! embedding, summed) of the first N voice frames; `cache` is the circular token buffer (text,
//! agent and user codebooks; column `c` at index `c % CT`) after the last voice frame, frame
//! `N + 1`. Replaying it feeds the embeddings, then continues from the buffer's columns `N` and
//! `N + 1`.
//!
//! Reading uses candle's reader of torch's zip-and-pickle format; [`VoiceEmbeddings::write`]
//! writes the same format (protocol-2 pickle of `torch._utils._rebuild_tensor_v2` calls, raw
//! little-endian storages), so voxloop can make `.pt` voices of its own (`voxloop duplex
//! voice-embeddings`).

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::DuplexError;
use super::arch::Arch;

/// Token columns in the buffer voxloop writes (the fork's `max_delay + 3`).
const WRITTEN_COLUMNS: usize = 4;
/// The fork's "ungenerated" token: a slot nothing has written.
const UNGENERATED: i64 = -2;

/// Whether `path` names a `.pt` voice prompt (else it is audio).
pub fn is_embeddings(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pt"))
}

/// A `.pt` voice prompt in memory.
#[derive(Debug, Clone)]
pub struct VoiceEmbeddings {
    /// `[N, 1, 1, dim]`.
    embeddings: Tensor,
    /// `[streams][CT]` token buffer, row-major.
    cache: Vec<i64>,
    streams: usize,
    columns: usize,
}

impl VoiceEmbeddings {
    /// From `embeddings` (`[N, 1, 1, dim]`) and the token columns `N` and `N + 1` (`None`:
    /// nothing written yet).
    ///
    /// # Errors
    /// [`DuplexError::Compute`] for a tensor of another rank.
    pub fn new(embeddings: Tensor, columns: &[Vec<Option<u32>>; 2]) -> Result<Self, DuplexError> {
        let (n, _, _, _) = embeddings.dims4()?;
        let streams = columns[0].len();
        let mut cache = vec![UNGENERATED; streams * WRITTEN_COLUMNS];
        for (offset, column) in columns.iter().enumerate() {
            let at = (n + offset) % WRITTEN_COLUMNS;
            for (s, token) in column.iter().enumerate() {
                if let Some(t) = token {
                    cache[s * WRITTEN_COLUMNS + at] = i64::from(*t);
                }
            }
        }
        Ok(Self {
            embeddings,
            cache,
            streams,
            columns: WRITTEN_COLUMNS,
        })
    }

    /// Reads a `.pt` voice prompt for a model of `arch`, its embeddings onto `device` in
    /// `dtype`.
    ///
    /// # Errors
    /// [`DuplexError::MissingFile`] when absent; [`DuplexError::Audio`] (naming the file) when
    /// it is not a torch file with `embeddings` and `cache` of this model's shapes.
    pub fn read(
        path: &Path,
        arch: &Arch,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DuplexError> {
        if !path.is_file() {
            return Err(DuplexError::MissingFile(path.to_path_buf()));
        }
        let bad =
            |why: String| DuplexError::Audio(format!("voice prompt {}: {why}", path.display()));
        let tensors = candle_core::pickle::read_all(path)
            .map_err(|e| bad(format!("not a torch .pt file ({e})")))?;
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| bad(format!("no {name:?} tensor")))
        };
        let (embeddings, cache) = (get("embeddings")?, get("cache")?);
        let streams = 1 + 2 * arch.codebooks;
        match embeddings.dims() {
            [_, 1, 1, d] if *d == arch.dim => {}
            dims => {
                return Err(bad(format!(
                    "embeddings are {dims:?}, this model needs [N, 1, 1, {}]",
                    arch.dim
                )));
            }
        }
        let columns = match cache.dims() {
            [1, s, ct] if *s == streams && *ct >= 2 => *ct,
            dims => {
                return Err(bad(format!(
                    "cache is {dims:?}, this model needs [1, {streams}, CT]"
                )));
            }
        };
        let cache = cache
            .to_dtype(DType::I64)
            .and_then(|c| c.flatten_all()?.to_vec1::<i64>())
            .map_err(|e| bad(e.to_string()))?;
        let embeddings = embeddings.to_dtype(dtype)?.to_device(device)?;
        Ok(Self {
            embeddings,
            cache,
            streams,
            columns,
        })
    }

    /// Voice frames given as embeddings (all but the last).
    pub fn frames(&self) -> usize {
        self.embeddings.dims()[0]
    }

    /// The `i`th embedding, `[1, 1, dim]`.
    ///
    /// # Errors
    /// [`DuplexError::Compute`] for `i` out of range.
    pub fn embedding(&self, i: usize) -> Result<Tensor, DuplexError> {
        Ok(self.embeddings.i(i)?)
    }

    /// Token columns `N` (the last voice frame) and `N + 1`, for a model of `streams` streams;
    /// slots holding no token (negative, or past the vocabularies) are `None`.
    ///
    /// # Errors
    /// [`DuplexError::Audio`] when the stream count differs.
    pub fn columns(&self, streams: usize) -> Result<[Vec<Option<u32>>; 2], DuplexError> {
        if streams != self.streams {
            return Err(DuplexError::Audio(format!(
                "voice prompt has {} token streams, the model {streams}",
                self.streams
            )));
        }
        let n = self.frames();
        let column = |c: usize| -> Vec<Option<u32>> {
            let at = c % self.columns;
            (0..streams)
                .map(|s| u32::try_from(self.cache[s * self.columns + at]).ok())
                .collect()
        };
        Ok([column(n), column(n + 1)])
    }

    /// Writes it as `torch.save` would: a zip holding `archive/data.pkl` and one raw storage
    /// per tensor (embeddings in their dtype, the cache as int64).
    ///
    /// # Errors
    /// [`DuplexError::Write`] naming the file when it cannot be written.
    pub fn write(&self, path: &Path) -> Result<(), DuplexError> {
        let embeddings = self.embeddings.to_device(&Device::Cpu)?;
        let (storage, bytes) = match embeddings.dtype() {
            DType::BF16 => (
                "BFloat16Storage",
                embeddings
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            _ => (
                "FloatStorage",
                embeddings
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        let cache: Vec<u8> = self.cache.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            PickledTensor {
                name: "embeddings",
                storage,
                dims: embeddings.dims().to_vec(),
            },
            PickledTensor {
                name: "cache",
                storage: "LongStorage",
                dims: vec![1, self.streams, self.columns],
            },
        ];
        let failed = |reason: String| DuplexError::Write {
            file: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::create(path).map_err(|e| failed(e.to_string()))?;
        let mut zip = zip::ZipWriter::new(file);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let entries: [(&str, &[u8]); 5] = [
            ("archive/data.pkl", &pickle(&tensors)),
            ("archive/data/0", &bytes),
            ("archive/data/1", &cache),
            ("archive/version", b"3\n"),
            ("archive/byteorder", b"little"),
        ];
        for (name, data) in entries {
            zip.start_file(name, stored)
                .map_err(|e| failed(e.to_string()))?;
            zip.write_all(data).map_err(|e| failed(e.to_string()))?;
        }
        zip.finish().map_err(|e| failed(e.to_string()))?;
        Ok(())
    }
}

/// One tensor of the pickled dict; its storage key is its index.
struct PickledTensor {
    name: &'static str,
    storage: &'static str,
    dims: Vec<usize>,
}

/// A protocol-2 pickle of `{name: _rebuild_tensor_v2(storage, 0, size, stride, False,
/// OrderedDict())}`, the shape `torch.save` gives a dict of contiguous tensors (Python's
/// `pickletools` opcodes).
fn pickle(tensors: &[PickledTensor]) -> Vec<u8> {
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn global(out: &mut Vec<u8>, module: &str, name: &str) {
        out.push(b'c');
        out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn tuple(out: &mut Vec<u8>, values: &[usize]) {
        out.push(b'(');
        for &v in values {
            int(out, v);
        }
        out.push(b't');
    }
    let mut out = vec![0x80, 2, b'}', b'('];
    for (key, t) in tensors.iter().enumerate() {
        let numel: usize = t.dims.iter().product();
        let strides: Vec<usize> = (0..t.dims.len())
            .map(|i| t.dims[i + 1..].iter().product())
            .collect();
        unicode(&mut out, t.name);
        global(&mut out, "torch._utils", "_rebuild_tensor_v2");
        out.push(b'(');
        // The storage, by persistent id: ('storage', class, key, location, numel).
        out.push(b'(');
        unicode(&mut out, "storage");
        global(&mut out, "torch", t.storage);
        unicode(&mut out, &key.to_string());
        unicode(&mut out, "cpu");
        int(&mut out, numel);
        out.extend_from_slice(b"tQ");
        int(&mut out, 0);
        tuple(&mut out, &t.dims);
        tuple(&mut out, &strides);
        out.push(0x89); // False: requires_grad
        global(&mut out, "collections", "OrderedDict");
        out.extend_from_slice(b")R");
        out.extend_from_slice(b"tR");
    }
    out.extend_from_slice(b"u.");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_voice_reads_back_the_same() {
        let arch = Arch::tiny();
        let streams = 1 + 2 * arch.codebooks;
        let embeddings = Tensor::arange(0f32, (3 * arch.dim) as f32, &Device::Cpu)
            .unwrap()
            .reshape((3, 1, 1, arch.dim))
            .unwrap();
        let cur: Vec<Option<u32>> = (0..streams as u32).map(Some).collect();
        let mut next = vec![None; streams];
        next[2] = Some(7);
        let voice = VoiceEmbeddings::new(embeddings.clone(), &[cur.clone(), next.clone()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.pt");
        voice.write(&path).unwrap();
        let back = VoiceEmbeddings::read(&path, &arch, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(back.frames(), 3);
        let same = back
            .embeddings
            .eq(&embeddings)
            .unwrap()
            .flatten_all()
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<u8>()
            .unwrap();
        assert_eq!(same, 1);
        assert_eq!(back.columns(streams).unwrap(), [cur, next]);
    }

    #[test]
    fn a_voice_for_another_width_is_refused_by_name() {
        let arch = Arch::tiny();
        let streams = 1 + 2 * arch.codebooks;
        let embeddings = Tensor::zeros((2, 1, 1, arch.dim + 1), DType::F32, &Device::Cpu).unwrap();
        let column = vec![None; streams];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.pt");
        VoiceEmbeddings::new(embeddings, &[column.clone(), column])
            .unwrap()
            .write(&path)
            .unwrap();
        let err = VoiceEmbeddings::read(&path, &arch, &Device::Cpu, DType::F32).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("wide.pt") && message.contains("embeddings are"),
            "{message}"
        );
        std::fs::write(&path, b"not a zip").unwrap();
        let err = VoiceEmbeddings::read(&path, &arch, &Device::Cpu, DType::F32).unwrap_err();
        assert!(err.to_string().contains("not a torch .pt file"), "{err}");
    }
}
