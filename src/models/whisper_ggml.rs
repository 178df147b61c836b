//! Converts a CTranslate2 Whisper model (`model.bin`, `config.json`, `vocabulary.txt`) into
//! whisper.cpp's ggml file, in f16. The format facts are in ARCHITECTURE §7; in short:
//!
//! CT2 `model.bin`: `u32` version, string spec name, `u32` revision, `u32` variable count; per
//! variable: string name, `u8` rank, `u32` dims, `u8` dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16,
//! 5 bf16), `u32` byte count, data; then `u32` alias count and string pairs. A string is a `u16`
//! length including a NUL, then the bytes. All little-endian.
//!
//! ggml: `i32` magic `0x67676d6c`; 11 `i32` hyper-parameters; the mel filter bank (`i32` 80,
//! `i32` 201, 80 x 201 `f32`); the vocabulary (`i32` count, then per token below
//! `<|endoftext|>` an `i32` length and the bytes); then tensors: `i32` dims, `i32` name length,
//! `i32` type (0 f32, 1 f16), the dims innermost first, the name, the data.

use std::collections::HashMap;
use std::io::Write;

use half::f16;

/// `ggml` file magic ("ggml" read as a little-endian `u32`).
pub const GGML_MAGIC: u32 = 0x6767_6d6c;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// `model.bin` does not follow the CTranslate2 layout (what was wrong).
    #[error("CTranslate2 model.bin is malformed: {0}")]
    Malformed(String),
    /// A variable the conversion needs is absent (its name).
    #[error("CTranslate2 model lacks {0}")]
    Missing(String),
    /// `vocabulary.txt` is unusable (what was wrong).
    #[error("vocabulary.txt: {0}")]
    Vocabulary(String),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One CT2 variable: shape, dtype code and raw little-endian data.
struct Variable<'a> {
    dims: Vec<usize>,
    dtype: u8,
    data: &'a [u8],
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConvertError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| ConvertError::Malformed(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, ConvertError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ConvertError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ConvertError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, ConvertError> {
        let len = self.u16()? as usize;
        let raw = self.take(len)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec())
            .map_err(|_| ConvertError::Malformed("a name is not UTF-8".into()))
    }
}

/// Parses a CT2 `model.bin` into its variables (aliases resolved).
fn parse_ct2(bytes: &[u8]) -> Result<HashMap<String, Variable<'_>>, ConvertError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u32()?;
    if !(5..=7).contains(&version) {
        return Err(ConvertError::Malformed(format!(
            "unknown model.bin version {version}"
        )));
    }
    let spec = r.string()?;
    if spec != "WhisperSpec" {
        return Err(ConvertError::Malformed(format!(
            "spec {spec:?} is not WhisperSpec"
        )));
    }
    let _revision = r.u32()?;
    let count = r.u32()?;
    let mut variables = HashMap::new();
    for _ in 0..count {
        let name = r.string()?;
        let rank = r.u8()?;
        let dims = (0..rank)
            .map(|_| r.u32().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = r.u8()?;
        let len = r.u32()? as usize;
        let data = r.take(len)?;
        variables.insert(name, Variable { dims, dtype, data });
    }
    if r.at < bytes.len() {
        let aliases = r.u32()?;
        for _ in 0..aliases {
            let alias = r.string()?;
            let target = r.string()?;
            if let Some(v) = variables.get(&target) {
                let copy = Variable {
                    dims: v.dims.clone(),
                    dtype: v.dtype,
                    data: v.data,
                };
                variables.insert(alias, copy);
            }
        }
    }
    Ok(variables)
}

/// GPT-2's byte-to-unicode table inverted: the character a `vocabulary.txt` token uses for each
/// byte, back to the byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(char::from_u32(c).expect("valid"), b as u8);
    }
    map
}

/// The 80 x 201 mel filter bank whisper uses: librosa's `filters.mel(sr=16000, n_fft=400,
/// n_mels=80)`, Slaney's mel scale and area normalization, as `f32`.
pub fn mel_filters(n_mels: usize) -> Vec<f32> {
    const SR: f64 = 16_000.0;
    const N_FFT: usize = 400;
    let n_bins = N_FFT / 2 + 1;
    let hz_to_mel = |hz: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) =
            (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if hz >= min_log_hz {
            min_log_mel + (hz / min_log_hz).ln() / logstep
        } else {
            hz / f_sp
        }
    };
    let mel_to_hz = |mel: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) =
            (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if mel >= min_log_mel {
            min_log_hz * ((mel - min_log_mel) * logstep).exp()
        } else {
            mel * f_sp
        }
    };
    let fft_freqs: Vec<f64> = (0..n_bins).map(|i| i as f64 * SR / N_FFT as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(SR / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f32; n_mels * n_bins];
    for m in 0..n_mels {
        let enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - mel_f[m]) / (mel_f[m + 1] - mel_f[m]);
            let upper = (mel_f[m + 2] - f) / (mel_f[m + 2] - mel_f[m + 1]);
            weights[m * n_bins + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    weights
}

/// A tensor for the ggml file.
struct Tensor {
    name: String,
    /// PyTorch order (outermost first); written reversed.
    shape: Vec<usize>,
    /// `true`: f16; `false`: f32.
    half: bool,
    data: Vec<u8>,
}

/// Turns CT2 data of `dtype` (f32 or f16) into f16 or f32 bytes.
fn as_type(var: &Variable<'_>, half: bool, name: &str) -> Result<Vec<u8>, ConvertError> {
    match (var.dtype, half) {
        (4, true) | (0, false) => Ok(var.data.to_vec()),
        (4, false) => Ok(var
            .data
            .chunks_exact(2)
            .flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes())
            .collect()),
        (0, true) => Ok(var
            .data
            .chunks_exact(4)
            .flat_map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
            .collect()),
        (dtype, _) => Err(ConvertError::Malformed(format!(
            "{name}: dtype {dtype} (expected f16 or f32)"
        ))),
    }
}

/// Adds one tensor: name, PyTorch shape, f16 or not, data.
type AddTensor<'a> = dyn FnMut(&str, Vec<usize>, bool, Vec<u8>) + 'a;

/// Splits the rows of a fused weight or bias (`[parts * n, ...]`) into `parts` pieces.
fn split_rows(data: &[u8], parts: usize) -> Vec<Vec<u8>> {
    let len = data.len() / parts;
    data.chunks(len).map(<[u8]>::to_vec).collect()
}

/// Converts CT2 files (their bytes) to a ggml f16 model written to `out`. `progress` is told
/// each tensor written (index, count).
///
/// # Errors
/// [`ConvertError`] for malformed or incomplete input, or a write failure.
pub fn convert(
    model_bin: &[u8],
    vocabulary_txt: &str,
    out: &mut impl Write,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), ConvertError> {
    let vars = parse_ct2(model_bin)?;
    let get = |name: &str| {
        vars.get(name)
            .ok_or_else(|| ConvertError::Missing(name.to_string()))
    };
    let scalar = |name: &str| -> Result<usize, ConvertError> {
        let v = get(name)?;
        match v.dtype {
            2 => Ok(i16::from_le_bytes([v.data[0], v.data[1]]) as usize),
            3 => Ok(i32::from_le_bytes(v.data[..4].try_into().expect("4 bytes")) as usize),
            d => Err(ConvertError::Malformed(format!(
                "{name}: dtype {d} for a count"
            ))),
        }
    };
    let count_layers = |prefix: &str| {
        (0..)
            .take_while(|i| vars.contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight")))
            .count()
    };

    let embeddings = get("decoder/embeddings/weight")?;
    let (n_vocab, n_text_state) = (embeddings.dims[0], embeddings.dims[1]);
    let enc_pos = get("encoder/position_encodings/encodings")?;
    let (n_audio_ctx, n_audio_state) = (enc_pos.dims[0], enc_pos.dims[1]);
    let n_text_ctx = get("decoder/position_encodings/encodings")?.dims[0];
    let n_mels = get("encoder/conv1/weight")?.dims[1];
    let (n_audio_layer, n_text_layer) = (count_layers("encoder"), count_layers("decoder"));
    let (n_audio_head, n_text_head) = (scalar("encoder/num_heads")?, scalar("decoder/num_heads")?);

    // Vocabulary: one token per line, GPT-2 byte-level characters, ids in line order.
    let table = unicode_to_byte();
    let lines: Vec<&str> = vocabulary_txt.split('\n').collect();
    let eot = lines
        .iter()
        .position(|l| *l == "<|endoftext|>")
        .ok_or_else(|| ConvertError::Vocabulary("no <|endoftext|> token".into()))?;
    let mut tokens = Vec::with_capacity(eot);
    for (id, line) in lines[..eot].iter().enumerate() {
        let bytes: Option<Vec<u8>> = line.chars().map(|c| table.get(&c).copied()).collect();
        tokens.push(bytes.ok_or_else(|| {
            ConvertError::Vocabulary(format!("token {id} {line:?} is not byte-level"))
        })?);
    }

    // Tensors, in whisper.cpp's own order.
    let mut tensors = Vec::new();
    let mut add = |name: &str, shape: Vec<usize>, half: bool, data: Vec<u8>| {
        tensors.push(Tensor {
            name: name.to_string(),
            shape,
            half,
            data,
        });
    };
    let plain =
        |ct2: &str, half: bool| -> Result<Vec<u8>, ConvertError> { as_type(get(ct2)?, half, ct2) };
    let s = n_audio_state;
    add(
        "encoder.positional_embedding",
        vec![n_audio_ctx, s],
        false,
        plain("encoder/position_encodings/encodings", false)?,
    );
    for conv in ["conv1", "conv2"] {
        let w = get(&format!("encoder/{conv}/weight"))?;
        add(
            &format!("encoder.{conv}.weight"),
            w.dims.clone(),
            true,
            as_type(w, true, conv)?,
        );
        add(
            &format!("encoder.{conv}.bias"),
            vec![s, 1],
            false,
            plain(&format!("encoder/{conv}/bias"), false)?,
        );
    }
    let block =
        |prefix: &str, ct2: &str, cross: bool, add: &mut AddTensor| -> Result<(), ConvertError> {
            let d = if cross { n_text_state } else { s };
            // Self-attention: q|k|v fused in linear_0; the key has no bias.
            let qkv_w = split_rows(
                &plain(&format!("{ct2}/self_attention/linear_0/weight"), true)?,
                3,
            );
            let qkv_b = split_rows(
                &plain(&format!("{ct2}/self_attention/linear_0/bias"), false)?,
                3,
            );
            add(
                &format!("{prefix}.attn.query.weight"),
                vec![d, d],
                true,
                qkv_w[0].clone(),
            );
            add(
                &format!("{prefix}.attn.query.bias"),
                vec![d],
                false,
                qkv_b[0].clone(),
            );
            add(
                &format!("{prefix}.attn.key.weight"),
                vec![d, d],
                true,
                qkv_w[1].clone(),
            );
            add(
                &format!("{prefix}.attn.value.weight"),
                vec![d, d],
                true,
                qkv_w[2].clone(),
            );
            add(
                &format!("{prefix}.attn.value.bias"),
                vec![d],
                false,
                qkv_b[2].clone(),
            );
            add(
                &format!("{prefix}.attn.out.weight"),
                vec![d, d],
                true,
                plain(&format!("{ct2}/self_attention/linear_1/weight"), true)?,
            );
            add(
                &format!("{prefix}.attn.out.bias"),
                vec![d],
                false,
                plain(&format!("{ct2}/self_attention/linear_1/bias"), false)?,
            );
            add(
                &format!("{prefix}.attn_ln.weight"),
                vec![d],
                false,
                plain(&format!("{ct2}/self_attention/layer_norm/gamma"), false)?,
            );
            add(
                &format!("{prefix}.attn_ln.bias"),
                vec![d],
                false,
                plain(&format!("{ct2}/self_attention/layer_norm/beta"), false)?,
            );
            if cross {
                // Cross-attention: query in linear_0, k|v fused in linear_1, out in linear_2.
                add(
                    &format!("{prefix}.cross_attn.query.weight"),
                    vec![d, d],
                    true,
                    plain(&format!("{ct2}/attention/linear_0/weight"), true)?,
                );
                add(
                    &format!("{prefix}.cross_attn.query.bias"),
                    vec![d],
                    false,
                    plain(&format!("{ct2}/attention/linear_0/bias"), false)?,
                );
                let kv_w = split_rows(
                    &plain(&format!("{ct2}/attention/linear_1/weight"), true)?,
                    2,
                );
                let kv_b = split_rows(&plain(&format!("{ct2}/attention/linear_1/bias"), false)?, 2);
                add(
                    &format!("{prefix}.cross_attn.key.weight"),
                    vec![d, d],
                    true,
                    kv_w[0].clone(),
                );
                add(
                    &format!("{prefix}.cross_attn.value.weight"),
                    vec![d, d],
                    true,
                    kv_w[1].clone(),
                );
                add(
                    &format!("{prefix}.cross_attn.value.bias"),
                    vec![d],
                    false,
                    kv_b[1].clone(),
                );
                add(
                    &format!("{prefix}.cross_attn.out.weight"),
                    vec![d, d],
                    true,
                    plain(&format!("{ct2}/attention/linear_2/weight"), true)?,
                );
                add(
                    &format!("{prefix}.cross_attn.out.bias"),
                    vec![d],
                    false,
                    plain(&format!("{ct2}/attention/linear_2/bias"), false)?,
                );
                add(
                    &format!("{prefix}.cross_attn_ln.weight"),
                    vec![d],
                    false,
                    plain(&format!("{ct2}/attention/layer_norm/gamma"), false)?,
                );
                add(
                    &format!("{prefix}.cross_attn_ln.bias"),
                    vec![d],
                    false,
                    plain(&format!("{ct2}/attention/layer_norm/beta"), false)?,
                );
            }
            let ff = get(&format!("{ct2}/ffn/linear_0/weight"))?.dims[0];
            add(
                &format!("{prefix}.mlp.0.weight"),
                vec![ff, d],
                true,
                plain(&format!("{ct2}/ffn/linear_0/weight"), true)?,
            );
            add(
                &format!("{prefix}.mlp.0.bias"),
                vec![ff],
                false,
                plain(&format!("{ct2}/ffn/linear_0/bias"), false)?,
            );
            add(
                &format!("{prefix}.mlp.2.weight"),
                vec![d, ff],
                true,
                plain(&format!("{ct2}/ffn/linear_1/weight"), true)?,
            );
            add(
                &format!("{prefix}.mlp.2.bias"),
                vec![d],
                false,
                plain(&format!("{ct2}/ffn/linear_1/bias"), false)?,
            );
            add(
                &format!("{prefix}.mlp_ln.weight"),
                vec![d],
                false,
                plain(&format!("{ct2}/ffn/layer_norm/gamma"), false)?,
            );
            add(
                &format!("{prefix}.mlp_ln.bias"),
                vec![d],
                false,
                plain(&format!("{ct2}/ffn/layer_norm/beta"), false)?,
            );
            Ok(())
        };
    for i in 0..n_audio_layer {
        block(
            &format!("encoder.blocks.{i}"),
            &format!("encoder/layer_{i}"),
            false,
            &mut add,
        )?;
    }
    add(
        "encoder.ln_post.weight",
        vec![s],
        false,
        plain("encoder/layer_norm/gamma", false)?,
    );
    add(
        "encoder.ln_post.bias",
        vec![s],
        false,
        plain("encoder/layer_norm/beta", false)?,
    );
    add(
        "decoder.positional_embedding",
        vec![n_text_ctx, n_text_state],
        false,
        plain("decoder/position_encodings/encodings", false)?,
    );
    add(
        "decoder.token_embedding.weight",
        vec![n_vocab, n_text_state],
        true,
        plain("decoder/embeddings/weight", true)?,
    );
    for i in 0..n_text_layer {
        block(
            &format!("decoder.blocks.{i}"),
            &format!("decoder/layer_{i}"),
            true,
            &mut add,
        )?;
    }
    add(
        "decoder.ln.weight",
        vec![n_text_state],
        false,
        plain("decoder/layer_norm/gamma", false)?,
    );
    add(
        "decoder.ln.bias",
        vec![n_text_state],
        false,
        plain("decoder/layer_norm/beta", false)?,
    );

    // Write.
    let i32s = |out: &mut dyn Write, values: &[i64]| -> std::io::Result<()> {
        for &v in values {
            out.write_all(&(v as i32).to_le_bytes())?;
        }
        Ok(())
    };
    out.write_all(&GGML_MAGIC.to_le_bytes())?;
    let hparams = [
        n_vocab,
        n_audio_ctx,
        n_audio_state,
        n_audio_head,
        n_audio_layer,
        n_text_ctx,
        n_text_state,
        n_text_head,
        n_text_layer,
        n_mels,
    ];
    i32s(out, &hparams.map(|v| v as i64))?;
    i32s(out, &[1])?; // ftype: mostly f16
    let mel = mel_filters(n_mels);
    i32s(out, &[n_mels as i64, (mel.len() / n_mels) as i64])?;
    for v in &mel {
        out.write_all(&v.to_le_bytes())?;
    }
    i32s(out, &[tokens.len() as i64])?;
    for token in &tokens {
        i32s(out, &[token.len() as i64])?;
        out.write_all(token)?;
    }
    let total = tensors.len();
    for (index, tensor) in tensors.iter().enumerate() {
        let dims: Vec<i64> = tensor.shape.iter().rev().map(|&d| d as i64).collect();
        i32s(
            out,
            &[
                dims.len() as i64,
                tensor.name.len() as i64,
                i64::from(tensor.half),
            ],
        )?;
        i32s(out, &dims)?;
        out.write_all(tensor.name.as_bytes())?;
        let expected = tensor.shape.iter().product::<usize>() * if tensor.half { 2 } else { 4 };
        if tensor.data.len() != expected {
            return Err(ConvertError::Malformed(format!(
                "{}: {} bytes, expected {expected}",
                tensor.name,
                tensor.data.len()
            )));
        }
        out.write_all(&tensor.data)?;
        progress(index + 1, total);
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_round_trips_every_byte() {
        let table = unicode_to_byte();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'!'], b'!');
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
    }

    #[test]
    fn mel_filters_match_librosa() {
        // Values from whisper's mel_filters.npz (librosa 0.8), as the reference model stores them.
        let mel = mel_filters(80);
        assert_eq!(mel.len(), 80 * 201);
        assert!((mel[1] - 0.024_862_595).abs() < 1e-7, "{}", mel[1]);
        assert!((mel[201 + 1] - 0.001_991).abs() < 1e-6);
        assert!((mel[201 + 2] - 0.022_872).abs() < 1e-6);
        assert_eq!(mel[0], 0.0);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut out = Vec::new();
        assert!(convert(b"", "", &mut out, &mut |_, _| {}).is_err());
        assert!(
            convert(
                &[6, 0, 0, 0, 3, 0, b'a', b'b', 0],
                "",
                &mut out,
                &mut |_, _| {}
            )
            .is_err()
        );
    }
}
