//! `GET|HEAD /v1/tag.js`: the publishers' tag, a small script served from
//! the tracker itself. Included with `<script async src=".../v1/tag.js"
//! data-program="ID"></script>`, it sends an `impression` for the page and
//! defines `window.adtrack.track(type, params)`; calls queued before it
//! loads with `(window.adtrackq = window.adtrackq || []).push([type,
//! params])` are sent once it does. Events go in batches with
//! `navigator.sendBeacon` (or `fetch` with `keepalive`) to `/v1/events`,
//! with the consent strings given as `data-gdpr`, `data-gdpr-consent`,
//! `data-gpp` and `data-gpp-sid`. Cacheable for an hour, with an `ETag`
//! naming its version and content (304 when the browser has it).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::api_error::{ApiError, Body};

/// The script, as served.
pub const TAG_JS: &str = include_str!("../../assets/tag.js");

/// The tag's version and a checksum of its text: a new tracker serving
/// another script answers a new `ETag`.
fn etag() -> &'static str {
    static ETAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ETAG.get_or_init(|| format!("\"tag-v1-{:08x}\"", crc32fast::hash(TAG_JS.as_bytes())))
}

pub fn handle<B>(req: &Request<B>) -> Result<Response<Body>, ApiError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(ApiError::MethodNotAllowed("GET, HEAD")),
    };
    let tag = etag();
    let fresh = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        // Weak comparison (RFC 9110): a cache in front may mark it `W/`.
        .is_some_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
        });
    let body = if head || fresh {
        Bytes::new()
    } else {
        Bytes::from_static(TAG_JS.as_bytes())
    };
    let mut resp = Response::new(Full::new(body));
    if fresh {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(ETAG, v);
    }
    if head {
        h.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(TAG_JS.len()),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_small_and_revalidates() {
        assert!(TAG_JS.len() < 3 * 1024, "{} bytes", TAG_JS.len());
        let get = |etag: Option<&str>| {
            let mut b = Request::builder().uri("/v1/tag.js");
            if let Some(t) = etag {
                b = b.header(IF_NONE_MATCH, t);
            }
            handle(&b.body(()).expect("request")).expect("answer")
        };
        let first = get(None);
        assert_eq!(first.status(), StatusCode::OK);
        let tag = first.headers()[ETAG].to_str().expect("etag").to_owned();
        assert_eq!(get(Some(&tag)).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            get(Some(&format!("\"x\", W/{tag}"))).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(get(Some("\"other\"")).status(), StatusCode::OK);
    }
}
