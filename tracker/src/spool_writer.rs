//! The request path's way onto the disk spool: group commit on a thread of
//! its own. A handler reserves room at once (so a full spool is known before
//! anything waits), queues its events and awaits the answer; the writer
//! thread writes everything queued by then with one `write` and flushes the
//! file to the device every 200 ms while the spool holds events. No runtime
//! worker runs file I/O or waits on a lock held across it, and under load
//! many handlers' events share one system call.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::sync::oneshot;

use crate::metric;
use crate::outgoing::Outgoing;
use crate::spool::Spool;

/// How often the writer flushes the spool to the device while it holds events.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);

/// Why events were not queued for the spool.
#[derive(Debug)]
pub enum Refused {
    /// Past the spool's bound: the events come back untouched.
    Full(Vec<Outgoing>),
    /// The writer has stopped (shutdown).
    Closed,
}

struct Job {
    events: Vec<Outgoing>,
    bytes: u64,
    done: oneshot::Sender<bool>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    sleeping: bool,
    stopped: bool,
}

/// The writer thread's handle; cheap to share.
pub struct SpoolWriter {
    spool: Arc<Spool>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Counted here, once written, whether or not the handler still waits.
    accepted: Counter,
    spooled: Counter,
}

/// Resolves once queued events are on disk (true) or could not be written.
pub struct Written(oneshot::Receiver<bool>);

impl Written {
    pub async fn wait(self) -> bool {
        self.0.await.unwrap_or(false)
    }
}

impl SpoolWriter {
    /// Starts the writer thread for `spool`.
    pub fn start(spool: Arc<Spool>) -> std::io::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let writer = Arc::new(Self {
            spool,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            accepted: metrics::counter!(metric::EVENTS_ACCEPTED),
            spooled: metrics::counter!(metric::EVENTS_SPOOLED, "cause" => "ingress"),
        });
        let w = writer.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || w.run())?;
        Ok((writer, thread))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing holding the lock can leave the queue half-changed.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues events for the spool, all or none; never blocks on I/O.
    pub fn submit(&self, events: Vec<Outgoing>) -> Result<Written, Refused> {
        let bytes = Spool::framed_len(&events);
        let mut q = self.lock();
        if q.stopped {
            return Err(Refused::Closed);
        }
        if !self.spool.reserve(bytes, events.len() as u64) {
            return Err(Refused::Full(events));
        }
        let (done, rx) = oneshot::channel();
        q.jobs.push(Job {
            events,
            bytes,
            done,
        });
        if q.sleeping {
            q.sleeping = false;
            self.wake.notify_one();
        }
        Ok(Written(rx))
    }

    /// Refuses new events; the thread writes what is queued, flushes and ends.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_one();
    }

    fn run(&self) {
        let mut last_sync = Instant::now();
        loop {
            let (jobs, stopped) = {
                let mut q = self.lock();
                if q.jobs.is_empty() && !q.stopped {
                    q.sleeping = true;
                    let wait = SYNC_EVERY.saturating_sub(last_sync.elapsed());
                    q = self
                        .wake
                        .wait_timeout(q, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    q.sleeping = false;
                }
                (std::mem::take(&mut q.jobs), q.stopped)
            };
            self.write(jobs);
            if stopped || last_sync.elapsed() >= SYNC_EVERY {
                last_sync = Instant::now();
                if self.spool.pending() > 0
                    && let Err(e) = self.spool.sync()
                {
                    tracing::warn!(error = %e, "spool sync failed");
                }
            }
            if stopped && self.lock().jobs.is_empty() {
                return;
            }
        }
    }

    fn write(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let bytes: u64 = jobs.iter().map(|j| j.bytes).sum();
        let mut events = Vec::with_capacity(jobs.iter().map(|j| j.events.len()).sum());
        let mut done = Vec::with_capacity(jobs.len());
        for job in jobs {
            events.extend(job.events);
            done.push(job.done);
        }
        let ok = match self.spool.write_reserved(&events, bytes) {
            Ok(()) => {
                self.accepted.increment(events.len() as u64);
                self.spooled.increment(events.len() as u64);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "cannot write the spool");
                false
            }
        };
        for d in done {
            let _ = d.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev(i: usize) -> Outgoing {
        Outgoing {
            partition_key: format!("key-{i}"),
            data: Bytes::from(vec![b'e'; 100]),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn handlers_never_wait_on_the_file_and_share_writes() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 16).expect("open");
        let spool = Arc::new(spool);
        let (writer, thread) = SpoolWriter::start(spool.clone()).expect("start");
        // While the file is held (a stalled disk), submitting still returns
        // at once and the runtime goes on: only the waiters wait.
        let held = spool.hold_file_for_test();
        let waits: Vec<Written> = (0..10)
            .map(|i| writer.submit(vec![ev(i)]).expect("queued"))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(spool.pending(), 0, "nothing written while the file is held");
        assert_eq!(spool.queued(), 10);
        drop(held);
        for w in waits {
            assert!(w.wait().await, "written");
        }
        assert_eq!(spool.pending(), 10);
        assert_eq!(spool.queued(), 0);
        // Past the bound: refused at once, events handed back.
        let big: Vec<Outgoing> = (0..20_000).map(ev).collect();
        assert!(matches!(writer.submit(big), Err(Refused::Full(back)) if back.len() == 20_000));
        writer.stop();
        assert!(matches!(writer.submit(vec![ev(0)]), Err(Refused::Closed)));
        thread.join().expect("writer ends");
    }
}
