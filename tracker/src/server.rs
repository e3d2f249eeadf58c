//! The accept loop: bounded connections, header-read timeout, keep-alive, and
//! a graceful stop that lets in-flight requests finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metric;
use crate::routes::{AppState, handle};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Longest header section (request line included), in bytes.
    pub max_header_bytes: usize,
}

/// Serves until `stop` fires, then stops accepting and waits up to
/// `grace` for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    settings: ServerSettings,
    stop: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true)
        .max_buf_size(settings.max_header_bytes.max(8192));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = service_fn(move |req| handle(req, state.clone(), peer));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        metrics::gauge!(metric::CONNECTIONS_OPEN).increment(1.0);
        tokio::spawn(async move {
            let _ = conn.await;
            metrics::gauge!(metric::CONNECTIONS_OPEN).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("connections still open at the drain deadline; closing them");
        }
    }
}
