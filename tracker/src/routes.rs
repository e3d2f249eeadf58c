//! The public HTTP surface: routing only. Each endpoint has its module;
//! what they share lives in [`crate::ingest`] and [`crate::app_state`].

pub mod batch;
pub mod click;
pub mod event;
pub mod health;
pub mod pixel;
pub mod postback;
pub mod tag;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};

use crate::api_error::ApiError;
pub use crate::api_error::Body;
pub use crate::app_state::{AppState, Limits};
use crate::conn_timeouts::ConnPhase;
use crate::metric::{self, Route};
pub use pixel::PIXEL_GIF;

/// Response header naming the id of the event a hit produced.
pub const EVENT_ID_HEADER: &str = "x-event-id";

/// Entry point for every public request.
pub async fn handle<B>(
    req: Request<B>,
    state: Arc<AppState>,
    peer: SocketAddr,
    phase: Arc<ConnPhase>,
) -> Result<Response<Body>, Infallible>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    phase.busy();
    let started = Instant::now();
    let (route, result) = dispatch(req, &state, peer).await;
    let resp = result.unwrap_or_else(ApiError::into_response);
    state
        .meters
        .request(route, resp.status(), started.elapsed().as_secs_f64());
    phase.idle();
    Ok(resp)
}

/// The route's path: without the configured prefix when it has it.
fn public_path<'a>(path: &'a str, prefix: &str) -> &'a str {
    if prefix.is_empty() {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

async fn dispatch<B>(
    req: Request<B>,
    state: &AppState,
    peer: SocketAddr,
) -> (Route, Result<Response<Body>, ApiError>)
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len as u64 > state.limits.max_uri_bytes {
        metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "uri_bytes").increment(1);
        return (
            Route::None,
            Err(ApiError::UriTooLong(state.limits.max_uri_bytes)),
        );
    }
    let path = public_path(req.uri().path(), &state.limits.path_prefix);
    if let Some(id) = path.strip_prefix("/v1/pixel/") {
        (Route::Pixel, pixel::handle(&req, id, state, peer).await)
    } else if let Some(id) = path.strip_prefix("/v1/click/") {
        (Route::Click, click::handle(&req, id, state, peer).await)
    } else if let Some(id) = path.strip_prefix("/v1/postback/") {
        (
            Route::Postback,
            postback::handle(&req, id, state, peer).await,
        )
    } else if let Some(id) = path.strip_prefix("/event/") {
        (Route::Event, event::handle(&req, id, state, peer).await)
    } else {
        match path {
            "/v1/events" => (Route::Batch, batch::handle(req, state, peer).await),
            "/v1/tag.js" => (Route::Tag, tag::handle(&req)),
            "/health/live" if path.len() == req.uri().path().len() => {
                (Route::Health, Ok(health::live(&state.health)))
            }
            "/health/ready" | "/health/check" if path.len() == req.uri().path().len() => {
                (Route::Health, Ok(health::ready(&state.health)))
            }
            _ => (Route::Unknown, Err(ApiError::NotFound)),
        }
    }
}
