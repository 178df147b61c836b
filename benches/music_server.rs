//! Paged reading through the music server against one plain HTTP GET, side by side.
//!
//! `cargo bench --bench music_server` reads the 60 s MP3 `torus_trooper_tt1.mp3` (960,851 bytes)
//! whole, in interleaved rounds: one plain GET from the server's loopback file server, and
//! page by page through MCP `resources/read` over stdio and over streamable HTTP at 16, 100 and
//! 512 KiB pages. Prints the median MB/s of each and its ratio to the plain GET.
//!
//! Then memory: a 256 MiB track from a loopback upstream that ignores Range (so the server must
//! skip and slice a stream that starts at byte 0) is read through the server over stdio in
//! 512 KiB pages, and the server process's peak RSS (`VmHWM`) is printed before and after.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use common::{Client, connect_http, serve_loopback, spawn_http_server, spawn_stdio};
use rmcp::model::CallToolRequestParams;
use voxloop::tools::paging::{PagingLimits, read_paged};

const ROUNDS: usize = 15;
const WARMUP: usize = 2;
const PAGE_KIB: [u64; 3] = [16, 100, 512];

async fn track_link(client: &Client) -> String {
    let args = serde_json::json!({"query": "torus trooper"});
    let result = client
        .call_tool(
            CallToolRequestParams::new("musicPlayer")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    result.content[0]
        .as_resource_link()
        .expect("a resource_link")
        .uri
        .clone()
}

async fn paged(client: &Client, uri: &str, page_kib: u64) -> (Duration, u64) {
    let limits = PagingLimits {
        page_bytes: page_kib * 1024,
        ..PagingLimits::default()
    };
    let start = Instant::now();
    let summary = read_paged(client.peer(), uri, limits, |_| {})
        .await
        .unwrap();
    (start.elapsed(), summary.bytes)
}

async fn plain_get(http: &reqwest::Client, url: &str) -> (Duration, u64) {
    let start = Instant::now();
    let body = http.get(url).send().await.unwrap().bytes().await.unwrap();
    (start.elapsed(), body.len() as u64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Streams a large generated track through the server and reports its peak RSS.
async fn memory() {
    const TRACK_BYTES: u64 = 256 << 20;
    const CHUNK: usize = 64 << 10;
    // An upstream that ignores Range and streams TRACK_BYTES from byte 0, never held whole.
    let router = axum::Router::new().route(
        "/big.mp3",
        axum::routing::get(|| async {
            let chunks = (0..TRACK_BYTES / CHUNK as u64)
                .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![i as u8; CHUNK])));
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            (
                [(axum::http::header::CONTENT_LENGTH, TRACK_BYTES.to_string())],
                body,
            )
        }),
    );
    let upstream = serve_loopback(router).await;
    let cmd = tokio::process::Command::new(common::music_server_bin());
    let (transport, _) = rmcp::transport::TokioChildProcess::builder(cmd)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = transport.id().unwrap();
    let client = rmcp::ServiceExt::serve((), transport).await.unwrap();
    let uri = common::track_uri(&format!("{upstream}/big.mp3"));
    let before = peak_rss_kib(pid);
    let (elapsed, bytes) = paged(&client, &uri, 512).await;
    let after = peak_rss_kib(pid);
    assert_eq!(bytes, TRACK_BYTES);
    println!(
        "memory: {} MiB read in 512 KiB pages over stdio from a Range-ignoring upstream in {:.2} s \
         ({:.0} MB/s); server peak RSS {:.1} MiB before, {:.1} MiB after (growth {:.1} MiB)",
        bytes >> 20,
        elapsed.as_secs_f64(),
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0
    );
}

/// A tool hub with the music server over stdio and the default pager settings (100 KiB pages,
/// prefetch 2).
async fn pager_hub() -> voxloop::tools::hub::ToolHub {
    let mut config = voxloop::config::Config::default();
    let server = voxloop::tools::config::McpServerConfig {
        command: Some(common::music_server_bin().display().to_string()),
        cwd: Some(common::repo_root()),
        ..Default::default()
    };
    config.mcp_servers.insert("music".into(), server);
    voxloop::tools::hub::ToolHub::start(config.hub()).await
}

/// The track through the hub: the tool call, then the media stream drained (timed).
async fn hub_paged(hub: &voxloop::tools::hub::ToolHub) -> (Duration, u64) {
    let call = voxloop::tools::hub::ToolCall {
        name: "musicPlayer".into(),
        arguments: serde_json::json!({"query": "torus trooper"}),
    };
    let mut outcome = hub.call(&call, &Default::default()).await;
    let start = Instant::now();
    let mut bytes = 0;
    while let Some(chunk) = outcome.media[0].next_chunk().await {
        bytes += chunk.unwrap().len() as u64;
    }
    (start.elapsed(), bytes)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; any other argument is taken as a filter and ignored here.
    let stdio = spawn_stdio(&[]).await;
    let (_server, endpoint) = spawn_http_server(&[]).await;
    let http_mcp = connect_http(&endpoint).await;
    let stdio_uri = track_link(&stdio).await;
    let http_uri = track_link(&http_mcp).await;
    let encoded = stdio_uri.strip_prefix("audio://music/").unwrap();
    let file_url = String::from_utf8(BASE64URL.decode(encoded).unwrap()).unwrap();
    let http = reqwest::Client::new();
    let hub = pager_hub().await;

    // name -> MB/s of each measured round
    let mut rows: Vec<(String, Vec<f64>)> = vec![("plain GET".into(), vec![])];
    for kib in PAGE_KIB {
        rows.push((format!("stdio, {kib} KiB pages"), vec![]));
        rows.push((format!("HTTP, {kib} KiB pages"), vec![]));
    }
    rows.push((
        "stdio, tool hub pager, prefetch 2, 100 KiB pages".into(),
        vec![],
    ));
    let mut size = 0;
    for round in 0..WARMUP + ROUNDS {
        let mut results = vec![plain_get(&http, &file_url).await];
        for kib in PAGE_KIB {
            results.push(paged(&stdio, &stdio_uri, kib).await);
            results.push(paged(&http_mcp, &http_uri, kib).await);
        }
        results.push(hub_paged(&hub).await);
        for ((_, samples), (elapsed, bytes)) in rows.iter_mut().zip(results) {
            size = bytes;
            if round >= WARMUP {
                samples.push(bytes as f64 / elapsed.as_secs_f64() / 1e6);
            }
        }
    }

    let get = median(rows[0].1.clone());
    println!(
        "file: torus_trooper_tt1.mp3, {size} bytes; {ROUNDS} rounds (after {WARMUP} warm-up), medians"
    );
    println!("| read | MB/s | ratio to plain GET |");
    println!("|---|---:|---:|");
    for (name, samples) in rows {
        let mbps = median(samples);
        println!("| {name} | {mbps:.1} | {:.2} |", mbps / get);
    }
    memory().await;
}
