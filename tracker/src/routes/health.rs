//! `GET /health/live`, `/health/ready` and the reference design's
//! `/health/check` (public and admin ports).

use http::StatusCode;

use crate::api_error::{Body, json_response};
use crate::health::Health;

/// Liveness: 200 while every background loop reports in, 503 naming the
/// loops that missed their deadline.
pub fn live(health: &Health) -> http::Response<Body> {
    let stalled = health.stalled();
    if stalled.is_empty() {
        json_response(StatusCode::OK, br#"{"status":"live"}"#.to_vec())
    } else {
        let body = serde_json::json!({"status": "not live", "stalled": stalled});
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }
}

/// Readiness: 200 when ready, 503 with the reasons otherwise.
pub fn ready(health: &Health) -> http::Response<Body> {
    if health.is_ready() {
        json_response(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
    } else {
        let body = serde_json::json!({"status": "not ready", "reasons": health.reasons()});
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }
}
