//! The local chat model's speed: the prompt in one batch (cold) and resumed after the warm-up,
//! and generated tokens per second for a text reply and for a constrained tool call (whose
//! count includes the forced and scored tokens), with the music server's two tools offered.
//!
//! Measures the default local model (Qwen2.5-0.5B; `voxloop models fetch`), or the GGUF file in
//! `LOCAL_MODEL` (e.g. SmolLM2's). Run: `cargo bench --bench llm`.

use std::time::Instant;

use serde_json::json;
use voxloop::config::LlmConfig;
use voxloop::conversation::DEFAULT_SYSTEM_PROMPT;
use voxloop::llm::local::LocalModel;
use voxloop::llm::{ChatMessage, LlmEvent, Role};

fn main() {
    let config = LlmConfig {
        temperature: 0.0,
        max_tokens: 64,
        ..LlmConfig::default()
    };
    let path = std::env::var_os("LOCAL_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| config.local_model_path());
    let started = Instant::now();
    let model = match LocalModel::load(&path, &config) {
        Ok(model) => model,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    println!(
        "load: {:.0} ms ({})",
        started.elapsed().as_secs_f64() * 1000.0,
        path.display()
    );
    let tools = vec![
        json!({"type": "function", "function": {"name": "musicPlayer",
            "description": "Plays a track from the music library. Returns a link to the audio.",
            "parameters": {"type": "object", "properties": {"query": {"type": ["string", "null"],
            "description": "Words from the title, the artist or the file name."}}}}}),
        json!({"type": "function", "function": {"name": "set_volume",
            "description": "Sets the playback volume.",
            "parameters": {"type": "object", "properties": {"volume": {"type": "integer",
            "minimum": 1, "maximum": 100}}, "required": ["volume"]}}}),
    ];
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let system = vec![ChatMessage::new(Role::System, DEFAULT_SYSTEM_PROMPT)];
    let request = |user: &str| {
        let mut m = system.clone();
        m.push(ChatMessage::new(Role::User, user));
        m
    };
    // Cold: the whole prompt in one batch (a fresh model has nothing cached).
    let cold = LocalModel::load(&path, &config).expect("model");
    let (_, stats) = cold
        .complete_blocking(&request("Play the song just over the horizon."), &tools)
        .expect("completion");
    println!(
        "cold prompt: {} tokens in {:.0} ms ({:.1} tokens/s, one batch)",
        stats.prompt_tokens,
        stats.prefill_ms,
        stats.prefill_tokens_per_s()
    );
    // Warm: the system message computed ahead, the request resumed from it token by token.
    let started = Instant::now();
    model.warm_up(&system, &tools).expect("warm-up");
    println!(
        "warm-up (system prompt and tools): {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    for (label, user) in [
        ("text reply", "Tell me a short story about a cat."),
        ("tool call", "Play the song just over the horizon."),
    ] {
        let messages = request(user);
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut last = Vec::new();
        for _ in 0..rounds {
            // Back to the system message alone, as before a new request.
            model.warm_up(&system, &tools).expect("warm-up");
            let (events, stats) = model
                .complete_blocking(&messages, &tools)
                .expect("completion");
            prefill.push(stats.prefill_ms);
            decode.push(stats.decode_tokens_per_s());
            println!(
                "  {label}: {} prompt tokens ({} cached) in {:.0} ms, {} generated in {:.0} ms",
                stats.prompt_tokens,
                stats.cached_tokens,
                stats.prefill_ms,
                stats.generated_tokens,
                stats.decode_ms
            );
            last = events;
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{label}: prompt after warm-up {:.0} ms, decode {:.1} tokens/s (median of {rounds})",
            median(&mut prefill),
            median(&mut decode)
        );
        for event in last {
            match event {
                LlmEvent::Text(t) => print!("{t}"),
                LlmEvent::ToolCall(c) => print!("[call {}({})]", c.name, c.arguments),
                LlmEvent::Done { finish_reason, .. } => println!(" <{finish_reason}>"),
            }
        }
    }
}
