//! The one retry policy of the adtrack services: exponential backoff with
//! full jitter (each wait drawn uniformly between zero and a ceiling that
//! doubles per attempt up to a cap), so retrying clients spread out instead
//! of calling again in step.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// A backoff: the first ceiling and the largest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

/// Failed AWS and store calls of the readers and writers (the consumer's
/// writes, the Kinesis reader, the core-data updates): up to 50 ms after the
/// first failure, doubling to 10 s.
pub const CALLS: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(10));

/// The wait was cut short by the stop token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The longest wait after `attempts` failed attempts.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempts.min(16))
            .min(self.cap)
    }

    /// How long to wait after `attempts` failed attempts.
    pub fn delay(&self, attempts: u32) -> Duration {
        rand::rng().random_range(Duration::ZERO..=self.ceiling(attempts))
    }

    /// Waits [`Self::delay`], unless `stop` fires first.
    pub async fn sleep(&self, attempts: u32, stop: &CancellationToken) -> Result<(), Stopped> {
        tokio::select! {
            _ = stop.cancelled() => Err(Stopped),
            _ = tokio::time::sleep(self.delay(attempts)) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        assert_eq!(b.ceiling(0), b.base);
        for attempts in 1..40 {
            assert!(b.ceiling(attempts) >= b.ceiling(attempts - 1));
            assert!(b.ceiling(attempts) <= b.cap);
            assert!(b.delay(attempts) <= b.ceiling(attempts));
        }
        assert!(b.ceiling(3) > b.ceiling(2), "does not grow");
        assert_eq!(b.ceiling(39), b.cap);
    }

    #[tokio::test]
    async fn a_stop_cuts_the_wait_short() {
        let b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(b.sleep(0, &stop).await, Err(Stopped));
    }
}
