//! Retry delays for transient failures: capped exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with "equal jitter": the delay before retry `n` (after the
/// `n`-th failed attempt) is drawn from `[d/2, d]` with `d = min(cap, base * 2^(n-1))`.
/// Delays therefore never shrink from one attempt to the next until the cap is reached, and
/// concurrent failures spread out instead of retrying in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay scale of the first retry.
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The delay before the retry that follows failed attempt `attempt` (1-based), never less
    /// than `retry_after` when the peer asked for one.
    pub fn delay(&self, attempt: i32, retry_after: Option<Duration>) -> Duration {
        let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
        let full = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.cap)
            .min(self.cap);
        let half = full / 2;
        let jitter = if half.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::rng().random_range(0..=half.as_nanos() as u64))
        };
        let d = half + jitter;
        match retry_after {
            Some(r) if r > d => r,
            _ => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        let mut prev = Duration::ZERO;
        for attempt in 1..=4 {
            let d = b.delay(attempt, None);
            let full = Duration::from_millis(100 * (1 << (attempt - 1)));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            assert!(d >= prev);
            prev = d;
        }
        for attempt in 5..40 {
            assert!(b.delay(attempt, None) <= Duration::from_secs(1));
        }
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
    }
}
