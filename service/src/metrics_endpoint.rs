//! Prometheus: one recorder per process, and a minimal admin endpoint
//! (`/metrics`, `/health/live`) for binaries without an admin port of their own.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's Prometheus recorder once (histogram buckets per
/// metric name) and returns its handle; later calls return the same handle.
pub fn install(buckets: &[(&str, &[f64])]) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, b) in buckets {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), b)
                    .expect("static buckets are valid");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Drains histogram samples into their buckets every few seconds, so memory
/// stays bounded even when nobody scrapes `/metrics`. Runs until `stop`.
pub async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// The text exposition of every metric.
pub fn render(handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    handle.run_upkeep();
    let mut resp = Response::new(Full::new(Bytes::from(handle.render())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// An admin route table: a request in, a response out.
pub type AdminRoutes =
    Arc<dyn Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `/metrics` and `/health/live` until `stop`.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, stop: CancellationToken) {
    let routes: AdminRoutes = Arc::new(move |req| match req.uri().path() {
        "/metrics" => render(&handle),
        "/health/live" => Response::new(Full::new(Bytes::from_static(b"{\"status\":\"live\"}"))),
        _ => not_found(),
    });
    serve_routes(listener, routes, stop).await;
}

/// 404 with a JSON body.
pub fn not_found() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{\"error\":\"not_found\"}")));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// Serves an admin route table until `stop` (HTTP/1, header timeout 10 s).
pub async fn serve_routes(listener: TcpListener, routes: AdminRoutes, stop: CancellationToken) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let routes = routes.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = routes(&req);
                async move { Ok::<_, Infallible>(resp) }
            }),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
