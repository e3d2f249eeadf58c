//! `GET /event/{programId}`: the reference design's endpoint and its JSON
//! reply, field for field.

use std::net::SocketAddr;

use adtrack_proto::v1::EventType;
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::api_error::{ApiError, Body, json_response};
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::ingest::{
    ClientInfo, EventParts, NotShipped, check_id, lookup, now, parse_query, ship, usable,
};

/// The reference design's reply, field for field.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventReply<'a> {
    user_agent: &'a str,
    program_id: &'a str,
    program_name: &'a str,
    checksum: &'a str,
    customer_id: i32,
    customer_name: &'a str,
    message_id: &'a str,
    valid: bool,
}

/// 200 with the enriched program, 404 unknown or not valid now, 400
/// malformed; 202 when Redis could not be asked in time.
pub async fn handle<B>(
    req: &Request<B>,
    raw_id: &str,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    let id = check_id(raw_id, state)?;
    let (params, event_type) = parse_query(req.uri().query(), EventType::Impression, state)?;
    let (now, timestamp_ms) = now();
    let lookup = lookup(state, &id, now).await;
    usable(&lookup)?;
    let client = ClientInfo::from_request(req.headers(), peer, state);
    let parts = EventParts {
        id: &id,
        lookup: &lookup,
        event_type,
        timestamp_ms,
        source: "event",
        params,
        destination_url: String::new(),
        conversion: None,
    };
    let event_id = match ship(parts, &client, state).await {
        Ok(id) => id,
        Err(NotShipped::OptedOut) => http::HeaderValue::from_static(""),
        Err(NotShipped::Queue(_)) => return Err(ApiError::Overloaded),
        Err(NotShipped::TooLarge(n)) => return Err(ApiError::EventTooLarge(n)),
        Err(NotShipped::RateLimited(wait)) => return Err(ApiError::RateLimited(wait)),
    };
    let event_id = event_id.to_str().unwrap_or_default();
    let (status, body) = match &lookup {
        Lookup::Active(p) => (
            StatusCode::OK,
            serde_json::to_vec(&EventReply {
                user_agent: &client.user_agent,
                program_id: p.program_id(),
                program_name: p.program_name(),
                checksum: p.checksum(),
                customer_id: p.customer_id(),
                customer_name: p.customer_name(),
                message_id: event_id,
                valid: true,
            }),
        ),
        _ => (
            StatusCode::ACCEPTED,
            serde_json::to_vec(&serde_json::json!({
                "programId": id.as_str(),
                "messageId": event_id,
                "valid": false,
                "validation": "unverified",
            })),
        ),
    };
    let mut resp = json_response(status, body.unwrap_or_default());
    client.set_cookie(&mut resp, state);
    Ok(resp)
}
