//! Request rate limits of the HTTP surfaces: `[server] rate_per_key` requests per
//! `rate_window_s` for one credential, and `rate_per_ip` for one IP address, as GCRA limiters
//! (the `governor` crate) that refill evenly over the window. An over-limit request gets HTTP
//! 429 with `Retry-After` in whole seconds (RFC 9110 §10.2.3).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::api::config::ServerConfig;

/// Checks between two sweeps of keys whose state is back to full (bounded memory under many
/// distinct IPs or keys).
const SWEEP_EVERY: u64 = 4096;

/// The per-credential and per-IP limiters of one surface.
pub struct RateLimits {
    per_key: Option<DefaultKeyedRateLimiter<String>>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicU64,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(
    per_window: u32,
    window: Duration,
) -> Option<DefaultKeyedRateLimiter<K>> {
    let burst = NonZeroU32::new(per_window)?;
    let quota = Quota::with_period(window / per_window)?.allow_burst(burst);
    Some(RateLimiter::keyed(quota))
}

impl RateLimits {
    /// Limiters of `config`; a limit of 0 is none.
    pub fn new(config: &ServerConfig) -> Self {
        let window = Duration::from_secs(config.rate_window_s);
        Self {
            per_key: limiter(config.rate_per_key, window),
            per_ip: limiter(config.rate_per_ip, window),
            checks: AtomicU64::new(0),
        }
    }

    fn sweep(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            if let Some(l) = &self.per_key {
                l.retain_recent();
            }
            if let Some(l) = &self.per_ip {
                l.retain_recent();
            }
        }
    }

    /// Counts one request from `ip`.
    ///
    /// # Errors
    /// The time until it would be admitted, when over the limit.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Duration> {
        self.sweep();
        match &self.per_ip {
            None => Ok(()),
            Some(l) => l
                .check_key(&ip)
                .map_err(|not| not.wait_time_from(l.clock().now())),
        }
    }

    /// Counts one request by the credential named `name`.
    ///
    /// # Errors
    /// The time until it would be admitted, when over the limit.
    pub fn check_key(&self, name: &str) -> Result<(), Duration> {
        match &self.per_key {
            None => Ok(()),
            Some(l) => l
                .check_key(&name.to_string())
                .map_err(|not| not.wait_time_from(l.clock().now())),
        }
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_s(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_waits_and_keys_are_apart() {
        let config = ServerConfig {
            rate_per_key: 3,
            rate_per_ip: 0,
            rate_window_s: 60,
            ..ServerConfig::default()
        };
        let limits = RateLimits::new(&config);
        for _ in 0..3 {
            limits.check_key("a").unwrap();
        }
        let wait = limits.check_key("a").unwrap_err();
        // One request comes back every 20 s.
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(retry_after_s(wait), 20);
        limits.check_key("b").unwrap();
        limits.check_ip("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1500)), 2);
    }
}
