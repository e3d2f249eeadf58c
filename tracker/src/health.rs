//! Liveness and readiness: what the load balancer and ECS ask.
//!
//! Readiness is a set of flags. Liveness is the tracker's background loops
//! reporting in (PostHog capture's health registry): each loop registers
//! with a deadline and beats as it goes round; a loop that has not beaten
//! within its deadline (stuck in a call, deadlocked, or gone) fails
//! `/health/live`, so ECS replaces the task.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How often a registered loop should beat at least (its deadline is
/// longer: see [`Health::register`]).
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// One background loop's reports.
#[derive(Debug)]
pub struct Beat {
    name: &'static str,
    deadline: Duration,
    /// Milliseconds since the registry's start, at the last beat.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Beat {
    /// The loop is alive and going round.
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn stalled(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_ms.load(Ordering::Acquire))
            > self.deadline.as_millis() as u64
    }
}

/// Readiness is the AND of these flags; the tracker starts not ready.
#[derive(Debug)]
pub struct Health {
    cache_warm: AtomicBool,
    stream_ok: AtomicBool,
    draining: AtomicBool,
    loops: Mutex<Vec<Arc<Beat>>>,
    epoch: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            cache_warm: AtomicBool::new(false),
            stream_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            loops: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        }
    }
}

impl Health {
    pub fn set_cache_warm(&self) {
        self.cache_warm.store(true, Ordering::Release);
        self.publish();
    }
    pub fn is_cache_warm(&self) -> bool {
        self.cache_warm.load(Ordering::Acquire)
    }
    pub fn set_stream_ok(&self) {
        self.stream_ok.store(true, Ordering::Release);
        self.publish();
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.publish();
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    pub fn is_ready(&self) -> bool {
        self.cache_warm.load(Ordering::Acquire)
            && self.stream_ok.load(Ordering::Acquire)
            && !self.is_draining()
    }

    /// Why the tracker is not ready, for the readiness body.
    pub fn reasons(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.cache_warm.load(Ordering::Acquire) {
            r.push("program cache not warm yet (or Redis does not hold every program yet)");
        }
        if !self.stream_ok.load(Ordering::Acquire) {
            r.push("the delivery engine has not listed the Kinesis stream's shards yet");
        }
        if self.is_draining() {
            r.push("draining for shutdown");
        }
        r
    }

    /// Registers a background loop that must beat at least every
    /// `deadline` (beating every [`BEAT_EVERY`]); it counts as beaten now.
    pub fn register(&self, name: &'static str, deadline: Duration) -> Arc<Beat> {
        let beat = Arc::new(Beat {
            name,
            deadline,
            last_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        beat.beat();
        self.loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(beat.clone());
        beat
    }

    /// Loops that missed their deadline; empty when the tracker is live.
    pub fn stalled(&self) -> Vec<&'static str> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        self.loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|b| b.stalled(now_ms))
            .map(|b| b.name)
            .collect()
    }

    fn publish(&self) {
        metrics::gauge!(crate::metric::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_beating_fails_liveness() {
        let health = Health::default();
        let engine = health.register("delivery engine", Duration::from_secs(30));
        let sync = health.register("program sync", Duration::from_secs(30));
        assert!(health.stalled().is_empty());
        for _ in 0..40 {
            tokio::time::advance(BEAT_EVERY).await;
            engine.beat();
            sync.beat();
        }
        assert!(health.stalled().is_empty(), "beating loops are live");
        for _ in 0..31 {
            tokio::time::advance(BEAT_EVERY).await;
            sync.beat();
        }
        assert_eq!(health.stalled(), vec!["delivery engine"]);
        engine.beat();
        assert!(health.stalled().is_empty(), "live again once it beats");
    }
}
