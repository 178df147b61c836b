//! `[duplex]`: the PersonaPlex co-host (ARCHITECTURE §6): where the model is, the device and
//! dtype it runs in, its idle offload, and the limits of its REST and WebSocket surfaces.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range, one_of};

/// `[duplex]`: the PersonaPlex co-host (ARCHITECTURE §6). Durations in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DuplexConfig {
    /// Directory with the files of nvidia/personaplex-7b-v1 (`model.safetensors`, Mimi's
    /// `tokenizer-e351c8d8-checkpoint125.safetensors`, `tokenizer_spm_32k_3.model`, `voices/`).
    /// Env `PERSONAPLEX_MODEL_DIR` overrides it.
    pub model_dir: Option<PathBuf>,
    /// Compute device: `auto` (the GPU when built with the `cuda` feature and one is there, else
    /// the CPU), `cpu` or `cuda`.
    pub device: String,
    /// LM weights' dtype: `auto` (bf16 on a GPU, f32 on the CPU), `bf16` or `f32`.
    pub dtype: String,
    /// Seconds without a request before the model is parked in host memory (1..=86400). Env
    /// `GPU_IDLE_TIMEOUT` overrides it.
    pub idle_timeout_s: u64,
    /// The voice when none is asked for (an id of `assets/duplex/voices.toml`).
    pub default_voice: String,
    /// Sampling seed when none is asked for.
    pub seed: u64,
    /// Address and port of `voxloop duplex serve` (the reference server's port).
    pub bind: String,
    /// Longest offline input (`/api/offline`, `process_audio`), seconds of audio (1..=86400).
    pub max_input_s: f64,
    /// Largest `/api/offline` upload, bytes (1 KiB..=4 GiB).
    pub max_upload_bytes: usize,
    /// 80 ms frames of a conversation's audio queued for the model before the WebSocket stops
    /// reading (back-pressure on a client that sends faster than the model runs; 1..=10000).
    pub chat_queue_frames: usize,
    /// How long a new conversation waits for the model before it is refused as busy (close
    /// code 1013), ms (0..=600000).
    pub chat_wait_ms: u64,
}

impl Default for DuplexConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            device: "auto".into(),
            dtype: "auto".into(),
            idle_timeout_s: 300,
            default_voice: "NATF2".into(),
            seed: 42_424_242,
            bind: "127.0.0.1:8998".into(),
            max_input_s: 600.0,
            max_upload_bytes: 64 << 20,
            chat_queue_frames: 64,
            chat_wait_ms: 1000,
        }
    }
}

impl DuplexConfig {
    /// Checks every `[duplex]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `duplex.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "duplex.idle_timeout_s",
            self.idle_timeout_s,
            1..=86_400,
            "seconds",
        )?;
        one_of("duplex.device", &self.device, &["auto", "cpu", "cuda"])?;
        one_of("duplex.dtype", &self.dtype, &["auto", "bf16", "f32"])?;
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(InvalidSetting::new(
                "duplex.bind",
                format!("{:?}", self.bind),
                "an address and port such as \"127.0.0.1:8998\"",
            ));
        }
        in_range(
            "duplex.max_input_s",
            self.max_input_s,
            1.0..=86_400.0,
            "seconds",
        )?;
        in_range(
            "duplex.max_upload_bytes",
            self.max_upload_bytes,
            1_024..=(4 << 30),
            "bytes",
        )?;
        in_range(
            "duplex.chat_queue_frames",
            self.chat_queue_frames,
            1..=10_000,
            "frames of 80 ms",
        )?;
        in_range(
            "duplex.chat_wait_ms",
            self.chat_wait_ms,
            0..=600_000,
            "milliseconds",
        )?;
        Ok(())
    }
}
