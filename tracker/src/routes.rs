//! The public HTTP surface: routing, one handler per route, and the error
//! model (one status per error kind, a JSON body with the reason).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use adtrack_proto::program::ProgramId;
use adtrack_proto::v1::{EventType, ValidationOutcome};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, REFERER, USER_AGENT};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use prost::Message;
use serde::Serialize;
use time::OffsetDateTime;

use crate::cache::{Lookup, ProgramCache};
use crate::health::Health;
use crate::hit::{Hit, IpPolicy, Params, QueryError, header_text};
use crate::metric;
use crate::shipper::{EventSink, Outgoing, QueueError};

/// The 43-byte transparent 1x1 GIF.
pub const PIXEL_GIF: &[u8; 43] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xf9\x04\x01\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";

pub type Body = Full<Bytes>;

/// Response header naming the id of the event a hit produced.
pub const EVENT_ID_HEADER: &str = "x-event-id";

/// What every request handler shares.
pub struct AppState {
    pub cache: Arc<ProgramCache>,
    pub sink: EventSink,
    pub health: Arc<Health>,
    pub ip_policy: IpPolicy,
}

/// One error kind, one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed program id: {0}")]
    MalformedId(String),
    #[error("{0}")]
    BadQuery(#[from] QueryError),
    #[error("unknown program")]
    UnknownProgram,
    #[error("program is not valid now")]
    InactiveProgram,
    #[error("event queue is full, retry later")]
    Overloaded,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::MalformedId(_) | Self::BadQuery(_) => StatusCode::BAD_REQUEST,
            Self::UnknownProgram | Self::InactiveProgram | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::MalformedId(_) => "malformed_program_id",
            Self::BadQuery(_) => "bad_query",
            Self::UnknownProgram => "unknown_program",
            Self::InactiveProgram => "inactive_program",
            Self::Overloaded => "overloaded",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            error: &'a str,
            reason: String,
        }
        let body = serde_json::to_vec(&ErrorBody {
            error: self.code(),
            reason: self.to_string(),
        })
        .unwrap_or_default();
        let mut resp = json_response(self.status(), body);
        match self {
            Self::MethodNotAllowed(allow) => {
                resp.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::Overloaded => {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
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

/// Entry point for every public request.
pub async fn handle<B>(
    req: Request<B>,
    state: Arc<AppState>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let path = req.uri().path();
    let (route, result) = if let Some(id) = path.strip_prefix("/v1/pixel/") {
        ("pixel", pixel(&req, id, &state, peer).await)
    } else if let Some(id) = path.strip_prefix("/event/") {
        ("event", event(&req, id, &state, peer).await)
    } else {
        match path {
            "/health/live" => ("health", Ok(health_live())),
            "/health/ready" | "/health/check" => ("health", Ok(health_ready(&state.health))),
            _ => ("unknown", Err(ApiError::NotFound)),
        }
    };
    let resp = result.unwrap_or_else(ApiError::into_response);
    metrics::counter!(metric::REQUESTS, "route" => route, "status" => resp.status().as_str().to_owned()).increment(1);
    metrics::histogram!(metric::REQUEST_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    Ok(resp)
}

fn check_id(raw: &str) -> Result<ProgramId, ApiError> {
    if raw.contains('/') {
        return Err(ApiError::NotFound);
    }
    ProgramId::parse(raw).map_err(|e| {
        metrics::counter!(metric::HITS, "outcome" => "malformed").increment(1);
        ApiError::MalformedId(e.to_string())
    })
}

fn now() -> (OffsetDateTime, i64) {
    let t = OffsetDateTime::now_utc();
    (t, (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

struct Validated {
    lookup: Lookup,
    params: Params,
    event_type: EventType,
    timestamp_ms: i64,
}

async fn validate<B>(
    req: &Request<B>,
    id: &ProgramId,
    state: &AppState,
    default_type: EventType,
) -> Result<Validated, ApiError> {
    let parsed = Params::parse(req.uri().query())
        .and_then(|params| params.event_type(default_type).map(|t| (params, t)));
    let (params, event_type) = parsed.inspect_err(|_| {
        metrics::counter!(metric::HITS, "outcome" => "malformed").increment(1);
    })?;
    let (now, timestamp_ms) = now();
    let lookup = state.cache.lookup(id.as_str(), now).await;
    let outcome = match &lookup {
        Lookup::Active(_) => "valid",
        Lookup::Inactive(_) => "invalid",
        Lookup::Unknown => "unknown",
        Lookup::Unverified => "unverified",
    };
    metrics::counter!(metric::HITS, "outcome" => outcome).increment(1);
    Ok(Validated {
        lookup,
        params,
        event_type,
        timestamp_ms,
    })
}

/// Builds and queues the event; returns its id.
fn ship<B>(
    req: &Request<B>,
    id: &ProgramId,
    v: Validated,
    state: &AppState,
    peer: SocketAddr,
    source: &'static str,
) -> Result<(String, Lookup), QueueError> {
    let (program, outcome) = match &v.lookup {
        Lookup::Active(p) => (Some(p.clone()), ValidationOutcome::Valid),
        Lookup::Unverified => (None, ValidationOutcome::Unverified),
        Lookup::Inactive(_) | Lookup::Unknown => (None, ValidationOutcome::Invalid),
    };
    let event_id = adtrack_proto::event::new_event_id();
    let headers = req.headers();
    let event = Hit {
        event_id: event_id.clone(),
        timestamp_ms: v.timestamp_ms,
        program_id: id.as_str(),
        program: program.as_deref(),
        outcome,
        event_type: v.event_type,
        source,
        user_agent: header_text(headers, USER_AGENT),
        referrer: header_text(headers, REFERER),
        client_ip: state.ip_policy.client_ip(peer.ip(), headers),
        params: v.params,
    }
    .into_event();
    let data = Bytes::from(event.encode_to_vec());
    state
        .sink
        .try_send(Outgoing {
            partition_key: event_id.clone(),
            data,
        })
        .inspect_err(|e| {
            metrics::counter!(metric::EVENTS_DROPPED, "cause" => e.cause()).increment(1);
        })?;
    Ok((event_id, v.lookup))
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
    let id = match check_id(raw_id) {
        Ok(id) => id,
        Err(ApiError::NotFound) => return Err(ApiError::NotFound),
        Err(_) => return Ok(pixel_response(head)),
    };
    let Ok(v) = validate(req, &id, state, EventType::Impression).await else {
        return Ok(pixel_response(head));
    };
    let mut resp = pixel_response(head);
    if matches!(v.lookup, Lookup::Active(_) | Lookup::Unverified) {
        // A full queue still answers the GIF; the drop is counted with its cause.
        if let Ok((event_id, _)) = ship(req, &id, v, state, peer, "pixel")
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
    let id = check_id(raw_id)?;
    let v = validate(req, &id, state, EventType::Impression).await?;
    match &v.lookup {
        Lookup::Unknown => return Err(ApiError::UnknownProgram),
        Lookup::Inactive(_) => return Err(ApiError::InactiveProgram),
        Lookup::Active(_) | Lookup::Unverified => {}
    }
    let user_agent = header_text(req.headers(), USER_AGENT);
    let (event_id, lookup) =
        ship(req, &id, v, state, peer, "event").map_err(|_| ApiError::Overloaded)?;
    let body = match &lookup {
        Lookup::Active(p) => serde_json::to_vec(&EventReply {
            user_agent: &user_agent,
            program_id: p.program_id.as_str(),
            program_name: &p.program_name,
            checksum: &p.checksum,
            customer_id: p.customer_id,
            customer_name: &p.customer_name,
            message_id: &event_id,
            valid: true,
        }),
        _ => serde_json::to_vec(&serde_json::json!({
            "programId": id.as_str(),
            "messageId": event_id,
            "valid": false,
            "validation": "unverified",
        })),
    }
    .unwrap_or_default();
    let status = if matches!(lookup, Lookup::Active(_)) {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_response(status, body))
}

fn health_live() -> Response<Body> {
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

/// Liveness for the admin port.
pub fn live() -> Response<Body> {
    health_live()
}
