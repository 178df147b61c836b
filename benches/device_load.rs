//! Device server load: simulated devices receiving paced music (issue 7's benchmark).
//!
//! ```text
//! cargo bench --bench device_load                  # steps 25 50 100 200 300 400 600 800 1000
//! cargo bench --bench device_load -- 100 200       # chosen session counts
//! cargo bench --bench device_load -- worst 100 200 # every session a different track
//! cargo bench --bench device_load -- mix 100 200   # tracks of a catalog, Zipf popularity
//! cargo bench --bench device_load -- mix warm 1000 # the same, on a warm disk cache
//! LOAD_EXTRA='[audio]\ntranscode_cache_mb = 0' cargo bench --bench device_load  # config added
//! ```
//!
//! Each step's server starts with an empty transcode cache on disk (its `XDG_CACHE_HOME` is
//! the bench's directory), so the steps are cold. With `warm`, each step runs twice on one disk
//! cache: a first run that fills it (its row marked `cold`), then the measured run, as a server
//! sees after it has played the catalog's popular tracks once (each file then holds about the
//! `WINDOW` the devices played, plus the fill's lead).
//!
//! What the sessions play: by default (`same`) every session the same track, which the server's
//! transcode cache encodes once. `worst`: session i plays track i of a catalog of
//! [`CATALOG`] tracks, so nothing is shared. `mix`: each session plays a track of that catalog
//! drawn with Zipf popularity (rank k with probability proportional to 1/k, a seeded draw), as
//! listeners of a large catalog do. The catalog is the bundled MP3 of the default track
//! hard-linked under [`CATALOG`] names (`track 0001.mp3`, ...): each is a resource of its own
//! URI, so the cache keys them apart; the device asks for one by its name, and the scripted
//! LLM calls `musicPlayer` with the device's words.
//!
//! The server is the real `voxloop serve` in its own process (with the bundled music server as
//! its MCP server, a third process); this process is the load generator and the far end of the
//! LLM API (a scripted OpenAI-compatible endpoint on loopback that answers every request with
//! `musicPlayer {"query": WORDS}`, then with words after the tool's result). For each
//! session count N, a fresh server; N devices connect (protocol v3), say hello and send
//! `listen detect {text: "play horizon"}` (or a catalog track's name): each turn calls the LLM,
//! the music server's tool,
//! reads the track (59 s MP3) page by page through `resources/read`, decodes, resamples to
//! 24 kHz and sends 60 ms Opus frames paced `device_lead_ms` (120 ms) ahead.
//!
//! Frame lateness, from the device's side: frame i is due `max(0, i * 60 - 120)` ms after the
//! session's first frame arrived (the server's pacing schedule); lateness = arrival - due. Each
//! device records `WINDOW` seconds from its first frame; p50/p99/max over every frame of every
//! session, and the time from the request to its first frame. CPU: user+system time (from /proc) of the server, the music server and this load
//! generator over the step, in % of one core; per session for the server. Steady: the server's
//! CPU and the whole machine's busy share from 6 s to 16 s after the step starts, when every
//! session plays (the step's average includes the starts and the ends). Memory: the server's resident set during the window minus after start,
//! per session. A step passes with every session playing and p99 lateness < 20 ms; the
//! steps stop after the first that fails. Bounded: at most 1000 sessions, 20 s per step.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Seconds each device records after its first frame.
const WINDOW: Duration = Duration::from_secs(20);
/// Frame length and lead of the downlink (the defaults of `[audio]`).
const FRAME_MS: f64 = 60.0;
const LEAD_MS: f64 = 120.0;
/// The pass mark for p99 lateness.
const P99_LIMIT_MS: f64 = 20.0;
const MAX_SESSIONS: usize = 1000;
/// Tracks in the catalog of the `worst` and `mix` modes.
const CATALOG: usize = 2000;

/// Which tracks the sessions play.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Same,
    Worst,
    Mix,
}

/// The catalog: the default track hard-linked (or copied) `CATALOG` times into `dir`.
fn catalog(dir: &std::path::Path) -> std::path::PathBuf {
    let library = dir.join("catalog");
    std::fs::create_dir_all(&library).unwrap();
    let track = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/music/tumiki_just_over_the_horizon.mp3");
    for i in 1..=CATALOG {
        let link = library.join(format!("track {i:04}.mp3"));
        if !link.exists() && std::fs::hard_link(&track, &link).is_err() {
            std::fs::copy(&track, &link).unwrap();
        }
    }
    library
}

/// The track each of `sessions` sessions asks for, by name.
fn requests(mode: Mode, sessions: usize) -> Vec<String> {
    // A fixed linear congruential draw: the same mix on every run.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let harmonic: f64 = (1..=CATALOG).map(|k| 1.0 / k as f64).sum();
    (0..sessions)
        .map(|i| match mode {
            Mode::Same => "play horizon".to_string(),
            Mode::Worst => format!("play track {:04}", i % CATALOG + 1),
            Mode::Mix => {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 * harmonic;
                let mut sum = 0.0;
                let rank = (1..=CATALOG)
                    .find(|k| {
                        sum += 1.0 / *k as f64;
                        sum >= u
                    })
                    .unwrap_or(CATALOG);
                format!("play track {rank:04}")
            }
        })
        .collect()
}

/// `voxloop serve` in its own process, the music server reading `library` when given:
/// (child, its WebSocket URL).
async fn start_server(
    llm_url: &str,
    dir: &std::path::Path,
    library: Option<&std::path::Path>,
) -> (tokio::process::Child, String) {
    let sections = format!(
        "[llm]\nprovider = \"openai\"\nurl = \"{llm_url}\"\nmodel = \"scripted\"\n\n[asr]\nlanguage = \"en\"\n{}",
        common::extra_toml("LOAD_EXTRA")
    );
    let args: Vec<String> = match library {
        Some(library) => vec!["--library".into(), library.display().to_string()],
        None => Vec::new(),
    };
    common::spawn_device_bench_server(dir, &sections, &args).await
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

/// Busy and total CPU time of the whole machine, in ticks (/proc/stat: idle and iowait are not
/// busy).
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// The steady part of a step, from `STEADY.0` to `STEADY.1` after its start: every session has
/// been playing for a while and none has ended (they end `WINDOW` after their first frame).
const STEADY: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(16));

/// Resident set of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    common::proc_status(pid, "VmRSS:") / 1024.0
}

/// One device: connects, asks for music, and returns its frames' lateness in ms (empty when no
/// music arrived before `deadline`).
async fn device(
    url: String,
    deadline: Instant,
    words: String,
) -> Result<(f64, Vec<(usize, f64)>), String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request
        .headers_mut()
        .insert("protocol-version", "3".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let hello = json!({"type": "hello", "version": 3, "transport": "websocket",
        "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}});
    socket
        .send(Message::text(hello.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let detect = json!({"type": "listen", "state": "detect", "text": words});
    let asked = Instant::now();
    socket
        .send(Message::text(detect.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let mut arrivals: Vec<Instant> = Vec::new();
    loop {
        let timeout = match arrivals.first() {
            Some(first) => (*first + WINDOW).min(deadline),
            None => deadline,
        };
        let message = match tokio::time::timeout_at(timeout.into(), socket.next()).await {
            Err(_) => break,
            Ok(None) => return Err("the server closed the socket".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        // v3 binary: type 0 is Opus.
        if let Message::Binary(bytes) = message
            && bytes.first() == Some(&0)
        {
            arrivals.push(Instant::now());
        }
    }
    let _ = socket.close(None).await;
    let Some(first) = arrivals.first().copied() else {
        return Ok((f64::NAN, Vec::new()));
    };
    let first_ms = first.duration_since(asked).as_secs_f64() * 1000.0;
    Ok((
        first_ms,
        arrivals
            .iter()
            .enumerate()
            .map(|(i, at)| {
                let due_ms = (i as f64 * FRAME_MS - LEAD_MS).max(0.0);
                (i, at.duration_since(first).as_secs_f64() * 1000.0 - due_ms)
            })
            .collect(),
    ))
}

struct Step {
    sessions: usize,
    playing: usize,
    errors: Vec<String>,
    p50: f64,
    p99: f64,
    p99_settled: f64,
    first_p50: f64,
    first_max: f64,
    max: f64,
    frames: usize,
    server_cpu_pct: f64,
    music_cpu_pct: f64,
    generator_cpu_pct: f64,
    rss_start_mib: f64,
    rss_peak_mib: f64,
    /// Server CPU in the steady part, % of one core, and the machine's busy share (% of all
    /// cores).
    steady_server_pct: f64,
    steady_machine_pct: f64,
}

async fn step(sessions: usize, llm_url: &str, dir: &std::path::Path, mode: Mode) -> Step {
    let library = (mode != Mode::Same).then(|| catalog(dir));
    let (child, url) = start_server(llm_url, dir, library.as_deref()).await;
    let pid = child.id().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let music: Vec<u32> = common::proc_children(pid);
    let rss_start_mib = rss_mib(pid);
    let started = Instant::now();
    let cpu0 = cpu_seconds(pid);
    let music0: f64 = music.iter().map(|p| cpu_seconds(*p)).sum();
    let generator0 = cpu_seconds(std::process::id());
    // Every device gets 15 s to start playing, then the window.
    let deadline = started + Duration::from_secs(15) + WINDOW;
    let peak = Arc::new(Mutex::new(rss_start_mib));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut peak = peak.lock().unwrap();
                *peak = peak.max(rss_mib(pid));
            }
        })
    };
    let steady = tokio::spawn(async move {
        tokio::time::sleep_until((started + STEADY.0).into()).await;
        let (cpu, (busy, total)) = (cpu_seconds(pid), machine_ticks());
        tokio::time::sleep_until((started + STEADY.1).into()).await;
        let (cpu1, (busy1, total1)) = (cpu_seconds(pid), machine_ticks());
        (
            100.0 * (cpu1 - cpu) / (STEADY.1 - STEADY.0).as_secs_f64(),
            100.0 * (busy1 - busy) / (total1 - total).max(1.0),
        )
    });
    let tasks: Vec<_> = (0..sessions)
        .zip(requests(mode, sessions))
        .map(|(_, words)| tokio::spawn(device(url.clone(), deadline, words)))
        .collect();
    let mut lateness = Vec::new();
    // Frames after each session's first 5 s of music.
    let mut settled = Vec::new();
    let mut firsts = Vec::new();
    let (mut playing, mut errors) = (0, Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Ok((first_ms, l)) if !l.is_empty() => {
                playing += 1;
                firsts.push(first_ms);
                let after = (5000.0 / FRAME_MS) as usize;
                settled.extend(l.iter().filter(|(i, _)| *i >= after).map(|(_, x)| *x));
                lateness.extend(l.into_iter().map(|(_, x)| x));
            }
            Ok(_) => errors.push("no music before the deadline".to_string()),
            Err(e) => errors.push(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let music_cpu: f64 = music.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - music0;
    let generator_cpu = cpu_seconds(std::process::id()) - generator0;
    sampler.abort();
    let (steady_server_pct, steady_machine_pct) = steady.await.unwrap();
    // The fills that the sessions left write their frames to the disk cache when they notice
    // (within a frame); stopping the server at once would lose some of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(child);
    lateness.sort_by(f64::total_cmp);
    settled.sort_by(f64::total_cmp);
    firsts.sort_by(f64::total_cmp);
    let q = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let rss_peak_mib = *peak.lock().unwrap();
    Step {
        sessions,
        playing,
        errors,
        p50: q(&lateness, 0.5),
        p99: q(&lateness, 0.99),
        p99_settled: q(&settled, 0.99),
        first_p50: q(&firsts, 0.5),
        first_max: firsts.last().copied().unwrap_or(f64::NAN),
        max: lateness.last().copied().unwrap_or(f64::NAN),
        frames: lateness.len(),
        server_cpu_pct: 100.0 * cpu / elapsed,
        music_cpu_pct: 100.0 * music_cpu / elapsed,
        generator_cpu_pct: 100.0 * generator_cpu / elapsed,
        rss_start_mib,
        rss_peak_mib,
        steady_server_pct,
        steady_machine_pct,
    }
}

fn main() {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let mode = if words.iter().any(|w| w == "worst") {
        Mode::Worst
    } else if words.iter().any(|w| w == "mix") {
        Mode::Mix
    } else {
        Mode::Same
    };
    let warm = words.iter().any(|w| w == "warm");
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if args.is_empty() {
        vec![25, 50, 100, 200, 300, 400, 600, 800, 1000]
    } else {
        args
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let llm_url = common::music_llm().await;
        let dir = std::env::temp_dir().join(format!("voxloop-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        println!(
            "| sessions | playing | frames | lateness p50 / p99 / max (ms) | p99 after 5 s (ms) | request to first frame p50 / max (s) | server CPU (% of a core) | per session | steady server CPU | per session | machine busy, steady (% of all cores) | music server CPU | load generator CPU | server RSS start / peak (MiB) | per session (MiB) |"
        );
        println!("|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
        for sessions in counts.into_iter().filter(|n| *n <= MAX_SESSIONS) {
            let mut distinct = requests(mode, sessions);
            distinct.sort();
            distinct.dedup();
            println!("  ({sessions} sessions play {} distinct tracks)", distinct.len());
            let _ = std::fs::remove_dir_all(dir.join("cache"));
            let mut runs = vec![step(sessions, &llm_url, &dir, mode).await];
            if warm {
                runs.push(step(sessions, &llm_url, &dir, mode).await);
            }
            let stored = std::fs::read_dir(dir.join("cache/voxloop/transcode"))
                .map(|d| d.count())
                .unwrap_or(0);
            println!("  ({stored} tracks' frames on disk after the step)");
            let last = runs.len() - 1;
            for (run, s) in runs.iter().enumerate() {
            let label = if run < last { " (cold)" } else { "" };
            println!(
                "| {}{label} | {} | {} | {:.1} / {:.1} / {:.1} | {:.1} | {:.2} / {:.2} | {:.0} | {:.2} | {:.0} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.2} |",
                s.sessions,
                s.playing,
                s.frames,
                s.p50,
                s.p99,
                s.max,
                s.p99_settled,
                s.first_p50 / 1000.0,
                s.first_max / 1000.0,
                s.server_cpu_pct,
                s.server_cpu_pct / s.sessions as f64,
                s.steady_server_pct,
                s.steady_server_pct / s.sessions as f64,
                s.steady_machine_pct,
                s.music_cpu_pct,
                s.generator_cpu_pct,
                s.rss_start_mib,
                s.rss_peak_mib,
                (s.rss_peak_mib - s.rss_start_mib) / s.sessions as f64,
            );
            }
            let s = &runs[last];
            if !s.errors.is_empty() {
                let mut shown = s.errors.clone();
                shown.sort();
                shown.dedup();
                println!("  {} sessions failed: {:?}", s.errors.len(), &shown[..shown.len().min(3)]);
            }
            if s.playing < s.sessions || s.p99 >= P99_LIMIT_MS {
                println!("  stop: p99 {:.1} ms (limit {P99_LIMIT_MS}), {} of {} playing", s.p99, s.playing, s.sessions);
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
