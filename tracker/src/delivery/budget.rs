//! Per-shard write budgets: a token bucket of one second's allowance
//! (records and bytes), and a pause after the shard answers
//! `ProvisionedThroughputExceededException`.

use std::time::Duration;

use adtrack_service::retry::Backoff;
use tokio::time::Instant;

/// A throttled shard pauses 200 ms after its first throttle, doubling to
/// 2 s (the ceilings of the services' backoff; no jitter: one engine
/// paces its own shard).
const THROTTLE_PAUSE: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// How soon a shard out of tokens is tried again.
const REFILL_WAIT: Duration = Duration::from_millis(10);

/// One shard's write budget.
#[derive(Debug)]
pub struct Budget {
    records: f64,
    bytes: f64,
    rate_records: f64,
    rate_bytes: f64,
    refilled: Instant,
    paused_until: Instant,
    throttles: u32,
}

impl Budget {
    pub fn new(records_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Self {
        Self {
            records: records_per_sec as f64,
            bytes: bytes_per_sec as f64,
            rate_records: records_per_sec as f64,
            rate_bytes: bytes_per_sec as f64,
            refilled: now,
            paused_until: now,
            throttles: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.records = (self.records + dt * self.rate_records).min(self.rate_records);
        self.bytes = (self.bytes + dt * self.rate_bytes).min(self.rate_bytes);
        self.refilled = now;
    }

    /// Takes one record of `size` bytes if the shard can take it now.
    pub fn try_take(&mut self, size: usize, now: Instant) -> bool {
        if self.is_paused(now) {
            return false;
        }
        self.refill(now);
        // A record bigger than a second's allowance still goes when the bucket is full.
        let size = (size as f64).min(self.rate_bytes);
        if self.records >= 1.0 && self.bytes >= size {
            self.records -= 1.0;
            self.bytes -= size;
            true
        } else {
            false
        }
    }

    pub fn is_paused(&self, now: Instant) -> bool {
        now < self.paused_until
    }

    /// The shard refused records for throughput: pause it, longer each time.
    pub fn throttled(&mut self, now: Instant) {
        self.throttles = self.throttles.saturating_add(1);
        let pause = THROTTLE_PAUSE.ceiling(self.throttles);
        self.paused_until = now + pause;
        self.records = 0.0;
        self.bytes = 0.0;
    }

    pub fn succeeded(&mut self) {
        self.throttles = 0;
    }

    /// When this shard may send again, if it cannot now.
    pub fn next_chance(&self, now: Instant) -> Instant {
        if self.is_paused(now) {
            self.paused_until
        } else {
            now + REFILL_WAIT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_shard_to_its_allowance_and_refills() {
        let t0 = Instant::now();
        let mut b = Budget::new(2, 1_000, t0);
        assert!(b.try_take(400, t0));
        assert!(b.try_take(400, t0));
        assert!(!b.try_take(1, t0), "third record in the same instant");
        assert!(
            b.try_take(400, t0 + Duration::from_millis(500)),
            "half a second refills one record"
        );
        // Bytes bound too.
        let mut b = Budget::new(100, 1_000, t0);
        assert!(b.try_take(900, t0));
        assert!(!b.try_take(200, t0));
        // A record over a second's allowance still goes on a full bucket.
        let mut b = Budget::new(100, 1_000, t0);
        assert!(b.try_take(5_000, t0));
    }

    #[test]
    fn throttling_pauses_longer_each_time_until_success() {
        let t0 = Instant::now();
        let mut b = Budget::new(1_000, 1 << 20, t0);
        b.throttled(t0);
        let first = b.next_chance(t0) - t0;
        assert!(!b.try_take(1, t0));
        b.throttled(t0);
        let second = b.next_chance(t0) - t0;
        assert!(second > first);
        assert!(b.try_take(1, t0 + second + Duration::from_millis(1)));
        b.succeeded();
        b.throttled(t0);
        assert_eq!(b.next_chance(t0) - t0, first);
    }
}
