//! CORS for the batch endpoint: which browser origins may POST events.

use http::HeaderValue;

/// Allowed origins: none, any (`*`), or an exact list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsPolicy {
    None,
    Any,
    List(Vec<String>),
}

impl CorsPolicy {
    /// Parses `TRACKER_CORS_ORIGINS`: empty, `*`, or comma-separated origins
    /// such as `https://shop.example.com`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::None);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let mut list = Vec::new();
        for o in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let lower = o.to_ascii_lowercase();
            let ok = (lower.starts_with("https://") || lower.starts_with("http://"))
                && !lower
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .contains('/');
            if !ok {
                return Err(format!(
                    "{o:?} is not an origin like https://shop.example.com"
                ));
            }
            list.push(lower);
        }
        Ok(Self::List(list))
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if allowed.
    pub fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        match self {
            Self::None => None,
            Self::Any => Some(origin.clone()),
            Self::List(list) => {
                let o = origin.to_str().ok()?.to_ascii_lowercase();
                list.contains(&o).then(|| origin.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let p = CorsPolicy::parse("https://a.example, http://B.example:8080").expect("ok");
        let a = HeaderValue::from_static("https://a.example");
        assert_eq!(p.allow(Some(&a)), Some(a.clone()));
        assert!(
            p.allow(Some(&HeaderValue::from_static("http://b.example:8080")))
                .is_some()
        );
        assert!(
            p.allow(Some(&HeaderValue::from_static("https://evil.example")))
                .is_none()
        );
        assert!(p.allow(None).is_none());
        assert!(CorsPolicy::parse("a.example").is_err());
        assert!(CorsPolicy::parse("https://a.example/path").is_err());
        assert_eq!(CorsPolicy::parse("").expect("ok"), CorsPolicy::None);
        assert!(
            CorsPolicy::parse("*")
                .expect("ok")
                .allow(Some(&a))
                .is_some()
        );
    }
}
