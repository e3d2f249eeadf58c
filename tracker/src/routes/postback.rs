//! `GET /v1/postback/{programId}?click_id&txid&value&currency&ts&sig`: an
//! advertiser's server reports a conversion, signed with the program's
//! postback secret. `sig` is the lowercase hex HMAC-SHA256 of the raw query
//! as sent, up to and excluding `&sig=` (so `sig` comes last). A checked
//! postback ships one event of type `conversion` (source `postback`) and is
//! answered 200 with its event id; the consumer keeps one conversion per
//! program and `txid`, so a repeated postback is answered 200 again and
//! absorbed downstream.
//!
//! Refusals, in the order they are checked: 405 not GET; 400 malformed id or
//! query; 404 unknown or inactive program; 503 program not cached and Redis
//! not answering; 403 `postbacks_disabled` (no secret); 401
//! `missing_signature`, `bad_signature`; 400 `ts` missing or not a number;
//! 401 `expired_timestamp` (more than 300 s from the tracker's clock); 400
//! malformed `txid` (1-64 of `A-Za-z0-9._:-`), `click_id` (the same),
//! `value` (a decimal) or `currency` (three letters).

use std::net::SocketAddr;

use adtrack_proto::postback::{split_signature, verify};
use adtrack_proto::v1::EventType;
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::api_error::{ApiError, Body, json_response};
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::hit::Conversion;
use crate::ingest::{
    ClientInfo, EventParts, NotShipped, check_id, lookup, now, parse_query, ship, usable,
};

/// Largest distance between a postback's `ts` and the tracker's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostbackReply<'a> {
    event_id: &'a str,
    conversion_id: String,
}

/// 1-64 of `A-Za-z0-9._:-`: transaction and click ids.
fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A decimal: optional sign, up to 18 digits, optionally a point and up to
/// 6 more digits.
fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    (1..=18).contains(&int.len())
        && all_digits(int)
        && frac.is_none_or(|f| (1..=6).contains(&f.len()) && all_digits(f))
}

fn bad(reason: &'static str) -> ApiError {
    ApiError::BadParameter(reason)
}

fn refused(e: ApiError, state: &AppState) -> ApiError {
    state.meters.postback_refused(e.code());
    e
}

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
    let raw_query = req.uri().query().unwrap_or("");
    // The event is a conversion whatever `type` says.
    let (mut params, _) = parse_query(Some(raw_query), EventType::Conversion, state)?;
    let (now, timestamp_ms) = now();
    let lookup = lookup(state, &id, now).await;
    usable(&lookup)?;
    let Lookup::Active(program) = &lookup else {
        // Not cached and Redis did not answer: the secret is not known.
        return Err(ApiError::ProgramUnavailable);
    };
    let secret = program
        .postback_secret()
        .ok_or_else(|| refused(ApiError::PostbacksDisabled, state))?;
    let (signed, sig) =
        split_signature(raw_query).ok_or_else(|| refused(ApiError::MissingSignature, state))?;
    if !verify(secret, signed, sig) {
        return Err(refused(ApiError::BadSignature, state));
    }
    params.0.remove("sig");
    let ts = params
        .0
        .remove("ts")
        .ok_or_else(|| bad("`ts` is required"))?;
    let ts: i64 = ts
        .parse()
        .map_err(|_| bad("`ts` is not a Unix time in seconds"))?;
    if ts.abs_diff(timestamp_ms / 1000) > MAX_CLOCK_SKEW_SECS {
        return Err(refused(
            ApiError::ExpiredTimestamp(MAX_CLOCK_SKEW_SECS),
            state,
        ));
    }
    let txid = params
        .0
        .remove("txid")
        .ok_or_else(|| bad("`txid` is required"))?;
    if !is_id(&txid) {
        return Err(bad("`txid` must be 1-64 of A-Z a-z 0-9 . _ : -"));
    }
    let click_id = params.0.remove("click_id").unwrap_or_default();
    if !click_id.is_empty() && !is_id(&click_id) {
        return Err(bad("`click_id` must be 1-64 of A-Z a-z 0-9 . _ : -"));
    }
    let value = params.0.remove("value").unwrap_or_default();
    if !value.is_empty() && !is_decimal(&value) {
        return Err(bad("`value` must be a decimal (such as 12.50)"));
    }
    let currency = params.0.remove("currency").unwrap_or_default();
    let is_code = currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_alphabetic());
    if !currency.is_empty() && !is_code {
        return Err(bad("`currency` must be an ISO 4217 code (three letters)"));
    }
    let conversion = Conversion {
        click_id,
        transaction_id: txid,
        value,
        currency: currency.to_ascii_uppercase(),
        attribution_window_days: program.attribution_window_days(),
    };
    let conversion_id = format!("{}#{}", id.as_str(), conversion.transaction_id);
    params.0.remove("type");
    let mut client = ClientInfo::from_request(req.headers(), peer, state);
    // A server reports the conversion: a browser's DNT or GPC signal does
    // not apply to it, and the conversion must not be lost for one.
    client.opted_out = false;
    let parts = EventParts {
        id: &id,
        lookup: &lookup,
        event_type: EventType::Conversion,
        timestamp_ms,
        source: "postback",
        params,
        destination_url: String::new(),
        conversion: Some(conversion),
    };
    let event_id = match ship(parts, &client, state).await {
        Ok(id) => id,
        Err(NotShipped::TooLarge(n)) => return Err(ApiError::EventTooLarge(n)),
        Err(NotShipped::RateLimited(wait)) => return Err(ApiError::RateLimited(wait)),
        // The queue is full (an opt-out cannot happen here).
        Err(NotShipped::Queue(_) | NotShipped::OptedOut) => return Err(ApiError::Overloaded),
    };
    let body = serde_json::to_vec(&PostbackReply {
        event_id: event_id.to_str().unwrap_or_default(),
        conversion_id,
    });
    Ok(json_response(StatusCode::OK, body.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_amounts() {
        assert!(is_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"));
        assert!(is_id("order:2026.12_05-1"));
        assert!(!is_id("") && !is_id("a b") && !is_id(&"x".repeat(65)));
        for ok in ["0", "12", "12.5", "-3.25", "123456789012345678.123456"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            ".5",
            "1.",
            "1e3",
            "1,5",
            "12.1234567",
            "1234567890123456789",
        ] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }
}
