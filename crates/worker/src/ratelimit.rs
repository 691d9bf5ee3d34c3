//! A token bucket: per socket (no shared state, no locks), and per client
//! address inside `limits.rs`.

use std::time::{Duration, Instant};

/// Allows `rate` events per second on average and `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: f64,
    /// Most tokens the bucket holds.
    burst: f64,
    /// Tokens now (as of `last`).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self { rate: rate.max(0.0), burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(1.0, now)
    }

    /// Takes `n` tokens if the bucket holds them; more than the burst is
    /// charged as the burst (a full bucket), or it could never be taken.
    pub fn try_take_n(&mut self, n: f64, now: Instant) -> bool {
        let n = n.min(self.burst);
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Reserves `n` tokens, going into debt if need be, and says how long the
    /// caller must wait for them to be paid back; refuses (taking nothing) when
    /// that wait would exceed `max_wait`. Reservations queue up in arrival
    /// order, so waiters are served at the rate however many there are. More
    /// than the burst is charged as the burst.
    pub fn reserve(&mut self, n: f64, now: Instant, max_wait: Duration) -> Option<Duration> {
        let n = n.min(self.burst);
        self.refill(now);
        let after = self.tokens - n;
        if after >= 0.0 {
            self.tokens = after;
            return Some(Duration::ZERO);
        }
        if self.rate <= 0.0 {
            return None;
        }
        let wait = Duration::from_secs_f64(-after / self.rate);
        if wait > max_wait {
            return None;
        }
        self.tokens = after;
        Some(wait)
    }

    /// Whether the bucket is full (an idle client's bucket: forgetting it loses nothing).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20.0, 40.0, t0);
        assert_eq!((0..100).filter(|_| b.try_take(t0)).count(), 40);
        // Half a second refills 10 tokens.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.try_take(t1)).count(), 10);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.try_take(t2)).count(), 40);
    }

    #[test]
    fn reservations_queue_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        let max = Duration::from_secs(2);
        assert_eq!(b.reserve(100.0, t0, max), Some(Duration::ZERO));
        assert_eq!(b.reserve(100.0, t0, max), Some(Duration::from_secs(1)));
        assert_eq!(b.reserve(100.0, t0, max), Some(Duration::from_secs(2)));
        // A third in the queue would wait 3 s: refused, and it takes nothing.
        assert_eq!(b.reserve(100.0, t0, max), None);
        assert!(!b.is_full(t0 + Duration::from_secs(2)));
        assert!(b.is_full(t0 + Duration::from_secs(3)));
        // More than the burst costs a full bucket, not a wait that never ends.
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(b.reserve(1e9, t3, max), Some(Duration::ZERO));
        assert!(b.try_take_n(1e9, t3 + Duration::from_secs(1)));
    }
}
