//! The first-party id (opt-in, `TRACKER_USER_COOKIE`): the tracker reads
//! the browser's `adtrack_uid` cookie and, when it has none, makes a random
//! one and sets it (`Secure`, `HttpOnly`, `SameSite=None`, the configured
//! domain and lifetime), so frequency and attribution can join a browser's
//! events. Never where the person said no: no id is read, made or set on a
//! hit with `DNT: 1` or `Sec-GPC: 1` (unless `TRACKER_PRIVACY_SIGNALS=ignore`),
//! or whose consent strings deny storage or measurement.

use std::sync::OnceLock;

use http::HeaderValue;
use http::header::COOKIE;

/// The cookie's name.
pub const COOKIE_NAME: &str = "adtrack_uid";

/// How the cookie is set.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    /// `Domain=` (empty: the tracker's host only).
    pub domain: String,
    pub max_age_secs: u64,
}

impl CookiePolicy {
    fn header(&self, id: &str) -> Option<HeaderValue> {
        let domain = if self.domain.is_empty() {
            String::new()
        } else {
            format!("; Domain={}", self.domain)
        };
        HeaderValue::from_str(&format!(
            "{COOKIE_NAME}={id}; Max-Age={}; Path=/; Secure; HttpOnly; SameSite=None{domain}",
            self.max_age_secs
        ))
        .ok()
    }
}

/// One request's first-party id: the browser's, or one made for it the
/// first time an event may carry it.
#[derive(Debug, Default)]
pub struct UserId {
    existing: Option<String>,
    made: OnceLock<String>,
}

/// Ids the tracker makes: 32 lowercase hex digits.
fn is_ours(v: &str) -> bool {
    v.len() == 32
        && v.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl UserId {
    /// The id the request's cookies carry (one the tracker could have made;
    /// anything else is ignored and replaced).
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let existing = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, value)| *name == COOKIE_NAME && is_ours(value))
            .map(|(_, value)| value.to_owned());
        Self {
            existing,
            made: OnceLock::new(),
        }
    }

    /// The id for an event: the browser's, or a new one.
    pub fn get(&self) -> &str {
        match &self.existing {
            Some(id) => id,
            None => self
                .made
                .get_or_init(|| uuid::Uuid::new_v4().simple().to_string()),
        }
    }

    /// The `Set-Cookie` value when an id was made for this request.
    pub fn set_cookie(&self, policy: &CookiePolicy) -> Option<HeaderValue> {
        self.made.get().and_then(|id| policy.header(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keeps_or_makes_the_id() {
        let policy = CookiePolicy {
            domain: "example.com".into(),
            max_age_secs: 60,
        };
        let mut h = http::HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("a=1; adtrack_uid=0123456789abcdef0123456789abcdef; b=2"),
        );
        let known = UserId::from_headers(&h);
        assert_eq!(known.get(), "0123456789abcdef0123456789abcdef");
        assert!(known.set_cookie(&policy).is_none(), "nothing new to set");
        h.insert(
            COOKIE,
            HeaderValue::from_static("adtrack_uid=forged<script>"),
        );
        let fresh = UserId::from_headers(&h);
        assert!(
            fresh.set_cookie(&policy).is_none(),
            "none made until an event wants one"
        );
        let id = fresh.get().to_owned();
        assert!(is_ours(&id), "{id}");
        assert_eq!(fresh.get(), id, "made once");
        let set = fresh.set_cookie(&policy).expect("set");
        assert_eq!(
            set.to_str().expect("text"),
            format!(
                "adtrack_uid={id}; Max-Age=60; Path=/; Secure; HttpOnly; SameSite=None; Domain=example.com"
            )
        );
    }
}
