//! The admin port: Prometheus metrics, health, cache stats and the public
//! port's API contract (`/openapi.json`). Nothing here (or anywhere)
//! flushes or fills the cache.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api_error::Body;
use crate::cache::ProgramCache;
use crate::health::Health;
use crate::routes::health;

pub struct AdminState {
    pub health: Arc<Health>,
    pub cache: Arc<ProgramCache>,
    pub prometheus: PrometheusHandle,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let routes: adtrack_service::metrics_endpoint::AdminRoutes =
        Arc::new(move |req| route(req, &state));
    adtrack_service::metrics_endpoint::serve_routes(listener, routes, stop).await;
}

fn route<B>(req: &Request<B>, state: &AdminState) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => adtrack_service::metrics_endpoint::render(&state.prometheus),
        "/health/live" => health::live(&state.health),
        "/health/ready" => health::ready(&state.health),
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
        "/openapi.json" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI_JSON.as_bytes())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        _ => adtrack_service::metrics_endpoint::not_found(),
    }
}

/// The public port's API contract (`tracker/openapi.yaml`, as JSON).
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");
