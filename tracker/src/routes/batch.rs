//! `POST /v1/events`: a batch of events as a JSON array, JSON lines, or a
//! `text/plain` body from `navigator.sendBeacon`, with a result per event;
//! `OPTIONS /v1/events` answers CORS preflights for the configured origins.
//!
//! Accepted events are queued all together or not at all: when the queue
//! cannot take the whole batch the answer is 503 with `Retry-After` and
//! nothing was accepted, so a client's retry cannot duplicate.
//!
//! Each event: `{"programId": "...", "type": "click", "page": "...",
//! "referrer": "...", "params": {"k": "v"}}`; only `programId` is required.
//! Any other top-level field holding a string, a number or a boolean goes
//! into the event's extra parameters like a `params` entry (same bounds),
//! and is counted: a beacon cannot read its answer, so a harmless extra
//! field must not cost the event. A field that cannot be stored there (an
//! object or an array, or a name `params` already has) refuses the event
//! with the field named.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use adtrack_proto::program::ProgramId;
use adtrack_proto::v1::EventType;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::header::{CONTENT_LENGTH, ORIGIN};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api_error::{ApiError, Body, json_response};
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::customers::RateLimited;
use crate::hit::{MAX_HEADER_COPY, MAX_PARAM_NAME, MAX_PARAM_VALUE, MAX_PARAMS, Params};
use crate::ingest::{
    ClientInfo, EventParts, admit, build_event, now, outcome_of, store, switched, usable,
};
use crate::metric::{self, Outcome};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchEvent {
    program_id: String,
    #[serde(rename = "type")]
    event_type: Option<String>,
    page: Option<String>,
    referrer: Option<String>,
    params: Option<BTreeMap<String, String>>,
    /// Every other top-level field.
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Moves the other top-level fields of an event into its parameters
/// (checked with them afterwards); returns how many it moved.
fn merge_other_fields(
    params: &mut BTreeMap<String, String>,
    other: BTreeMap<String, Value>,
) -> Result<u64, String> {
    let mut moved = 0;
    for (k, v) in other {
        let text = match v {
            Value::Null => continue,
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(_) | Value::Object(_) => {
                return Err(format!(
                    "field {k:?} is not a string, number or boolean (put structured data in params as text)"
                ));
            }
        };
        if params.contains_key(&k) {
            return Err(format!(
                "field {k:?} is given both as a field and in params"
            ));
        }
        params.insert(k, text);
        moved += 1;
    }
    Ok(moved)
}

#[derive(Debug, Serialize)]
struct ItemResult {
    index: usize,
    status: &'static str,
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none")]
    event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl ItemResult {
    fn rejected(index: usize, e: &ApiError) -> Self {
        Self {
            index,
            status: "rejected",
            event_id: None,
            error: Some(e.code()),
            reason: Some(e.to_string()),
        }
    }
}

pub async fn handle<B>(
    req: Request<B>,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let allow_origin = state.cors.allow(req.headers().get(ORIGIN));
    let mut resp = match *req.method() {
        Method::OPTIONS => preflight(req.headers().get(ORIGIN).is_some(), allow_origin.is_some())?,
        Method::POST => post(req, state, peer).await?,
        _ => return Err(ApiError::MethodNotAllowed("POST, OPTIONS")),
    };
    if let Some(origin) = allow_origin {
        let h = resp.headers_mut();
        h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(http::header::VARY, HeaderValue::from_static("Origin"));
    }
    Ok(resp)
}

fn preflight(has_origin: bool, allowed: bool) -> Result<Response<Body>, ApiError> {
    if !has_origin || !allowed {
        return Err(ApiError::OriginNotAllowed);
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    Ok(resp)
}

async fn read_body<B>(req: Request<B>, state: &AppState) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "body_bytes").increment(1);
        return Err(ApiError::BodyTooLarge(max));
    }
    let body = Limited::new(req.into_body(), max as usize);
    match tokio::time::timeout(state.limits.body_timeout, body.collect()).await {
        Err(_) => {
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "body_timeout").increment(1);
            Err(ApiError::Timeout)
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "body_bytes").increment(1);
            Err(ApiError::BodyTooLarge(max))
        }
        Ok(Err(e)) => Err(ApiError::BadBody(format!("could not read the body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// A JSON array of at most `max` values, refused at the first one over
/// (counted while parsing, not after).
struct BoundedArray<'a> {
    max: u64,
    /// Set when the array held more than `max` values.
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BoundedArray<'_> {
    type Value = Vec<Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedArray<'_> {
    type Value = Vec<Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an array of at most {} events", self.max)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            if out.len() as u64 == self.max {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many events"));
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// Splits a body into event values: a JSON array, or one JSON value per line.
fn parse_values(body: &[u8], max_events: u64) -> Result<Vec<Value>, ApiError> {
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::BadBody("body is not UTF-8".into()))?;
    let trimmed = text.trim_start();
    let values: Vec<Value> = if trimmed.starts_with('[') {
        let over = Cell::new(false);
        let mut de = serde_json::Deserializer::from_str(trimmed);
        let parsed = BoundedArray {
            max: max_events,
            over: &over,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
        match parsed {
            Ok(v) => v,
            Err(_) if over.get() => {
                metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "batch_events").increment(1);
                return Err(ApiError::TooManyEvents(max_events));
            }
            Err(e) => {
                return Err(ApiError::BadBody(format!(
                    "not a JSON array of events: {e}"
                )));
            }
        }
    } else {
        let mut v = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if v.len() as u64 >= max_events {
                break;
            }
            v.push(serde_json::from_str(line).map_err(|e| {
                ApiError::BadBody(format!("line {} is not a JSON event: {e}", n + 1))
            })?);
        }
        if text.lines().filter(|l| !l.trim().is_empty()).count() as u64 > max_events {
            metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "batch_events").increment(1);
            return Err(ApiError::TooManyEvents(max_events));
        }
        v
    };
    if values.is_empty() {
        return Err(ApiError::BadBody("no events in the body".into()));
    }
    if values.len() as u64 > max_events {
        metrics::counter!(metric::BOUNDS_BREACHED, "bound" => "batch_events").increment(1);
        return Err(ApiError::TooManyEvents(max_events));
    }
    Ok(values)
}

fn check_params(map: BTreeMap<String, String>) -> Result<Params, String> {
    if map.len() > MAX_PARAMS {
        return Err(format!("more than {MAX_PARAMS} params"));
    }
    for (k, v) in &map {
        if k.is_empty() || k.len() > MAX_PARAM_NAME {
            return Err(format!(
                "param name {k:?} is empty or longer than {MAX_PARAM_NAME} bytes"
            ));
        }
        if v.len() > MAX_PARAM_VALUE {
            return Err(format!(
                "param {k:?} is longer than {MAX_PARAM_VALUE} bytes"
            ));
        }
    }
    Ok(Params(map))
}

/// One event of a batch that passed the checks that need no lookup.
struct Prepared {
    index: usize,
    id: ProgramId,
    event_type: EventType,
    params: Params,
    referrer: Option<String>,
    /// Other top-level fields kept among the parameters.
    extra_fields: u64,
}

/// Checks one event of a batch (nothing looked up).
fn parse_event(index: usize, value: Value) -> Result<Prepared, ApiError> {
    let item: BatchEvent =
        serde_json::from_value(value).map_err(|e| ApiError::BadBody(e.to_string()))?;
    if item.program_id.contains('/') {
        return Err(ApiError::MalformedId(
            "program id may not contain '/'".into(),
        ));
    }
    let id =
        ProgramId::parse(&item.program_id).map_err(|e| ApiError::MalformedId(e.to_string()))?;
    let mut params = item.params.unwrap_or_default();
    let extra_fields = merge_other_fields(&mut params, item.other).map_err(ApiError::BadBody)?;
    let mut params = check_params(params).map_err(ApiError::BadBody)?;
    let event_type = match item.event_type.as_deref() {
        None => EventType::Custom,
        Some(t) => EventType::from_param(t)
            .ok_or_else(|| ApiError::BadQuery(crate::hit::QueryError::BadType(t.to_owned())))?,
    };
    if let Some(page) = item.page {
        params.0.insert("page".into(), truncate(page));
    }
    Ok(Prepared {
        index,
        id,
        event_type,
        params,
        referrer: item.referrer,
        extra_fields,
    })
}

/// Checks one event of a batch; the rejection (counted) otherwise.
fn prepare(index: usize, value: Value, state: &AppState) -> Result<Prepared, ItemResult> {
    let prepared = parse_event(index, value).map_err(|e| {
        state.meters.hit(Outcome::Malformed);
        ItemResult::rejected(index, &e)
    })?;
    if prepared.extra_fields > 0 {
        state.meters.batch_extra_fields(prepared.extra_fields);
    }
    Ok(prepared)
}

/// Everything a batch body goes through before any lookup: the body
/// refused whole, or each event accepted or refused. For fuzzing and tests.
pub fn parse_body(body: &[u8], max_events: u64) -> Result<Vec<Result<(), ApiError>>, ApiError> {
    Ok(parse_values(body, max_events)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| parse_event(i, v).map(|_| ()))
        .collect())
}

/// Looks up every distinct program of a batch at once (at most
/// [`LOOKUPS_IN_FLIGHT`] at a time) under one deadline for the whole
/// request: during a Redis brownout a batch of uncached ids costs one
/// deadline, not one Redis timeout per event. An id not answered by then
/// is unverified (its events are shipped as such, as for a single hit).
async fn lookup_all(
    items: &[Prepared],
    state: &AppState,
    now: time::OffsetDateTime,
) -> HashMap<ProgramId, Lookup> {
    let mut ids: Vec<&ProgramId> = items.iter().map(|p| &p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut found = HashMap::with_capacity(ids.len());
    let mut waiting = ids.into_iter();
    let mut in_flight = FuturesUnordered::new();
    for id in waiting.by_ref().take(LOOKUPS_IN_FLIGHT) {
        in_flight.push(lookup_one(state, id, now));
    }
    let _ = tokio::time::timeout(state.limits.lookup_deadline, async {
        while let Some((id, lookup)) = in_flight.next().await {
            found.insert(id.clone(), lookup);
            if let Some(next) = waiting.next() {
                in_flight.push(lookup_one(state, next, now));
            }
        }
    })
    .await;
    found
}

async fn lookup_one<'a>(
    state: &AppState,
    id: &'a ProgramId,
    now: time::OffsetDateTime,
) -> (&'a ProgramId, Lookup) {
    (
        id,
        switched(state, state.cache.lookup(id.as_str(), now).await),
    )
}

/// Program lookups one batch keeps in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 32;

async fn post<B>(
    req: Request<B>,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = ClientInfo::from_request(req.headers(), peer, state).into_owned();
    let body = read_body(req, state).await?;
    let values = parse_values(&body, state.limits.max_batch_events)?;
    let (now, timestamp_ms) = now();
    let mut results = Vec::with_capacity(values.len());
    let mut prepared = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        match prepare(index, value, state) {
            Ok(p) => prepared.push(p),
            Err(rejected) => results.push(rejected),
        }
    }
    let lookups = lookup_all(&prepared, state, now).await;
    let mut outgoing = Vec::with_capacity(prepared.len());
    // The longest wait of the events refused for their customer's rate.
    let mut limited: Option<RateLimited> = None;
    for item in prepared {
        let index = item.index;
        let lookup = match lookups.get(&item.id) {
            Some(l) => l.clone(),
            None => {
                metrics::counter!(metric::REDIS_ERRORS, "op" => "timeout").increment(1);
                Lookup::Unverified
            }
        };
        state.meters.hit(outcome_of(&lookup));
        if let Err(e) = usable(&lookup) {
            results.push(ItemResult::rejected(index, &e));
            continue;
        }
        if let Err(wait) = admit(state, &lookup) {
            limited = limited.max(Some(wait));
            results.push(ItemResult::rejected(index, &ApiError::RateLimited(wait)));
            continue;
        }
        let item_client = ClientInfo {
            user_agent: Cow::Borrowed(&client.user_agent),
            referrer: match item.referrer {
                Some(r) => Cow::Owned(truncate(r)),
                None => Cow::Borrowed(&client.referrer),
            },
            client_ip: client.client_ip.clone(),
            opted_out: client.opted_out,
            user: client.user.clone(),
        };
        let status = if matches!(lookup, Lookup::Active(_)) {
            "accepted"
        } else {
            "unverified"
        };
        let parts = EventParts {
            id: &item.id,
            lookup: &lookup,
            event_type: item.event_type,
            timestamp_ms,
            source: "batch",
            params: item.params,
            destination_url: String::new(),
            conversion: None,
        };
        match build_event(parts, &item_client, state) {
            Err(too_large) => results.push(ItemResult::rejected(index, &too_large.into())),
            Ok(Some(ev)) => {
                results.push(ItemResult {
                    index,
                    status,
                    event_id: Some(ev.partition_key.clone()),
                    error: None,
                    reason: None,
                });
                outgoing.push(ev);
            }
            Ok(None) => {
                state.meters.dropped("privacy_opt_out", 1);
                results.push(ItemResult {
                    index,
                    status: "skipped",
                    event_id: None,
                    error: None,
                    reason: Some("client opted out of tracking".into()),
                });
            }
        }
    }
    results.sort_by_key(|r| r.index);
    let accepted = outgoing.len();
    // Nothing taken and some refused for the rate: the whole batch is
    // refused, to be sent again after the wait. Some taken: 200 with the
    // refused ones named (and the wait), so nothing is sent twice.
    if let Some(wait) = limited
        && accepted == 0
    {
        return Err(ApiError::RateLimited(wait));
    }
    if store(outgoing, state).await.is_err() {
        return Err(ApiError::Overloaded);
    }
    #[derive(Serialize)]
    struct Reply {
        accepted: usize,
        rejected: usize,
        results: Vec<ItemResult>,
    }
    let rejected = results.iter().filter(|r| r.status == "rejected").count();
    let body = serde_json::to_vec(&Reply {
        accepted,
        rejected,
        results,
    })
    .unwrap_or_default();
    let mut resp = json_response(StatusCode::OK, body);
    if let Some(wait) = limited {
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(wait.retry_after_secs()),
        );
    }
    client.set_cookie(&mut resp, state);
    Ok(resp)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_HEADER_COPY {
        let mut cut = MAX_HEADER_COPY;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_events() {
        assert_eq!(
            parse_values(br#"[{"programId":"a"},{"programId":"b"}]"#, 10)
                .expect("ok")
                .len(),
            2
        );
        assert_eq!(
            parse_values(b"{\"programId\":\"a\"}\n\n{\"programId\":\"b\"}\n", 10)
                .expect("ok")
                .len(),
            2
        );
        assert!(matches!(parse_values(b"[{", 10), Err(ApiError::BadBody(_))));
        assert!(
            matches!(parse_values(b"{}\nnope", 10), Err(ApiError::BadBody(r)) if r.contains("line 2"))
        );
        assert!(matches!(
            parse_values(b"[{},{},{}]", 2),
            Err(ApiError::TooManyEvents(2))
        ));
        // Counted while parsing: refused at the first event over the bound,
        // before what follows it is read.
        assert!(matches!(
            parse_values(b"[{},{},{},{\"never\" read", 2),
            Err(ApiError::TooManyEvents(2))
        ));
        assert!(matches!(
            parse_values(b"[{},{}] trailing", 2),
            Err(ApiError::BadBody(_))
        ));
        assert!(matches!(
            parse_values(b"{}\n{}\n{}", 2),
            Err(ApiError::TooManyEvents(2))
        ));
        assert!(matches!(parse_values(b"  ", 2), Err(ApiError::BadBody(_))));
        assert!(matches!(
            parse_values(&[0xff, 0xfe], 2),
            Err(ApiError::BadBody(_))
        ));
    }
}
