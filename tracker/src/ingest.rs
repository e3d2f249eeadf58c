//! The request path every endpoint shares: checking a program id, looking
//! the program up, reading the client from the request, and building and
//! queueing the event.

use std::borrow::Cow;
use std::net::SocketAddr;

use adtrack_proto::event::MAX_EVENT_BYTES;
use adtrack_proto::program::ProgramId;
use adtrack_proto::v1::{EventType, ValidationOutcome};
use http::header::{REFERER, USER_AGENT};
use http::{HeaderMap, HeaderValue};
use time::OffsetDateTime;

use std::sync::Arc;

use adtrack_proto::v1::ConsentState;

use crate::api_error::ApiError;
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::customers::RateLimited;
use crate::hit::{Conversion, Hit, Params, Privacy, header_text};
use crate::metric::{self, Outcome};
use crate::outgoing::Outgoing;
use crate::shipper::QueueError;
use crate::user_cookie::UserId;

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

/// Looks a program up (with its customer's kill switch) and counts the
/// outcome.
pub async fn lookup(state: &AppState, id: &ProgramId, now: OffsetDateTime) -> Lookup {
    let lookup = switched(state, state.cache.lookup(id.as_str(), now).await);
    state.meters.hit(outcome_of(&lookup));
    lookup
}

/// An active program of a switched-off customer is inactive: it takes no
/// hits, as a disabled program does.
pub fn switched(state: &AppState, lookup: Lookup) -> Lookup {
    match lookup {
        Lookup::Active(p) if !state.customers.enabled(p.customer_id()) => Lookup::Inactive(p),
        other => other,
    }
}

/// Takes one event from the budget of an active program's customer; the
/// wait when it is spent (counted). Unverified hits (Redis down, the
/// program not cached) have no known customer and are not limited.
pub fn admit(state: &AppState, lookup: &Lookup) -> Result<(), RateLimited> {
    match lookup {
        Lookup::Active(p) => state.customers.admit(p.customer_id()),
        _ => Ok(()),
    }
}

/// The refusal for a program that cannot take hits: unknown (404) or not
/// active now (404); `Ok` for an active or unverified one.
pub fn usable(lookup: &Lookup) -> Result<(), ApiError> {
    match lookup {
        Lookup::Unknown => Err(ApiError::UnknownProgram),
        Lookup::Inactive(_) => Err(ApiError::InactiveProgram),
        Lookup::Active(_) | Lookup::Unverified => Ok(()),
    }
}

/// How a lookup's answer is counted.
pub fn outcome_of(lookup: &Lookup) -> Outcome {
    match lookup {
        Lookup::Active(_) => Outcome::Valid,
        Lookup::Inactive(_) => Outcome::Invalid,
        Lookup::Unknown => Outcome::Unknown,
        Lookup::Unverified => Outcome::Unverified,
    }
}

/// Parses a pixel's or click's query; counts a malformed one.
pub fn parse_query(
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

/// What the request itself says about the client (borrowed from its
/// headers where it can be).
pub struct ClientInfo<'a> {
    pub user_agent: Cow<'a, str>,
    pub referrer: Cow<'a, str>,
    pub client_ip: String,
    pub opted_out: bool,
    /// The first-party id, when the tracker keeps one.
    pub user: Option<Arc<UserId>>,
}

impl<'a> ClientInfo<'a> {
    pub fn from_request(headers: &'a HeaderMap, peer: SocketAddr, state: &AppState) -> Self {
        Self {
            user_agent: header_text(headers, USER_AGENT),
            referrer: header_text(headers, REFERER),
            client_ip: state.ip_policy.client_ip(peer.ip(), headers),
            opted_out: Privacy::signal(headers),
            user: state
                .user_cookie
                .as_ref()
                .map(|_| Arc::new(UserId::from_headers(headers))),
        }
    }

    /// Sets the first-party cookie on the reply when an id was made for
    /// this request.
    pub fn set_cookie<B>(&self, resp: &mut http::Response<B>, state: &AppState) {
        if let (Some(user), Some(policy)) = (&self.user, &state.user_cookie)
            && let Some(v) = user.set_cookie(policy)
        {
            resp.headers_mut().append(http::header::SET_COOKIE, v);
        }
    }

    /// The same, no longer borrowing the request.
    pub fn into_owned(self) -> ClientInfo<'static> {
        ClientInfo {
            user_agent: Cow::Owned(self.user_agent.into_owned()),
            referrer: Cow::Owned(self.referrer.into_owned()),
            client_ip: self.client_ip,
            opted_out: self.opted_out,
            user: self.user,
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
    pub conversion: Option<Conversion>,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotShipped {
    /// The client opted out and the policy is `skip`.
    OptedOut,
    /// The encoded event is larger than the largest event (its size).
    TooLarge(usize),
    Queue(QueueError),
    /// Over the customer's rate limit.
    RateLimited(RateLimited),
}

/// An event whose encoding is larger than [`MAX_EVENT_BYTES`] (its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl From<TooLarge> for ApiError {
    fn from(TooLarge(n): TooLarge) -> Self {
        ApiError::EventTooLarge(n)
    }
}

/// Builds and encodes the event for a hit; `Ok(None)` when the client
/// opted out and the privacy policy says to skip it; the refusal (counted)
/// when its encoding is larger than [`MAX_EVENT_BYTES`], so nothing later in
/// the pipeline can refuse an event the tracker acknowledged.
pub fn build_event(
    parts: EventParts<'_>,
    client: &ClientInfo<'_>,
    state: &AppState,
) -> Result<Option<Outgoing>, TooLarge> {
    let (program, outcome) = match parts.lookup {
        Lookup::Active(p) => (Some(p.as_ref()), ValidationOutcome::Valid),
        Lookup::Unverified => (None, ValidationOutcome::Unverified),
        Lookup::Inactive(_) | Lookup::Unknown => (None, ValidationOutcome::Invalid),
    };
    let consent = crate::consent::read(&parts.params);
    let hit = Hit {
        event_id: adtrack_proto::event::new_event_id(),
        timestamp_ms: parts.timestamp_ms,
        program_id: parts.id.as_str(),
        program,
        outcome,
        event_type: parts.event_type,
        source: parts.source,
        user_agent: &client.user_agent,
        referrer: &client.referrer,
        client_ip: &client.client_ip,
        params: parts.params,
        destination_url: parts.destination_url,
        conversion: parts.conversion,
        consent,
        user_id: "",
        privacy_restricted: false,
        is_bot: false,
    };
    let Some(mut hit) = state.privacy.apply(hit, client.opted_out) else {
        return Ok(None);
    };
    // The first-party id, only where identifiers may be kept.
    let may_identify = !hit.privacy_restricted
        && matches!(
            hit.consent,
            ConsentState::Granted | ConsentState::NotApplicable | ConsentState::Unspecified
        );
    if let Some(user) = client.user.as_deref().filter(|_| may_identify) {
        hit.user_id = user.get();
    }
    let event = hit.into_outgoing();
    if event.data.len() > MAX_EVENT_BYTES {
        metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "event_bytes").increment(1);
        return Err(TooLarge(event.data.len()));
    }
    Ok(Some(event))
}

/// Queues events (all or none) and waits until they are stored (only the
/// spool takes a moment); counts a drop with its cause.
pub async fn store(events: Vec<Outgoing>, state: &AppState) -> Result<(), QueueError> {
    let n = events.len() as u64;
    state
        .sink
        .send_all(events)
        .await
        .inspect_err(|e| state.meters.dropped(e.cause(), n))
}

/// Builds and stores the event for a hit, within its customer's rate
/// limit; returns its id, as the reply's header carries it.
pub async fn ship(
    parts: EventParts<'_>,
    client: &ClientInfo<'_>,
    state: &AppState,
) -> Result<HeaderValue, NotShipped> {
    admit(state, parts.lookup).map_err(NotShipped::RateLimited)?;
    let event = match build_event(parts, client, state) {
        Ok(Some(ev)) => ev,
        Ok(None) => {
            state.meters.dropped("privacy_opt_out", 1);
            return Err(NotShipped::OptedOut);
        }
        Err(TooLarge(n)) => return Err(NotShipped::TooLarge(n)),
    };
    // An event id is a UUID: always a valid header value.
    let event_id =
        HeaderValue::from_str(&event.partition_key).unwrap_or(HeaderValue::from_static(""));
    state
        .sink
        .send(event)
        .await
        .inspect_err(|e| state.meters.dropped(e.cause(), 1))
        .map_err(NotShipped::Queue)?;
    Ok(event_id)
}
