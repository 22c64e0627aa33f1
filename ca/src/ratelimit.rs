//! Per-credential rate limiting: one token bucket per credential (a join
//! token's nonce, the SPIFFE ID renewing with its certificate, a Kubernetes
//! service account). A leaked credential can then mint a handful of
//! certificates, not thousands, and one busy client cannot starve others.
//!
//! Pure: the clock is a parameter ([`RateLimiter::check_at`]), so refill
//! and `Retry-After` are tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bucket size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests a credential may make back to back.
    pub burst: u32,
    /// Requests per second it regains, up to `burst`.
    pub per_second: f64,
}

impl Default for RateLimit {
    /// A sidecar asks once per renewal (every ~12 h at the default 24 h
    /// TTL) plus a few retries at start: a burst of 10 never slows a healthy
    /// one, and 1/s still lets a Deployment whose replicas share one
    /// service account start 60 pods a minute, while a leaked credential
    /// mints at most ~3600 certificates an hour instead of as many as the
    /// CPU can sign.
    fn default() -> Self {
        RateLimit {
            burst: 10,
            per_second: 1.0,
        }
    }
}

impl RateLimit {
    /// Refuse settings that would block everything or never refill.
    pub fn validate(&self) -> Result<(), String> {
        if self.burst == 0 {
            return Err("--rate-limit-burst must be at least 1".to_string());
        }
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err("--rate-limit-per-second must be a positive number".to_string());
        }
        Ok(())
    }
}

/// Drop idle buckets once there are this many, so a flood of distinct
/// credentials cannot grow memory without bound.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by credential.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Take one request for `key` at `now`: `Ok` if allowed, else how long
    /// until the next one would be.
    pub fn check_at(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() >= PRUNE_ABOVE {
            self.prune(now);
        }
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.per_second;
        let bucket = self.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// [`RateLimiter::check_at`] now.
    pub fn check(&mut self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Forget buckets that have refilled completely: they behave exactly
    /// like new ones.
    fn prune(&mut self, now: Instant) {
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.per_second;
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_configured_rate() {
        let mut rl = RateLimiter::new(RateLimit {
            burst: 3,
            per_second: 0.5,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check_at("a", t0).unwrap();
        }
        let wait = rl.check_at("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(retry_after_secs(wait), 2);
        // Other credentials have their own bucket.
        rl.check_at("b", t0).unwrap();
        // One token back after 2 s, not before.
        assert!(rl.check_at("a", t0 + Duration::from_millis(1500)).is_err());
        let wait = rl
            .check_at("a", t0 + Duration::from_millis(1500))
            .unwrap_err();
        assert_eq!(retry_after_secs(wait), 1);
        rl.check_at("a", t0 + Duration::from_secs(2)).unwrap();
        assert!(rl.check_at("a", t0 + Duration::from_secs(2)).is_err());
        // Never more than the burst, however long idle.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            rl.check_at("a", later).unwrap();
        }
        assert!(rl.check_at("a", later).is_err());
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let mut rl = RateLimiter::new(RateLimit {
            burst: 2,
            per_second: 1.0,
        });
        let t0 = Instant::now();
        for i in 0..PRUNE_ABOVE {
            rl.check_at(&i.to_string(), t0).unwrap();
        }
        rl.check_at("busy", t0 + Duration::from_secs(10)).unwrap();
        rl.check_at("busy", t0 + Duration::from_secs(10)).unwrap();
        // Checks over the threshold dropped every refilled bucket.
        assert!(rl.check_at("busy", t0 + Duration::from_secs(10)).is_err());
        assert_eq!(rl.buckets.len(), 1);
    }

    #[test]
    fn settings_are_validated() {
        assert!(RateLimit::default().validate().is_ok());
        let zero = RateLimit {
            burst: 0,
            per_second: 1.0,
        };
        assert!(zero.validate().is_err());
        for per_second in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let bad = RateLimit {
                burst: 1,
                per_second,
            };
            assert!(bad.validate().is_err(), "{per_second}");
        }
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
