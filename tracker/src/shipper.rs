//! The request side of delivery: where a handler puts an event. Never waits:
//! the event goes to the bounded in-memory inbox, or, past its bounds or
//! while Kinesis is unreachable (or older events are still spooled), to the
//! disk spool; past the spool's bound it is refused and the caller counts
//! the drop with its cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metrics::Counter;

use crate::delivery::{Inbox, Refused};
use crate::metric;
use crate::outgoing::Outgoing;
use crate::spool::{Spool, SpoolError};

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
    /// Bytes of events held in memory (inbox and engine), released on delivery.
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
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    accepted: Counter,
    spooled: Counter,
}

impl EventSink {
    pub fn new(inbox: Arc<Inbox>, shared: Arc<Shared>) -> Self {
        Self {
            inbox,
            shared,
            accepted: metrics::counter!(metric::EVENTS_ACCEPTED),
            spooled: metrics::counter!(metric::EVENTS_SPOOLED, "cause" => "ingress"),
        }
    }

    /// Queues an event without waiting.
    pub fn try_send(&self, ev: Outgoing) -> Result<(), QueueError> {
        let size = ev.size();
        self.offer(std::iter::once(ev), size)
    }

    /// Queues all events or none (a batch request's events go together).
    pub fn try_send_all(&self, events: Vec<Outgoing>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let size = events.iter().map(Outgoing::size).sum();
        self.offer(events.into_iter(), size)
    }

    /// Refuses new events from now on (shutdown); the engine drains the rest.
    pub fn close(&self) {
        self.inbox.close();
    }

    fn offer<I>(&self, mut events: I, size: u64) -> Result<(), QueueError>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        let n = events.len() as u64;
        if (!self.shared.spool_first() || self.shared.spool.is_none())
            && self.shared.try_reserve(size)
        {
            match self.inbox.push_all(events) {
                Ok(()) => {
                    self.accepted.increment(n);
                    return Ok(());
                }
                Err((refused, back)) => {
                    self.shared.release(size);
                    if refused == Refused::Closed {
                        return Err(QueueError::Closed);
                    }
                    events = back;
                }
            }
        }
        let Some(spool) = &self.shared.spool else {
            return Err(QueueError::Full);
        };
        let events: Vec<Outgoing> = events.collect();
        match spool.append_all(&events) {
            Ok(()) => {
                self.accepted.increment(n);
                self.spooled.increment(n);
                Ok(())
            }
            // The spool is full (replaying, or Kinesis down): memory may still have room.
            Err(SpoolError::Full) if self.shared.try_reserve(size) => {
                match self.inbox.push_all_any_age(events.into_iter()) {
                    Ok(()) => {
                        self.accepted.increment(n);
                        Ok(())
                    }
                    Err((refused, _)) => {
                        self.shared.release(size);
                        Err(if refused == Refused::Closed {
                            QueueError::Closed
                        } else {
                            QueueError::SpoolFull
                        })
                    }
                }
            }
            Err(SpoolError::Full) => Err(QueueError::SpoolFull),
            Err(SpoolError::Io(e)) => {
                tracing::error!(error = %e, "cannot write the spool");
                Err(QueueError::SpoolIo)
            }
        }
    }
}
