//! Rate limits: a token bucket, and a bounded set of buckets keyed by an id (one per
//! key-package box). Used by the session (per connection) and the service (per box).
//! Not for: size or count limits (the service and the store check those).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `burst` tokens, refilled at a steady rate.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    per_sec: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `per_sec` tokens per second.
    pub fn new(burst: u32, per_sec: f64) -> Self {
        Self {
            capacity: f64::from(burst),
            tokens: f64::from(burst),
            per_sec,
            last: None,
        }
    }

    /// A full bucket refilled at `per_minute` tokens per minute.
    pub fn per_minute(burst: u32, per_minute: u32) -> Self {
        Self::new(burst, f64::from(per_minute) / 60.0)
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `amount` tokens, going into debt if there are fewer; returns how long from `now`
    /// until the debt is repaid (zero if there is none). For byte budgets: a caller that waits
    /// that long before its next take keeps to the rate on average, with bursts up to the
    /// bucket's size.
    pub fn take_with_debt(&mut self, amount: usize, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= amount as f64;
        if self.tokens >= 0.0 || self.per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((-self.tokens / self.per_sec).min(86_400.0))
    }

    /// Whether the bucket is full again at `now` (so forgetting it changes nothing).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now
                .saturating_duration_since(last)
                .min(Duration::from_secs(86_400));
            self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_sec).min(self.capacity);
        }
        self.last = Some(now);
    }
}

/// One token bucket per key, with at most `max_keys` buckets in memory: when full, buckets
/// that have refilled are forgotten; if none has, new keys are refused until some do (so a
/// flood of distinct keys costs bounded memory and cannot reset anyone's bucket).
pub struct KeyedLimiter<K> {
    template: TokenBucket,
    max_keys: usize,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Eq + Hash + Copy> KeyedLimiter<K> {
    /// A limiter handing each key a bucket like `template`.
    pub fn new(template: TokenBucket, max_keys: usize) -> Self {
        Self {
            template,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub fn try_take(&self, key: K, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if !buckets.contains_key(&key) && buckets.len() >= self.max_keys {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        buckets
            .entry(key)
            .or_insert_with(|| self.template.clone())
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_refills_at_the_rate() {
        let mut b = TokenBucket::per_minute(3, 60);
        let t0 = Instant::now();
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(
            b.try_take(t0 + Duration::from_secs(1)),
            "one token per second at 60/min"
        );
        assert!(!b.try_take(t0 + Duration::from_secs(1)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(600);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    #[test]
    fn a_byte_budget_goes_into_debt_and_says_how_long_to_wait() {
        let mut b = TokenBucket::new(1000, 1000.0);
        let t0 = Instant::now();
        assert_eq!(
            b.take_with_debt(1000, t0),
            Duration::ZERO,
            "the burst is free"
        );
        let wait = b.take_with_debt(500, t0);
        assert!(
            (wait.as_secs_f64() - 0.5).abs() < 1e-6,
            "500 bytes over at 1000/s is half a second: {wait:?}"
        );
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take_with_debt(0, t1), Duration::ZERO, "repaid by then");
    }

    #[test]
    fn keyed_buckets_are_independent_and_bounded() {
        let limiter = KeyedLimiter::new(TokenBucket::per_minute(1, 60), 2);
        let t0 = Instant::now();
        assert!(limiter.try_take(1u8, t0));
        assert!(!limiter.try_take(1u8, t0), "key 1 spent its burst");
        assert!(limiter.try_take(2u8, t0), "key 2 has its own bucket");
        assert!(
            !limiter.try_take(3u8, t0),
            "no room for a third key while the others are still refilling"
        );
        let later = t0 + Duration::from_secs(5);
        assert!(
            limiter.try_take(3u8, later),
            "refilled buckets are forgotten to make room"
        );
    }
}
