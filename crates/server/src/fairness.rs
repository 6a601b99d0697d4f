//! Per-key fairness: a token-bucket rate limit on requests and a quota on concurrent
//! sandboxes (live sessions plus executions in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::ApiError;

/// Rate and quota settings, the same for every key.
#[derive(Debug, Clone, Copy)]
pub struct FairnessConfig {
    /// Sustained requests per second per key.
    pub rate_per_sec: f64,
    /// Requests a key may make in a burst.
    pub burst: f64,
    /// Sandboxes a key may hold at once (sessions + running executions).
    pub max_sandboxes: usize,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 100.0,
            burst: 200.0,
            max_sandboxes: 64,
        }
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Default)]
struct KeyState {
    bucket: Option<Bucket>,
    sandboxes: usize,
}

/// Rate limits and quotas for all keys.
#[derive(Clone)]
pub struct Fairness {
    config: FairnessConfig,
    keys: Arc<Mutex<HashMap<String, KeyState>>>,
}

impl Fairness {
    pub fn new(config: FairnessConfig) -> Fairness {
        Fairness {
            config,
            keys: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Takes one request token for `key`, or says how long to wait (429).
    pub fn admit(&self, key: &str) -> Result<(), ApiError> {
        let mut keys = self.keys.lock().expect("fairness lock");
        let state = keys.entry(key.to_string()).or_default();
        let now = Instant::now();
        let bucket = state.bucket.get_or_insert(Bucket {
            tokens: self.config.burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.config.rate_per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.config.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.config.rate_per_sec;
            Err(ApiError::rate_limited(wait.ceil() as u64))
        }
    }

    /// Reserves `count` sandboxes for `key`; the guard gives them back when dropped (unless
    /// kept with `SandboxPermit::keep`, for sessions, released by `release`).
    pub fn reserve(&self, key: &str, count: usize) -> Result<SandboxPermit, ApiError> {
        let mut keys = self.keys.lock().expect("fairness lock");
        let state = keys.entry(key.to_string()).or_default();
        if state.sandboxes + count > self.config.max_sandboxes {
            return Err(ApiError::quota(format!(
                "this API key may hold {} sandboxes at once (sessions plus running executions)",
                self.config.max_sandboxes
            )));
        }
        state.sandboxes += count;
        Ok(SandboxPermit {
            fairness: self.clone(),
            key: key.to_string(),
            count,
        })
    }

    /// Gives back `count` sandboxes kept for `key`.
    pub fn release(&self, key: &str, count: usize) {
        let mut keys = self.keys.lock().expect("fairness lock");
        if let Some(state) = keys.get_mut(key) {
            state.sandboxes = state.sandboxes.saturating_sub(count);
        }
    }
}

/// Sandboxes reserved for a key.
pub struct SandboxPermit {
    fairness: Fairness,
    key: String,
    count: usize,
}

impl SandboxPermit {
    /// Keeps the reservation past this guard (a session holds it until deleted).
    pub fn keep(mut self) {
        self.count = 0;
    }
}

impl Drop for SandboxPermit {
    fn drop(&mut self) {
        if self.count > 0 {
            self.fairness.release(&self.key, self.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_beyond_burst_with_a_wait() {
        let fairness = Fairness::new(FairnessConfig {
            rate_per_sec: 1.0,
            burst: 2.0,
            max_sandboxes: 1,
        });
        assert!(fairness.admit("a").is_ok());
        assert!(fairness.admit("a").is_ok());
        let refused = fairness.admit("a").unwrap_err();
        assert_eq!(refused.retry_after, Some(1));
        assert!(fairness.admit("b").is_ok(), "keys are independent");
    }

    #[test]
    fn quota_is_returned_when_the_permit_drops() {
        let fairness = Fairness::new(FairnessConfig {
            max_sandboxes: 2,
            ..FairnessConfig::default()
        });
        let first = fairness.reserve("a", 2).unwrap();
        assert!(fairness.reserve("a", 1).is_err());
        drop(first);
        let kept = fairness.reserve("a", 1).unwrap();
        kept.keep();
        assert!(fairness.reserve("a", 2).is_err());
        fairness.release("a", 1);
        assert!(fairness.reserve("a", 2).is_ok());
    }
}
