//! Liveness and readiness: what the load balancer and ECS ask.

use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness is the AND of these flags; the tracker starts not ready.
#[derive(Debug, Default)]
pub struct Health {
    cache_warm: AtomicBool,
    stream_ok: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn set_cache_warm(&self) {
        self.cache_warm.store(true, Ordering::Release);
        self.publish();
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
            r.push("program cache not warm yet");
        }
        if !self.stream_ok.load(Ordering::Acquire) {
            r.push("Kinesis stream has not answered yet");
        }
        if self.is_draining() {
            r.push("draining for shutdown");
        }
        r
    }

    fn publish(&self) {
        metrics::gauge!(crate::metric::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}
