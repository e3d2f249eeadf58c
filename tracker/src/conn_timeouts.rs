//! Per-connection timeouts that hyper's HTTP/1 server does not give us as
//! such: a new connection must send its first request head within the
//! header timeout (a silent one is closed, so silent connections cannot pin
//! the connection slots); a slow client that has started a request but not
//! finished its headers gets `408 Request Timeout` after the header
//! timeout; a keep-alive connection idle between requests is closed after
//! the idle timeout (longer than the load balancer's, so the ALB never
//! reuses a closed connection); a response the client does not read within
//! the write timeout closes the connection. A request line longer than the
//! longest request target allows is answered `414 URI Too Long` as it
//! arrives, whatever its size (hyper alone would answer 431 once the whole
//! head passed its bound).
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::metric;

/// A connection's byte stream: a socket, or an in-memory pipe (fuzzing).
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    /// Writes a short answer if it fits without waiting (best effort).
    fn write_now(&self, buf: &[u8]);
}

impl Stream for TcpStream {
    fn write_now(&self, buf: &[u8]) {
        let _ = self.try_write(buf);
    }
}

impl Stream for tokio::io::DuplexStream {
    /// An in-memory pipe cannot be written without a task context: the
    /// answer is left out, the connection still closes.
    fn write_now(&self, _buf: &[u8]) {}
}

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

/// A connection's deadlines and its longest request line.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header: Duration,
    pub idle: Duration,
    pub write: Duration,
    /// Longest request target (path and query), in bytes.
    pub max_uri_bytes: usize,
}

/// Room on a request line besides its target: method, spaces, version.
const REQUEST_LINE_SLACK: usize = 64;

/// Bytes read at most at once while a request line is open (then copied
/// into hyper's buffer): the first read of a request usually holds all of it.
const LINE_SCRATCH: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Accepted; no request head yet (the header deadline runs from accept).
    Fresh,
    /// Between requests.
    Idle,
    /// Bytes of a request head have arrived; the handler has not run yet.
    Receiving,
    /// The handler runs or ran; waiting for it to report idle.
    Busy,
}

/// A TCP stream with header and idle deadlines.
pub struct TimedIo<S = TcpStream> {
    inner: TokioIo<S>,
    phase: Arc<ConnPhase>,
    local: Local,
    seen_started: u32,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    write_timeout: Duration,
    /// Armed while a write waits for the client to read (created only then).
    write_timer: Option<Pin<Box<Sleep>>>,
    /// The next bytes read belong to a request line not yet ended...
    in_line: bool,
    /// ...of which this many have been read.
    line_len: usize,
    max_line: usize,
}

impl<S: Stream> TimedIo<S> {
    pub fn new(stream: S, phase: Arc<ConnPhase>, d: Deadlines) -> Self {
        let deadline = Instant::now() + d.header;
        Self {
            inner: TokioIo::new(stream),
            phase,
            local: Local::Fresh,
            seen_started: 0,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            header_timeout: d.header,
            idle_timeout: d.idle,
            write_timeout: d.write,
            write_timer: None,
            in_line: true,
            line_len: 0,
            max_line: d.max_uri_bytes + REQUEST_LINE_SLACK,
        }
    }

    /// Reads while a request line is open, watching its length. Ready(Err)
    /// (after a best-effort 414) when the line is longer than allowed.
    fn poll_read_line(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; LINE_SCRATCH];
        let n = buf.remaining().min(LINE_SCRATCH);
        let mut rb = tokio::io::ReadBuf::new(&mut scratch[..n]);
        ready!(tokio::io::AsyncRead::poll_read(
            Pin::new(self.inner.inner_mut()),
            cx,
            &mut rb
        ))?;
        let got = rb.filled();
        let seen = match got.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.in_line = false;
                self.line_len + end
            }
            None => self.line_len + got.len(),
        };
        self.line_len = if self.in_line { seen } else { 0 };
        if seen > self.max_line {
            self.inner.inner().write_now(
                b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            metrics::counter!(metric::REQUESTS, "route" => "none", "status" => "414").increment(1);
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "uri_bytes").increment(1);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request line longer than the longest request target allows",
            )));
        }
        buf.put_slice(got);
        Poll::Ready(Ok(()))
    }

    /// Err once a write has waited for the client past the write timeout.
    fn poll_write_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.write_timeout;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "write_timeout").increment(1);
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read its response in time",
        ))
    }

    /// A write's outcome: progress disarms the write deadline, waiting
    /// arms it.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => match self.poll_write_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            done => {
                self.write_timer = None;
                done
            }
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
            // What the client sends next starts a request line.
            self.in_line = true;
            self.line_len = 0;
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
                    self.inner.inner().write_now(
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
                Local::Fresh => {
                    metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "silent_connection")
                        .increment(1);
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request received on a new connection in time",
                    )
                }
                _ => io::Error::new(io::ErrorKind::TimedOut, "keep-alive connection idle"),
            });
        }
    }
}

impl<S: Stream> Read for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.sync_phase();
        let read = if this.in_line && buf.remaining() > 0 {
            this.poll_read_line(cx, &mut buf)
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        // Data and EOF both count as activity (an EOF ends the connection anyway).
        match read {
            Poll::Ready(Ok(())) => {
                match this.local {
                    Local::Idle => {
                        this.local = Local::Receiving;
                        this.deadline = Instant::now() + this.header_timeout;
                    }
                    // The first head's deadline runs from accept.
                    Local::Fresh => this.local = Local::Receiving,
                    Local::Receiving | Local::Busy => {}
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

impl<S: Stream> Write for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(cx, r)
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
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, r)
    }
}
