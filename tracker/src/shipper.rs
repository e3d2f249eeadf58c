//! The request side of delivery: where a handler puts an event. Never waits:
//! the event goes to the bounded in-memory queue, or, past its byte bound or
//! while Kinesis is unreachable (or older events are still spooled), to the
//! disk spool; past the spool's bound it is refused and the caller counts
//! the drop with its cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metric;
use crate::spool::{Spool, SpoolError};

/// One event on its way to Kinesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The event id: spreads events over shards and lets the consumer dedup.
    pub partition_key: String,
    /// The encoded `TrackingEvent`.
    pub data: Bytes,
}

impl Outgoing {
    pub fn size(&self) -> u64 {
        (self.data.len() + self.partition_key.len()) as u64
    }
}

/// Why an event was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("event queue is full and there is no spool")]
    Full,
    #[error("event spool is full")]
    SpoolFull,
    #[error("event spool cannot be written")]
    SpoolIo,
    #[error("shutting down")]
    Closed,
}

impl QueueError {
    pub fn cause(self) -> &'static str {
        match self {
            Self::Full => "queue_full",
            Self::SpoolFull => "spool_full",
            Self::SpoolIo => "spool_io",
            Self::Closed => "shutting_down",
        }
    }
}

/// State shared by the request side and the delivery engine.
pub struct Shared {
    /// Bytes of events held in memory (queue and engine), released on delivery.
    pub mem_bytes: AtomicU64,
    pub max_mem_bytes: u64,
    /// True until the engine has reached Kinesis, and again after
    /// consecutive failed calls; cleared on success.
    pub kinesis_down: AtomicBool,
    pub spool: Option<Arc<Spool>>,
}

impl Shared {
    fn try_reserve(&self, size: u64) -> bool {
        let before = self.mem_bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_mem_bytes {
            self.mem_bytes.fetch_sub(size, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// New events go to disk while Kinesis is down or older ones wait there.
    fn spool_first(&self) -> bool {
        self.kinesis_down.load(Ordering::Acquire)
            || self.spool.as_ref().is_some_and(|s| s.pending() > 0)
    }

    pub fn release(&self, size: u64) {
        self.mem_bytes.fetch_sub(size, Ordering::AcqRel);
    }
}

/// The request side of the queue; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
}

impl EventSink {
    pub fn new(tx: mpsc::Sender<Outgoing>, shared: Arc<Shared>) -> Self {
        Self { tx, shared }
    }

    /// Queues an event without waiting.
    pub fn try_send(&self, ev: Outgoing) -> Result<(), QueueError> {
        self.try_send_all(vec![ev])
    }

    /// Queues all events or none (a batch request's events go together).
    pub fn try_send_all(&self, events: Vec<Outgoing>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        if !self.shared.spool_first() || self.shared.spool.is_none() {
            let size: u64 = events.iter().map(Outgoing::size).sum();
            if self.shared.try_reserve(size) {
                match self.tx.try_reserve_many(events.len()) {
                    Ok(permits) => {
                        for (permit, ev) in permits.zip(events) {
                            permit.send(ev);
                        }
                        metrics::counter!(metric::EVENTS_ACCEPTED).increment(n);
                        return Ok(());
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        self.shared.release(size);
                        return Err(QueueError::Closed);
                    }
                    Err(mpsc::error::TrySendError::Full(())) => self.shared.release(size),
                }
            }
        }
        let Some(spool) = &self.shared.spool else {
            return Err(QueueError::Full);
        };
        match spool.append_all(&events) {
            Ok(()) => {
                metrics::counter!(metric::EVENTS_ACCEPTED).increment(n);
                metrics::counter!(metric::EVENTS_SPOOLED).increment(n);
                Ok(())
            }
            Err(SpoolError::Full) => Err(QueueError::SpoolFull),
            Err(SpoolError::Io(e)) => {
                tracing::error!(error = %e, "cannot write the spool");
                Err(QueueError::SpoolIo)
            }
        }
    }
}
