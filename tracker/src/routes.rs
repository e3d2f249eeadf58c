//! The public HTTP surface: routing, one handler per route, and how a hit
//! becomes a queued event.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use adtrack_proto::program::ProgramId;
use adtrack_proto::v1::{EventType, ValidationOutcome};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, REFERER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use time::OffsetDateTime;

pub use crate::api_error::Body;
use crate::api_error::{ApiError, json_response};
use crate::cache::{Lookup, ProgramCache};
use crate::conn_timeouts::ConnPhase;
use crate::cors::CorsPolicy;
use crate::health::Health;
use crate::hit::{Hit, IpPolicy, Params, Privacy, header_text};
use crate::metric::{self, Outcome, Route};
use crate::outgoing::Outgoing;
use crate::shipper::{EventSink, QueueError};

/// The 43-byte transparent 1x1 GIF.
pub const PIXEL_GIF: &[u8; 43] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xf9\x04\x01\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";

/// Response header naming the id of the event a hit produced.
pub const EVENT_ID_HEADER: &str = "x-event-id";

/// Request bounds enforced in handlers (the head's are enforced by hyper).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_uri_bytes: u64,
    pub max_body_bytes: u64,
    pub max_batch_events: u64,
    pub body_timeout: std::time::Duration,
}

/// What every request handler shares.
pub struct AppState {
    pub cache: Arc<ProgramCache>,
    pub sink: EventSink,
    pub health: Arc<Health>,
    pub ip_policy: IpPolicy,
    pub privacy: Privacy,
    pub cors: CorsPolicy,
    pub limits: Limits,
    pub meters: metric::RequestMeters,
}

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
    let path = req.uri().path();
    if let Some(id) = path.strip_prefix("/v1/pixel/") {
        let id = id.to_owned();
        (Route::Pixel, pixel(&req, &id, state, peer).await)
    } else if let Some(id) = path.strip_prefix("/v1/click/") {
        let id = id.to_owned();
        (Route::Click, click(&req, &id, state, peer).await)
    } else if let Some(id) = path.strip_prefix("/event/") {
        let id = id.to_owned();
        (Route::Event, event(&req, &id, state, peer).await)
    } else {
        match path {
            "/v1/events" => (Route::Batch, crate::batch::handle(req, state, peer).await),
            "/health/live" => (Route::Health, Ok(health_live())),
            "/health/ready" | "/health/check" => (Route::Health, Ok(health_ready(&state.health))),
            _ => (Route::Unknown, Err(ApiError::NotFound)),
        }
    }
}

/// Checks a program id from a path; counts a malformed one.
pub fn check_id(raw: &str, state: &AppState) -> Result<ProgramId, ApiError> {
    if raw.contains('/') {
        return Err(ApiError::NotFound);
    }
    ProgramId::parse(raw).map_err(|e| {
        state.meters.hit(Outcome::Malformed);
        ApiError::MalformedId(e.to_string())
    })
}

/// The wall clock, as the validity check and the event want it.
pub fn now() -> (OffsetDateTime, i64) {
    let t = OffsetDateTime::now_utc();
    (t, (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Looks a program up and counts the outcome.
pub async fn lookup(state: &AppState, id: &ProgramId, now: OffsetDateTime) -> Lookup {
    let lookup = state.cache.lookup(id.as_str(), now).await;
    let outcome = match &lookup {
        Lookup::Active(_) => Outcome::Valid,
        Lookup::Inactive(_) => Outcome::Invalid,
        Lookup::Unknown => Outcome::Unknown,
        Lookup::Unverified => Outcome::Unverified,
    };
    state.meters.hit(outcome);
    lookup
}

fn parse_query(
    query: Option<&str>,
    default_type: EventType,
    state: &AppState,
) -> Result<(Params, EventType), ApiError> {
    Params::parse(query)
        .and_then(|params| params.event_type(default_type).map(|t| (params, t)))
        .map_err(|e| {
            state.meters.hit(Outcome::Malformed);
            ApiError::BadQuery(e)
        })
}

/// What the request itself says about the client.
pub struct ClientInfo {
    pub user_agent: String,
    pub referrer: String,
    pub client_ip: String,
    pub opted_out: bool,
}

impl ClientInfo {
    pub fn from_request(headers: &HeaderMap, peer: SocketAddr, state: &AppState) -> Self {
        Self {
            user_agent: header_text(headers, USER_AGENT),
            referrer: header_text(headers, REFERER),
            client_ip: state.ip_policy.client_ip(peer.ip(), headers),
            opted_out: Privacy::signal(headers),
        }
    }
}

/// Everything about one event except the client.
pub struct EventParts<'a> {
    pub id: &'a ProgramId,
    pub lookup: &'a Lookup,
    pub event_type: EventType,
    pub timestamp_ms: i64,
    pub source: &'static str,
    pub params: Params,
    pub destination_url: String,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotShipped {
    /// The client opted out and the policy is `skip`.
    OptedOut,
    Queue(QueueError),
}

/// Builds and encodes the event for a hit; `None` when the client opted
/// out and the privacy policy says to skip it.
pub fn build_event(
    parts: EventParts<'_>,
    client: &ClientInfo,
    state: &AppState,
) -> Option<Outgoing> {
    let (program, outcome) = match parts.lookup {
        Lookup::Active(p) => (Some(p.as_ref()), ValidationOutcome::Valid),
        Lookup::Unverified => (None, ValidationOutcome::Unverified),
        Lookup::Inactive(_) | Lookup::Unknown => (None, ValidationOutcome::Invalid),
    };
    let hit = Hit {
        event_id: adtrack_proto::event::new_event_id(),
        timestamp_ms: parts.timestamp_ms,
        program_id: parts.id.as_str(),
        program,
        outcome,
        event_type: parts.event_type,
        source: parts.source,
        user_agent: client.user_agent.clone(),
        referrer: client.referrer.clone(),
        client_ip: client.client_ip.clone(),
        params: parts.params,
        destination_url: parts.destination_url,
        privacy_restricted: false,
        is_bot: false,
    };
    state
        .privacy
        .apply(hit, client.opted_out)
        .map(Hit::into_outgoing)
}

/// Queues one event; counts a drop with its cause. Returns the event id.
pub fn ship_one(event: Outgoing, state: &AppState) -> Result<String, QueueError> {
    let event_id = event.partition_key.clone();
    state
        .sink
        .try_send(event)
        .inspect_err(|e| state.meters.dropped(e.cause(), 1))?;
    Ok(event_id)
}

fn ship(
    parts: EventParts<'_>,
    client: &ClientInfo,
    state: &AppState,
) -> Result<String, NotShipped> {
    match build_event(parts, client, state) {
        None => {
            state.meters.dropped("privacy_opt_out", 1);
            Err(NotShipped::OptedOut)
        }
        Some(ev) => ship_one(ev, state).map_err(NotShipped::Queue),
    }
}

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

/// `GET|HEAD /v1/pixel/{programId}`: always the GIF (browsers ignore error
/// bodies); only valid or unverified hits are shipped, rejections are counted.
async fn pixel<B>(
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
        };
        // A full queue still answers the GIF; the drop is counted with its cause.
        if let Ok(event_id) = ship(parts, &client, state)
            && let Ok(value) = HeaderValue::from_str(&event_id)
        {
            resp.headers_mut().insert(EVENT_ID_HEADER, value);
        }
    }
    Ok(resp)
}

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

/// `GET /event/{programId}`: 200 with the enriched program, 404 unknown or
/// not valid now, 400 malformed; 202 when Redis could not be asked in time.
async fn event<B>(
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
    match &lookup {
        Lookup::Unknown => return Err(ApiError::UnknownProgram),
        Lookup::Inactive(_) => return Err(ApiError::InactiveProgram),
        Lookup::Active(_) | Lookup::Unverified => {}
    }
    let client = ClientInfo::from_request(req.headers(), peer, state);
    let parts = EventParts {
        id: &id,
        lookup: &lookup,
        event_type,
        timestamp_ms,
        source: "event",
        params,
        destination_url: String::new(),
    };
    let event_id = match ship(parts, &client, state) {
        Ok(id) => id,
        Err(NotShipped::OptedOut) => String::new(),
        Err(NotShipped::Queue(_)) => return Err(ApiError::Overloaded),
    };
    let (status, body) = match &lookup {
        Lookup::Active(p) => (
            StatusCode::OK,
            serde_json::to_vec(&EventReply {
                user_agent: &client.user_agent,
                program_id: p.program_id.as_str(),
                program_name: &p.program_name,
                checksum: &p.checksum,
                customer_id: p.customer_id,
                customer_name: &p.customer_name,
                message_id: &event_id,
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
    Ok(json_response(status, body.unwrap_or_default()))
}

/// `GET /v1/click/{programId}?url=...`: 302 to `url` only when its host is
/// allowed by the program; never an open redirect.
async fn click<B>(
    req: &Request<B>,
    raw_id: &str,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    let id = check_id(raw_id, state)?;
    let (mut params, event_type) = parse_query(req.uri().query(), EventType::Click, state)?;
    let raw_url = params.0.remove("url").ok_or(ApiError::MissingUrl)?;
    let url = url::Url::parse(&raw_url).map_err(|_| ApiError::BadRedirectUrl)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::BadRedirectUrl);
    }
    let host = url
        .host_str()
        .ok_or(ApiError::BadRedirectUrl)?
        .to_ascii_lowercase();
    let (now, timestamp_ms) = now();
    let lookup = lookup(state, &id, now).await;
    match &lookup {
        Lookup::Unknown => return Err(ApiError::UnknownProgram),
        Lookup::Inactive(_) => return Err(ApiError::InactiveProgram),
        Lookup::Active(p) if !p.allows_redirect_to(&host) => {
            metrics::counter!(metric::REDIRECTS_REFUSED).increment(1);
            return Err(ApiError::RedirectNotAllowed(host));
        }
        Lookup::Active(_) | Lookup::Unverified => {}
    }
    let client = ClientInfo::from_request(req.headers(), peer, state);
    let parts = EventParts {
        id: &id,
        lookup: &lookup,
        event_type,
        timestamp_ms,
        source: "click",
        params,
        destination_url: url.as_str().to_owned(),
    };
    let shipped = ship(parts, &client, state);
    if matches!(lookup, Lookup::Unverified) {
        // The allow-list cannot be checked: the click is kept, the redirect is not made.
        return Err(ApiError::ProgramUnavailable);
    }
    if let Err(NotShipped::Queue(_)) = shipped {
        return Err(ApiError::Overloaded);
    }
    let location = HeaderValue::from_str(url.as_str()).map_err(|_| ApiError::BadRedirectUrl)?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(LOCATION, location);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(event_id) = shipped
        && let Ok(v) = HeaderValue::from_str(&event_id)
    {
        resp.headers_mut().insert(EVENT_ID_HEADER, v);
    }
    Ok(resp)
}

/// Liveness (public and admin ports).
pub fn health_live() -> Response<Body> {
    json_response(StatusCode::OK, br#"{"status":"live"}"#.to_vec())
}

/// Readiness: 200 when ready, 503 with the reasons otherwise.
pub fn health_ready(health: &Health) -> Response<Body> {
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
