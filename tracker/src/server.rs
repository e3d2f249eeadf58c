//! The accept loop: bounded connections (503 past the bound), header and
//! idle timeouts, keep-alive, and a graceful stop that lets in-flight
//! requests finish within their share of the drain deadline, then closes
//! what is left and waits for every connection task to end, so nothing is
//! queued after the final flush begins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::conn_timeouts::{ConnPhase, Deadlines, TimedIo};
use crate::metric;
use crate::routes::{AppState, handle};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    /// Longest request target; a longer request line is answered 414.
    pub max_uri_bytes: usize,
    pub idle_timeout: Duration,
    /// Longest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
}

const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Serves until `stop` fires, then stops accepting and waits up to
/// `grace` for open connections to finish their requests; connections
/// still open then are closed (their requests unanswered, counted). Returns
/// once every connection task has ended.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    settings: ServerSettings,
    stop: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    // Every connection task, so the drain can close what is left and wait
    // for all of them (aborting a task costs its connection nothing while it
    // runs, unlike a cancellation branch polled at every wake-up).
    let mut tasks = JoinSet::new();
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Our own IO wrapper enforces header and idle deadlines (hyper's
        // header timeout would also cut idle keep-alive connections short).
        .header_read_timeout(None)
        .keep_alive(true)
        .max_header_size(settings.max_header_bytes)
        .max_buf_size(settings.max_header_bytes.max(8192) + 8192);
    loop {
        let (mut stream, peer): (_, SocketAddr) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "connections").increment(1);
            metrics::counter!(metric::REQUESTS, "route" => "none", "status" => "503").increment(1);
            tasks.spawn(async move {
                let _ = stream.write_all(OVER_CAPACITY).await;
                let _ = stream.shutdown().await;
            });
            reap(&mut tasks);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let phase = Arc::new(ConnPhase::default());
        let io = TimedIo::new(
            stream,
            phase.clone(),
            Deadlines {
                header: settings.header_timeout,
                idle: settings.idle_timeout,
                write: settings.write_timeout,
                max_uri_bytes: settings.max_uri_bytes,
            },
        );
        let state = state.clone();
        let svc = service_fn(move |req| handle(req, state.clone(), peer, phase.clone()));
        let conn = graceful.watch(builder.serve_connection(io, svc));
        metrics::gauge!(metric::CONNECTIONS_OPEN).increment(1.0);
        tasks.spawn(async move {
            // Dropped (the connection closed) if the drain aborts the task.
            let _open = OpenConnection { _slot: permit };
            if let Err(e) = conn.await {
                count_connection_error(&e);
            }
        });
        reap(&mut tasks);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            reap(&mut tasks);
            tracing::warn!(
                connections = tasks.len(),
                "connections still open at their share of the drain deadline; closing them"
            );
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "drain_grace")
                .increment(tasks.len() as u64);
            tasks.abort_all();
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Forgets connection tasks that have ended.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

/// An open connection: its slot and its place in the gauge, given back
/// however the connection ends.
struct OpenConnection {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(metric::CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// hyper answers malformed heads itself (400, 431, 414); count them.
fn count_connection_error(e: &hyper::Error) {
    let (bound, status) = if e.is_parse_too_large() {
        ("header_bytes", "431")
    } else if e.is_parse() {
        ("malformed_request", "400")
    } else {
        return;
    };
    metrics::counter!(metric::BOUNDS_BREACHED, "bound" => bound).increment(1);
    metrics::counter!(metric::REQUESTS, "route" => "none", "status" => status).increment(1);
}
