//! `GET /v1/click/{programId}?url=...`: 302 to `url` only when its host is
//! allowed by the program; never an open redirect. The destination gets the
//! click's event id as one more query parameter (`adtrack_click_id`, or the
//! program's `clickIdParam`), its own query and fragment kept, so the
//! advertiser can hand it back in the conversion's postback.

use std::net::SocketAddr;

use adtrack_proto::v1::EventType;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::EVENT_ID_HEADER;
use crate::api_error::{ApiError, Body};
use crate::app_state::AppState;
use crate::cache::Lookup;
use crate::ingest::{
    ClientInfo, EventParts, NotShipped, check_id, lookup, now, parse_query, ship, usable,
};
use crate::metric;

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
    usable(&lookup)?;
    if let Lookup::Active(p) = &lookup
        && !p.allows_redirect_to(&host)
    {
        metrics::counter!(metric::REDIRECTS_REFUSED).increment(1);
        return Err(ApiError::RedirectNotAllowed(host));
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
        conversion: None,
    };
    let shipped = ship(parts, &client, state).await;
    if let Err(NotShipped::TooLarge(n)) = shipped {
        return Err(ApiError::EventTooLarge(n));
    }
    if matches!(lookup, Lookup::Unverified) {
        // The allow-list cannot be checked: the click is kept, the redirect is not made.
        return Err(ApiError::ProgramUnavailable);
    }
    if let Err(NotShipped::Queue(_)) = shipped {
        return Err(ApiError::Overloaded);
    }
    // Over the customer's rate limit the visitor still gets to the page;
    // the click is dropped and counted.
    if let Err(NotShipped::RateLimited(_)) = shipped {
        state.meters.dropped("rate_limited", 1);
    }
    let mut destination = url;
    if let (Ok(event_id), Lookup::Active(p)) = (&shipped, &lookup)
        && let Ok(id) = event_id.to_str()
    {
        destination = with_click_id(destination, p.click_id_param(), id);
    }
    let location =
        HeaderValue::from_str(destination.as_str()).map_err(|_| ApiError::BadRedirectUrl)?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(LOCATION, location);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(event_id) = shipped {
        resp.headers_mut().insert(EVENT_ID_HEADER, event_id);
    }
    client.set_cookie(&mut resp, state);
    Ok(resp)
}

/// The destination with the click id as its parameter `param`: any pair
/// the destination already had under that name (a stale or forged id) is
/// dropped, the rest of its query kept byte for byte, its fragment kept.
fn with_click_id(mut url: url::Url, param: &str, id: &str) -> url::Url {
    if let Some(query) = url.query() {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                url::form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .is_none_or(|(name, _)| name != param)
            })
            .collect();
        let kept = kept.join("&");
        url.set_query((!kept.is_empty()).then_some(kept.as_str()));
    }
    url.query_pairs_mut().append_pair(param, id);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_click_id_replaces_one_already_there() {
        let add = |dest: &str| {
            with_click_id(
                url::Url::parse(dest).expect("url"),
                "adtrack_click_id",
                "C1",
            )
            .to_string()
        };
        assert_eq!(
            add("https://s.example/p?a=1&b=%20x#top"),
            "https://s.example/p?a=1&b=%20x&adtrack_click_id=C1#top"
        );
        assert_eq!(
            add("https://s.example/p?adtrack_click_id=forged&a=1&adtrack%5Fclick%5Fid=2"),
            "https://s.example/p?a=1&adtrack_click_id=C1"
        );
        assert_eq!(
            add("https://s.example/p?adtrack_click_id=x"),
            "https://s.example/p?adtrack_click_id=C1"
        );
        assert_eq!(
            add("https://s.example/"),
            "https://s.example/?adtrack_click_id=C1"
        );
    }
}
