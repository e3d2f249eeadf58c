//! What a hit carries: strictly parsed query parameters, the client's
//! anonymised IP, and the `TrackingEvent` built from them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use adtrack_proto::event::EventRef;
use adtrack_proto::v1::{ConsentState, EventType, ValidationOutcome};
use http::HeaderMap;

use crate::consent::ConsentMode;
use crate::outgoing::Outgoing;
use crate::program_entry::ProgramEntry;

/// Most query parameters on one hit.
pub const MAX_PARAMS: usize = 32;
/// Longest parameter name, in bytes (decoded).
pub const MAX_PARAM_NAME: usize = 64;
/// Longest parameter value, in bytes (decoded).
pub const MAX_PARAM_VALUE: usize = 2048;
/// Longest header value copied into an event (user agent, referrer).
pub const MAX_HEADER_COPY: usize = 1024;

/// Why a query string was refused (answered 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("malformed percent-encoding in the query")]
    BadPercent,
    #[error("query is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("more than {MAX_PARAMS} query parameters")]
    TooMany,
    #[error("query parameter name longer than {MAX_PARAM_NAME} bytes")]
    NameTooLong,
    #[error("query parameter {0:?} is longer than {MAX_PARAM_VALUE} bytes")]
    ValueTooLong(String),
    #[error("query parameter {0:?} is given more than once")]
    Duplicate(String),
    #[error("empty query parameter name")]
    EmptyName,
    #[error("unknown event type {0:?} (impression, click, conversion, viewable, custom)")]
    BadType(String),
}

/// Query parameters, decoded and checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(pub BTreeMap<String, String>);

impl Params {
    /// Strict parse: valid percent-encoding, UTF-8, bounded, no duplicates.
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut map = BTreeMap::new();
        let Some(q) = query else {
            return Ok(Self(map));
        };
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            if map.len() == MAX_PARAMS {
                return Err(QueryError::TooMany);
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k)?;
            if k.is_empty() {
                return Err(QueryError::EmptyName);
            }
            if k.len() > MAX_PARAM_NAME {
                return Err(QueryError::NameTooLong);
            }
            let v = decode(v)?;
            if v.len() > MAX_PARAM_VALUE {
                return Err(QueryError::ValueTooLong(k));
            }
            if map.contains_key(&k) {
                return Err(QueryError::Duplicate(k));
            }
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    /// The event type from `type` (default: the route's own).
    pub fn event_type(&self, default: EventType) -> Result<EventType, QueryError> {
        match self.0.get("type") {
            None => Ok(default),
            Some(t) => EventType::from_param(t).ok_or_else(|| QueryError::BadType(t.clone())),
        }
    }
}

/// A name or value of the query: `+` is a space, `%XX` a byte, and the
/// result must be UTF-8. One allocation, and no decoding of text that has
/// no `%`.
fn decode(s: &str) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut escaped = false;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return Err(QueryError::BadPercent);
            }
            escaped = true;
            i += 3;
        } else {
            i += 1;
        }
    }
    if !escaped {
        return Ok(s.replace('+', " "));
    }
    let mut out = Vec::with_capacity(bytes.len());
    for (n, piece) in s.split('+').enumerate() {
        if n > 0 {
            out.push(b' ');
        }
        out.extend(percent_encoding::percent_decode_str(piece));
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// How the client's IP is found and kept.
#[derive(Debug, Clone, Copy)]
pub struct IpPolicy {
    pub trusted_proxy_hops: u8,
    pub keep_full_ip: bool,
}

impl IpPolicy {
    /// The client IP: the socket peer, or the `X-Forwarded-For` entry added by
    /// the outermost trusted proxy; anonymised unless configured otherwise.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> String {
        let ip = if self.trusted_proxy_hops == 0 {
            peer
        } else {
            forwarded_ip(headers, self.trusted_proxy_hops).unwrap_or(peer)
        };
        let ip = if self.keep_full_ip { ip } else { anonymise(ip) };
        ip.to_string()
    }
}

fn forwarded_ip(headers: &HeaderMap, hops: u8) -> Option<IpAddr> {
    // Each proxy appends the address it saw; with N trusted proxies the Nth
    // entry from the right was written by the outermost one.
    let mut entries: Vec<&str> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        entries.extend(value.to_str().ok()?.split(',').map(str::trim));
    }
    let idx = entries.len().checked_sub(hops as usize)?;
    entries.get(idx)?.parse().ok()
}

/// IPv4 keeps its /24, IPv6 its /48.
pub fn anonymise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return anonymise(IpAddr::V4(v4));
            }
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0])
        }
    }
}

/// A header value, bounded, lossily as UTF-8 (borrowed when it is UTF-8).
pub fn header_text(headers: &HeaderMap, name: http::header::HeaderName) -> Cow<'_, str> {
    match headers.get(name) {
        None => Cow::Borrowed(""),
        Some(v) => {
            let b = v.as_bytes();
            String::from_utf8_lossy(&b[..b.len().min(MAX_HEADER_COPY)])
        }
    }
}

/// A conversion as a signed postback reports it (checked), and the
/// program's attribution window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversion {
    pub click_id: String,
    pub transaction_id: String,
    pub value: String,
    pub currency: String,
    pub attribution_window_days: u32,
}

/// Everything an event is built from.
pub struct Hit<'a> {
    pub event_id: String,
    pub timestamp_ms: i64,
    pub program_id: &'a str,
    pub program: Option<&'a ProgramEntry>,
    pub outcome: ValidationOutcome,
    pub event_type: EventType,
    pub source: &'static str,
    pub user_agent: &'a str,
    pub referrer: &'a str,
    pub client_ip: &'a str,
    pub params: Params,
    pub destination_url: String,
    /// What a postback says about its conversion.
    pub conversion: Option<Conversion>,
    /// What the hit's consent strings say.
    pub consent: ConsentState,
    /// The first-party id (empty: none).
    pub user_id: &'a str,
    /// Set by [`Privacy::apply`].
    pub privacy_restricted: bool,
    /// Set from the user agent when the event is built (kept under `Strip`).
    pub is_bot: bool,
}

/// What the tracker does when a client sends `DNT: 1` or `Sec-GPC: 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivacyMode {
    /// Ship the event without identifiers.
    Strip,
    /// Ship nothing (counted as dropped, cause `privacy_opt_out`).
    Skip,
    /// Ship it as usual.
    Ignore,
}

/// The privacy policy.
#[derive(Debug, Clone)]
pub struct Privacy {
    pub mode: PrivacyMode,
    /// Parameters that identify a person, removed under `Strip`.
    pub identifier_params: Vec<String>,
    /// What the hit's consent strings do (`TRACKER_CONSENT`).
    pub consent: ConsentMode,
}

impl Privacy {
    pub fn new(mode: &str, identifier_params: &str, consent: ConsentMode) -> Self {
        let mode = match mode {
            "skip" => PrivacyMode::Skip,
            "ignore" => PrivacyMode::Ignore,
            _ => PrivacyMode::Strip,
        };
        Self {
            mode,
            identifier_params: identifier_params
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            consent,
        }
    }

    /// True when the request carries `DNT: 1` or `Sec-GPC: 1`.
    pub fn signal(headers: &HeaderMap) -> bool {
        let on = |name: &str| headers.get(name).is_some_and(|v| v.as_bytes() == b"1");
        on("dnt") || on("sec-gpc")
    }

    /// Applies the policy to a hit from a client that did (or did not) opt out.
    pub fn apply<'a>(&self, mut hit: Hit<'a>, opted_out: bool) -> Option<Hit<'a>> {
        let signalled = opted_out && self.mode != PrivacyMode::Ignore;
        if signalled && self.mode == PrivacyMode::Skip {
            return None;
        }
        // Identifiers go on a DNT or GPC signal under `strip`, and without
        // storage and measurement consent where the GDPR applies under
        // `TRACKER_CONSENT=enforce`.
        if signalled || !self.consent.keeps_identifiers(hit.consent) {
            hit.privacy_restricted = true;
            hit.client_ip = "";
            hit.is_bot = crate::bots::is_bot(hit.user_agent);
            hit.user_agent = "";
            for p in &self.identifier_params {
                hit.params.0.remove(p);
            }
        }
        Some(hit)
    }
}

/// Parameters that become fields of their own, not extras.
const NOT_EXTRA: [&str; 2] = ["page", "type"];

impl Hit<'_> {
    /// The event, encoded once, straight from the hit and the cached
    /// program, ready to ship.
    pub fn into_outgoing(self) -> Outgoing {
        let is_bot =
            self.is_bot || (!self.privacy_restricted && crate::bots::is_bot(self.user_agent));
        let page_url = self.params.0.get("page").map_or("", String::as_str);
        let mut ev = EventRef {
            programid: self.program_id,
            is_valid: self.outcome == ValidationOutcome::Valid,
            message_id: &self.event_id,
            event_type: self.event_type,
            timestamp_ms: self.timestamp_ms,
            user_agent: self.user_agent,
            client_ip: self.client_ip,
            referrer: self.referrer,
            page_url,
            extra: Some(&self.params.0),
            skip: &NOT_EXTRA,
            validation: self.outcome,
            source: self.source,
            privacy_restricted: self.privacy_restricted,
            is_bot,
            destination_url: &self.destination_url,
            consent: self.consent,
            user_id: self.user_id,
            ..EventRef::default()
        };
        if let Some(c) = &self.conversion {
            ev.click_id = &c.click_id;
            ev.transaction_id = &c.transaction_id;
            ev.conversion_value = &c.value;
            ev.currency = &c.currency;
            ev.attribution_window_days = c.attribution_window_days;
        }
        if let Some(p) = self.program {
            ev.checksum = p.checksum();
            ev.customer_id = p.customer_id();
            ev.program_name = p.program_name();
            ev.customer_name = p.customer_name();
            ev.program_version = p.version();
        }
        let data = ev.to_bytes();
        Outgoing {
            partition_key: self.event_id,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_query_parses_or_is_refused_without_panic(q in "\\PC{0,300}") {
            if let Ok(p) = Params::parse(Some(&q)) {
                proptest::prop_assert!(p.0.len() <= MAX_PARAMS);
            }
        }
    }

    #[test]
    fn the_encoded_event_is_the_event() {
        use adtrack_proto::v1::TrackingEvent;
        use prost::Message;
        let program = adtrack_proto::program::Program::from_json(&serde_json::json!({
            "programId": "p1", "programName": "Summer", "checksum": "c9",
            "customerId": 77, "customerName": "Acme", "version": 5
        }))
        .expect("program");
        let mut params = Params::parse(Some(
            "page=https%3A%2F%2Fa.example%2F&type=click&campaign=x&z=1",
        ))
        .expect("params");
        params.0.insert("empty".into(), String::new());
        let hit = Hit {
            event_id: "0190-id".into(),
            timestamp_ms: 1_700_000_000_123,
            program_id: "p1",
            program: Some(&ProgramEntry::new(&program)),
            outcome: ValidationOutcome::Valid,
            event_type: EventType::Click,
            source: "pixel",
            user_agent: "Mozilla/5.0 (compatible; Googlebot/2.1)",
            referrer: "https://ref.example/",
            client_ip: "203.0.113.0",
            params,
            destination_url: "https://shop.example/".into(),
            conversion: None,
            consent: ConsentState::Unspecified,
            user_id: "",
            privacy_restricted: false,
            is_bot: false,
        };
        let out = hit.into_outgoing();
        assert_eq!(out.partition_key, "0190-id");
        let decoded = TrackingEvent::decode(&out.data[..]).expect("decodes");
        let expected = TrackingEvent {
            programid: "p1".into(),
            checksum: "c9".into(),
            customer_id: 77,
            user_agent: "Mozilla/5.0 (compatible; Googlebot/2.1)".into(),
            program_name: "Summer".into(),
            customer_name: "Acme".into(),
            is_valid: true,
            message_id: "0190-id".into(),
            event_type: EventType::Click as i32,
            timestamp_ms: 1_700_000_000_123,
            client_ip: "203.0.113.0".into(),
            referrer: "https://ref.example/".into(),
            page_url: "https://a.example/".into(),
            // `page` and `type` have fields of their own.
            extra: [("campaign", "x"), ("z", "1"), ("empty", "")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            validation: ValidationOutcome::Valid as i32,
            source: "pixel".into(),
            program_version: 5,
            privacy_restricted: false,
            is_bot: true,
            destination_url: "https://shop.example/".into(),
            ..TrackingEvent::default()
        };
        assert_eq!(decoded, expected);
    }

    #[test]
    fn strict_query_parsing() {
        let p =
            Params::parse(Some("type=click&page=https%3A%2F%2Fa.example%2Fx&q=a+b")).expect("ok");
        assert_eq!(p.0["page"], "https://a.example/x");
        assert_eq!(p.0["q"], "a b");
        assert_eq!(p.event_type(EventType::Impression), Ok(EventType::Click));
        assert_eq!(Params::parse(Some("a=%zz")), Err(QueryError::BadPercent));
        assert_eq!(Params::parse(Some("a=%4")), Err(QueryError::BadPercent));
        assert_eq!(Params::parse(Some("a=%ff")), Err(QueryError::NotUtf8));
        assert_eq!(
            Params::parse(Some("a=1&a=2")),
            Err(QueryError::Duplicate("a".into()))
        );
        let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            Params::parse(Some(&many.join("&"))),
            Err(QueryError::TooMany)
        );
        assert!(matches!(
            Params::parse(Some("type=bogus"))
                .expect("ok")
                .event_type(EventType::Impression),
            Err(QueryError::BadType(_))
        ));
    }

    #[test]
    fn ips_are_anonymised_and_forwarded_only_through_trusted_hops() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().expect("hv"),
        );
        let peer: IpAddr = "10.0.0.5".parse().expect("ip");
        let direct = IpPolicy {
            trusted_proxy_hops: 0,
            keep_full_ip: false,
        };
        assert_eq!(direct.client_ip(peer, &h), "10.0.0.0");
        let alb = IpPolicy {
            trusted_proxy_hops: 1,
            keep_full_ip: false,
        };
        assert_eq!(alb.client_ip(peer, &h), "198.51.100.0");
        let two = IpPolicy {
            trusted_proxy_hops: 2,
            keep_full_ip: true,
        };
        assert_eq!(two.client_ip(peer, &h), "203.0.113.9");
        let v6: IpAddr = "2001:db8:1234:5678::1".parse().expect("ip");
        assert_eq!(anonymise(v6).to_string(), "2001:db8:1234::");
    }
}
