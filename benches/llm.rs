//! The local chat model's speed: the prompt in one batch (cold) and resumed after the warm-up,
//! and generated tokens per second for a text reply and for a constrained tool call (whose
//! count includes the forced and scored tokens), with the music server's two tools offered.
//!
//! Measures the default local model (Qwen2.5-0.5B; `voxloop models fetch`), or the GGUF file in
//! `LOCAL_MODEL` (e.g. SmolLM2's), on both engines side by side: candle in this process, and
//! llama.cpp's `llama-server` (`voxloop models fetch llama-server`; left out when missing).
//! Run: `cargo bench --bench llm`.

use std::time::Instant;

use serde_json::json;
use voxloop::llm::config::DEFAULT_SYSTEM_PROMPT;
use voxloop::llm::config::{LlmConfig, LocalEngine};
use voxloop::llm::local::LocalModel;
use voxloop::llm::{ChatMessage, LlmEvent, Role};

/// One engine's figures: cold prompt tokens/s, then for the text reply and the tool call the
/// prompt after the warm-up (ms) and the decode rate (tokens/s), medians.
struct Row {
    engine: &'static str,
    load_ms: f64,
    cold_tokens: usize,
    cold_tokens_per_s: f64,
    warm_up_ms: f64,
    text: (f64, f64),
    call: (f64, f64),
}

fn main() {
    let mut rows = Vec::new();
    for engine in [LocalEngine::Candle, LocalEngine::LlamaCpp] {
        if engine == LocalEngine::LlamaCpp && !LlmConfig::default().llama_server_path().is_file() {
            println!("llama.cpp left out: no llama-server (voxloop models fetch llama-server)");
            continue;
        }
        if let Some(row) = run(engine) {
            rows.push(row);
        }
    }
    println!();
    println!(
        "| engine | load | cold prompt | warm-up | text: request after warm-up | text: decode | tool call: request after warm-up | tool call: decode |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} ms | {} tokens, {:.1} tokens/s | {:.0} ms | {:.0} ms | {:.1} tokens/s | {:.0} ms | {:.1} tokens/s |",
            r.engine,
            r.load_ms,
            r.cold_tokens,
            r.cold_tokens_per_s,
            r.warm_up_ms,
            r.text.0,
            r.text.1,
            r.call.0,
            r.call.1
        );
    }
}

fn run(engine: LocalEngine) -> Option<Row> {
    let name = match engine {
        LocalEngine::Candle => "candle",
        LocalEngine::LlamaCpp => "llama.cpp",
    };
    println!("## {name}");
    let config = LlmConfig {
        temperature: 0.0,
        max_tokens: 64,
        engine,
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
            return None;
        }
    };
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
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
    let warm_up_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("warm-up (system prompt and tools): {warm_up_ms:.0} ms");
    let mut figures = Vec::new();
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
        let (prefill, decode) = (median(&mut prefill), median(&mut decode));
        println!(
            "{label}: prompt after warm-up {prefill:.0} ms, decode {decode:.1} tokens/s (median of {rounds})"
        );
        figures.push((prefill, decode));
        for event in last {
            match event {
                LlmEvent::Text(t) => print!("{t}"),
                LlmEvent::ToolCall(c) => print!("[call {}({})]", c.name, c.arguments),
                LlmEvent::Done { finish_reason, .. } => println!(" <{finish_reason}>"),
            }
        }
    }
    Some(Row {
        engine: name,
        load_ms,
        cold_tokens: stats.prompt_tokens,
        cold_tokens_per_s: stats.prefill_tokens_per_s(),
        warm_up_ms,
        text: figures[0],
        call: figures[1],
    })
}
