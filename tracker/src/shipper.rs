//! The request side of delivery: where a handler puts an event. Never
//! blocks: the event goes to the bounded in-memory inbox, or, past its
//! bounds, while Kinesis is behind or while older events are still spooled,
//! to the disk spool through its writer thread (the handler's answer then
//! waits until the event is on disk); past the spool's bound it is refused
//! and the caller counts the drop with its cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metrics::Counter;

use crate::delivery::{Inbox, Refused};
use crate::metric;
use crate::outgoing::Outgoing;
use crate::spool::Spool;
use crate::spool_writer::{Refused as SubmitRefused, SpoolWriter, Written};

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

    /// New events go to disk while Kinesis is behind or older ones wait
    /// there (written, or queued to be).
    fn spool_first(&self) -> bool {
        self.kinesis_down.load(Ordering::Acquire)
            || self
                .spool
                .as_ref()
                .is_some_and(|s| s.pending() > 0 || s.queued() > 0)
    }

    pub fn release(&self, size: u64) {
        self.mem_bytes.fetch_sub(size, Ordering::AcqRel);
    }
}

/// An accepted event's way to safety: already in the memory queue, or
/// queued for the spool, where the answer waits until it is on disk.
#[must_use = "a spooled event is accepted only once it is written"]
pub enum Accepted {
    Memory,
    Spool(Written),
}

impl Accepted {
    /// Waits (only for the spool) until the events are stored.
    pub async fn settled(self) -> Result<(), QueueError> {
        match self {
            Self::Memory => Ok(()),
            Self::Spool(written) => match written.wait().await {
                true => Ok(()),
                false => Err(QueueError::SpoolIo),
            },
        }
    }
}

/// The request side of the queue; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    writer: Option<Arc<SpoolWriter>>,
    accepted: Counter,
}

impl EventSink {
    pub fn new(inbox: Arc<Inbox>, shared: Arc<Shared>, writer: Option<Arc<SpoolWriter>>) -> Self {
        Self {
            inbox,
            shared,
            writer,
            accepted: metrics::counter!(metric::EVENTS_ACCEPTED),
        }
    }

    /// Queues an event without waiting on anything but a short lock; a
    /// spooled event is stored once [`Accepted::settled`] says so.
    pub fn try_send(&self, ev: Outgoing) -> Result<Accepted, QueueError> {
        let size = ev.size();
        self.offer(std::iter::once(ev), size)
    }

    /// Queues all events or none (a batch request's events go together).
    pub fn try_send_all(&self, events: Vec<Outgoing>) -> Result<Accepted, QueueError> {
        if events.is_empty() {
            return Ok(Accepted::Memory);
        }
        let size = events.iter().map(Outgoing::size).sum();
        self.offer(events.into_iter(), size)
    }

    /// Queues an event and waits until it is stored: at once in memory, or
    /// once the spool writer has written it.
    pub async fn send(&self, ev: Outgoing) -> Result<(), QueueError> {
        self.try_send(ev)?.settled().await
    }

    /// [`Self::send`] for events that go all together or not at all.
    pub async fn send_all(&self, events: Vec<Outgoing>) -> Result<(), QueueError> {
        self.try_send_all(events)?.settled().await
    }

    /// Refuses new events from now on (shutdown); the engine drains the
    /// rest, the spool writer writes what is queued.
    pub fn close(&self) {
        self.inbox.close();
        if let Some(w) = &self.writer {
            w.stop();
        }
    }

    fn to_memory<I>(&self, events: I, size: u64, any_age: bool) -> Result<(), (QueueError, I)>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        if !self.shared.try_reserve(size) {
            return Err((QueueError::Full, events));
        }
        let n = events.len() as u64;
        let pushed = if any_age {
            self.inbox.push_all_any_age(events)
        } else {
            self.inbox.push_all(events)
        };
        match pushed {
            Ok(()) => {
                self.accepted.increment(n);
                Ok(())
            }
            Err((refused, back)) => {
                self.shared.release(size);
                let e = if refused == Refused::Closed {
                    QueueError::Closed
                } else {
                    QueueError::Full
                };
                Err((e, back))
            }
        }
    }

    /// Memory first unless the spool must be (nothing is allocated for the
    /// common case of memory); the spool, then memory as a last resort.
    fn offer<I>(&self, events: I, size: u64) -> Result<Accepted, QueueError>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        let Some(writer) = &self.writer else {
            return self
                .to_memory(events, size, true)
                .map(|()| Accepted::Memory)
                .map_err(|(e, _)| e);
        };
        let events = if self.shared.spool_first() {
            events
        } else {
            match self.to_memory(events, size, false) {
                Ok(()) => return Ok(Accepted::Memory),
                Err((QueueError::Closed, _)) => return Err(QueueError::Closed),
                Err((_, back)) => back,
            }
        };
        match writer.submit(events.collect()) {
            Ok(written) => Ok(Accepted::Spool(written)),
            // The spool is full (replaying, or Kinesis down): memory may still have room.
            Err(SubmitRefused::Full(back)) => match self.to_memory(back.into_iter(), size, true) {
                Ok(()) => Ok(Accepted::Memory),
                Err((QueueError::Closed, _)) => Err(QueueError::Closed),
                Err(_) => Err(QueueError::SpoolFull),
            },
            Err(SubmitRefused::Closed) => Err(QueueError::Closed),
        }
    }
}
