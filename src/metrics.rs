//! Process-wide metrics in the Prometheus text format (`GET /metrics` on `voxloop serve`), kept
//! with the `prometheus-client` crate. Every family is here, with its unit in the name:
//!
//! - `voxloop_tool_calls_total{server, tool, status}`: tool calls, `status` = `success` (the
//!   server answered), `error` (the tool reported an error) or `failed` (no answer: transport,
//!   timeout, open breaker).
//! - `voxloop_tool_call_duration_seconds{server}`: histogram of tool-call time.
//! - `voxloop_pager_bytes_total`, `voxloop_pager_pages_total`: paged audio resources read.
//! - `voxloop_active_sessions{surface}`: open sessions (`device`, `duplex_chat`).
//! - `voxloop_time_to_first_audio_seconds`: histogram, end of the user's turn to the first
//!   reply audio.
//! - `voxloop_llm_tokens_total{kind}`: `prompt` and `completion` tokens the LLM reported.
//! - `voxloop_breaker_state{upstream}`: 0 closed, 1 half-open, 2 open.
//! - `voxloop_gpu_location{location}`: 1 where the duplex model is (`gpu`, `cpu`, `unloaded`).
//! - `voxloop_http_refusals_total{surface, status}`: requests refused before a handler
//!   (401, 403, 429).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::breaker::BreakerState;

/// A label set: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Every metric family (see the module docs).
pub struct Metrics {
    registry: Registry,
    tool_calls: Family<Labels, Counter>,
    tool_call_seconds: HistogramFamily,
    pager_bytes: Counter,
    pager_pages: Counter,
    active_sessions: Family<Labels, Gauge>,
    first_audio_seconds: Histogram,
    queue_wait_seconds: HistogramFamily,
    queue_waiting: Family<Labels, Gauge>,
    queue_busy: Family<Labels, Counter>,
    transcode_lookups: Family<Labels, Counter>,
    transcode_bytes: Gauge,
    transcode_disk_loads: Family<Labels, Counter>,
    transcode_disk_bytes: Gauge,
    llm_tokens: Family<Labels, Counter>,
    breaker_state: Family<Labels, Gauge>,
    gpu_location: Family<Labels, Gauge>,
    refusals: Family<Labels, Counter>,
    /// The session gauges by surface, for status pages.
    surfaces: std::sync::Mutex<std::collections::BTreeMap<&'static str, Gauge>>,
}

/// 5 ms to about 41 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let tool_calls = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_tool_calls",
            "Tool calls by server, tool and status (success, error, failed)",
            tool_calls.clone(),
        );
        let tool_call_seconds: HistogramFamily = Family::new_with_constructor(seconds_histogram);
        registry.register(
            "voxloop_tool_call_duration_seconds",
            "Tool call duration by server",
            tool_call_seconds.clone(),
        );
        let pager_bytes = Counter::default();
        registry.register(
            "voxloop_pager_bytes",
            "Bytes of paged audio resources read",
            pager_bytes.clone(),
        );
        let pager_pages = Counter::default();
        registry.register(
            "voxloop_pager_pages",
            "Pages of paged audio resources read",
            pager_pages.clone(),
        );
        let active_sessions = Family::<Labels, Gauge>::default();
        registry.register(
            "voxloop_active_sessions",
            "Open sessions by surface",
            active_sessions.clone(),
        );
        let first_audio_seconds = seconds_histogram();
        registry.register(
            "voxloop_time_to_first_audio_seconds",
            "End of the user's turn to the first audio of the reply",
            first_audio_seconds.clone(),
        );
        let queue_wait_seconds: HistogramFamily = Family::new_with_constructor(seconds_histogram);
        registry.register(
            "voxloop_queue_wait_seconds",
            "Time a job waited for a worker of a shared compute stage (asr, llm, tts)",
            queue_wait_seconds.clone(),
        );
        let queue_waiting = Family::<Labels, Gauge>::default();
        registry.register(
            "voxloop_queue_waiting",
            "Jobs waiting for a worker now, by stage (the queue's depth)",
            queue_waiting.clone(),
        );
        let queue_busy = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_queue_busy",
            "Jobs refused after waiting the stage's max_wait_ms, by stage",
            queue_busy.clone(),
        );
        let transcode_lookups = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_transcode_cache_lookups",
            "Media resources opened for a device downlink, by result (hit: frames already encoded or being encoded; miss: a new fill)",
            transcode_lookups.clone(),
        );
        let transcode_bytes = Gauge::default();
        registry.register(
            "voxloop_transcode_cache_bytes",
            "Bytes of Opus frames in the transcode cache after the last fill or eviction",
            transcode_bytes.clone(),
        );
        let transcode_disk_loads = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_transcode_cache_disk_loads",
            "Transcode cache misses found on disk, by result (complete: served without decoding; partial: served, then resumed; unreadable: deleted)",
            transcode_disk_loads.clone(),
        );
        let transcode_disk_bytes = Gauge::default();
        registry.register(
            "voxloop_transcode_cache_disk_bytes",
            "Bytes of the transcode cache's files on disk after the last write or eviction",
            transcode_disk_bytes.clone(),
        );
        let llm_tokens = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_llm_tokens",
            "LLM tokens by kind (prompt, completion), as the model reported them",
            llm_tokens.clone(),
        );
        let breaker_state = Family::<Labels, Gauge>::default();
        registry.register(
            "voxloop_breaker_state",
            "Circuit breaker state by upstream: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let gpu_location = Family::<Labels, Gauge>::default();
        registry.register(
            "voxloop_gpu_location",
            "1 for where the duplex model is: gpu, cpu or unloaded",
            gpu_location.clone(),
        );
        let refusals = Family::<Labels, Counter>::default();
        registry.register(
            "voxloop_http_refusals",
            "HTTP requests refused before a handler, by surface and status (401, 403, 429)",
            refusals.clone(),
        );
        Self {
            registry,
            tool_calls,
            tool_call_seconds,
            pager_bytes,
            pager_pages,
            active_sessions,
            first_audio_seconds,
            queue_wait_seconds,
            queue_waiting,
            queue_busy,
            transcode_lookups,
            transcode_bytes,
            transcode_disk_loads,
            transcode_disk_bytes,
            llm_tokens,
            breaker_state,
            gpu_location,
            refusals,
            surfaces: Default::default(),
        }
    }

    /// One tool call: `status` is `success`, `error` or `failed`.
    pub fn tool_call(&self, server: &str, tool: &str, status: &str, took: Duration) {
        self.tool_calls
            .get_or_create(&vec![
                ("server", server.to_string()),
                ("tool", tool.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.tool_call_seconds
            .get_or_create(&vec![("server", server.to_string())])
            .observe(took.as_secs_f64());
    }

    /// One page of a paged resource, `bytes` long.
    pub fn pager_page(&self, bytes: u64) {
        self.pager_pages.inc();
        self.pager_bytes.inc_by(bytes);
    }

    /// A session opened on `surface`; it counts until the guard drops.
    pub fn session(&'static self, surface: &'static str) -> SessionGuard {
        let gauge = self
            .active_sessions
            .get_or_create(&vec![("surface", surface.to_string())])
            .clone();
        gauge.inc();
        self.surfaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(surface, gauge.clone());
        SessionGuard(gauge)
    }

    /// Open sessions by surface (those that ever had one).
    pub fn sessions(&self) -> std::collections::BTreeMap<&'static str, i64> {
        let surfaces = self.surfaces.lock().unwrap_or_else(|e| e.into_inner());
        surfaces.iter().map(|(s, g)| (*s, g.get())).collect()
    }

    /// Time from the end of a turn to its first reply audio.
    pub fn first_audio(&self, took: Duration) {
        self.first_audio_seconds.observe(took.as_secs_f64());
    }

    /// A job starts waiting in `stage`'s queue ([`crate::compute`]); the gauge goes down when
    /// the returned guard drops.
    pub fn queue_entered(&self, stage: &'static str) -> SessionGuard {
        let gauge = self
            .queue_waiting
            .get_or_create(&vec![("stage", stage.to_string())])
            .clone();
        gauge.inc();
        SessionGuard(gauge)
    }

    /// A job waited `took` in `stage`'s queue; `busy`: it was refused.
    pub fn queue_waited(&self, stage: &'static str, took: Duration, busy: bool) {
        let labels = vec![("stage", stage.to_string())];
        self.queue_wait_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if busy {
            self.queue_busy.get_or_create(&labels).inc();
        }
    }

    /// A media resource opened through the transcode cache: `hit` or miss.
    pub fn transcode_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.transcode_lookups
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// A miss of the transcode cache looked on disk: `complete`, `partial` or `unreadable`
    /// (a file that would not parse, deleted).
    pub fn transcode_cache_disk(&self, result: &str) {
        self.transcode_disk_loads
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// The transcode cache's disk tier, in bytes.
    pub fn transcode_cache_disk_bytes(&self, bytes: u64) {
        self.transcode_disk_bytes.set(bytes as i64);
    }

    /// The transcode cache's size in bytes.
    pub fn transcode_cache_bytes(&self, bytes: usize) {
        self.transcode_bytes.set(bytes as i64);
    }

    /// Tokens one LLM request used.
    pub fn llm_tokens(&self, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.llm_tokens
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc_by(n);
        }
    }

    /// A breaker's new state.
    pub fn set_breaker(&self, upstream: &str, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        self.breaker_state
            .get_or_create(&vec![("upstream", upstream.to_string())])
            .set(value);
    }

    /// Where the duplex model is now: `gpu`, `cpu` or `unloaded`.
    pub fn set_gpu_location(&self, location: &str) {
        for place in ["gpu", "cpu", "unloaded"] {
            self.gpu_location
                .get_or_create(&vec![("location", place.to_string())])
                .set(i64::from(place == location));
        }
    }

    /// A request refused on `surface` with HTTP `status`.
    pub fn refusal(&self, surface: &str, status: u16) {
        self.refusals
            .get_or_create(&vec![
                ("surface", surface.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Every family in the Prometheus text exposition format (version 0.0.4, as OpenMetrics
    /// text with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Counts one open session; dropping it ends the count.
pub struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_labels() {
        let m = Metrics::new();
        m.tool_call("music", "musicPlayer", "success", Duration::from_millis(20));
        m.pager_page(1000);
        let guard = m
            .active_sessions
            .get_or_create(&vec![("surface", "device".into())]);
        guard.inc();
        m.set_breaker("mcp:music", BreakerState::Open);
        m.set_gpu_location("cpu");
        let text = m.render();
        for line in [
            r#"voxloop_tool_calls_total{server="music",tool="musicPlayer",status="success"} 1"#,
            r#"voxloop_tool_call_duration_seconds_count{server="music"} 1"#,
            "voxloop_pager_bytes_total 1000",
            r#"voxloop_active_sessions{surface="device"} 1"#,
            r#"voxloop_breaker_state{upstream="mcp:music"} 2"#,
            r#"voxloop_gpu_location{location="cpu"} 1"#,
            r#"voxloop_gpu_location{location="gpu"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
