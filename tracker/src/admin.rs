//! The admin port: Prometheus metrics, health and cache stats. Nothing here
//! (or anywhere) flushes or fills the cache.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::ProgramCache;
use crate::health::Health;
use crate::routes::{Body, health_ready, live};

pub struct AdminState {
    pub health: Arc<Health>,
    pub cache: Arc<ProgramCache>,
    pub prometheus: PrometheusHandle,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
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
        let state = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
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

fn route<B>(req: &Request<B>, state: &AdminState) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => adtrack_service::metrics_endpoint::render(&state.prometheus),
        "/health/live" => live(),
        "/health/ready" => health_ready(&state.health),
        "/cache/stats" => {
            let body = serde_json::json!({
                "entries": state.cache.entry_count(),
                "redisConnected": state.cache.is_connected(),
            });
            let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        _ => {
            let mut resp =
                Response::new(Full::new(Bytes::from_static(b"{\"error\":\"not_found\"}")));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}
