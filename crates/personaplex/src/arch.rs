//! PersonaPlex's shapes and its checkpoint layout.
//!
//! The Hugging Face repo (nvidia/personaplex-7b-v1, ARCHITECTURE §6) ships `model.safetensors` in the
//! PyTorch layout of NVIDIA's moshi fork (`moshi/models/loaders.py`): a depformer whose attention
//! and feed-forward weights are per step (`weights_per_step`, 16 steps: in_proj rows stacked step
//! after step, one `gating.{step}` module per step). The `moshi` crate's `LmModel` wants one
//! transformer per depformer step instead (`depformer.{step}.transformer...`). [`PyTorchLayout`]
//! serves the crate's names from the PyTorch file, slicing the stacked weights. Moshi's own
//! 8-step checkpoints are not served (the fork copies steps 0..7 to 8..15 but has no source for
//! `depformer_emb.7`): loading one names the missing tensor. Mimi's file
//! (`tokenizer-e351c8d8-checkpoint125.safetensors`) is read by the crate as it is.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde::{Deserialize, Serialize};

/// File in a model directory that overrides [`Arch::personaplex_7b`] (test models of other
/// shapes). Not part of the Hugging Face repo.
pub const ARCH_FILE: &str = "voxloop_duplex_arch.json";

/// The shapes of a PersonaPlex model: the temporal transformer, the depformer and Mimi.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    /// Temporal transformer width.
    pub dim: usize,
    /// Its attention heads.
    pub num_heads: usize,
    /// Its layers.
    pub num_layers: usize,
    /// Its attention context, in frames.
    pub context: usize,
    /// Text vocabulary (output logits); the input embedding has one more (the start token).
    pub text_card: usize,
    /// Audio codebook size; embeddings have one more (the padding token).
    pub card: usize,
    /// Audio codebooks the model sees per stream (agent and user each).
    pub codebooks: usize,
    /// Depformer width.
    pub depformer_dim: usize,
    /// Depformer heads.
    pub depformer_num_heads: usize,
    /// Depformer layers.
    pub depformer_num_layers: usize,
    /// Depformer attention context, in steps.
    pub depformer_context: usize,
    /// Mimi: SEANet latent width.
    pub mimi_dim: usize,
    /// Mimi: SEANet base filters.
    pub mimi_filters: usize,
    /// Mimi: transformer layers (encoder and decoder each).
    pub mimi_layers: usize,
    /// Mimi: transformer heads.
    pub mimi_heads: usize,
    /// Mimi: transformer feed-forward width.
    pub mimi_ffn: usize,
    /// Mimi: quantizer codebook width.
    pub mimi_quantizer_dim: usize,
}

impl Arch {
    /// nvidia/personaplex-7b-v1 (ARCHITECTURE §6; the fork's `_lm_kwargs`, `_seanet_kwargs`).
    pub fn personaplex_7b() -> Self {
        Self {
            dim: 4096,
            num_heads: 32,
            num_layers: 32,
            context: 3000,
            text_card: 32000,
            card: 2048,
            codebooks: 8,
            depformer_dim: 1024,
            depformer_num_heads: 16,
            depformer_num_layers: 6,
            depformer_context: 8,
            mimi_dim: 512,
            mimi_filters: 64,
            mimi_layers: 8,
            mimi_heads: 8,
            mimi_ffn: 2048,
            mimi_quantizer_dim: 256,
        }
    }

    /// A model small enough for tests on a CPU (same structure, a few MB of weights).
    pub fn tiny() -> Self {
        Self {
            dim: 64,
            num_heads: 4,
            num_layers: 2,
            context: 500,
            text_card: 64,
            card: 32,
            codebooks: 8,
            depformer_dim: 32,
            depformer_num_heads: 2,
            depformer_num_layers: 1,
            depformer_context: 8,
            mimi_dim: 32,
            mimi_filters: 4,
            mimi_layers: 1,
            mimi_heads: 2,
            mimi_ffn: 64,
            mimi_quantizer_dim: 16,
        }
    }

    /// The arch of `dir`: its [`ARCH_FILE`] if present, else PersonaPlex 7B.
    ///
    /// # Errors
    /// The file is present but not a valid arch (serde's message, with line and column).
    pub fn of_dir(dir: &Path) -> Result<Self, serde_json::Error> {
        let path = dir.join(ARCH_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text),
            Err(_) => Ok(Self::personaplex_7b()),
        }
    }

    /// Depformer steps: every codebook of both streams (16 for PersonaPlex).
    pub fn depformer_steps(&self) -> usize {
        2 * self.codebooks
    }

    /// The temporal transformer's feed-forward hidden width (gated: 2/3 of 4.125 x dim).
    fn hidden(dim: usize) -> usize {
        11 * dim / 4
    }

    /// The `moshi` crate's LM configuration for this arch.
    pub fn lm_config(&self) -> moshi::lm::Config {
        let transformer =
            |d_model, num_heads, num_layers, context, rope| moshi::transformer::Config {
                d_model,
                num_heads,
                num_layers,
                dim_feedforward: 4 * d_model,
                causal: true,
                norm_first: true,
                bias_ff: false,
                bias_attn: false,
                layer_scale: None,
                context,
                max_period: 10_000,
                use_conv_block: false,
                use_conv_bias: true,
                cross_attention: None,
                gating: Some(candle_nn::Activation::Silu),
                norm: moshi::NormType::RmsNorm,
                positional_embedding: if rope {
                    moshi::transformer::PositionalEmbedding::Rope
                } else {
                    moshi::transformer::PositionalEmbedding::None
                },
                conv_layout: false,
                conv_kernel_size: 3,
                kv_repeat: 1,
                max_seq_len: 4096.max(context),
                shared_cross_attn: false,
            };
        moshi::lm::Config {
            transformer: transformer(
                self.dim,
                self.num_heads,
                self.num_layers,
                self.context,
                true,
            ),
            depformer: Some(moshi::lm::DepFormerConfig {
                transformer: transformer(
                    self.depformer_dim,
                    self.depformer_num_heads,
                    self.depformer_num_layers,
                    self.depformer_context,
                    false,
                ),
                num_slices: self.depformer_steps(),
                low_rank_embeddings: None,
            }),
            text_in_vocab_size: self.text_card + 1,
            text_out_vocab_size: self.text_card,
            audio_vocab_size: self.card + 1,
            audio_codebooks: 2 * self.codebooks,
            conditioners: None,
            extra_heads: None,
        }
    }

    /// The `moshi` crate's Mimi configuration (24 kHz, 12.5 Hz frames, `codebooks` used).
    pub fn mimi_config(&self) -> moshi::mimi::Config {
        let mut cfg = moshi::mimi::Config::v0_1(Some(self.codebooks));
        cfg.seanet.dimension = self.mimi_dim;
        cfg.seanet.n_filters = self.mimi_filters;
        cfg.transformer.d_model = self.mimi_dim;
        cfg.transformer.num_layers = self.mimi_layers;
        cfg.transformer.num_heads = self.mimi_heads;
        cfg.transformer.dim_feedforward = self.mimi_ffn;
        cfg.quantizer_bins = self.card;
        cfg.quantizer_dim = self.mimi_quantizer_dim;
        cfg
    }

    /// Every tensor of the LM checkpoint in the PyTorch layout with its shape, in a stable order.
    /// `steps_in_file` is 16 for PersonaPlex's layout, 8 for a file of Moshi's.
    pub fn pytorch_tensors(&self, steps_in_file: usize) -> Vec<(String, Vec<usize>)> {
        let (d, dd) = (self.dim, self.depformer_dim);
        let (h, hd) = (Self::hidden(d), Self::hidden(dd));
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("text_emb.weight".into(), vec![self.text_card + 1, d]),
            ("text_linear.weight".into(), vec![self.text_card, d]),
            ("out_norm.alpha".into(), vec![1, 1, d]),
            (
                "depformer_text_emb.weight".into(),
                vec![self.text_card + 1, dd],
            ),
        ];
        for i in 0..2 * self.codebooks {
            out.push((format!("emb.{i}.weight"), vec![self.card + 1, d]));
        }
        for l in 0..self.num_layers {
            let p = format!("transformer.layers.{l}");
            out.push((format!("{p}.self_attn.in_proj_weight"), vec![3 * d, d]));
            out.push((format!("{p}.self_attn.out_proj.weight"), vec![d, d]));
            out.push((format!("{p}.norm1.alpha"), vec![1, 1, d]));
            out.push((format!("{p}.norm2.alpha"), vec![1, 1, d]));
            out.push((format!("{p}.gating.linear_in.weight"), vec![2 * h, d]));
            out.push((format!("{p}.gating.linear_out.weight"), vec![d, h]));
        }
        for k in 0..steps_in_file {
            out.push((format!("depformer_in.{k}.weight"), vec![dd, d]));
            out.push((format!("linears.{k}.weight"), vec![self.card, dd]));
            if k + 1 < steps_in_file {
                out.push((format!("depformer_emb.{k}.weight"), vec![self.card + 1, dd]));
            }
        }
        for l in 0..self.depformer_num_layers {
            let p = format!("depformer.layers.{l}");
            let s = steps_in_file;
            out.push((
                format!("{p}.self_attn.in_proj_weight"),
                vec![s * 3 * dd, dd],
            ));
            out.push((format!("{p}.self_attn.out_proj.weight"), vec![s * dd, dd]));
            out.push((format!("{p}.norm1.alpha"), vec![1, 1, dd]));
            out.push((format!("{p}.norm2.alpha"), vec![1, 1, dd]));
            for k in 0..s {
                out.push((format!("{p}.gating.{k}.linear_in.weight"), vec![2 * hd, dd]));
                out.push((format!("{p}.gating.{k}.linear_out.weight"), vec![dd, hd]));
            }
        }
        out
    }
}

/// Where a `moshi` crate tensor lives in the PyTorch layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The PyTorch tensor's name.
    pub name: String,
    /// Rows `start..start + len` of dimension 0, when the crate's tensor is one step of a stacked
    /// per-step weight.
    pub rows: Option<(usize, usize)>,
}

/// The PyTorch-layout source of the crate's tensor `name`; `dd` is the depformer width.
pub fn pytorch_source(name: &str, dd: usize) -> Source {
    let plain = |name: String| Source { name, rows: None };
    let Some(rest) = name.strip_prefix("depformer.") else {
        return plain(name.to_string());
    };
    let Some((step, tail)) = rest.split_once('.') else {
        return plain(name.to_string());
    };
    let Ok(step) = step.parse::<usize>() else {
        return plain(name.to_string());
    };
    match tail {
        "linear_in.weight" => plain(format!("depformer_in.{step}.weight")),
        "linear_out.weight" => plain(format!("linears.{step}.weight")),
        "emb.weight" if step == 0 => plain("depformer_text_emb.weight".into()),
        "emb.weight" => plain(format!("depformer_emb.{}.weight", step - 1)),
        _ => {
            let Some(layer_tail) = tail.strip_prefix("transformer.layers.") else {
                return plain(name.to_string());
            };
            let Some((layer, what)) = layer_tail.split_once('.') else {
                return plain(name.to_string());
            };
            let p = format!("depformer.layers.{layer}");
            match what {
                "self_attn.in_proj_weight" => Source {
                    name: format!("{p}.self_attn.in_proj_weight"),
                    rows: Some((step * 3 * dd, 3 * dd)),
                },
                "self_attn.out_proj.weight" => Source {
                    name: format!("{p}.self_attn.out_proj.weight"),
                    rows: Some((step * dd, dd)),
                },
                "gating.linear_in.weight" | "gating.linear_out.weight" => {
                    let which = what.trim_start_matches("gating.");
                    plain(format!("{p}.gating.{step}.{which}"))
                }
                other => plain(format!("{p}.{other}")),
            }
        }
    }
}

/// A `candle_nn` backend serving the `moshi` crate's tensor names from a memory-mapped
/// PyTorch-layout `model.safetensors`. Each tensor is read when the model asks for it; a stacked
/// per-step weight is read once and kept until the model is built (the backend is dropped).
pub struct PyTorchLayout {
    file: candle_core::safetensors::MmapedSafetensors,
    stacked: std::sync::Mutex<HashMap<String, Tensor>>,
    depformer_dim: usize,
}

impl PyTorchLayout {
    /// Maps `path`.
    ///
    /// # Errors
    /// When the file cannot be mapped or is not safetensors.
    pub fn open(path: &Path, arch: &Arch) -> candle_core::Result<Self> {
        // SAFETY: the file is mapped read-only; voxloop does not write model files it loads.
        let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
        Ok(Self {
            file,
            stacked: std::sync::Mutex::new(HashMap::new()),
            depformer_dim: arch.depformer_dim,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.file.get(name).is_ok()
    }

    fn lookup(&self, name: &str) -> candle_core::Result<Tensor> {
        let source = pytorch_source(name, self.depformer_dim);
        if !self.has(&source.name) {
            candle_core::bail!(
                "model.safetensors has no tensor {} (wanted for {name})",
                source.name
            );
        }
        match source.rows {
            None => self.file.load(&source.name, &Device::Cpu),
            Some((start, len)) => {
                let mut stacked = self.stacked.lock().expect("stacked lock");
                let tensor = match stacked.get(&source.name) {
                    Some(t) => t.clone(),
                    None => {
                        let t = self.file.load(&source.name, &Device::Cpu)?;
                        stacked.insert(source.name.clone(), t.clone());
                        t
                    }
                };
                tensor.narrow(0, start, len)
            }
        }
    }
}

impl SimpleBackend for PyTorchLayout {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.lookup(name)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "model.safetensors: {name} has shape {:?}, the arch wants {s:?}",
                tensor.shape()
            );
        }
        tensor.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.lookup(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.has(&pytorch_source(name, self.depformer_dim).name)
    }
}

/// Writes a random-weights model of `arch` into `dir` with the Hugging Face repo's file names:
/// `model.safetensors` (PyTorch layout, `steps_in_file` depformer steps), Mimi's file, a
/// SentencePiece model of `text_card` pieces, and [`ARCH_FILE`] unless `arch` is PersonaPlex 7B.
/// Weights are normal with standard deviation 0.05 (norms 1) from `seed`, in `dtype`.
///
/// # Errors
/// I/O and tensor errors, as text.
pub fn write_random_model(
    dir: &Path,
    arch: &Arch,
    steps_in_file: usize,
    dtype: DType,
    seed: u64,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let device = Device::Cpu;
    let mut rng = Normal::new(seed);
    let mut lm = HashMap::new();
    for (name, shape) in arch.pytorch_tensors(steps_in_file) {
        let tensor = if name.ends_with(".alpha") {
            Tensor::ones(shape, dtype, &device)
        } else {
            rng.tensor(&shape, &device).and_then(|t| t.to_dtype(dtype))
        }
        .map_err(|e| e.to_string())?;
        lm.insert(name, tensor);
    }
    candle_core::safetensors::save(&lm, dir.join(super::MODEL_FILE)).map_err(|e| e.to_string())?;
    drop(lm);

    // Mimi's names are the crate's own: build it on a VarMap, then randomise every variable.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    moshi::mimi::Mimi::new(arch.mimi_config(), vb).map_err(|e| e.to_string())?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let shape = var.shape().clone();
        let value = if name.ends_with("cluster_usage")
            || name.ends_with("_initialized")
            || name.ends_with("weight_g")
            || name.ends_with("scale")
        {
            Tensor::ones(shape, DType::F32, &device)
        } else if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, &device)
        } else {
            rng.tensor(shape.dims(), &device)
        }
        .map_err(|e| e.to_string())?;
        var.set(&value).map_err(|e| e.to_string())?;
    }
    varmap
        .save(dir.join(super::MIMI_FILE))
        .map_err(|e| e.to_string())?;

    // A SentencePiece model of `text_card` pieces: specials, letters, the space, filler words.
    use super::tokenizer::Piece;
    let mut pieces = vec![
        Piece::new("<unk>", 0.0, 2),
        Piece::new("<s>", 0.0, 3),
        Piece::new("</s>", 0.0, 3),
        Piece::new("<pad>", 0.0, 3),
    ];
    let letters = "abcdefghijklmnopqrstuvwxyz<>";
    for (i, c) in letters
        .chars()
        .enumerate()
        .take(arch.text_card.saturating_sub(5))
    {
        pieces.push(Piece::new(c, -(i as f32) * 0.01 - 3.0, 1));
    }
    pieces.push(Piece::new("▁", -2.0, 1));
    while pieces.len() < arch.text_card {
        pieces.push(Piece::new(format!("▁w{}", pieces.len()), -10.0, 1));
    }
    std::fs::write(
        dir.join(super::TOKENIZER_FILE),
        super::tokenizer::write_model(&pieces),
    )
    .map_err(|e| e.to_string())?;
    if *arch != Arch::personaplex_7b() {
        std::fs::write(
            dir.join(ARCH_FILE),
            serde_json::to_string_pretty(arch).expect("arch serializes"),
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Normal samples with standard deviation 0.05 from a seed (SplitMix64, Box-Muller): candle's
/// CPU generator cannot be seeded.
struct Normal(u64);

impl Normal {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn tensor(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 0.05) as f32
            })
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depformer_names_map_to_the_pytorch_layout() {
        let s = |n| pytorch_source(n, 1024);
        assert_eq!(
            s("depformer.3.linear_in.weight").name,
            "depformer_in.3.weight"
        );
        assert_eq!(
            s("depformer.0.emb.weight").name,
            "depformer_text_emb.weight"
        );
        assert_eq!(s("depformer.5.emb.weight").name, "depformer_emb.4.weight");
        assert_eq!(
            s("depformer.15.linear_out.weight").name,
            "linears.15.weight"
        );
        let attn = s("depformer.2.transformer.layers.4.self_attn.in_proj_weight");
        assert_eq!(attn.name, "depformer.layers.4.self_attn.in_proj_weight");
        assert_eq!(attn.rows, Some((2 * 3 * 1024, 3 * 1024)));
        let out = s("depformer.2.transformer.layers.4.self_attn.out_proj.weight");
        assert_eq!(out.rows, Some((2 * 1024, 1024)));
        assert_eq!(
            s("depformer.7.transformer.layers.1.gating.linear_in.weight").name,
            "depformer.layers.1.gating.7.linear_in.weight"
        );
        assert_eq!(
            s("depformer.7.transformer.layers.1.norm2.alpha").name,
            "depformer.layers.1.norm2.alpha"
        );
        assert_eq!(
            s("transformer.layers.3.self_attn.in_proj_weight").name,
            "transformer.layers.3.self_attn.in_proj_weight"
        );
    }

    #[test]
    fn the_7b_arch_has_the_published_parameter_count() {
        // ARCHITECTURE §6: about 16.7 GB in bf16, i.e. about 8.4e9 parameters with the depformer.
        let params: usize = Arch::personaplex_7b()
            .pytorch_tensors(16)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        let gb = params as f64 * 2.0 / 1e9;
        assert!((16.0..17.5).contains(&gb), "{gb} GB");
    }
}
