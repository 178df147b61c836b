//! Circuit breakers, one per upstream (each MCP server, the LLM endpoint, the TTS): after
//! `[breaker] failures` consecutive failures the breaker opens and calls fail fast for
//! `open_ms`; then it half-opens and lets calls through, and the first success closes it (a
//! failure opens it again). The state machine is the `failsafe` crate's; this module names the
//! upstream, keeps the state readable for status pages and exports it as the metric
//! `voxloop_breaker_state{upstream}` (0 closed, 1 half-open, 2 open).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{self, ConsecutiveFailures};
use failsafe::{Instrument, StateMachine};

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// The open time has passed: calls go through, and the next outcome decides.
    HalfOpen,
    /// Calls fail fast.
    Open,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            2 => Self::Open,
            1 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// The error of a call refused by an open breaker.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{upstream} is unavailable: its circuit breaker opened after {failures} consecutive failures; calls are tried again in {} s",
    retry_in.as_secs().max(1)
)]
pub struct Open {
    /// The upstream's name (`mcp:music`, `llm`, `tts`).
    pub upstream: String,
    /// `[breaker] failures`.
    pub failures: u32,
    /// Time until calls are let through again.
    pub retry_in: Duration,
}

/// Writes transitions into the shared state and the metric.
struct Tracker {
    upstream: String,
    state: Arc<AtomicU8>,
    opened: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Tracker {
    fn set(&self, state: BreakerState) {
        self.state.store(state as u8, Ordering::Relaxed);
        crate::metrics::get().set_breaker(&self.upstream, state);
    }
}

impl Instrument for Tracker {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        *self.opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        tracing::warn!(upstream = %self.upstream, "circuit breaker opened");
        self.set(BreakerState::Open);
    }

    fn on_half_open(&self) {
        tracing::info!(upstream = %self.upstream, "circuit breaker half-open");
        self.set(BreakerState::HalfOpen);
    }

    fn on_closed(&self) {
        self.set(BreakerState::Closed);
    }
}

/// One upstream's breaker. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct Breaker(Arc<Inner>);

struct Inner {
    upstream: String,
    machine: StateMachine<ConsecutiveFailures<Constant>, Tracker>,
    state: Arc<AtomicU8>,
    opened: Arc<std::sync::Mutex<Option<Instant>>>,
    config: BreakerConfig,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("upstream", &self.0.upstream)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    /// A closed breaker for `upstream` (e.g. `mcp:music`, `llm`, `tts`).
    pub fn new(upstream: &str, config: &BreakerConfig) -> Self {
        let state = Arc::new(AtomicU8::new(0));
        let opened = Arc::new(std::sync::Mutex::new(None));
        let tracker = Tracker {
            upstream: upstream.to_string(),
            state: state.clone(),
            opened: opened.clone(),
        };
        let policy = failure_policy::consecutive_failures(
            config.failures,
            backoff::constant(Duration::from_millis(config.open_ms)),
        );
        Self(Arc::new(Inner {
            upstream: upstream.to_string(),
            machine: StateMachine::new(policy, tracker),
            state,
            opened,
            config: config.clone(),
        }))
    }

    /// Asks to call the upstream.
    ///
    /// # Errors
    /// [`Open`] while the breaker is open.
    pub fn permit(&self) -> Result<(), Open> {
        if self.0.machine.is_call_permitted() {
            return Ok(());
        }
        let since = self
            .0
            .opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        Err(Open {
            upstream: self.0.upstream.clone(),
            failures: self.0.config.failures,
            retry_in: Duration::from_millis(self.0.config.open_ms).saturating_sub(since),
        })
    }

    /// Records a call that reached the upstream and got an answer.
    pub fn success(&self) {
        self.0.machine.on_success();
    }

    /// Records a call that failed because of the upstream (unreachable, timed out, died, 5xx).
    pub fn failure(&self) {
        self.0.machine.on_error();
    }

    /// The state after the last transition (an open breaker whose time is up reads `open`
    /// until the next call half-opens it).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.0.state.load(Ordering::Relaxed))
    }

    /// `{upstream, state}` for status pages.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({"upstream": self.0.upstream, "state": self.state()})
    }
}

/// `[breaker]`: a circuit breaker per upstream (each MCP server, the LLM endpoint, the TTS). It
/// opens after `failures` consecutive failures, fails fast while open, lets calls through again
/// (half-open) after `open_ms`, and closes on the first success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// Time open before calls are tried again, ms.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_ms: 30_000,
        }
    }
}

impl BreakerConfig {
    /// Checks every `[breaker]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `breaker.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range("breaker.failures", self.failures, 1..=1_000, "failures")?;
        in_range(
            "breaker.open_ms",
            self.open_ms,
            1..=3_600_000,
            "milliseconds",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_half_opens_after_the_time_and_closes_on_success() {
        let config = BreakerConfig {
            failures: 3,
            open_ms: 50,
        };
        let breaker = Breaker::new("test", &config);
        breaker.failure();
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.success(); // resets the count
        breaker.failure();
        breaker.failure();
        assert!(breaker.permit().is_ok());
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        let open = breaker.permit().unwrap_err();
        assert!(open.to_string().contains("test is unavailable"), "{open}");
        assert!(open.retry_in <= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.permit().is_ok());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.permit().is_ok());
        breaker.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
