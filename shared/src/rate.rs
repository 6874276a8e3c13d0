//! A token bucket: `rate` tokens a second, at most `burst` saved up. Time
//! is passed in (seconds on any monotonic clock), so the rule is pure and
//! tested without waiting.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: f64,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: f64, burst: f64, now: f64) -> Self {
        Self { rate, burst, tokens: burst, at: now }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: f64) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now` (a full bucket holds no history
    /// worth keeping).
    pub fn is_full(&mut self, now: f64) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: f64) {
        // A clock that went back refills nothing.
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut b = TokenBucket::new(10.0, 5.0, 0.0);
        assert_eq!((0..8).filter(|_| b.take(0.0)).count(), 5, "the burst");
        assert!(!b.take(0.05), "half a token");
        assert!(b.take(0.1));
        // Over ten seconds at 100 attempts a second: 10 a second get through.
        let passed = (0..1000).filter(|i| b.take(0.1 + f64::from(*i) * 0.01)).count();
        assert!((99..=101).contains(&passed), "{passed}");
        assert!(!b.is_full(10.1));
        assert!(b.is_full(20.0));
        // Time going back neither refills nor breaks it.
        let mut c = TokenBucket::new(1.0, 1.0, 100.0);
        assert!(c.take(100.0));
        assert!(!c.take(50.0));
        assert!(c.take(101.0));
    }
}
