//! `GET|HEAD /v1/pixel/{programId}`: always the 43-byte GIF (browsers ignore
//! error bodies); only valid or unverified hits are shipped, rejections are
//! counted.

use std::net::SocketAddr;

use adtrack_proto::v1::EventType;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response};
use http_body_util::Full;

use super::EVENT_ID_HEADER;
use crate::api_error::{ApiError, Body};
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::ingest::{ClientInfo, EventParts, NotShipped, check_id, lookup, now, parse_query, ship};

/// The 43-byte transparent 1x1 GIF.
pub const PIXEL_GIF: &[u8; 43] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xf9\x04\x01\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";

fn pixel_response(head: bool) -> Response<Body> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from_static(PIXEL_GIF)
    };
    let mut resp = Response::new(Full::new(body));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    if head {
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("43"));
    }
    resp
}

pub async fn handle<B>(
    req: &Request<B>,
    raw_id: &str,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(ApiError::MethodNotAllowed("GET, HEAD")),
    };
    let id = match check_id(raw_id, state) {
        Ok(id) => id,
        Err(ApiError::NotFound) => return Err(ApiError::NotFound),
        Err(_) => return Ok(pixel_response(head)),
    };
    let Ok((params, event_type)) = parse_query(req.uri().query(), EventType::Impression, state)
    else {
        return Ok(pixel_response(head));
    };
    let (now, timestamp_ms) = now();
    let lookup = lookup(state, &id, now).await;
    let mut resp = pixel_response(head);
    if matches!(lookup, Lookup::Active(_) | Lookup::Unverified) {
        let client = ClientInfo::from_request(req.headers(), peer, state);
        let parts = EventParts {
            id: &id,
            lookup: &lookup,
            event_type,
            timestamp_ms,
            source: "pixel",
            params,
            destination_url: String::new(),
            conversion: None,
        };
        // A full queue, or a customer over its rate limit, still answers
        // the GIF; the drop is counted with its cause.
        match ship(parts, &client, state).await {
            Ok(event_id) => {
                resp.headers_mut().insert(EVENT_ID_HEADER, event_id);
            }
            Err(NotShipped::RateLimited(_)) => state.meters.dropped("rate_limited", 1),
            Err(_) => {}
        }
        client.set_cookie(&mut resp, state);
    }
    Ok(resp)
}
