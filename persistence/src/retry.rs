//! Retrying transactions that the database aborted to keep them
//! serializable (SQLSTATE 40001, which CockroachDB returns routinely under
//! contention), with jittered exponential backoff.

use std::future::Future;
use std::time::Duration;

/// Backoff of a retry loop: `base · 2^attempt`, capped, each wait drawn
/// uniformly from [half, full] so contending clients spread out.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(5), cap: Duration::from_millis(500), attempts: 12 }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self.base.saturating_mul(1u32 << attempt.min(20)).min(self.cap);
        let half = full / 2;
        half + full.saturating_sub(half).mul_f64(fastrand::f64())
    }
}

/// Whether an error is worth retrying at once: a serialization failure, or
/// (where the caller says so) another transient conflict.
pub trait Retryable {
    fn retryable(&self) -> bool;
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or the
/// attempts run out (then the last error is returned).
pub async fn with_retry<T, E, F, Fut>(backoff: Backoff, mut op: F) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.retryable() && attempt + 1 < backoff.attempts => {
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    enum E {
        Conflict,
        Fatal,
    }

    impl Retryable for E {
        fn retryable(&self) -> bool {
            *self == E::Conflict
        }
    }

    fn fast() -> Backoff {
        Backoff { base: Duration::from_micros(10), cap: Duration::from_micros(100), attempts: 5 }
    }

    #[tokio::test]
    async fn retries_conflicts_then_succeeds() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, E> = with_retry(fast(), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 3 { Err(E::Conflict) } else { Ok(n) }
        })
        .await;
        assert_eq!(r, Ok(3));
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts_and_never_retries_fatal_errors() {
        let calls = AtomicU32::new(0);
        let r: Result<(), E> = with_retry(fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E::Conflict)
        })
        .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err(E::Conflict), 5));
        calls.store(0, Ordering::SeqCst);
        let r: Result<(), E> = with_retry(fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E::Fatal)
        })
        .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err(E::Fatal), 1));
    }

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let b = Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(100), attempts: 10 };
        for attempt in 0..10 {
            let full = Duration::from_millis(10 * (1 << attempt)).min(Duration::from_millis(100));
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?} outside [{:?}, {full:?}]", full / 2);
            }
        }
    }
}
