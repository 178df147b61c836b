//! The resource pager through the tool hub, against the fixture server.
//!
//! ```text
//! cargo build --release --example mcp_fixture && cargo bench --bench tool_hub
//! ```
//!
//! 1. Memory first (a fresh process): a 200 MB generated resource streamed in 512 KiB pages with
//!    prefetch 2 and no delay; this process's resident set before and its peak (`VmHWM`) after.
//! 2. A server that adds 20 ms per page: a 10 MB resource in 100 KiB pages with prefetch 0, 1
//!    and 2, 3 interleaved rounds: time from the tool result to the first media byte, and
//!    sustained MB/s with the ratio to prefetch 0. Medians.

use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::fixture_bin;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use voxloop::config::Config;
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::{ToolCall, ToolHub};

async fn hub(page_delay_ms: u64, page_bytes: u64, prefetch: usize) -> ToolHub {
    let mut config = Config::default();
    let server = McpServerConfig {
        command: Some(fixture_bin().display().to_string()),
        args: vec!["--page-delay-ms".into(), page_delay_ms.to_string()],
        ..McpServerConfig::default()
    };
    config.mcp_servers.insert("fixture".into(), server);
    config.tools.page_bytes = page_bytes;
    config.tools.prefetch = prefetch;
    config.tools.max_media_bytes = 1 << 30;
    ToolHub::start(config.hub()).await
}

/// Streams `fixture://gen/{bytes}` through `hub`: (time to the first byte after the tool result,
/// total time after the tool result, bytes).
async fn stream(hub: &ToolHub, bytes: u64) -> (Duration, Duration, u64) {
    let call = ToolCall {
        name: "link".into(),
        arguments: json!({"uri": format!("fixture://gen/{bytes}")}),
    };
    let mut outcome = hub.call(&call, &CancellationToken::new()).await;
    let start = Instant::now();
    let media = &mut outcome.media[0];
    let mut first = None;
    let mut total = 0u64;
    while let Some(chunk) = media.next_chunk().await {
        let chunk = chunk.expect("the stream ends without an error");
        first.get_or_insert_with(|| start.elapsed());
        total += chunk.len() as u64;
    }
    (first.unwrap_or_default(), start.elapsed(), total)
}

fn proc_status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    const BIG: u64 = 200_000_000;
    let memory_hub = hub(0, 512 * 1024, 2).await;
    let before = proc_status_kib("VmRSS:");
    let (_, elapsed, bytes) = stream(&memory_hub, BIG).await;
    let peak = proc_status_kib("VmHWM:");
    assert_eq!(bytes, BIG);
    println!(
        "memory: {} MB in 512 KiB pages, prefetch 2, in {:.2} s ({:.0} MB/s); client RSS {:.1} MiB \
         before, peak {:.1} MiB (growth {:.1} MiB)",
        BIG / 1_000_000,
        elapsed.as_secs_f64(),
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(before) as f64 / 1024.0
    );
    drop(memory_hub);

    const SIZE: u64 = 10_000_000;
    const ROUNDS: usize = 3;
    let depths = [0usize, 1, 2];
    let mut hubs = Vec::new();
    for depth in depths {
        hubs.push(hub(20, 100 * 1024, depth).await);
    }
    let mut first_ms = vec![Vec::new(); depths.len()];
    let mut mbps = vec![Vec::new(); depths.len()];
    for _ in 0..ROUNDS {
        for (i, hub) in hubs.iter().enumerate() {
            let (first, total, bytes) = stream(hub, SIZE).await;
            first_ms[i].push(first.as_secs_f64() * 1e3);
            mbps[i].push(bytes as f64 / total.as_secs_f64() / 1e6);
        }
    }
    println!(
        "20 ms per page, {} MB in 100 KiB pages, {ROUNDS} rounds, medians",
        SIZE / 1_000_000
    );
    println!("| prefetch | first media byte (ms) | MB/s | ratio to prefetch 0 |");
    println!("|---:|---:|---:|---:|");
    let base = median(mbps[0].clone());
    for (i, depth) in depths.iter().enumerate() {
        let rate = median(mbps[i].clone());
        println!(
            "| {depth} | {:.1} | {rate:.2} | {:.2} |",
            median(first_ms[i].clone()),
            rate / base
        );
    }
}
