//! The hand-over between request handlers and the delivery engine: a
//! bounded list behind a short lock. A handler appends without waking the
//! engine; the engine takes the whole list when it wakes (on its own
//! deadlines, when the list passes a size that fills an aggregate, or on the
//! first event after it asked to be told), so a hit costs a lock and a push,
//! never a cross-thread wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::outgoing::Outgoing;

/// Why events were not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The list holds its bound of events.
    Full,
    /// Closed for shutdown.
    Closed,
    /// The engine has not taken what waits for longer than the memory age
    /// bound (it is starved or stuck): new events should go to disk.
    Stale,
}

struct List {
    events: Vec<Outgoing>,
    /// When the oldest waiting event was pushed.
    since: Option<Instant>,
    closed: bool,
}

/// Events waiting for the engine.
pub struct Inbox {
    list: Mutex<List>,
    max_events: usize,
    /// Wake the engine when the list reaches this many events.
    wake_at: usize,
    /// The engine asked to be woken by the next event.
    wake_next: AtomicBool,
    wake: Notify,
    /// Longest events may wait before [`Refused::Stale`].
    max_wait: Duration,
}

impl Inbox {
    /// `max_wait`: how long the engine may leave events untaken before new
    /// ones are refused as [`Refused::Stale`] (`Duration::MAX`: never).
    pub fn new(max_events: usize, wake_at: usize, max_wait: Duration) -> Self {
        Self {
            list: Mutex::new(List {
                events: Vec::new(),
                since: None,
                closed: false,
            }),
            max_events: max_events.max(1),
            wake_at: wake_at.max(1),
            max_wait,
            wake_next: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, List> {
        // Nothing holding the lock can leave the list half-changed.
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends all events or none; refused events come back untouched.
    /// Refused as [`Refused::Stale`] when the engine has left what waits
    /// untaken longer than the bound (looked at only once the list is past
    /// the size that wakes the engine, so a healthy engine costs no clock
    /// read).
    pub fn push_all<I>(&self, events: I) -> Result<(), (Refused, I)>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        self.push(events, true)
    }

    /// The same, whatever the age of what waits (memory is the only place
    /// left for the events).
    pub fn push_all_any_age<I>(&self, events: I) -> Result<(), (Refused, I)>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        self.push(events, false)
    }

    fn push<I>(&self, events: I, check_age: bool) -> Result<(), (Refused, I)>
    where
        I: ExactSizeIterator<Item = Outgoing>,
    {
        let n = events.len();
        let len = {
            let mut list = self.lock();
            if list.closed {
                return Err((Refused::Closed, events));
            }
            if list.events.len() + n > self.max_events {
                return Err((Refused::Full, events));
            }
            match list.since {
                None => list.since = Some(Instant::now()),
                Some(since)
                    if check_age
                        && list.events.len() >= self.wake_at
                        && since.elapsed() > self.max_wait =>
                {
                    return Err((Refused::Stale, events));
                }
                Some(_) => {}
            }
            list.events.extend(events);
            list.events.len()
        };
        let crossed = len >= self.wake_at && len - n < self.wake_at;
        if crossed
            || (self.wake_next.load(Ordering::Relaxed)
                && self.wake_next.swap(false, Ordering::AcqRel))
        {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves every waiting event into `into` (which should be empty; its
    /// allocation is kept for the next round). Returns true once closed.
    pub fn take(&self, into: &mut Vec<Outgoing>) -> bool {
        let mut list = self.lock();
        std::mem::swap(&mut list.events, into);
        list.since = None;
        list.closed
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses new events from now on; the engine drains what is left.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Asks to be woken by the next event (or the size threshold).
    pub fn wake_on_next(&self) {
        self.wake_next.store(true, Ordering::Release);
    }

    /// Resolves when a handler woke the engine (or it was closed).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev(i: usize) -> Outgoing {
        Outgoing {
            partition_key: format!("k{i}"),
            data: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn all_or_nothing_within_the_bound() {
        let inbox = Inbox::new(3, 100, Duration::MAX);
        assert!(inbox.push_all((0..2).map(ev)).is_ok());
        let (refused, back) = inbox.push_all((2..4).map(ev)).expect_err("over the bound");
        assert_eq!(refused, Refused::Full);
        assert_eq!(back.len(), 2, "refused events come back");
        assert_eq!(inbox.len(), 2);
        let mut got = Vec::new();
        assert!(!inbox.take(&mut got));
        assert_eq!(got.len(), 2);
        assert!(inbox.is_empty());
        inbox.close();
        assert!(matches!(
            inbox.push_all((0..1).map(ev)),
            Err((Refused::Closed, _))
        ));
        got.clear();
        assert!(inbox.take(&mut got));
    }

    #[test]
    fn events_left_untaken_past_the_bound_refuse_new_ones() {
        let inbox = Inbox::new(100, 2, Duration::from_millis(20));
        assert!(inbox.push_all((0..2).map(ev)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        let (refused, back) = inbox.push_all((2..3).map(ev)).expect_err("stale");
        assert_eq!(refused, Refused::Stale);
        assert_eq!(back.len(), 1);
        assert!(
            inbox.push_all_any_age(back).is_ok(),
            "memory as last resort"
        );
        let mut got = Vec::new();
        inbox.take(&mut got);
        assert_eq!(got.len(), 3);
        assert!(inbox.push_all((0..3).map(ev)).is_ok(), "taken: fresh again");
    }

    #[test]
    fn wakes_at_the_threshold_and_on_request() {
        use futures_util::FutureExt;
        let inbox = Inbox::new(100, 3, Duration::MAX);
        assert!(inbox.push_all((0..2).map(ev)).is_ok());
        // Below the threshold and nobody asked: no wake-up is stored.
        assert!(
            inbox.woken().now_or_never().is_none(),
            "woken below the threshold"
        );
        assert!(inbox.push_all((2..3).map(ev)).is_ok());
        assert!(
            inbox.woken().now_or_never().is_some(),
            "not woken at the threshold"
        );
        let mut got = Vec::new();
        inbox.take(&mut got);
        assert!(inbox.push_all((0..1).map(ev)).is_ok());
        assert!(
            inbox.woken().now_or_never().is_none(),
            "woken without asking"
        );
        inbox.wake_on_next();
        assert!(inbox.push_all((1..2).map(ev)).is_ok());
        assert!(
            inbox.woken().now_or_never().is_some(),
            "not woken after asking"
        );
    }
}
