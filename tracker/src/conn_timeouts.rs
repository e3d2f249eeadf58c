//! Per-connection timeouts that hyper's HTTP/1 server does not give us as
//! such: a slow client that has started a request but not finished its
//! headers gets `408 Request Timeout` after `header_timeout`; a keep-alive
//! connection idle between requests is closed after `idle_timeout` (longer
//! than the load balancer's, so the ALB never reuses a closed connection).
//!
//! The IO wrapper learns the request phase from the handler through
//! [`ConnPhase`]. Deadlines are kept as plain instants; the one timer per
//! connection is never armed more than `header_timeout` ahead and is re-armed
//! when it fires early, so a new deadline is never earlier than the armed
//! timer and a request costs a clock read, not a timer-wheel update.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::metric;

/// Shared between a connection's IO wrapper and its request handler:
/// requests whose head arrived, and requests answered.
#[derive(Debug, Default)]
pub struct ConnPhase {
    started: AtomicU32,
    finished: AtomicU32,
}

impl ConnPhase {
    /// The handler has the request head: no header deadline any more.
    pub fn busy(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }
    /// The handler is done: the connection waits for the next request.
    pub fn idle(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Between requests (or before the first).
    Idle,
    /// Bytes of a request head have arrived; the handler has not run yet.
    Receiving,
    /// The handler runs or ran; waiting for it to report idle.
    Busy,
}

/// A TCP stream with header and idle deadlines.
pub struct TimedIo {
    inner: TokioIo<TcpStream>,
    phase: Arc<ConnPhase>,
    local: Local,
    seen_started: u32,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl TimedIo {
    pub fn new(
        stream: TcpStream,
        phase: Arc<ConnPhase>,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        let deadline = now + idle_timeout;
        Self {
            inner: TokioIo::new(stream),
            phase,
            local: Local::Idle,
            seen_started: 0,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.min(now + header_timeout))),
            header_timeout,
            idle_timeout,
        }
    }

    fn sync_phase(&mut self) {
        let started = self.phase.started.load(Ordering::Acquire);
        if started != self.seen_started {
            // A head arrived (possibly pipelined): its header deadline is over.
            self.seen_started = started;
            self.local = Local::Busy;
        }
        if self.local == Local::Busy && self.phase.finished.load(Ordering::Acquire) == started {
            self.local = Local::Idle;
            self.deadline = Instant::now() + self.idle_timeout;
        }
    }

    /// Ready(Err) when the current deadline has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.local == Local::Busy {
            return Poll::Pending;
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let now = Instant::now();
            if now < self.deadline {
                let next = self.deadline.min(now + self.header_timeout);
                self.timer.as_mut().reset(next);
                continue;
            }
            return Poll::Ready(match self.local {
                Local::Receiving => {
                    // Best effort: the socket buffer is empty, this fits.
                    let _ = self.inner.inner().try_write(
                        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    metrics::counter!(metric::REQUESTS, "route" => "none", "status" => "408")
                        .increment(1);
                    metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "header_timeout")
                        .increment(1);
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request headers not received in time",
                    )
                }
                _ => io::Error::new(io::ErrorKind::TimedOut, "keep-alive connection idle"),
            });
        }
    }
}

impl Read for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.sync_phase();
        // Data and EOF both count as activity (an EOF ends the connection anyway).
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.local == Local::Idle {
                    this.local = Local::Receiving;
                    this.deadline = Instant::now() + this.header_timeout;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Write for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
